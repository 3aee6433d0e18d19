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
import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lfmjax import accounting, algorithms, tensorboard
from lfmjax.checkpoint import (CheckpointError, Checkpoints, check_workdir,
                               partition_fingerprint)
from lfmjax.data import PARTITIONS, client_table, load_dataset, make_partition
from lfmjax.data.datasets import canonical_name
from lfmjax.evaluate import eval_client_ids, make_evaluate, pad_to_chunks
from lfmjax.models import MODEL_NAMES, get_model
from lfmjax.models.patch_conv import compiler_options
from lfmjax.optim import OPTIMIZERS, SCHEDULES
from lfmjax.mesh import (Placement, jit_sharded, make_mesh, make_placement, pad_data,
                         pad_state, padded_num_clients, padded_round, put_global,
                         real_clients)
from lfmjax.round import make_multi_step, make_round_step
from lfmjax.state import RoundState, init_state, make_data


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the fix."""


class TrainingError(RuntimeError):
  """The run cannot go on (a non-finite loss); the message names the iteration."""


class Interrupted(Exception):
  """SIGINT or SIGTERM arrived; the run saved a checkpoint (if it has a workdir)."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum


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
  need(config.client_optimizer in OPTIMIZERS, "client_optimizer",
       f"use one of {', '.join(OPTIMIZERS)}")
  need(config.server_optimizer in (None, *OPTIMIZERS), "server_optimizer",
       f"use one of {', '.join(OPTIMIZERS)} (or leave unset)")
  need(config.client_schedule in SCHEDULES, "client_schedule",
       f"use one of {', '.join(SCHEDULES)}")
  need(config.server_schedule in (None, *SCHEDULES), "server_schedule",
       f"use one of {', '.join(SCHEDULES)} (or leave unset)")
  need(0.0 <= config.weight_decay < math.inf, "weight_decay", "must be >= 0")
  need(config.grad_clip_norm is None or positive(config.grad_clip_norm), "grad_clip_norm",
       "the clipping norm must be a positive number (or leave it unset)")
  need(0.0 <= config.warmup_fraction < 1.0, "warmup_fraction", "must be in [0, 1)")
  need(all(0.0 < f < 1.0 for f in config.decay_fractions), "decay_fractions",
       "each drop must lie in (0, 1), a fraction of the run")
  need(0.0 < config.decay_factor < math.inf, "decay_factor", "must be positive")
  need(known_dataset(config.dataset), "dataset", "use fashion_mnist or cifar10")
  need(positive(config.client_lr), "client_lr", "the learning rate must be a positive number")
  need(config.server_lr is None or positive(config.server_lr), "server_lr",
       "the learning rate must be a positive number (or leave it unset)")
  need(math.isfinite(config.server_lr_exponent), "server_lr_exponent", "must be a number")
  need(0.0 <= config.momentum < 1.0, "momentum", "must be in [0, 1)")
  need(config.fedavg_every >= 1, "fedavg_every", "T_c must be at least 1")
  need(config.num_mixed >= 1, "num_mixed", "n_s must be at least 1")
  need(positive(config.mixup_alpha), "mixup_alpha", "Beta(alpha, alpha) needs alpha > 0")
  need(positive(config.dirichlet_alpha), "dirichlet_alpha", "Dirichlet needs alpha > 0")
  need(0.0 <= config.mu < math.inf, "mu", "the local-loss weight must be >= 0")
  need(config.local_ce_weight is None or 0.0 <= config.local_ce_weight < math.inf,
       "local_ce_weight", "must be >= 0 (or leave it unset)")
  need(config.classes_per_client >= 1, "classes_per_client", "must be at least 1")
  need(config.samples_per_client >= 1, "samples_per_client", "must be at least 1")
  need(config.num_iterations >= 0, "num_iterations", "must be non-negative")
  need(config.steps_per_dispatch >= 1, "steps_per_dispatch", "must be at least 1")
  need(config.eval_every >= 1, "eval_every", "must be at least 1")
  need(config.eval_clients >= 0, "eval_clients", "must be >= 0 (0: all clients)")
  need(config.eval_chunk >= 1, "eval_chunk", "must be at least 1")
  need(config.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: no checkpoints)")
  need(config.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1")
  need(config.num_seeds >= 1, "num_seeds", "must be at least 1")
  need(0 <= config.num_devices <= jax.device_count(), "num_devices",
       f"this run has {jax.device_count()} device(s); use 0 (all) or fewer")
  need(config.local_loss_kind in ("bce", "mse"), "local_loss_kind", "use 'bce' or 'mse'")
  need(config.input.normalize in algorithms.NORMALIZATIONS, "input.normalize",
       f"use one of {', '.join(algorithms.NORMALIZATIONS)}")
  need(0.0 < config.gradmix_fraction <= 1.0, "gradmix_fraction", "phi must be in (0, 1]")
  for field in ("client_flops_per_s", "server_flops_per_s", "uplink_bytes_per_s",
                "downlink_bytes_per_s"):
    need(positive(config.get(field)), field, "rates must be positive numbers")
  check_composition(config)


def known_dataset(name) -> bool:
  try:
    canonical_name(name)
  except ValueError:
    return False
  return True


def positive(value) -> bool:
  return 0.0 < value < math.inf


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
                 "loss_mix", "loss_local", "loss_aux", "train_accuracy", "lr_client",
                 "lr_server", "bytes_up", "bytes_down", "latency_s", "wall_s")

  def __init__(self, workdir: str | None, algorithm: str = "run"):
    self.workdir = workdir
    self.algorithm = algorithm
    self.evals: list[dict] = []

  def keep_until(self, step: int, eval_every: int) -> None:
    """Drops what a killed run wrote after iteration `step`, keeping its evaluations."""
    if not self.workdir:
      return
    path = os.path.join(self.workdir, "metrics.jsonl")
    records = []
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            records.append(json.loads(line))
          except ValueError:  # a line cut short by the kill
            break
    self.evals = [r for r in records if r.get("type") == "eval"
                  and r.get("iteration", 0) <= step and r["iteration"] % eval_every == 0]
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in self.evals))
    tensorboard.write_events(self.evals, self.workdir, self.algorithm)

  def write(self, record: dict) -> None:
    if record.get("type") == "eval":
      self.evals.append(record)
    if not self.workdir:
      return
    with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(record) + "\n")
    if record.get("type") == "eval":
      tensorboard.write_events(self.evals, self.workdir, self.algorithm)

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
  """Each train metric averaged over the window; the learning rates (`lr_*`) as of its
  last iteration, the rate the evaluated model was last stepped with."""
  return {k: float(np.mean(v[-1] if k.startswith("lr_") else v))
          for k, v in jax.device_get(stacked).items()}


