"""Scale-out check: a LocFedMix-SL run with many clients spread over several devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python experiments/scale_out.py --clients 1000 --batch 8 --iters 3 [--path psl_sgd]

Runs `--iters` iterations of the sharded round (lfmjax.mesh: clients split over a
'clients' mesh axis, server replicated) of one of `benchmarks/bench.py`'s paths (default
LocFedMix-SL with Adam) on its model with random 32x32x3 data, and
prints, per device, the bytes of the state and client data it holds (its shards) and the
compiled per-device program's argument/output/temporary bytes, the process's peak
resident memory, the compile time and the time per iteration. On fake
CPU devices all devices share one host's memory, so the peak RSS is the sum over them.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
from bench import INPUT_SHAPE, NUM_CLASSES, PATHS, round_config  # noqa: E402
from lfmjax.mesh import (jit_sharded, make_mesh, make_placement, pad_data, pad_state,
                         padded_num_clients, padded_round, put_global)
from lfmjax.models import get_model
from lfmjax.round import make_round_step
from lfmjax.state import init_state, make_data


def bytes_per_device(*trees) -> dict[str, int]:
  held = collections.Counter()
  for leaf in jax.tree.leaves(trees):
    for shard in leaf.addressable_shards:
      held[str(shard.device)] += shard.data.nbytes
  return dict(sorted(held.items()))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--clients", type=int, default=1000)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--path", choices=list(PATHS), default="locfedmix_adam")
  a = p.parse_args()
  cfg = round_config(PATHS[a.path], a.clients, a.batch)
  model = get_model(PATHS[a.path].model, num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE)
  per = 2 * a.batch
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (a.clients * per,) + INPUT_SHAPE, dtype=np.uint8)
  y = rng.integers(0, NUM_CLASSES, a.clients * per)
  data = jax.device_get(make_data(x, y, np.arange(a.clients * per).reshape(a.clients, per),
                                  np.full(a.clients, per)))
  state = jax.device_get(init_state(cfg, model, jax.random.key(0),
                                    np.zeros((1,) + INPUT_SHAPE, np.float32)))
  mesh = make_mesh()
  padded = padded_num_clients(a.clients, mesh.size)
  state = pad_state(cfg, state, padded)
  placement = make_placement(cfg, state, mesh)
  state = put_global(state, placement.state)
  data = put_global(pad_data(data, padded), placement.data)
  step = jit_sharded(padded_round(cfg, make_round_step(cfg, model, jit=False, mesh=mesh), mesh),
                     placement)
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()  # of the per-device (SPMD) program
  state, metrics = compiled(state, data)  # warm-up
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(a.iters):
    state, metrics = compiled(state, data)
  jax.block_until_ready(state)
  iter_s = (time.perf_counter() - t0) / a.iters
  print(json.dumps({
      "clients": a.clients, "padded_clients": padded, "batch": a.batch,
      "devices": mesh.size, "compile_s": round(compile_s, 2), "iter_s": round(iter_s, 3),
      "samples_per_s": round(a.clients * a.batch / iter_s, 1),
      "loss_real": float(metrics["loss_real"]),
      "state_and_data_MiB_per_device": {d: round(b / 2**20, 2)
                                        for d, b in bytes_per_device(state, data).items()},
      "program_MiB_per_device": {
          k: round(getattr(memory, f"{k}_size_in_bytes") / 2**20, 1)
          for k in ("argument", "output", "temp", "generated_code")} if memory else None,
      "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
  }, indent=1))


if __name__ == "__main__":
  main()
