"""A whole simulation run: load the data, build the round, train, evaluate, report.

The CLI (`lfmjax.main`) is a thin wrapper over `train_and_evaluate(config, workdir)`.
Training advances `steps_per_dispatch` iterations per dispatch (a `lax.scan` of the
jitted round), evaluates every `eval_every` iterations, and writes `config.json`,
`metrics.jsonl` (one JSON object a line), `eval.csv` and `accuracy.png` to the workdir.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lfmjax import accounting, algorithms
from lfmjax.data import PARTITIONS, client_table, load_dataset, make_partition
from lfmjax.evaluate import eval_client_ids, make_evaluate, pad_to_chunks
from lfmjax.models import MODEL_NAMES, get_model
from lfmjax.round import make_multi_step, make_round_step
from lfmjax.state import RoundState, init_state, make_data


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the fix."""


def validate(config) -> None:
  """Checks the config before anything is loaded or compiled."""
  def need(ok: bool, field: str, fix: str):
    if not ok:
      raise ConfigError(f"config.{field}={config.get(field)!r}: {fix}")
  need(config.algorithm in algorithms.ALGORITHMS, "algorithm",
       f"use one of {', '.join(sorted(algorithms.ALGORITHMS))}")
  need(config.model in MODEL_NAMES, "model", f"use one of {', '.join(MODEL_NAMES)}")
  need(config.partition in PARTITIONS, "partition", f"use one of {', '.join(PARTITIONS)}")
  need(config.num_clients >= 1, "num_clients", "must be at least 1")
  need(config.batch_size >= 1, "batch_size", "must be at least 1")
  need(config.client_optimizer in algorithms.OPTIMIZERS, "client_optimizer",
       f"use one of {', '.join(algorithms.OPTIMIZERS)}")
  need(config.server_optimizer in (None, *algorithms.OPTIMIZERS), "server_optimizer",
       f"use one of {', '.join(algorithms.OPTIMIZERS)} (or leave unset)")
  need(config.client_lr > 0, "client_lr", "must be positive")
  need(config.server_lr is None or config.server_lr > 0, "server_lr", "must be positive")
  need(config.fedavg_every >= 1, "fedavg_every", "T_c must be at least 1")
  need(config.num_mixed >= 1, "num_mixed", "n_s must be at least 1")
  need(config.mixup_alpha > 0, "mixup_alpha", "must be positive")
  need(config.num_iterations >= 0, "num_iterations", "must be non-negative")
  need(config.steps_per_dispatch >= 1, "steps_per_dispatch", "must be at least 1")
  need(config.eval_every >= 1, "eval_every", "must be at least 1")
  need(config.local_loss_kind in ("bce", "mse"), "local_loss_kind", "use 'bce' or 'mse'")
  need(config.input.normalize in algorithms.NORMALIZATIONS, "input.normalize",
       f"use one of {', '.join(algorithms.NORMALIZATIONS)}")
  need(0.0 < config.gradmix_fraction <= 1.0, "gradmix_fraction", "phi must be in (0, 1]")
  for field in ("client_flops_per_s", "server_flops_per_s", "uplink_bytes_per_s",
                "downlink_bytes_per_s"):
    need(config.get(field) > 0, field, "rates must be positive")
  check_composition(config)


def check_composition(config) -> None:
  """Switches the algorithm's structure cannot take (SPEC.md's table)."""
  structure = algorithms.ALGORITHMS[config.algorithm]
  switches = algorithms.resolve_switches(config)
  if structure["server"] == "relay":
    for name in ("fed", "mix", "gradmix"):
      if switches[name]:
        raise ConfigError(f"config.{name}=True: vanilla SL ({config.algorithm}) hands one "
                          f"lower from client to client and has no {name}; unset it or "
                          f"pick a parallel algorithm")
  if structure["server"] != "shared" and switches["mix"]:
    raise ConfigError(f"config.mix=True: SmashMix needs one shared server, and "
                      f"{config.algorithm} steps per client; use psl, sglr or locfedmix")
  if structure["download"] == "none" and config.local_ce_weight == 0.0:
    raise ConfigError(f"config.local_ce_weight=0.0: {config.algorithm}'s clients receive no "
                      f"gradient and learn only from the aux head; set it above 0")


def model_input_shape(config, image_shape) -> tuple[int, int, int]:
  h, w, c = image_shape
  side = config.input.resize_to
  return (side or h, side or w, config.input.channels or c)