def train_and_evaluate(config, workdir: str | None = None, *, quiet: bool = False
                       ) -> dict[str, Any]:
  """Runs the configured simulation; returns a summary (final accuracy, timings)."""
  validate(config)
  t_start = time.perf_counter()
  resuming = bool(workdir) and check_workdir(workdir, config.to_json())
  lead = jax.process_index() == 0  # only process 0 logs and writes files
  quiet = quiet or not lead
  log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))

  dataset = load_dataset(config.dataset, config.data_dir, download=config.download,
                         verify=config.data_verify)
  if int(config.num_clients) > len(dataset.train_y):
    raise ConfigError(f"config.num_clients={config.num_clients} is more than the "
                      f"{len(dataset.train_y)} train samples; lower num_clients")
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
  mesh = make_mesh(config.num_devices)
  log(f"lfmjax: {config.algorithm} (loc={switches['loc']}, fed={switches['fed']}, "
      f"mix={switches['mix']}) | {dataset.name} from {dataset.source} | "
      f"{config.model} | C={config.num_clients} B={config.batch_size} | "
      f"{config.num_iterations} iterations on {mesh.size} {jax.devices()[0].platform} "
      f"device(s)" + (f", {jax.process_count()} processes" if jax.process_count() > 1 else "")
      + (f" | {config.num_seeds} seeds" if config.num_seeds > 1 else ""))

  ledger = accounting.make_ledger(cfg, model, state, data)
  latency = accounting.make_latency(cfg, model, state, data, ledger, accounting.Rates(
      config.client_flops_per_s, config.server_flops_per_s, config.uplink_bytes_per_s,
      config.downlink_bytes_per_s))
  log(accounting.describe(ledger, latency))

  chunk = config.steps_per_dispatch
  run = place_run(cfg, model, mesh, config.num_seeds, state, seed, x_example, data, chunk)
  state, data = run.state, run.data
  test = put_global(pad_to_chunks(dataset.test_x, dataset.test_y,
                                  min(config.eval_chunk, len(dataset.test_y))),
                    (run.placement.replicated,) * 3)
  client_ids_host = eval_client_ids(config.num_clients, config.eval_clients, seed)
  client_ids = put_global(client_ids_host, run.placement.replicated)
  if not cfg.fedavg and len(client_ids_host) < config.num_clients:
    log(f"evaluating the mean over a seeded subset of {len(client_ids_host)} of "
        f"{config.num_clients} clients' lowers (eval_clients)")
  iters_per_epoch = max(1, math.ceil(float(np.mean(sizes_C)) / config.batch_size))

  if workdir and lead:
    os.makedirs(workdir, exist_ok=True)
    write_atomically(os.path.join(workdir, "config.json"), config.to_json(indent=2))
  checkpoints = Checkpoints(workdir, config.keep_checkpoints) if workdir else None
  fingerprint = partition_fingerprint(idx_CxM, sizes_C)
  writer = MetricsWriter(workdir if lead else None, config.algorithm)
  step, last_acc, train_window, wall_before = 0, None, [], 0.0
  if resuming:
    state, step, train_window = resume(checkpoints, state, fingerprint, writer,
                                       config.eval_every)
    last_acc = writer.evals[-1]["test_accuracy"] if writer.evals else None
    # wall_s counts on from the kept evaluations, so a resumed run's is its total.
    wall_before = writer.evals[-1].get("wall_s", 0.0) if writer.evals else 0.0
    log(f"resuming {workdir} from iteration {step}" if step else
        f"{workdir} has no checkpoint yet: starting from iteration 0")
  progress = Progress(config.num_iterations, step, stream=sys.stderr if not quiet
                      else open(os.devnull, "w"))

  def save(step_done: int) -> None:
    if checkpoints is not None:
      checkpoints.save(step_done, state, {"partition": fingerprint,
                                          "train_window": window_to_json(train_window)})

  t_train = time.perf_counter()
  compile_s = None
  start_step = step
  with signals_caught() as caught:
    while step < config.num_iterations:
      stop = next_stop(step, config)
      n = chunk if stop - step >= chunk else 1
      t0 = time.perf_counter()
      new_state, metrics = (run.multi_step if n == chunk else run.single_step)(state, data)
      # Waiting for each dispatch keeps the progress line honest (dispatch is async).
      metrics = jax.device_get(metrics)
      check_finite(metrics, step, checkpoints)
      state = new_state
      train_window.append(metrics)
      step += n
      if compile_s is None:
        compile_s = time.perf_counter() - t0
      if step % config.eval_every == 0 or step == config.num_iterations:
        record = evaluation_record(run.evaluate, state, data, client_ids, test, train_window,
                                   step, iters_per_epoch,
                                   wall_before + time.perf_counter() - t_start)
        record.update(ledger.totals(step), latency_s=round(latency.total(step), 6))
        if step % config.eval_every == 0:  # an end-of-run evaluation keeps the window
          train_window = []
        last_acc = record["test_accuracy"]
        writer.write(record)
        progress.close()  # ends the TTY's progress line before the evaluation line
        spread = (f" +- {100 * record['test_accuracy_std']:.2f}"
                  if "test_accuracy_std" in record else "")
        log(f"iter {record['iteration']:>6} | epoch {record['epoch']:7.2f} | test acc "
            f"{100 * last_acc:6.2f}%{spread} | test loss {record['test_loss']:.4f} | L "
            f"{record['loss_real']:.4f} L~ {record['loss_mix']:.4f} L^ "
            f"{record['loss_local']:.4f} | {record['bytes_up'] / 2**20:.1f} MiB up, "
            f"{record['bytes_down'] / 2**20:.1f} MiB down | simulated "
            f"{record['latency_s']:.1f}s")
      if (caught or step == config.num_iterations
          or config.checkpoint_every and step % config.checkpoint_every == 0):
        save(step)
      if caught:
        progress.close()
        where = (f"checkpoint saved in {checkpoints.directory}; run the same command to "
                 f"resume" if checkpoints else "no --workdir, so nothing was saved")
        raise Interrupted(caught[0], f"interrupted by {signal.Signals(caught[0]).name} at "
                                     f"iteration {step}: {where}")
      progress.update(step, last_acc)
  progress.update(step, last_acc, force=True)
  progress.close()
  if checkpoints is not None:
    checkpoints.close()
  train_s = time.perf_counter() - t_train
  writer.finish()
  summary = {
      "type": "summary",
      "algorithm": config.algorithm,
      "iterations": step,
      "final_test_accuracy": last_acc,
      **({"final_test_accuracy_std": writer.evals[-1].get("test_accuracy_std"),
          "final_test_accuracy_seeds": writer.evals[-1].get("test_accuracy_seeds")}
         if config.num_seeds > 1 and writer.evals else {}),
      "best_test_accuracy": max((e["test_accuracy"] for e in writer.evals), default=None),
      "train_s": round(train_s, 2),
      "first_dispatch_s": round(compile_s or 0.0, 2),
      "iterations_per_s": round((step - start_step) / max(train_s, 1e-9), 3),
      "total_s": round(time.perf_counter() - t_start, 2),
      **ledger.totals(step),
      "latency_s": round(latency.total(step), 6),
      "latency_per_iteration_s": latency.iteration_s,
  }
  writer.write(summary)
  acc = "-" if last_acc is None else f"{100 * last_acc:.2f}%"
  if summary.get("final_test_accuracy_std") is not None:
    acc += (f" +- {100 * summary['final_test_accuracy_std']:.2f} over {config.num_seeds} seeds "
            f"({', '.join(f'{100 * a:.2f}' for a in summary['final_test_accuracy_seeds'])})")
  log(f"done: {summary['iterations']} iterations in {summary['train_s']:.1f}s "
      f"({summary['iterations_per_s']:.2f} it/s, first dispatch {summary['first_dispatch_s']:.1f}s "
      f"incl. compile) | final test accuracy {acc}"
      + (f" | results in {workdir}" if workdir else ""))
  return summary


