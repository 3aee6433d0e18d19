"""Throughput of one LocFedMix-SL iteration against the PyTorch loop, at 1 to 1000 clients.

    python -m lfmjax.bench                          # the four points, both sides, twice
    python -m lfmjax.bench --clients 100 --batch 8 --json   # one lfmjax point, one line

The whole-table mode runs every (clients, batch) point in a fresh process, lfmjax and
the PyTorch reference (`lfmjax/torch_reference.py`, the project's peer; skipped when
torch is not installed) interleaved A B A B, `--repeats` times, and reports medians:
samples/s of each, their ratio, lfmjax's compile time and each side's peak resident
memory. It writes `bench.json` and `bench.md` to `--out` and checks the targets of
issue 4 (>= 1x torch everywhere, >= 2x at 100 and 1000 clients, compile time at 1000
clients <= 2x that at 1, samples/s at 1000 >= 0.8x that at 10, peak memory < 8 GiB).

Both sides run the same work (SPEC.md; Oh et al., LocFedMix-SL, WWW 2022): bench_cnn on
32x32x3, SGD 0.01 on both sides, mu = 1, one SmashMix batch per client with
lambda ~ Beta(2, 2), FedAvg of lowers and decoders every iteration. lfmjax's iteration
is its public jitted `round_step`, dispatched once per iteration, including sampling
the batches on the device. Samples/s counts client samples: clients x batch / iteration.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

POINTS = ((1, 256), (10, 32), (100, 8), (1000, 8))
INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
TORCH_REFERENCE = Path(__file__).with_name("torch_reference.py")


def round_config(clients: int, batch: int, algo: str):
  """The torch reference's iteration as a RoundConfig (`algo`: locfedmix | psl), built
  the way a run's config is: base_config's defaults (mu = 1, one SmashMix batch,
  Beta(2, 2), FedAvg every iteration) with SGD 0.01 on both sides."""
  from lfmjax.algorithms import round_config_from
  from lfmjax.config import base_config
  config = base_config()
  config.algorithm = algo
  config.num_clients = clients
  config.batch_size = batch
  config.client_optimizer = "sgd"
  config.client_lr = 0.01
  return round_config_from(config, NUM_CLASSES)


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_point(clients: int, batch: int, iters: int, algo: str = "locfedmix",
              samples_per_client: int | None = None) -> dict:
  """One lfmjax point in this process: compile time, then `iters` timed iterations."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lfmjax.models import get_model
  from lfmjax.round import make_round_step
  from lfmjax.state import init_state, make_data

  cfg = round_config(clients, batch, algo)
  model = get_model("bench_cnn", num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE)
  per_client = samples_per_client or 2 * batch
  rng = np.random.default_rng(0)  # values do not affect the speed
  x = rng.integers(0, 256, (clients * per_client,) + INPUT_SHAPE, dtype=np.uint8)
  y = rng.integers(0, NUM_CLASSES, clients * per_client)
  data = make_data(x, y, np.arange(clients * per_client).reshape(clients, per_client),
                   np.full(clients, per_client))
  state = init_state(cfg, model, jax.random.key(0), jnp.zeros((1,) + INPUT_SHAPE))
  step = make_round_step(cfg, model)
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state, data)  # warm-up, as the torch reference's
  jax.block_until_ready((state, metrics))
  t0 = time.perf_counter()
  for _ in range(iters):
    state, metrics = compiled(state, data)
  jax.block_until_ready((state, metrics))
  dt = (time.perf_counter() - t0) / iters
  return {"clients": clients, "batch": batch, "algo": algo, "iter_ms": round(dt * 1e3, 2),
          "samples_per_s": round(clients * batch / dt, 1), "compile_s": round(compile_s, 2),
          "peak_rss_mib": round(peak_rss_mib(), 1), "iters": iters,
          "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def torch_available() -> bool:
  try:
    import importlib.util
    return importlib.util.find_spec("torch") is not None
  except (ImportError, ValueError):
    return False


def _child(cmd: list[str], timeout: float) -> dict:
  """Runs one measurement in a fresh process; returns its last JSON line, with the
  child's own peak resident memory (from wait4) where it does not report one."""
  t0 = time.perf_counter()
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
      _, status, usage = os.wait4(proc.pid, 0)
    finally:
      timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-2000:]}")
  lines = [l for l in stdout.splitlines() if l.startswith("{")]
  result = json.loads(lines[-1])
  result.setdefault("peak_rss_mib", round(usage.ru_maxrss / 1024.0, 1))  # Linux: KiB
  result["wall_s"] = round(time.perf_counter() - t0, 1)
  return result


