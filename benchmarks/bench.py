"""Throughput of lfmjax's round against a PyTorch per-client loop, on the paths users run.

    python benchmarks/bench.py                                  # every path, both sides, twice
    python benchmarks/bench.py --paths psl_sgd --repeats 1      # one path
    python benchmarks/bench.py --path locfedmix_adam --clients 100 --batch 8 --json  # one point

Paths (`PATHS`): LocFedMix-SL with Adam (every shipped config's optimiser; per-client
segments), PSL with SGD (no FedAvg: per-client), LocFedMix-SL with SGD and FedAvg after
every iteration (the averaged-clients shortcut), resnet16 PSL with Adam at batch 8 (SGLR's
split), and 4 seeds vmapped in one program against 1 (lfmjax alone). Every point runs in
a fresh process, lfmjax and the PyTorch peer (`benchmarks/torch_peer.py`, the project's
own; skipped when torch is absent) interleaved
A B A B, `--repeats` times. The table gives medians of samples/s (client samples per
second), the ratio, the per-pair ratios, lfmjax's compile time and each side's peak
resident memory; it goes to `bench.md` and `bench.json` in `--out`, followed by the
targets of issue 14, met or not.

Both sides do the same work (SPEC.md; Oh et al., LocFedMix-SL, WWW 2022) on 32x32x3
inputs: lfmjax's public jitted `round_step`, dispatched once per iteration, batches
sampled on the device; the peer's loop over clients with one optimiser per client.
"""
from __future__ import annotations

import argparse
import dataclasses
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

INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
TORCH_PEER = Path(__file__).resolve().parent / "torch_peer.py"
ROOT = Path(__file__).resolve().parent.parent
BENCH_POINTS = ((1, 256), (10, 32), (100, 8), (1000, 8))
TRANSFORMER_POINTS = ((1, 256), (10, 32), (100, 8))  # issue 35: C in {1, 10, 100}
LORA_POINTS = ((1, 64), (10, 16), (100, 4))  # 128-byte windows; the config's 16 at C = 10


@dataclasses.dataclass(frozen=True)
class BenchPath:
  """One benchmarked path: the algorithm, optimiser and model on both sides."""
  algo: str
  optimizer: str
  lr: float
  model: str
  points: tuple[tuple[int, int], ...]
  seeds: tuple[int, ...] = ()   # lfmjax alone: these seed counts at each point
  participants: tuple[int, ...] = ()  # lfmjax alone: these K (clients_per_round) at each point
  about: str = ""
  config: str = ""  # a shipped config ("configs/FILE.py:ARG"): its optimiser, model, LoRA
  peer: str = "torch_peer.py"  # the PyTorch peer in benchmarks/
  peer_args: tuple[str, ...] = ()  # what the peer needs beyond --algo/--model/--optimizer