@dataclasses.dataclass
class PlacedRun:
  """A run's arrays on the mesh and its compiled programs."""
  state: RoundState
  data: Any
  placement: Placement
  multi_step: Any    # (state, data) -> (state, metrics stacked over `chunk` iterations)
  single_step: Any   # the same for one iteration
  evaluate: Any      # (state, weights_C, client_ids, test) -> {'accuracy', 'loss'}


def place_run(cfg, model, mesh, num_seeds: int, state: RoundState, seed: int, x_example,
              data_host, chunk: int) -> PlacedRun:
  """The state (`state` is seed `seed`'s; S seeds stacked when S > 1, clients padded to
  the mesh) and the data put on `mesh`, and the round, multi-step and evaluation
  programs for them."""
  num_padded = padded_num_clients(cfg.num_clients, mesh.size)
  states = [state] + [init_state(cfg, model, jax.random.PRNGKey(seed + i), x_example)
                      for i in range(1, num_seeds)]
  states = [pad_state(cfg, jax.device_get(s), num_padded) for s in states]
  state = states[0] if num_seeds == 1 else jax.tree.map(lambda *a: np.stack(a), *states)
  placement = make_placement(cfg, state, mesh, seeds=num_seeds > 1)
  state = put_global(state, placement.state)
  data = put_global(pad_data(data_host, num_padded), placement.data)

  step_fn = padded_round(cfg, make_round_step(cfg, model, jit=False, mesh=mesh), mesh)
  evaluate_one = make_evaluate(cfg, model, jit=False)

  def evaluate_real(state, weights_C, client_ids, test):
    c = cfg.num_clients
    return evaluate_one(real_clients(cfg, state), weights_C[:c], client_ids, test)

  if num_seeds > 1:
    step_fn = jax.vmap(step_fn, in_axes=(0, None))
    evaluate_real = jax.vmap(evaluate_real, in_axes=(0, None, None, None))
  return PlacedRun(
      state=state, data=data, placement=placement,
      multi_step=jit_sharded(make_multi_step(step_fn, chunk, jit=False), placement),
      single_step=jit_sharded(make_multi_step(step_fn, 1, jit=False), placement),
      evaluate=jax.jit(evaluate_real, compiler_options=compiler_options()))