def measure_table(points, repeats: int, iters: int, algo: str, torch_script: Path | None,
                  timeout: float, log=print) -> list[dict]:
  """Every point, lfmjax and torch interleaved, `repeats` times; medians per point."""
  raw = {p: {"jax": [], "torch": []} for p in points}
  for rep in range(repeats):
    for clients, batch in points:
      sides = [("jax", [sys.executable, "-m", "lfmjax.bench", "--clients", str(clients),
                        "--batch", str(batch), "--iters", str(iters), "--algo", algo,
                        "--json"])]
      if torch_script is not None:
        sides.append(("torch", [sys.executable, str(torch_script), "--clients",
                                str(clients), "--batch", str(batch), "--iters", str(iters),
                                "--algo", algo]))
      for side, cmd in sides:
        result = _child(cmd, timeout)
        raw[(clients, batch)][side].append(result)
        log(f"[{rep + 1}/{repeats}] {side:5s} {clients:5d} x {batch:3d}: "
            f"{result['samples_per_s']:9.1f} samples/s  ({result['iter_ms']:.0f} ms/iter, "
            f"peak {result['peak_rss_mib']:.0f} MiB)")
  rows = []
  for (clients, batch), runs in raw.items():
    med = lambda side, key: (statistics.median(r[key] for r in runs[side])
                             if runs[side] else None)
    row = {"clients": clients, "batch": batch, "algo": algo,
           "jax_samples_per_s": med("jax", "samples_per_s"),
           "torch_samples_per_s": med("torch", "samples_per_s"),
           "jax_compile_s": med("jax", "compile_s"),
           "jax_peak_rss_mib": med("jax", "peak_rss_mib"),
           "torch_peak_rss_mib": med("torch", "peak_rss_mib"),
           "jax_runs": [r["samples_per_s"] for r in runs["jax"]],
           "torch_runs": [r["samples_per_s"] for r in runs["torch"]]}
    row["ratio"] = (round(row["jax_samples_per_s"] / row["torch_samples_per_s"], 2)
                    if row["torch_samples_per_s"] else None)
    # Ratio per interleaved pair, to show the spread the median hides.
    row["pair_ratios"] = [round(j["samples_per_s"] / t["samples_per_s"], 2)
                          for j, t in zip(runs["jax"], runs["torch"])]
    rows.append(row)
  return rows


def check_targets(rows: list[dict]) -> list[tuple[str, bool | None]]:
  """Issue 4's targets, each (description, met? or None where not measured)."""
  by_clients = {r["clients"]: r for r in rows}
  checks = []
  for r in rows:
    need = 2.0 if r["clients"] >= 100 else 1.0
    checks.append((f"{r['clients']} x {r['batch']}: lfmjax >= {need:g}x torch",
                   None if r["ratio"] is None else r["ratio"] >= need))
  if 1 in by_clients and 1000 in by_clients:
    c1, c1000 = by_clients[1]["jax_compile_s"], by_clients[1000]["jax_compile_s"]
    checks.append((f"compile at 1000 clients ({c1000:.1f} s) <= 2x compile at 1 "
                   f"({c1:.1f} s)", c1000 <= 2 * c1))
  if 10 in by_clients and 1000 in by_clients:
    s10, s1000 = by_clients[10]["jax_samples_per_s"], by_clients[1000]["jax_samples_per_s"]
    checks.append((f"samples/s at 1000 clients ({s1000:.0f}) >= 0.8x at 10 ({s10:.0f})",
                   s1000 >= 0.8 * s10))
  if 1000 in by_clients:
    mem = by_clients[1000]["jax_peak_rss_mib"]
    checks.append((f"peak memory at 1000 clients ({mem / 1024:.2f} GiB) < 8 GiB",
                   mem < 8 * 1024))
  return checks