PATHS = {
    "locfedmix_adam": BenchPath("locfedmix", "adam", 1e-3, "bench_cnn", BENCH_POINTS,
                            about="LocFedMix-SL, Adam 1e-3: per-client segments"),
    "psl_sgd": BenchPath("psl", "sgd", 0.01, "bench_cnn", BENCH_POINTS,
                     about="PSL, SGD 0.01: per-client segments, no FedAvg"),
    "shortcut_sgd": BenchPath("locfedmix", "sgd", 0.01, "bench_cnn", BENCH_POINTS,
                          about="LocFedMix-SL, SGD 0.01, FedAvg every iteration: the "
                                "averaged-clients shortcut"),
    "resnet16_psl_adam": BenchPath("psl", "adam", 1e-3, "resnet16", ((1, 8), (10, 8), (20, 8)),
                               about="resnet16 PSL, Adam 1e-3, batch 8 (SGLR's split)"),
    "seeds": BenchPath("locfedmix", "adam", 1e-3, "bench_cnn", ((10, 32),), seeds=(1, 4),
                   about="LocFedMix-SL, Adam: S seeds vmapped in one program"),
    "participation": BenchPath(
        "locfedmix", "adam", 1e-3, "bench_cnn", ((1000, 8),), participants=(100, 1000),
        about="LocFedMix-SL, Adam, C = 1,000: K = 100 participants an iteration against "
              "all 1,000 (samples/s counts the participants' samples)"),
    "vit_psl_adam": BenchPath(
        "psl", "adam", 1e-3, "vit", TRANSFORMER_POINTS, config="configs/cifar_vit.py:psl",
        peer="torch_transformer_peer.py",
        about="split ViT (configs/cifar_vit.py: patch 4, width 64, depth 6, cut 2), PSL, Adam"),
    "vit_locfedmix_adam": BenchPath(
        "locfedmix", "adam", 1e-3, "vit", TRANSFORMER_POINTS,
        config="configs/cifar_vit.py:locfedmix", peer="torch_transformer_peer.py",
        about="split ViT, LocFedMix-SL (token decoder, SmashMix of token sequences), Adam"),
    "lora_lm_psl": BenchPath(
        "psl", "adam", 1e-3, "lm", LORA_POINTS, config="configs/text_lm.py:lora,psl",
        peer="torch_transformer_peer.py", peer_args=("--lora-rank", "8", "--seq-len", "128"),
        about="LoRA fine-tuning of the split byte LM (configs/text_lm.py:lora: width 128, "
              "depth 4, cut 1, 128 bytes, rank 8 on q/k/v/out of both segments, the "
              "backbone frozen and held once), PSL, Adam"),
    "lora_lm_locfedmix": BenchPath(
        "locfedmix", "adam", 1e-3, "lm", LORA_POINTS, config="configs/text_lm.py:lora",
        peer="torch_transformer_peer.py", peer_args=("--lora-rank", "8", "--seq-len", "128"),
        about="LoRA fine-tuning of the split byte LM, LocFedMix-SL (the shipped :lora "
              "config), Adam"),
    "many_clients": BenchPath(
        "locfedmix", "adam", 1e-3, "bench_cnn", ((10000, 8),), participants=(100,),
        about="LocFedMix-SL, Adam: 10,000 stateful clients, K = 100 an iteration"),
}


def round_config(path: BenchPath, clients: int, batch: int, clients_per_round=None):
  """The path's RoundConfig, built the way a run's is: base_config's defaults (mu = 1,
  one SmashMix batch, Beta(2, 2), FedAvg every iteration) with the path's algorithm and
  optimiser on both sides."""
  from lfmjax.config_round import round_config_from
  from lfmjax.config import base_config
  config = base_config()
  config.algorithm = path.algo
  config.num_clients = clients
  config.batch_size = batch
  config.client_optimizer = path.optimizer
  config.client_lr = path.lr
  config.clients_per_round = clients_per_round
  return round_config_from(config, NUM_CLASSES)