def next_stop(step: int, config) -> int:
  """The next iteration at which the loop must pause (evaluation, checkpoint, end).

  A function of the step alone, so a resumed run dispatches the same chunks as the
  uninterrupted one from there on."""
  stops = [(step // config.eval_every + 1) * config.eval_every, config.num_iterations]
  if config.checkpoint_every:
    stops.append((step // config.checkpoint_every + 1) * config.checkpoint_every)
  return min(stops)


LOSS_TERMS = ("loss_real", "loss_mix", "loss_local", "loss_aux")


def check_finite(metrics: dict, step: int, checkpoints: Checkpoints | None) -> None:
  """Stops the run at the first iteration whose loss is NaN or infinite (any seed)."""
  found = []  # (iteration, term order, seed, value)
  for order, term in enumerate(t for t in LOSS_TERMS if t in metrics):
    values = np.asarray(metrics[term]).reshape(len(metrics[term]), -1)  # iterations x seeds
    for i, seed in np.argwhere(~np.isfinite(values))[:1]:
      found.append((i, order, seed, term, values[i, seed], values.shape[1]))
  if not found:
    return
  i, _, seed, term, value, num_seeds = min(found)
  kept = checkpoints.latest_step() if checkpoints else None
  where = (f"the last good checkpoint (iteration {kept}) is kept in "
           f"{checkpoints.directory}" if kept is not None else "no checkpoint was written")
  which = f" (seed replica {seed})" if num_seeds > 1 else ""
  raise TrainingError(f"iteration {step + i + 1}: {term} is {value}{which}; {where}; "
                      f"lower client_lr/server_lr and start a new --workdir")


def joined_window(window: list[dict]) -> dict:
  """The train metrics since the last evaluation, one array per metric."""
  return {k: np.concatenate([m[k] for m in window]) for k in window[0]} if window else {}


def window_to_json(window: list[dict]) -> dict:
  """The train metrics since the last evaluation, exactly (float32 -> JSON -> float32)."""
  return {k: {"dtype": str(v.dtype), "values": v.tolist()}
          for k, v in joined_window(window).items()}


def window_from_json(saved: dict) -> list[dict]:
  if not saved:
    return []
  return [{k: np.asarray(v["values"], dtype=v["dtype"]) for k, v in saved.items()}]


def resume(checkpoints: Checkpoints, state: RoundState, fingerprint: str,
           writer: "MetricsWriter", eval_every: int) -> tuple[RoundState, int, list[dict]]:
  """The latest checkpoint's state, step and train window; the workdir's metrics are
  cut back to that step (records written after it are redone by this run), and an
  earlier invocation's end-of-run evaluation off the eval_every grid is dropped, so the
  file reads as the uninterrupted run's."""
  step = checkpoints.latest_step()
  if step is None:
    writer.keep_until(0, eval_every)
    return state, 0, []
  state, loop = checkpoints.restore(step, state)
  if loop.get("partition") != fingerprint:
    raise CheckpointError(f"the checkpoint in {checkpoints.directory} was made with another "
                          f"partition of the data (has the dataset changed?); use a new "
                          f"--workdir")
  writer.keep_until(step, eval_every)
  return state, step, window_from_json(loop.get("train_window", {}))


@contextlib.contextmanager
def signals_caught(signums=(signal.SIGINT, signal.SIGTERM)):
  """Within the block SIGINT and SIGTERM are noted in the yielded list, not raised, so
  the loop can finish its dispatch and save a checkpoint before it exits."""
  caught: list[int] = []
  if threading.current_thread() is not threading.main_thread():
    yield caught  # handlers can only be set from the main thread
    return
  previous = {n: signal.signal(n, lambda signum, frame: caught.append(signum))
              for n in signums}
  try:
    yield caught
  finally:
    for n, handler in previous.items():
      signal.signal(n, handler)


def write_atomically(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def evaluation_record(evaluate, state: RoundState, data, client_ids, test, train_window,
                      step: int, iters_per_epoch: int, wall_s: float) -> dict[str, Any]:
  """Test accuracy and loss (the mean over seeds, with each seed's and the spread when
  there are several) and the train metrics averaged since the last evaluation."""
  result = jax.device_get(evaluate(state, data.weights_C, client_ids, test))
  accuracy, loss = np.asarray(result["accuracy"]), np.asarray(result["loss"])
  train = mean_metrics(joined_window(train_window))
  record = {"type": "eval", "iteration": step, "epoch": round(step / iters_per_epoch, 4),
            "test_accuracy": float(accuracy.mean()), "test_loss": float(loss.mean())}
  if accuracy.ndim:  # num_seeds > 1
    record.update(test_accuracy_std=float(accuracy.std()),
                  test_accuracy_seeds=[float(a) for a in accuracy],
                  test_loss_seeds=[float(v) for v in loss])
  return {**record, **train, "wall_s": round(wall_s, 2)}
