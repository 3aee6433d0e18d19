"""Clients sharded over 8 fake CPU devices (conftest.py): every algorithm's iteration on
8 devices equals the one-device iteration, with client counts that divide 8 and that
do not (padded, masked clients); one executable, shardings kept; seeds in one program
equal separate runs; two processes on this machine equal one."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from test_checkpoint import TIMINGS, tiny_config
from test_cli import ROOT, synthetic_fmnist  # noqa: F401  (fixture)

from lfmjax.algorithms import ALGORITHMS
from lfmjax.config_round import round_config_from
from lfmjax.config import base_config
from lfmjax.data import client_table
from lfmjax.mesh import (CLIENTS, jit_sharded, make_mesh, make_placement, pad_data,
                         pad_state, padded_num_clients, padded_round, put_global,
                         real_clients, to_host)
from lfmjax.models import get_model
from lfmjax.round import make_round_step
from lfmjax.state import init_state, make_data
from lfmjax.train import train_and_evaluate

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def problem(algorithm: str, num_clients: int, batch: int = 4, seed: int = 0, **fields):
  """A tiny round: cfg, model, host state, host data (clients of unequal sizes)."""
  config = base_config()
  config.algorithm = algorithm
  config.num_clients = num_clients
  for name, value in fields.items():
    config[name] = value
  config.batch_size = batch
  cfg = round_config_from(config, 10)
  model = get_model("tiny_cnn", num_classes=10, input_shape=(28, 28, 1))
  rng = np.random.default_rng(0)
  sizes = 2 * batch + np.arange(num_clients)
  n = int(sizes.sum())
  x = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
  y = rng.integers(0, 10, n)
  idx_CxM, sizes_C = client_table(np.split(rng.permutation(n), np.cumsum(sizes)[:-1]))
  data = jax.device_get(make_data(x, y, idx_CxM, sizes_C))
  state = jax.device_get(init_state(cfg, model, jax.random.PRNGKey(seed),
                                    np.zeros((1, 28, 28, 1), np.float32)))
  return cfg, model, state, data


def sharded_step(cfg, model, state, data, mesh):
  padded = padded_num_clients(cfg.num_clients, mesh.size)
  state = pad_state(cfg, state, padded)
  placement = make_placement(cfg, state, mesh)
  step = jit_sharded(padded_round(cfg, make_round_step(cfg, model, jit=False, mesh=mesh), mesh),
                     placement)
  return (step, put_global(state, placement.state),
          put_global(pad_data(data, padded), placement.data), placement)


def assert_close(a, b, rtol=2e-5, atol=2e-6):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("num_clients", [8, 5])
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_eight_devices_equal_one(algorithm, num_clients):
  cfg, model, state, data = problem(algorithm, num_clients)
  want_state, want_metrics = make_round_step(cfg, model)(
      jax.device_put(state, jax.devices()[0]), jax.device_put(data, jax.devices()[0]))
  step, state8, data8, _ = sharded_step(cfg, model, state, data, make_mesh(8))
  got_state, got_metrics = step(state8, data8)
  got_state = to_host(got_state)
  assert_close(real_clients(cfg, got_state), jax.device_get(want_state))
  assert_close(got_metrics, want_metrics)
  # The padded clients come back exactly as they went in.
  padded_before = pad_state(cfg, state, 8)
  rows = lambda tree: jax.tree.map(lambda a: np.asarray(a)[num_clients:], tree.clients)
  jax.tree.map(np.testing.assert_array_equal, rows(got_state), rows(padded_before))


@pytest.mark.parametrize("algorithm,k", [("locfedmix", 3), ("sfl_v1", 8), ("sl", 5)])
def test_participants_on_eight_devices_equal_one(algorithm, k):
  """K of 12 clients (3: padded within the program; 8: one a device) with dropouts, two
  iterations, on 8 devices against one."""
  cfg, model, state, data = problem(algorithm, 12, clients_per_round=k, dropout_prob=0.2)
  one = make_round_step(cfg, model, jit=False)
  want = jax.device_put(state, jax.devices()[0]), []
  data1 = jax.device_put(data, jax.devices()[0])
  step, got, data8, _ = sharded_step(cfg, model, state, data, make_mesh(8))
  got = got, []
  for _ in range(2):
    want = jax.jit(one)(want[0], data1)
    got = step(got[0], data8)
  assert_close(real_clients(cfg, to_host(got[0])), jax.device_get(want[0]))
  assert_close(got[1], want[1])


def test_per_client_loops_run_per_device():
  """On the CPU the per-client path loops over each device's own clients (shard_map):
  16 clients on 8 devices are loops of 2, never one of 16 gathered onto every device."""
  import re
  cfg, model, state, data = problem("psl", 16)
  step, state8, data8, _ = sharded_step(cfg, model, state, data, make_mesh(8))
  hlo = step.lower(state8, data8).compile().as_text()
  trips = set(re.findall(r'known_trip_count":\{"n":"(\d+)"', hlo))
  assert "2" in trips and "16" not in trips


def test_padded_clients_contribute_exactly_nothing():
  """Garbage (NaN) in the padded clients' segments and weight 0 change nothing."""
  cfg, model, state, data = problem("locfedmix", 5)
  step, state8, data8, placement = sharded_step(cfg, model, state, data, make_mesh(8))
  clean_state, clean_metrics = step(state8, data8)
  clean_state = to_host(clean_state)
  poisoned = pad_state(cfg, state, 8)
  poisoned = poisoned.replace(clients=jax.tree.map(
      lambda a: np.concatenate([a[:5], np.full_like(a[5:], np.nan)])
      if np.issubdtype(a.dtype, np.floating) else a, poisoned.clients))
  got_state, got_metrics = step(put_global(poisoned, placement.state), data8)
  jax.tree.map(np.testing.assert_array_equal, real_clients(cfg, to_host(got_state)),
               real_clients(cfg, clean_state))
  jax.tree.map(np.testing.assert_array_equal, got_metrics, clean_metrics)


