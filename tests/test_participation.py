"""Clients that come and go (`lfmjax.participation`), heterogeneous devices
(`lfmjax.devices`) and their ledger (`accounting.ParticipationAccounts`).

The K < C rounds are checked against test_round's plain per-client loop run on the
participants alone; the participants, dropouts and deadlines are drawn here from the
documented streams (fold_in(fold_in(key, 6), step) and fold_in(fold_in(fold_in(key, 7),
step), client id)), not with lfmjax's functions.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lfmjax
from lfmjax import accounting, devices, participation
from lfmjax.algorithms import SpecError
from lfmjax.round import make_all_clients_round
from test_cli import ROOT, synthetic_fmnist, tiny_config  # noqa: F401 (a fixture)
from test_round import B, MODEL, algorithm_cfg, reference_step

SIZES = (8, 6, 10, 7, 9)  # five clients; test_round's loop runs three of them
ALL, K = len(SIZES), 3


def five_client_data(seconds=None):
  rng = np.random.default_rng(0)
  n = sum(SIZES)
  train_x = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
  train_y = rng.integers(0, 5, n).astype(np.int32)
  parts = np.split(rng.permutation(n), np.cumsum(SIZES)[:-1])
  idx, sizes = lfmjax.data.client_table(parts)
  return lfmjax.make_data(train_x, train_y, idx, sizes, seconds_C=seconds)


def differing_state(cfg, seed=0):
  """A C-row state whose clients' rows differ (as after training without FedAvg)."""
  state = lfmjax.init_state(cfg, MODEL, jax.random.PRNGKey(seed), jnp.zeros((B, 8, 8, 1)))
  rows = jax.tree.leaves(state.clients.params)[0].shape[0]
  noise = lambda a: a + 0.01 * jnp.arange(rows, dtype=a.dtype).reshape(
      (rows,) + (1,) * (a.ndim - 1)) * jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape)
  return state.replace(clients=state.clients.replace(
      params=jax.tree.map(noise, state.clients.params)))


def plain_participants(key, step):
  """The first K of the step's permutation, ascending."""
  k = jax.random.fold_in(jax.random.fold_in(key, 6), step)
  return np.sort(np.asarray(jax.random.permutation(k, ALL))[:K])


def plain_present(key, step, ids, p):
  k = jax.random.fold_in(jax.random.fold_in(key, 7), step)
  return np.array([float(jax.random.uniform(jax.random.fold_in(k, int(i)))) >= p
                   for i in ids])


def sub_problem(state, data, ids, latest_lower=None, server_rows=False):
  """The participants' rows and data, weights |D_k| over theirs, their ids."""
  clients = state.clients
  if jax.tree.leaves(clients.params)[0].shape[0] == ALL:  # not the averaged phase's copy
    clients = row_take(clients, ids)
  if latest_lower is not None:  # vanilla SL starts from the newest lower
    clients = clients.replace(params={**clients.params, "lower": jax.tree.map(
        lambda a, b: a.at[-1].set(b), clients.params["lower"], latest_lower)})
  server = row_take(state.server, ids) if server_rows else state.server
  sizes = np.asarray(data.sizes_C)[ids].astype(np.float32)
  sub_data = lfmjax.RoundData(data.train_x, data.train_y, data.idx_CxM[ids],
                              data.sizes_C[ids], jnp.asarray(sizes / sizes.sum()),
                              ids_C=jnp.asarray(ids, jnp.int32))
  return state.replace(clients=clients, server=server), sub_data


def engine_params(state):
  """The C clients' segments (one row each) and the upper."""
  clients = lfmjax.state.per_client(state.clients, ALL)
  return {"upper": state.server.params, **clients.params}


def row(tree, k):
  return jax.tree.map(lambda a: a[k], tree)


# With SGD and FedAvg every iteration the clients hold one copy (the averaged phase);
# `_per_client` keeps a row per client, so FedAvg's average is broadcast to all C rows.
SAMPLED = {**{name: {} for name in lfmjax.ALGORITHMS},
           "locfedmix_per_client": dict(base="locfedmix", averaged_clients=False)}