def markdown(rows: list[dict], checks, meta: dict) -> str:
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  lines = [f"lfmjax {meta['algo']} round vs the PyTorch loop: medians of {meta['repeats']} "
           f"interleaved runs of {meta['iters']} iterations each ({meta['when']}, "
           f"{meta['cpus']} CPUs, jax {meta['jax']}, torch {meta['torch'] or 'not installed'}).",
           "",
           "| clients x batch | lfmjax samples/s | torch samples/s | ratio | pair ratios "
           "| lfmjax compile s | lfmjax peak MiB | torch peak MiB |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['clients']} x {r['batch']} | {fmt(r['jax_samples_per_s'], ',.1f')} | "
        f"{fmt(r['torch_samples_per_s'], ',.1f')} | {fmt(r['ratio'], '.2f')} | "
        f"{', '.join(f'{x:.2f}' for x in r['pair_ratios']) or '-'} | "
        f"{fmt(r['jax_compile_s'], '.2f')} | {fmt(r['jax_peak_rss_mib'], ',.0f')} | "
        f"{fmt(r['torch_peak_rss_mib'], ',.0f')} |")
  lines += ["", "Targets:"]
  for text, met in checks:
    mark = "not measured" if met is None else ("met" if met else "NOT met")
    lines.append(f"- {text}: {mark}")
  return "\n".join(lines) + "\n"


def parse_points(text: str):
  try:
    return tuple(tuple(int(v) for v in p.split("x")) for p in text.split(","))
  except ValueError:
    raise SystemExit(f"error: --points {text!r} must look like 1x256,10x32")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--clients", type=int, help="one point: number of clients")
  p.add_argument("--batch", type=int, help="one point: batch per client")
  p.add_argument("--json", action="store_true", help="one point: print one JSON line")
  p.add_argument("--iters", type=int, default=5, help="timed iterations per run")
  p.add_argument("--algo", choices=["locfedmix", "psl"], default="locfedmix")
  p.add_argument("--points", default=",".join(f"{c}x{b}" for c, b in POINTS),
                 help="table mode: comma-separated CLIENTSxBATCH")
  p.add_argument("--repeats", type=int, default=2, help="table mode: interleaved repeats")
  p.add_argument("--torch_script", default=str(TORCH_REFERENCE),
                 help="the PyTorch reference to run ('' to skip torch)")
  p.add_argument("--out", default="runs/bench", help="table mode: bench.json, bench.md")
  p.add_argument("--timeout", type=float, default=1800, help="seconds per child run")
  a = p.parse_args(argv)
  if a.iters < 1 or a.repeats < 1:
    raise SystemExit("error: --iters and --repeats must be at least 1")
  if (a.clients is None) != (a.batch is None):
    raise SystemExit("error: give both --clients and --batch for one point")
  if a.clients is not None:
    if a.clients < 1 or a.batch < 1:
      raise SystemExit("error: --clients and --batch must be at least 1")
    result = run_point(a.clients, a.batch, a.iters, a.algo)
    print(json.dumps(result) if a.json else
          f"{a.clients} x {a.batch}: {result['samples_per_s']:.1f} samples/s, "
          f"{result['iter_ms']:.1f} ms/iter, compile {result['compile_s']:.2f} s, "
          f"peak {result['peak_rss_mib']:.0f} MiB")
    return 0

  torch_script = Path(a.torch_script) if a.torch_script else None
  torch_version = None
  if torch_script is not None:
    if not torch_script.is_file():
      raise SystemExit(f"error: --torch_script {torch_script} does not exist")
    if not torch_available():
      print("torch is not installed: measuring lfmjax alone "
            "(pip install torch==2.13.0 for the comparison)")
      torch_script = None
    else:
      import importlib.metadata
      torch_version = importlib.metadata.version("torch")
  import jax
  meta = {"algo": a.algo, "repeats": a.repeats, "iters": a.iters,
          "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
          "cpus": os.cpu_count(), "jax": jax.__version__, "torch": torch_version}
  rows = measure_table(parse_points(a.points), a.repeats, a.iters, a.algo, torch_script,
                       a.timeout)
  checks = check_targets(rows)
  out = Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  table = markdown(rows, checks, meta)
  (out / "bench.md").write_text(table)
  (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows, "targets": [
      {"target": t, "met": m} for t, m in checks]}, indent=1) + "\n")
  print()
  print(table)
  print(f"wrote {out / 'bench.md'} and {out / 'bench.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