@pytest.mark.parametrize("algorithm", ["locfedmix", "sfl_v1", "psl"])
def test_one_executable_and_the_state_stays_sharded(algorithm):
  cfg, model, state, data = problem(algorithm, 16)
  step, state8, data8, placement = sharded_step(cfg, model, state, data, make_mesh(8))
  for _ in range(3):
    state8, metrics = step(state8, data8)
  # One compiled program, reused: a second signature would be a second entry. (0 where
  # jit's C++ fast path is not taken: seen once in the full suite on one worker.)
  assert step._cache_size() <= 1
  hlo = step.lower(state8, data8).compile().as_text()
  assert "num_partitions=8" in hlo  # one SPMD program over the mesh, not one per device
  assert "all-reduce" in hlo  # the compiler placed the cross-client reductions
  for leaf, want in zip(jax.tree.leaves(state8), jax.tree.leaves(placement.state)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
  for leaf in jax.tree.leaves(state8.clients):
    assert len(leaf.sharding.device_set) == 8
    if cfg.client_phase == "averaged":  # one copy of the client segments, replicated
      assert leaf.sharding.spec == P() and leaf.shape[0] == 1
    else:
      assert leaf.sharding.spec == P(CLIENTS)
      assert leaf.addressable_shards[0].data.shape[0] == 2  # 16 clients, 2 per device
  server = jax.tree.leaves(state8.server)[0]
  assert server.sharding.spec == (P(CLIENTS) if algorithm == "sfl_v1" else P())


@pytest.mark.parametrize("algorithm", ["locfedmix", "psl"])
def test_seeds_in_one_program_equal_separate_runs(algorithm):
  mesh = make_mesh(8)
  runs = [problem(algorithm, 5, seed=s) for s in (0, 1)]
  cfg, model, _, data = runs[0]
  padded = padded_num_clients(5, 8)
  stacked = jax.tree.map(lambda *a: np.stack(a),
                         *[pad_state(cfg, r[2], padded) for r in runs])
  placement = make_placement(cfg, stacked, mesh, seeds=True)
  step = jit_sharded(jax.vmap(padded_round(cfg, make_round_step(cfg, model, jit=False), mesh),
                              in_axes=(0, None)), placement)
  got_state, got_metrics = step(put_global(stacked, placement.state),
                                put_global(pad_data(data, padded), placement.data))
  got_state = to_host(got_state)
  for s, (_, _, state, _) in enumerate(runs):
    want_state, want_metrics = make_round_step(cfg, model)(state, data)
    assert_close(real_clients(cfg, jax.tree.map(lambda a: a[s], got_state)),
                 jax.device_get(want_state))
    assert_close(jax.tree.map(lambda a: a[s], got_metrics), want_metrics)


@pytest.mark.parametrize("algorithm", ["locfedmix", "sl"])  # seeds vmapped, or in turn
def test_a_run_with_seeds_reports_each_seed_and_the_spread(synthetic_fmnist, tmp_path,
                                                           algorithm):
  turns = {"sl_turn_steps": 5} if algorithm == "sl" else {}  # 5 batches a turn: seconds
  config = tiny_config(synthetic_fmnist, num_seeds=2, num_iterations=4, checkpoint_every=0,
                       algorithm=algorithm, **turns)
  train_and_evaluate(config, str(tmp_path / "seeds"), quiet=True)
  records = [json.loads(l) for l in (tmp_path / "seeds" / "metrics.jsonl").read_text()
             .splitlines()]
  for s in (0, 1):
    train_and_evaluate(tiny_config(synthetic_fmnist, seed=s, partition_seed=0,
                                   num_iterations=4, checkpoint_every=0,
                                   algorithm=algorithm, **turns),
                       str(tmp_path / f"seed{s}"), quiet=True)
    alone = json.loads((tmp_path / f"seed{s}" / "metrics.jsonl").read_text().splitlines()[0])
    assert records[0]["test_loss_seeds"][s] == pytest.approx(alone["test_loss"], abs=1e-4)
  accs = records[0]["test_accuracy_seeds"]
  assert records[0]["test_accuracy"] == pytest.approx(np.mean(accs))
  assert records[0]["test_accuracy_std"] == pytest.approx(np.std(accs))
  assert records[-1]["final_test_accuracy_seeds"] == records[-2]["test_accuracy_seeds"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(synthetic_fmnist, tmp_path):
  """2 processes x 4 CPU devices (jax.distributed on localhost) = 1 process x 8."""
  args = ["--config=configs/fmnist.py", f"--config.data_dir={synthetic_fmnist}",
          "--config.model=tiny_cnn", "--config.num_clients=5", "--config.batch_size=8",
          "--config.num_iterations=4", "--config.eval_every=2",
          "--config.steps_per_dispatch=2", "--config.data_verify=False",
          "--config.checkpoint_every=0", "--config.validation_size=0"]
  one = subprocess.run([sys.executable, "-m", "lfmjax.main", *args,
                        f"--workdir={tmp_path / 'one'}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert one.returncode == 0, one.stderr
  assert "on 8 cpu device(s)" in one.stdout
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "lfmjax.main", *args, f"--workdir={tmp_path / 'two'}",
       "--config.distributed.enabled=True",
       f"--config.distributed.coordinator_address=localhost:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
       "--config.distributed.local_device_count=4"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in (0, 1)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err
  assert "on 8 cpu device(s), 2 processes" in outs[0][0]
  assert "iter" not in outs[1][0]  # only process 0 logs
  strip = lambda path: [{k: v for k, v in json.loads(l).items() if k not in TIMINGS}
                        for l in path.read_text().splitlines()]
  got, want = strip(tmp_path / "two" / "metrics.jsonl"), strip(tmp_path / "one" / "metrics.jsonl")
  assert [r["type"] for r in got] == ["eval", "eval", "summary"]  # written once
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for k in g:
      if k == "environment":  # where it ran: the processes' devices and XLA_FLAGS differ
        continue
      floats = isinstance(g[k], float) or (isinstance(g[k], list) and g[k]
                                            and isinstance(g[k][0], float))
      if floats:  # per-client lists too (dcor_clients)
        assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), k
      else:
        assert g[k] == w[k], k