def shipped_config(path: BenchPath, clients: int, batch: int, clients_per_round=None):
  """The path's shipped config (`configs/FILE.py:ARG`) with the point's C, B and K."""
  import importlib.util
  file, _, arg = path.config.partition(":")
  spec = importlib.util.spec_from_file_location("bench_config", ROOT / file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  config.num_clients = clients
  config.batch_size = batch
  config.clients_per_round = clients_per_round
  assert (config.algorithm, config.client_optimizer, config.model) == (
      path.algo, path.optimizer, path.model), f"{path.config} is not {path}"
  return config


def config_point(path: BenchPath, clients: int, batch: int, clients_per_round=None):
  """(RoundConfig, model, inputs, labels, x_example) of a shipped config's point: built
  as a run builds them (`round_config_from`, `get_model` with the config's overrides and
  LoRA), on random data of the dataset's shape (32x32x3 images, or 128-byte windows)."""
  import numpy as np
  from lfmjax.config_round import round_config_from
  from lfmjax.data.datasets import dataset_kind
  from lfmjax.models import get_model
  from lfmjax.run.validate import lora_options, model_overrides
  config = shipped_config(path, clients, batch, clients_per_round)
  tokens = dataset_kind(config.dataset) == "tokens"
  num_classes = 256 if tokens else NUM_CLASSES
  shape = (config.input.seq_len,) if tokens else INPUT_SHAPE
  cfg = round_config_from(config, num_classes, inputs="tokens" if tokens else "images")
  model = get_model(config.model, num_classes=num_classes, input_shape=shape,
                    **lora_options(config), **model_overrides(config))
  rng = np.random.default_rng(0)  # values do not affect the speed
  n = clients * 2 * batch
  x = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
  y = (rng.integers(0, 256, (n,) + shape).astype(np.int32) if tokens
       else rng.integers(0, NUM_CLASSES, n))
  return cfg, model, x, y, np.zeros((1,) + shape, np.uint8 if tokens else np.float32)


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_point(path: BenchPath, clients: int, batch: int, iters: int, seeds: int = 1,
              clients_per_round: int | None = None) -> dict:
  """One lfmjax point in this process: compile time, then `iters` timed iterations
  (samples/s counts the participants' samples: K x batch an iteration)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lfmjax.models import get_model
  from lfmjax.models.patch_conv import compiler_options
  from lfmjax.round import make_round_step
  from lfmjax.state import init_state, make_data

  per_client = 2 * batch
  if path.config:
    cfg, model, x, y, x_example = config_point(path, clients, batch, clients_per_round)
  else:
    cfg = round_config(path, clients, batch, clients_per_round)
    model = get_model(path.model, num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE)
    rng = np.random.default_rng(0)  # values do not affect the speed
    x = rng.integers(0, 256, (clients * per_client,) + INPUT_SHAPE, dtype=np.uint8)
    y = rng.integers(0, NUM_CLASSES, clients * per_client)
    x_example = jnp.zeros((1,) + INPUT_SHAPE)
  data = make_data(x, y, np.arange(clients * per_client).reshape(clients, per_client),
                   np.full(clients, per_client))
  if seeds == 1:
    state = init_state(cfg, model, jax.random.key(0), x_example)
    step = make_round_step(cfg, model)
  else:  # seeds vmapped in one program, as `num_seeds` runs them
    states = [init_state(cfg, model, jax.random.key(s), x_example) for s in range(seeds)]
    state = jax.tree.map(lambda *a: jnp.stack(a), *states)
    step = jax.jit(jax.vmap(make_round_step(cfg, model, jit=False), in_axes=(0, None)),
                   donate_argnums=0, compiler_options=compiler_options())
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state, data)  # warm-up, as the torch peer's
  jax.block_until_ready((state, metrics))
  t0 = time.perf_counter()
  for _ in range(iters):
    state, metrics = compiled(state, data)
  jax.block_until_ready((state, metrics))
  dt = (time.perf_counter() - t0) / iters
  participants = cfg.num_participants
  sizes = state_bytes(state)
  return {"clients": clients, "batch": batch, "seeds": seeds, **sizes,
          "clients_per_round": participants, "iter_ms": round(dt * 1e3, 2),
          "samples_per_s": round(seeds * participants * batch / dt, 1),
          "compile_s": round(compile_s, 2), "peak_rss_mib": round(peak_rss_mib(), 1),
          "iters": iters, "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def state_bytes(state) -> dict:
  """Bytes of the round's state: the clients' part (C copies), the server's and the
  frozen backbone held once (LoRA)."""
  import jax
  size = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))
  return {"client_state_bytes": int(size(state.clients)),
          "server_state_bytes": int(size(state.server)),
          "frozen_bytes": int(size(state.frozen))}


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


def commands(name: str, path: BenchPath, clients: int, batch: int, iters: int,
             torch_script: Path | None) -> list[tuple[str, list[str]]]:
  """The (side, command) pairs of one point, in the order they run."""
  sides = []
  for seeds in path.seeds or (1,):
    for k in path.participants or (None,):
      side = (f"jax x{seeds}" if path.seeds else f"jax K={k}" if k else "jax")
      sides.append((side, [sys.executable, str(Path(__file__).resolve()), "--path", name,
                           "--clients", str(clients), "--batch", str(batch), "--iters",
                           str(iters), "--seeds", str(seeds), "--json"]
                    + (["--clients_per_round", str(k)] if k else [])))
  if torch_script is not None and not path.seeds and not path.participants:
    script = torch_script.parent / path.peer
    sides.append(("torch", [sys.executable, str(script), "--clients", str(clients),
                            "--batch", str(batch), "--iters", str(iters), "--algo",
                            path.algo, "--model", path.model, "--optimizer", path.optimizer,
                            "--lr", str(path.lr), *path.peer_args]))
  return sides


def measure(names: list[str], repeats: int, iters: int, torch_script: Path | None,
            timeout: float, log=print) -> list[dict]:
  """Every point of every path, the sides interleaved, `repeats` times; medians."""
  raw: dict = {}
  for rep in range(repeats):
    for name in names:
      path = PATHS[name]
      for clients, batch in path.points:
        for side, cmd in commands(name, path, clients, batch, iters, torch_script):
          result = _child(cmd, timeout)
          raw.setdefault((name, clients, batch), {}).setdefault(side, []).append(result)
          log(f"[{rep + 1}/{repeats}] {name:18s} {side:7s} {clients:5d} x {batch:3d}: "
              f"{result['samples_per_s']:9.1f} samples/s ({result['iter_ms']:.0f} ms/iter, "
              f"peak {result['peak_rss_mib']:.0f} MiB)")
  return [summarise(name, clients, batch, runs)
          for (name, clients, batch), runs in raw.items()]


def summarise(name: str, clients: int, batch: int, runs: dict) -> dict:
  """One table row: medians of each side, and the ratio of lfmjax to the reference (the
  torch peer; for the seeds path, one seed: S seeds' samples/s, every seed's samples
  counted, against one seed's, so 1.0 means as fast as running them one by one)."""
  med = lambda side, key: (statistics.median(r[key] for r in runs[side])
                           if side in runs else None)
  path = PATHS[name]
  jax_side = f"jax x{max(path.seeds)}" if path.seeds else "jax"
  ref_side = f"jax x{min(path.seeds)}" if path.seeds else "torch"
  if path.participants:  # K participants against the largest K (all clients)
    jax_side, ref_side = (f"jax K={min(path.participants)}",
                          f"jax K={max(path.participants)}")
  row = {"path": name, "clients": clients, "batch": batch,
         "jax_samples_per_s": med(jax_side, "samples_per_s"),
         "ref_samples_per_s": med(ref_side, "samples_per_s"), "reference": ref_side,
         "jax_compile_s": med(jax_side, "compile_s"),
         "jax_peak_rss_mib": med(jax_side, "peak_rss_mib"),
         "ref_peak_rss_mib": med(ref_side, "peak_rss_mib"),
         "runs": {side: [r["samples_per_s"] for r in rs] for side, rs in runs.items()}}
  if jax_side in runs and "frozen_bytes" in runs[jax_side][0]:  # the state's sizes (exact)
    row.update({k: runs[jax_side][0][k] for k in
                ("client_state_bytes", "server_state_bytes", "frozen_bytes")})
  pairs = zip(runs.get(jax_side, []), runs.get(ref_side, []))
  row["pair_ratios"] = [round(j["samples_per_s"] / r["samples_per_s"], 2)
                        for j, r in pairs]
  row["ratio"] = (round(row["jax_samples_per_s"] / row["ref_samples_per_s"], 2)
                  if row["ref_samples_per_s"] else None)
  if path.participants and len(path.participants) > 1:  # the cost of an iteration
    row["iter_ms_ratio"] = round(med(jax_side, "iter_ms") / med(ref_side, "iter_ms"), 3)
  return row


def check_targets(rows: list[dict]) -> list[tuple[str, bool | None]]:
  """Issue 14's targets, each (description, met? or None where not measured)."""
  by = {(r["path"], r["clients"]): r for r in rows}
  checks = []
  need = {"locfedmix_adam": 1.0, "psl_sgd": 1.0, "resnet16_psl_adam": 1.0,
          "shortcut_sgd": 1.4}
  for r in rows:
    if r["path"] in need:
      checks.append((f"{r['path']} {r['clients']} x {r['batch']}: lfmjax >= "
                     f"{need[r['path']]:g}x torch",
                     None if r["ratio"] is None else r["ratio"] >= need[r["path"]]))
    elif r["path"] == "seeds" and r["ratio"] is not None:
      checks.append((f"4 seeds in one program at {r['clients']} x {r['batch']}: samples/s "
                     f"of all seeds >= 0.9x one seed's ({r['ratio']:.2f}x)", r["ratio"] >= 0.9))
    elif r["path"] == "participation" and "iter_ms_ratio" in r:
      k, c = min(PATHS["participation"].participants), r["clients"]
      checks.append((f"an iteration of K = {k} of {c} clients costs about a tenth of all "
                     f"{c} ({r['iter_ms_ratio']:.3f}x; target <= 0.15x)",
                     r["iter_ms_ratio"] <= 0.15))
    elif r["path"] == "many_clients":
      mem = r["jax_peak_rss_mib"]
      checks.append((f"{r['clients']:,} stateful clients, K = 100: "
                     f"{r['jax_samples_per_s']:.0f} samples/s, peak memory "
                     f"{mem / 1024:.2f} GiB < 8 GiB", mem < 8 * 1024))
  for r in rows:  # issue 35: transformers >= 1.5x torch at C >= 10
    if PATHS[r["path"]].config and r["clients"] >= 10:
      checks.append((f"{r['path']} {r['clients']} x {r['batch']}: lfmjax >= 1.5x torch",
                     None if r["ratio"] is None else r["ratio"] >= 1.5))
  checks += lora_memory_checks(rows)
  big, ten, one = (by.get(("locfedmix_adam", c)) for c in (1000, 10, 1))
  if big and ten:
    s1000, s10 = big["jax_samples_per_s"], ten["jax_samples_per_s"]
    checks.append((f"locfedmix_adam: samples/s at 1000 clients ({s1000:.0f}) >= 0.8x at 10 "
                   f"({s10:.0f})", s1000 >= 0.8 * s10))
  if big:
    mem = big["jax_peak_rss_mib"]
    checks.append((f"locfedmix_adam: peak memory at 1000 x 8 ({mem / 1024:.2f} GiB) < 4 GiB",
                   mem < 4 * 1024))
  if big and one:
    c1, c1000 = one["jax_compile_s"], big["jax_compile_s"]
    checks.append((f"locfedmix_adam: compile at 1000 clients ({c1000:.1f} s) <= 2x at 1 "
                   f"({c1:.1f} s)", c1000 <= 2 * c1))
  return checks


def lora_memory_checks(rows: list[dict]) -> list[tuple[str, bool]]:
  """LoRA's state: the backbone held once (the same bytes at every C) and the clients'
  part C x (adapters, decoder and their Adam moments), i.e. the same bytes a client."""
  checks = []
  for name in sorted({r["path"] for r in rows if PATHS[r["path"]].model == "lm"}):
    sized = sorted((r for r in rows if r["path"] == name and "frozen_bytes" in r),
                   key=lambda r: r["clients"])
    if len(sized) < 2:
      continue
    lo, hi = sized[0], sized[-1]
    per_client = {r["client_state_bytes"] / r["clients"] for r in sized}
    checks.append((f"{name}: backbone held once ({lo['frozen_bytes'] / 2**20:.2f} MiB at "
                   f"C = {lo['clients']} and {hi['frozen_bytes'] / 2**20:.2f} MiB at C = "
                   f"{hi['clients']}), client state {min(per_client) / 1024:.0f} KiB a "
                   f"client at every C", lo["frozen_bytes"] == hi["frozen_bytes"]
                   and len(per_client) == 1))
  return checks


def markdown(rows: list[dict], checks, meta: dict) -> str:
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  lines = [f"lfmjax against the PyTorch per-client loop: medians of {meta['repeats']} "
           f"interleaved runs of {meta['iters']} iterations each ({meta['when']}, "
           f"{meta['cpus']} CPUs, jax {meta['jax']}, torch {meta['torch'] or 'not installed'})."
           " The seeds row compares 4 seeds in one program (every seed's samples counted) with 1.",
           "",
           "| path | clients x batch | lfmjax samples/s | reference samples/s | ratio | "
           "pair ratios | lfmjax compile s | lfmjax peak MiB | reference peak MiB |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['path']} | {r['clients']} x {r['batch']} | "
        f"{fmt(r['jax_samples_per_s'], ',.1f')} | {fmt(r['ref_samples_per_s'], ',.1f')} "
        f"({r['reference']}) | {fmt(r['ratio'], '.2f')} | "
        f"{', '.join(f'{x:.2f}' for x in r['pair_ratios']) or '-'} | "
        f"{fmt(r['jax_compile_s'], '.2f')} | {fmt(r['jax_peak_rss_mib'], ',.0f')} | "
        f"{fmt(r['ref_peak_rss_mib'], ',.0f')} |")
  sized = [r for r in rows if r.get("frozen_bytes")]
  if sized:
    lines += ["", "State of the LoRA rows (bytes of arrays, exact): the clients' part (C "
              "copies of adapters, decoder and their optimiser state), the server's, and "
              "the frozen backbone held once.", "",
              "| path | clients | client state MiB | a client KiB | server state MiB | "
              "frozen backbone MiB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['clients']} | {r['client_state_bytes'] / 2**20:.2f} | "
              f"{r['client_state_bytes'] / r['clients'] / 1024:.1f} | "
              f"{r['server_state_bytes'] / 2**20:.2f} | {r['frozen_bytes'] / 2**20:.2f} |"
              for r in sized]
  lines += ["", "Paths:"] + [f"- `{n}`: {p.about}" for n, p in PATHS.items()
                             if any(r["path"] == n for r in rows)]
  lines += ["", "Targets:"]
  for text, met in checks:
    mark = "not measured" if met is None else ("met" if met else "NOT met")
    lines.append(f"- {text}: {mark}")
  return "\n".join(lines) + "\n"


def parse_names(text: str) -> list[str]:
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = sorted(set(names) - set(PATHS))
  if unknown or not names:
    raise SystemExit(f"error: --paths {text!r}: unknown {', '.join(unknown) or 'empty'}; "
                     f"use a comma-separated subset of {', '.join(PATHS)}")
  return names


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--path", choices=list(PATHS), help="one point: the path")
  p.add_argument("--clients", type=int, help="one point: number of clients")
  p.add_argument("--batch", type=int, help="one point: batch per client")
  p.add_argument("--seeds", type=int, default=1, help="one point: seeds in one program")
  p.add_argument("--clients_per_round", type=int, default=None,
                 help="one point: K participants an iteration (default: all clients)")
  p.add_argument("--json", action="store_true", help="one point: print one JSON line")
  p.add_argument("--iters", type=int, default=5, help="timed iterations per run")
  p.add_argument("--paths", default=",".join(PATHS), help="table mode: paths to measure")
  p.add_argument("--repeats", type=int, default=2, help="table mode: interleaved repeats")
  p.add_argument("--torch_script", default=str(TORCH_PEER),
                 help="the PyTorch peer to run ('' to skip torch)")
  p.add_argument("--out", default="runs/bench", help="table mode: bench.json, bench.md")
  p.add_argument("--timeout", type=float, default=1800, help="seconds per child run")
  a = p.parse_args(argv)
  if a.iters < 1 or a.repeats < 1 or a.seeds < 1:
    raise SystemExit("error: --iters, --repeats and --seeds must be at least 1")
  if (a.clients is None) != (a.batch is None):
    raise SystemExit("error: give both --clients and --batch for one point")
  if a.clients is not None:
    if a.clients < 1 or a.batch < 1:
      raise SystemExit("error: --clients and --batch must be at least 1")
    if a.clients_per_round is not None and not 1 <= a.clients_per_round <= a.clients:
      raise SystemExit("error: --clients_per_round must lie in [1, --clients]")
    result = run_point(PATHS[a.path or "locfedmix_adam"], a.clients, a.batch, a.iters,
                       a.seeds, a.clients_per_round)
    print(json.dumps(result) if a.json else
          f"{a.clients} x {a.batch}: {result['samples_per_s']:.1f} samples/s, "
          f"{result['iter_ms']:.1f} ms/iter, compile {result['compile_s']:.2f} s, "
          f"peak {result['peak_rss_mib']:.0f} MiB")
    return 0

  names = parse_names(a.paths)
  torch_script = Path(a.torch_script) if a.torch_script else None
  torch_version = None
  if torch_script is not None:
    if not torch_script.is_file():
      print(f"no torch peer at {torch_script}: measuring lfmjax alone")
      torch_script = None
    elif not torch_available():
      print("torch is not installed: measuring lfmjax alone "
            "(pip install torch==2.13.0 for the comparison)")
      torch_script = None
    else:
      import importlib.metadata
      torch_version = importlib.metadata.version("torch")
  import jax
  meta = {"repeats": a.repeats, "iters": a.iters,
          "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
          "cpus": os.cpu_count(), "jax": jax.__version__, "torch": torch_version}
  rows = measure(names, a.repeats, a.iters, torch_script, a.timeout)
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