@pytest.mark.parametrize("variant", list(SAMPLED))
def test_sampled_iteration_equals_plain_loop_over_participants(variant):
  fields = dict(SAMPLED[variant])
  name = fields.pop("base", variant)
  cfg = algorithm_cfg(name, num_clients=ALL, clients_per_round=K, local_loss_weight=0.7,
                      **fields)
  data = five_client_data()
  state = differing_state(cfg)
  if name == "sfl_v1":  # per-client server copies that differ too
    state = state.replace(server=state.server.replace(params=jax.tree.map(
        lambda a: a * (1 + 0.01 * jnp.arange(ALL, dtype=a.dtype).reshape(
            (ALL,) + (1,) * (a.ndim - 1))), state.server.params)))
  round_step = lfmjax.make_round_step(cfg, MODEL)
  # Two iterations where rows carry over (SL's handed-on lower, SFL-V1's server copies,
  # PSL's own lowers); one elsewhere.
  for _ in range(2 if name in ("sl", "sfl_v1", "psl") else 1):
    ids = plain_participants(state.key, int(state.step))
    relay = name == "sl"
    latest = row(state.clients.params["lower"], ALL - 1) if relay else None
    sub_state, sub_data = sub_problem(state, data, ids, latest, name == "sfl_v1")
    expected, ref_metrics = reference_step(cfg.participants_config(),
                                           jax.tree.map(jnp.array, sub_state), sub_data)
    before = jax.tree.map(np.array, state)
    state, metrics = round_step(state, data)
    got = engine_params(state)
    others = [k for k in range(ALL) if k not in ids]
    for name_, tree in got.items():
      if name_ == "upper":
        if name == "sfl_v1":
          chex.assert_trees_all_close(row_take(tree, ids), expected["upper"], atol=1e-5)
          # FedAvg every iteration: the average reaches every server copy
          for k in others:
            chex.assert_trees_all_close(row(tree, k), row(expected["upper"], 0), atol=1e-5)
        else:
          chex.assert_trees_all_close(tree, expected["upper"], atol=1e-5, rtol=1e-5)
        continue
      mine = row_take(tree, ids)
      if relay:  # the handed-on lower is kept in the last row as well
        chex.assert_trees_all_close(row(tree, ALL - 1), row(expected[name_], K - 1),
                                    atol=1e-5) if name_ == "lower" else None
        if ALL - 1 not in ids or name_ != "lower":
          chex.assert_trees_all_close(mine, expected[name_], atol=1e-5, rtol=1e-5)
        continue
      chex.assert_trees_all_close(mine, expected[name_], atol=1e-5, rtol=1e-5)
      for k in others:  # FedAvg's average for all, else unchanged
        want = (row(expected[name_], 0) if cfg.fedavg
                else row(engine_params(before)[name_], k))
        chex.assert_trees_all_close(row(tree, k), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_real"], ref_metrics["loss_real"], rtol=1e-5)
    assert float(metrics["participants"]) == K and float(metrics["dropped"]) == 0


def row_take(tree, ids):
  return jax.tree.map(lambda a: a[np.asarray(ids)], tree)


@pytest.mark.parametrize("name", ["psl", "sfl_v1", "locsplitfed", "sl"])
def test_dropped_participants_are_left_out_and_keep_their_state(name, monkeypatch):
  """With dropouts the round equals the plain loop over the present participants, and a
  dropped one's rows come back unchanged (FedAvg's average aside)."""
  p = 0.45
  cfg = algorithm_cfg(name, num_clients=ALL, clients_per_round=K, dropout_prob=p)
  data = five_client_data()
  state = differing_state(cfg)
  step = next(t for t in range(50)
              if 0 < plain_present(state.key, t, plain_participants(state.key, t), p).sum() < K)
  state = state.replace(step=jnp.int32(step))
  ids = plain_participants(state.key, step)
  present = plain_present(state.key, step, ids, p)
  kept = ids[present]
  latest = row(state.clients.params["lower"], ALL - 1) if name == "sl" else None
  sub_state, sub_data = sub_problem(state, data, kept, latest, name == "sfl_v1")
  plain_cfg = dataclasses.replace(cfg.participants_config(), num_clients=len(kept),
                                  dropout_prob=0.0)
  import test_round
  monkeypatch.setattr(test_round, "C", len(kept))  # the loop over the present alone
  expected, ref_metrics = reference_step(plain_cfg, jax.tree.map(jnp.array, sub_state),
                                         sub_data)
  before = engine_params(jax.tree.map(np.array, state))
  state, metrics = lfmjax.make_round_step(cfg, MODEL)(state, data)
  got = engine_params(state)
  assert float(metrics["dropped"]) == K - len(kept)
  np.testing.assert_allclose(metrics["loss_real"], ref_metrics["loss_real"], rtol=1e-5)
  if name == "sl":
    chex.assert_trees_all_close(row(got["lower"], ALL - 1), row(expected["lower"], -1),
                                atol=1e-5)
    chex.assert_trees_all_close(got["upper"], expected["upper"], atol=1e-5)
    return
  if name != "sfl_v1":
    chex.assert_trees_all_close(got["upper"], expected["upper"], atol=1e-5, rtol=1e-5)
  for j, k in enumerate(kept):
    chex.assert_trees_all_close(row(got["lower"], k), row(expected["lower"], j), atol=1e-5)
  for k in ids[~present]:
    want = (row(expected["lower"], 0) if cfg.fedavg else row(before["lower"], k))
    chex.assert_trees_all_close(row(got["lower"], k), want, atol=1e-5)


def test_deadline_drops_the_slow_and_no_upload_changes_nothing():
  seconds = np.array([1.0, 5.0, 1.0, 5.0, 1.0], np.float32)
  cfg = algorithm_cfg("psl", num_clients=ALL, clients_per_round=K, deadline_s=2.0)
  data = five_client_data(seconds)
  state = differing_state(cfg)
  round_step = lfmjax.make_round_step(cfg, MODEL)
  for _ in range(3):
    ids = plain_participants(state.key, int(state.step))
    slow = ids[seconds[ids] > 2.0]
    before = jax.tree.map(np.array, state)
    state, metrics = round_step(state, data)
    assert float(metrics["dropped"]) == len(slow)
    for k in slow:
      chex.assert_trees_all_equal(row(state.clients, k), row(before.clients, k))
  # Every participant late: nothing happens but the step.
  cfg = dataclasses.replace(cfg, deadline_s=0.5)
  state = differing_state(cfg)
  old = jax.tree.map(np.array, state)  # the round donates its input
  new, metrics = lfmjax.make_round_step(cfg, MODEL)(state, data)
  chex.assert_trees_all_equal(jax.device_get(new.replace(step=old.step)), old)
  assert int(new.step) == 1 and float(metrics["participants"]) == 0


@pytest.mark.parametrize("name", ["psl", "sfl_v1", "sl"])
def test_all_participants_equal_the_plain_round_bit_for_bit(name):
  """K = C through the gather and scatter (participants 0..C-1) is today's round, to the
  last bit; `clients_per_round = C` builds today's round itself."""
  cfg = algorithm_cfg(name, num_clients=4, local_loss_weight=0.7)
  assert not dataclasses.replace(cfg, clients_per_round=4).samples_clients
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
  y = rng.integers(0, 5, 40).astype(np.int32)
  idx, sizes = lfmjax.data.client_table(np.split(rng.permutation(40), 4))
  data = lfmjax.make_data(x, y, idx, sizes)  # equal sizes: weights |D_k| / sum exactly
  wrapped = jax.jit(participation.make_participation_round(
      dataclasses.replace(cfg, clients_per_round=4), make_all_clients_round(cfg, MODEL)))
  plain = jax.jit(make_all_clients_round(cfg, MODEL))
  a = b = differing_state(cfg)
  for _ in range(2):
    a, ma = wrapped(a, data)
    b, mb = plain(b, data)
  chex.assert_trees_all_equal(a, b)
  np.testing.assert_array_equal(ma["loss_real"], mb["loss_real"])


def test_by_size_sampling_follows_the_data_and_uniform_does_not():
  weights = jnp.asarray(np.array([0.1, 0.2, 0.3, 0.4], np.float32))
  key = jax.random.PRNGKey(3)
  def counts(sampling, k):
    cfg = algorithm_cfg("psl", num_clients=4, clients_per_round=k,
                        participant_sampling=sampling)
    draw = jax.jit(jax.vmap(lambda t: participation.draw_participants(cfg, key, t, weights)))
    ids = np.asarray(draw(jnp.arange(4000)))
    assert (np.diff(ids, axis=1) > 0).all()  # ascending, without replacement
    return np.bincount(ids.ravel(), minlength=4) / 4000
  np.testing.assert_allclose(counts("by_size", 1), weights, atol=0.025)
  np.testing.assert_allclose(counts("uniform", 1), 0.25, atol=0.025)
  np.testing.assert_allclose(counts("uniform", 2), 0.5, atol=0.03)


def test_bad_participation_fields_are_refused():
  for fields, name in ((dict(clients_per_round=6), "clients_per_round"),
                       (dict(clients_per_round=0), "clients_per_round"),
                       (dict(dropout_prob=1.0), "dropout_prob"),
                       (dict(dropout_prob=-0.1), "dropout_prob"),
                       (dict(deadline_s=0.0), "deadline_s"),
                       (dict(participant_sampling="fastest"), "participant_sampling")):
    with pytest.raises(SpecError, match=name):
      algorithm_cfg("psl", num_clients=ALL, **fields)


# ------------------------------------------------------------ devices and the ledger
def test_lognormal_devices_spread_around_the_rates_and_traces_are_checked(tmp_path):
  d = devices.lognormal(20000, 1e10, 1e6, 5e6, spread=2.0, seed=0)
  np.testing.assert_allclose(np.median(d.flops_per_s), 1e10, rtol=0.05)
  np.testing.assert_allclose(np.std(np.log(d.up_bytes_per_s)), 2.0, rtol=0.03)
  assert devices.homogeneous(3, 1, 2, 3).uniform and not d.uniform
  good = tmp_path / "trace.csv"
  good.write_text("client,flops_per_s,up_bytes_per_s,down_bytes_per_s\n"
                  "1,2e9,1e5,1e6\n0,1e10,1e6,5e6\n")
  t = devices.read_trace(str(good), 2)
  np.testing.assert_array_equal(t.flops_per_s, [1e10, 2e9])
  for text, problem in (("client,flops_per_s,up_bytes_per_s\n0,1,1\n", "lacks the columns"),
                        ("client,flops_per_s,up_bytes_per_s,down_bytes_per_s\n0,1,1,1\n",
                         "no row for clients 1"),
                        ("client,flops_per_s,up_bytes_per_s,down_bytes_per_s\n0,1,1,1\n"
                         "1,1,0,1\n", "non-positive rate")):
    good.write_text(text)
    with pytest.raises(devices.DevicesError, match=problem):
      devices.read_trace(str(good), 2)


def costs_for(seconds, sync=None, up=None, server_s=0.0):
  n = len(seconds)
  ones = np.ones(n)
  return accounting.ClientSeconds(np.asarray(seconds, np.float64),
                                  ones * 0 if sync is None else np.asarray(sync),
                                  ones * 10 if up is None else np.asarray(up), ones * 20,
                                  server_s)


def test_ledger_waits_for_the_slowest_present_and_sl_adds_them_up():
  ledger = accounting.CommLedger(ALL, 10, 20, 0, 0)
  seconds = [1.0, 3.0, 2.0, 8.0, 1.5]
  key = jax.random.PRNGKey(5)
  for name in ("psl", "sl"):
    cfg = algorithm_cfg(name, num_clients=ALL, clients_per_round=K, deadline_s=4.0)
    acc = accounting.ParticipationAccounts(cfg, costs_for(seconds), key,
                                           np.full(ALL, 0.2, np.float32), ALL, ledger)
    total, saved, late = 0.0, 0.0, 0
    for t in range(7):
      ids = plain_participants(key, t)
      s = np.asarray(seconds)[ids]
      on_time = s <= 4.0
      if name == "sl":
        time, waited = s[on_time].sum() + 4.0 * (~on_time).sum(), s.sum()
      else:
        time, waited = (4.0 if (~on_time).any() else s.max()), s.max()
      total, saved, late = total + time, saved + waited - time, late + (~on_time).sum()
    assert acc.total(7) == pytest.approx(total)
    info = acc.participation(0, 7)
    assert info["time_saved_s"] == pytest.approx(saved)
    assert info["late"] == pytest.approx(late / 7)
    # only the present participants' bytes arrive: 10 up each
    present = sum(int((np.asarray(seconds)[plain_participants(key, t)] <= 4.0).sum())
                  for t in range(7))
    assert acc.totals(7)["bytes_up"] == 10 * present


def test_deadline_covers_the_fedavg_transfer():
  """A participant whose split step meets the deadline but whose model transfer does not
  is present at iterations without FedAvg and late at those that end with it, in the
  round and in the ledger; the ledger's iteration then takes at least the deadline."""
  seconds = np.ones(ALL, np.float32)
  sync = np.array([0.5, 5.0, 0.5, 5.0, 0.5], np.float32)
  cfg = algorithm_cfg("locsplitfed", num_clients=ALL, clients_per_round=K, deadline_s=2.0,
                      fedavg_every=2)
  data = lfmjax.make_data(*_raw(five_client_data()), seconds_C=seconds,
                          sync_seconds_C=sync)
  state = differing_state(cfg)
  round_step = lfmjax.make_round_step(cfg, MODEL)
  key, dropped, want = np.asarray(state.key), [], []
  for t in range(4):
    ids = plain_participants(key, t)
    want.append(int((sync[ids] > 1.0).sum()) if t % 2 == 1 else 0)
    state, metrics = round_step(state, data)
    dropped.append(int(metrics["dropped"]))
  assert dropped == want and sum(want) > 0
  acc = accounting.ParticipationAccounts(cfg, costs_for(seconds, sync), key,
                                         data.weights_C, ALL,
                                         accounting.CommLedger(ALL, 10, 20, 7, 2))
  np.testing.assert_array_equal(acc.participation(0, 4)["late"], sum(want) / 4)
  total = 0.0
  for t in range(4):
    ids = plain_participants(key, t)
    on_time = sync[ids] <= 1.0 if t % 2 == 1 else np.ones(K, bool)
    time = 1.0 + (sync[ids][on_time].max() if t % 2 == 1 else 0.0)
    total += max(time, 2.0) if not on_time.all() else time
  assert acc.total(4) == pytest.approx(total)


def _raw(data):
  return (np.asarray(data.train_x), np.asarray(data.train_y), np.asarray(data.idx_CxM),
          np.asarray(data.sizes_C))


def test_replayed_draws_equal_the_round_and_resume_exactly():
  """The ledger's replay of participants and dropouts equals what the round did, for
  two seeds, and counting from the middle gives the same totals."""
  seconds = np.array([1.0, 5.0, 1.0, 2.0, 1.0], np.float32)
  cfg = algorithm_cfg("psl", num_clients=ALL, clients_per_round=K, dropout_prob=0.3,
                      deadline_s=3.0)
  data = five_client_data(seconds)
  states = [differing_state(cfg, seed) for seed in (0, 1)]
  keys = jnp.stack([np.asarray(s.key) for s in states])
  round_step = lfmjax.make_round_step(cfg, MODEL)
  present = []
  for state in states:
    counts = []
    for _ in range(6):
      state, metrics = round_step(state, data)
      counts.append(float(metrics["participants"]))
    present.append(counts)
  acc = accounting.ParticipationAccounts(cfg, costs_for(seconds), keys, data.weights_C, ALL,
                                         accounting.CommLedger(ALL, 10, 20, 0, 0))
  np.testing.assert_array_equal(acc.present_counts(6), np.asarray(present))
  fresh = accounting.ParticipationAccounts(cfg, costs_for(seconds), keys, data.weights_C,
                                           ALL, accounting.CommLedger(ALL, 10, 20, 0, 0))
  assert fresh.totals(6) == acc.totals(6) and fresh.seeds(6) == acc.seeds(6)


# ------------------------------------------------------------------------ bad input
def test_bad_participation_input_is_one_line(synthetic_fmnist, tmp_path):
  """K out of [1, C], p outside [0, 1), a deadline no client meets, and a trace with
  missing clients: ConfigErrors naming the field (the CLI prints them as one line,
  exit 2: checked here for the trace, read when the run starts)."""
  from lfmjax.run.loop import prepare
  from lfmjax.run.validate import ConfigError, validate
  for field, value, message in (
      ("clients_per_round", 7, "config.clients_per_round=7: K participants"),
      ("clients_per_round", 0, "config.clients_per_round=0: K participants"),
      ("dropout_prob", 1.0, "config.dropout_prob=1.0: a participant's dropout")):
    config = tiny_config(synthetic_fmnist, num_clients=6, **{field: value})
    with pytest.raises(ConfigError, match=message):
      validate(config)
  config = tiny_config(synthetic_fmnist, num_clients=6, deadline_s=1e-9)
  with pytest.raises(ConfigError, match="config.deadline_s=1e-09: no client can meet it"):
    prepare(config, log=lambda *a: None)
  trace = tmp_path / "trace.csv"
  trace.write_text("client,flops_per_s,up_bytes_per_s,down_bytes_per_s\n"
                   "0,1e9,1e6,1e6\n1,1e9,1e6,1e6\n2,1e9,1e6,1e6\n")
  out = subprocess.run(
      [sys.executable, "-m", "lfmjax.main", "--config=configs/fmnist.py",
       f"--config.data_dir={synthetic_fmnist}", "--config.data_verify=False",
       "--config.validation_size=0", "--config.num_clients=6", "--config.model=tiny_cnn",
       "--config.num_iterations=1", "--config.devices.distribution=trace",
       f"--config.devices.trace={trace}"], cwd=ROOT, capture_output=True, text=True,
      timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and "has no row for clients 3, 4, 5" in lines[0], out.stderr