class Progress:
  """One progress line: iterations, rate, ETA and the latest test accuracy."""

  def __init__(self, total: int, start: int, stream=sys.stderr):
    self.total, self.start, self.stream = total, start, stream
    self.t0 = time.perf_counter()
    self.tty = stream.isatty()
    self.last_print = 0.0

  def update(self, step: int, accuracy: float | None, force: bool = False) -> None:
    now = time.perf_counter()
    if not force and not self.tty and now - self.last_print < 10.0:
      return
    self.last_print = now
    done = step - self.start
    rate = done / max(now - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    width = 30
    filled = int(width * step / max(self.total, 1))
    acc = "-" if accuracy is None else f"{100 * accuracy:.2f}%"
    line = (f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} it "
            f"| {rate:.2f} it/s | ETA {format_seconds(eta)} | test acc {acc}")
    end = "\r" if self.tty else "\n"
    print(line, end=end, file=self.stream, flush=True)

  def close(self) -> None:
    if self.tty:
      print(file=self.stream)


def format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsWriter:
  """Appends JSON lines to metrics.jsonl and evaluation rows to eval.csv."""

  EVAL_FIELDS = ("iteration", "epoch", "test_accuracy", "test_loss", "loss_real",
                 "loss_mix", "loss_local", "loss_aux", "train_accuracy", "bytes_up",
                 "bytes_down", "latency_s", "wall_s")

  def __init__(self, workdir: str | None):
    self.workdir = workdir
    self.evals: list[dict] = []

  def write(self, record: dict) -> None:
    if record.get("type") == "eval":
      self.evals.append(record)
    if not self.workdir:
      return
    with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(record) + "\n")

  def finish(self) -> None:
    if not self.workdir or not self.evals:
      return
    with open(os.path.join(self.workdir, "eval.csv"), "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=self.EVAL_FIELDS, extrasaction="ignore")
      writer.writeheader()
      writer.writerows(self.evals)
    plot_accuracy(self.evals, os.path.join(self.workdir, "accuracy.png"))


def plot_accuracy(evals: list[dict], path: str) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:  # plots are a convenience; the CSV has the numbers
    return
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([e["iteration"] for e in evals], [100 * e["test_accuracy"] for e in evals], "o-")
  ax.set_xlabel("iteration")
  ax.set_ylabel("test accuracy (%)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def mean_metrics(stacked: dict) -> dict[str, float]:
  return {k: float(np.mean(v)) for k, v in jax.device_get(stacked).items()}


def train_and_evaluate(config, workdir: str | None = None, *, quiet: bool = False
                       ) -> dict[str, Any]:
  """Runs the configured simulation; returns a summary (final accuracy, timings)."""
  validate(config)
  t_start = time.perf_counter()
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))
  log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))

  dataset = load_dataset(config.dataset, config.data_dir, download=config.download,
                         verify=config.data_verify)
  seed = config.seed
  partition_seed = seed if config.partition_seed is None else config.partition_seed
  try:
    parts = make_partition(config.partition, dataset.train_y, config.num_clients,
                           partition_seed, alpha=config.dirichlet_alpha,
                           classes_per_client=config.classes_per_client,
                           per_client=config.samples_per_client)
  except ValueError as e:
    raise ConfigError(f"config.partition={config.partition!r} with "
                      f"num_clients={config.num_clients}: {e}") from None
  idx_CxM, sizes_C = client_table(parts)
  if int(sizes_C.min()) < config.batch_size:
    raise ConfigError(f"config.batch_size={config.batch_size} is larger than the smallest "
                      f"client's data ({int(sizes_C.min())} samples); lower batch_size or "
                      f"num_clients")
  cfg = algorithms.round_config_from(config, dataset.num_classes)
  input_shape = model_input_shape(config, dataset.train_x.shape[1:])
  try:
    model = get_model(config.model, num_classes=dataset.num_classes,
                      input_shape=input_shape, **config.model_overrides.to_dict())
  except ValueError as e:
    raise ConfigError(f"config.model={config.model!r} / config.model_overrides: {e}") from None
  data = make_data(dataset.train_x, dataset.train_y, idx_CxM, sizes_C)
  x_example, _ = cfg.preprocess(jnp.asarray(dataset.train_x[:config.batch_size]))
  state = init_state(cfg, model, jax.random.PRNGKey(seed), x_example)
  switches = algorithms.resolve_switches(config)
  log(f"lfmjax: {config.algorithm} (loc={switches['loc']}, fed={switches['fed']}, "
      f"mix={switches['mix']}) | {dataset.name} from {dataset.source} | "
      f"{config.model} | C={config.num_clients} B={config.batch_size} | "
      f"{config.num_iterations} iterations on {jax.devices()[0].platform}")

  ledger = accounting.make_ledger(cfg, model, state, data)
  latency = accounting.make_latency(cfg, model, state, data, ledger, accounting.Rates(
      config.client_flops_per_s, config.server_flops_per_s, config.uplink_bytes_per_s,
      config.downlink_bytes_per_s))
  log(accounting.describe(ledger, latency))

  round_step = make_round_step(cfg, model, jit=False)
  chunk = config.steps_per_dispatch
  multi_step = make_multi_step(round_step, chunk)
  single_step = make_multi_step(round_step, 1)
  evaluate = make_evaluate(cfg, model, chunk=config.eval_chunk)
  test = tuple(jnp.asarray(a) for a in pad_to_chunks(dataset.test_x, dataset.test_y,
                                                    min(config.eval_chunk,
                                                        len(dataset.test_y))))
  client_ids = jnp.asarray(eval_client_ids(config.num_clients, config.eval_clients, seed))
  if not cfg.fedavg and len(client_ids) < config.num_clients:
    log(f"evaluating the mean over a seeded subset of {len(client_ids)} of "
        f"{config.num_clients} clients' lowers (eval_clients)")
  iters_per_epoch = max(1, math.ceil(float(np.mean(sizes_C)) / config.batch_size))

  writer = MetricsWriter(workdir)
  progress = Progress(config.num_iterations, 0, stream=sys.stderr if not quiet
                      else open(os.devnull, "w"))
  step, last_acc, train_window = 0, None, []
  t_train = time.perf_counter()
  compile_s = None
  while step < config.num_iterations:
    next_eval = (step // config.eval_every + 1) * config.eval_every
    todo = min(next_eval, config.num_iterations) - step
    n = chunk if todo >= chunk else 1
    t0 = time.perf_counter()
    state, metrics = (multi_step if n == chunk else single_step)(state, data)
    # Waiting for each dispatch keeps the progress line honest (dispatch is async).
    train_window.append(jax.device_get(metrics))
    step += n
    if compile_s is None:
      compile_s = time.perf_counter() - t0
    if step % config.eval_every == 0 or step == config.num_iterations:
      record = evaluation_record(evaluate, state, data, client_ids, test, train_window,
                                 iters_per_epoch, time.perf_counter() - t_start)
      record.update(ledger.totals(step), latency_s=round(latency.total(step), 6))
      train_window = []
      last_acc = record["test_accuracy"]
      writer.write(record)
      progress.close()  # ends the TTY's progress line before the evaluation line
      log(f"iter {record['iteration']:>6} | epoch {record['epoch']:7.2f} | test acc "
          f"{100 * last_acc:6.2f}% | test loss {record['test_loss']:.4f} | L "
          f"{record['loss_real']:.4f} L~ {record['loss_mix']:.4f} L^ {record['loss_local']:.4f}"
          f" | {record['bytes_up'] / 2**20:.1f} MiB up, {record['bytes_down'] / 2**20:.1f} MiB "
          f"down | simulated {record['latency_s']:.1f}s")
    progress.update(step, last_acc)
  progress.update(step, last_acc, force=True)
  progress.close()
  train_s = time.perf_counter() - t_train
  writer.finish()
  summary = {
      "type": "summary",
      "algorithm": config.algorithm,
      "iterations": int(state.step),
      "final_test_accuracy": last_acc,
      "best_test_accuracy": max((e["test_accuracy"] for e in writer.evals), default=None),
      "train_s": round(train_s, 2),
      "first_dispatch_s": round(compile_s or 0.0, 2),
      "iterations_per_s": round(config.num_iterations / max(train_s, 1e-9), 3),
      "total_s": round(time.perf_counter() - t_start, 2),
      **ledger.totals(int(state.step)),
      "latency_s": round(latency.total(int(state.step)), 6),
      "latency_per_iteration_s": latency.iteration_s,
  }
  writer.write(summary)
  acc = "-" if last_acc is None else f"{100 * last_acc:.2f}%"
  log(f"done: {summary['iterations']} iterations in {summary['train_s']:.1f}s "
      f"({summary['iterations_per_s']:.2f} it/s, first dispatch {summary['first_dispatch_s']:.1f}s "
      f"incl. compile) | final test accuracy {acc}"
      + (f" | results in {workdir}" if workdir else ""))
  return summary


def evaluation_record(evaluate, state: RoundState, data, client_ids, test, train_window,
                      iters_per_epoch: int, wall_s: float) -> dict[str, Any]:
  result = jax.device_get(evaluate(state, data.weights_C, client_ids, test))
  step = int(state.step)
  train = mean_metrics(jax.tree.map(lambda *a: np.concatenate(a), *train_window)
                       ) if train_window else {}
  return {"type": "eval", "iteration": step, "epoch": round(step / iters_per_epoch, 4),
          "test_accuracy": float(result["accuracy"]), "test_loss": float(result["loss"]),
          **train, "wall_s": round(wall_s, 2)}
