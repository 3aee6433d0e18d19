"""The communication ledger against SPEC.md's closed form, and the latency model's scaling.

Sizes are worked out by hand from the tiny model of test_round.py (8x8x1 input):
lower = conv3x3(1->3) + stride-2 subsampling, so s is 4x4x3 = 48 floats a sample and
the lower has 3*3*1*3 + 3 = 30 parameters; decoder conv3x3(3->4) + conv3x3(4->1) has
112 + 37 = 149; the aux head (pool + dense 3->5) has 20.
"""
import jax
import jax.numpy as jnp
import pytest

import lfmjax
from lfmjax import accounting
from test_round import B, C, MODEL, algorithm_cfg, init, make_data

FLOAT = 4
SMASHED = B * 48 * FLOAT            # B * S(L)
LABELS = B * 4                      # int32 labels
LOWER, DECODER, AUX = 30 * FLOAT, 149 * FLOAT, 20 * FLOAT

# Per client: (up per iteration, down per iteration, |w_c| at each FedAvg). make_data's
# clients hold 12, 8 and 16 samples: vanilla SL's turns of one local epoch are 3, 2 and 4
# batches of B = 4, and each hands the lower on once.
SL_BATCHES = (3 + 2 + 4) / 3
EXPECTED = {
    "sl": (SL_BATCHES * (SMASHED + LABELS) + LOWER, SL_BATCHES * SMASHED + LOWER, 0),
    "psl": (SMASHED + LABELS, SMASHED, 0),
    "sfl_v1": (SMASHED + LABELS, SMASHED, LOWER),
    "sfl_v2": (SMASHED + LABELS, SMASHED, LOWER),
    "locsplitfed": (SMASHED + LABELS, 0, LOWER + AUX),
    "locfedmix": (SMASHED + LABELS, SMASHED, LOWER + DECODER),
    "sglr": (SMASHED + LABELS, SMASHED, 0),
    "mix2sfl": (SMASHED + LABELS, SMASHED, LOWER),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_ledger_equals_closed_form(name):
  cfg = algorithm_cfg(name, fedavg_every=3)
  ledger = accounting.make_ledger(cfg, MODEL, init(cfg), make_data())
  up, down, sync = EXPECTED[name]
  assert (ledger.up_per_iteration, ledger.down_per_iteration, ledger.sync_bytes) == (
      up, down, sync)
  steps = 10
  syncs = steps // 3 if sync else 0
  totals = ledger.totals(steps)
  assert totals["bytes_up"] == C * (steps * up + syncs * sync)
  assert totals["bytes_down"] == C * (steps * down + syncs * sync)


@pytest.mark.parametrize("turn", [1, 5])
def test_sl_counts_every_batch_of_a_turn_and_one_handoff(turn):
  cfg = algorithm_cfg("sl", sl_turn_steps=turn)
  ledger = accounting.make_ledger(cfg, MODEL, init(cfg), make_data())
  assert ledger.up_per_iteration == turn * (SMASHED + LABELS) + LOWER
  assert ledger.down_per_iteration == turn * SMASHED + LOWER
  assert ledger.totals(7)["bytes_up"] == C * 7 * (turn * (SMASHED + LABELS) + LOWER)


def test_sl_latency_adds_every_batch_and_handoff():
  """A turn of n batches costs n (client + batch transfers + server step), and each
  hand-on its transfer, from the same per-step FLOPs whatever the turn."""
  rates = accounting.Rates(client_flops_per_s=1e6, server_flops_per_s=1e9,
                           uplink_bytes_per_s=1e5, downlink_bytes_per_s=2e5)
  data = make_data(sizes=(8,) * C)
  lat = {}
  for turn in (1, 4):
    cfg = algorithm_cfg("sl", sl_turn_steps=turn)
    state = init(cfg)
    ledger = accounting.make_ledger(cfg, MODEL, state, data)
    lat[turn] = accounting.make_latency(cfg, MODEL, state, data, ledger, rates)
  per_batch = (lat[1].client_flops / 1e6 + (SMASHED + LABELS) / 1e5 + SMASHED / 2e5
               + lat[1].server_flops / C / 1e9)
  handoff = LOWER / 1e5 + LOWER / 2e5
  for turn in (1, 4):
    assert lat[turn].client_flops == lat[1].client_flops
    assert lat[turn].iteration_s == pytest.approx(C * (turn * per_batch + handoff))


def latency_per_iteration(name, num_clients):
  cfg = algorithm_cfg(name, num_clients=num_clients)
  data = make_data(sizes=(8,) * num_clients)
  state = lfmjax.init_state(cfg, MODEL, jax.random.PRNGKey(0), jnp.zeros((B, 8, 8, 1)))
  ledger = accounting.make_ledger(cfg, MODEL, state, data)
  rates = accounting.Rates(client_flops_per_s=1e6, server_flops_per_s=1e9,
                           uplink_bytes_per_s=1e5, downlink_bytes_per_s=1e5)
  return accounting.make_latency(cfg, MODEL, state, data, ledger, rates)


def test_sequential_latency_grows_linearly_parallel_does_not():
  sl = [latency_per_iteration("sl", c).iteration_s for c in (2, 4)]
  psl = [latency_per_iteration("psl", c).iteration_s for c in (2, 4)]
  assert sl[1] / sl[0] == pytest.approx(2.0, rel=0.05)
  assert psl[1] / psl[0] < 1.1


def test_flops_come_from_the_compiled_functions():
  lat = latency_per_iteration("psl", 2)
  # conv3x3(1->3) forward on 8x8 at batch B is 2*9*3*64*B multiply-adds; the client's
  # forward + backward is a few times that, never zero, never orders of magnitude more.
  conv_fwd = 2 * 9 * 3 * 64 * B
  assert 2 * conv_fwd <= lat.client_flops <= 20 * conv_fwd
  assert lat.server_flops > 0
