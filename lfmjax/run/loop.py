"""The training loop of a whole run (Oh et al., LocFedMix-SL, WWW 2022, as simulated by
lfmjax): prepare the data, partition, model and compiled programs; advance
`steps_per_dispatch` iterations per dispatch; evaluate every `eval_every`; checkpoint;
return the trained state with the history. `lfmjax.main` is a thin CLI over it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lfmjax import accounting, algorithms, config_round, devices, finetune
from lfmjax.checkpoint import (CheckpointError, Checkpoints, check_workdir, checkpoint_steps,
                               partition_fingerprint)
from lfmjax.data import client_table, holdout, load_dataset, make_partition
from lfmjax.evaluate import (eval_client_ids, eval_subset, make_evaluate, make_label_probe,
                             make_leakage_probe, pad_to_chunks, probe_size)
from lfmjax.mesh import (Placement, jit_sharded, make_mesh, make_placement, pad_data,
                         pad_state, padded_num_clients, padded_round, put_global,
                         real_clients, real_data)
from lfmjax.models import get_model
from lfmjax.models.patch_conv import compiler_options
from lfmjax.round import make_multi_step, make_round_step
from lfmjax.run.environment import environment
from lfmjax.run.lock import WorkdirLock, check_writable
from lfmjax.run.progress import Progress
from lfmjax.run.validate import (ConfigError, lora_options, model_input_shape, model_overrides,
                                 validate)
from lfmjax.run.workdir import (MetricsWriter, at_best_validation, evaluation_record, resume,
                                window_to_json, write_atomically)
from lfmjax.state import RoundState, init_state, make_data


class TrainingError(RuntimeError):
  """The run cannot go on (a non-finite loss); the message names the iteration."""


class Interrupted(Exception):
  """SIGINT or SIGTERM arrived; the run saved a checkpoint (if it has a workdir)."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum


@dataclasses.dataclass
class PlacedRun:
  """A run's arrays on the mesh and its compiled programs."""
  state: RoundState
  data: Any
  placement: Placement
  multi_step: Any    # (state, data) -> (state, metrics stacked over `chunk` iterations)
  single_step: Any   # the same for one iteration
  evaluate: Any      # (state, weights_C, client_ids, test) -> {'accuracy', 'loss'}
  leakage: Any = None  # (state, data) -> dCor(x, u) per client (seeds x C), or None


def place_run(cfg, model, mesh, num_seeds: int, state: RoundState, seed: int, x_example,
              data_host, chunk: int, probe: int = 0, backbone=None) -> PlacedRun:
  """The state (`state` is seed `seed`'s; S seeds stacked when S > 1, clients padded to
  the mesh) and the data put on `mesh`, and the round, multi-step and evaluation
  programs for them (with the leakage probe of `probe` samples per client, if any)."""
  num_padded = padded_num_clients(cfg.num_clients, mesh.size)
  states = [state] + [init_state(cfg, model, jax.random.PRNGKey(seed + i), x_example,
                                 backbone=backbone) for i in range(1, num_seeds)]
  states = [pad_state(cfg, jax.device_get(s), num_padded) for s in states]
  state = states[0] if num_seeds == 1 else jax.tree.map(lambda *a: np.stack(a), *states)
  placement = make_placement(cfg, state, mesh, seeds=num_seeds > 1,
                             seconds=data_host.seconds_C is not None)
  state = put_global(state, placement.state)
  data = put_global(pad_data(data_host, num_padded), placement.data)

  step_fn = padded_round(cfg, make_round_step(cfg, model, jit=False, mesh=mesh), mesh)
  evaluate_one = make_evaluate(cfg, model, jit=False)

  def evaluate_real(state, weights_C, client_ids, test):
    c = cfg.num_clients
    return evaluate_one(real_clients(cfg, state), weights_C[:c], client_ids, test)

  leakage = None
  if probe:
    dcor = make_leakage_probe(cfg, model, probe)
    label_auc = make_label_probe(cfg, model, probe) if cfg.inputs == "images" else None

    def leakage(state, data):  # what the server learns of inputs, and of labels
      state, data = real_clients(cfg, state), real_data(cfg, data)
      probes = {"dcor": dcor(state, data)}
      if label_auc is not None:
        probes["label_auc"] = label_auc(state, data)
      return probes
  if num_seeds > 1:
    step_fn = over_seeds(cfg, step_fn)
    evaluate_real = jax.vmap(evaluate_real, in_axes=(0, None, None, None))
    leakage = leakage and jax.vmap(leakage, in_axes=(0, None))
  return PlacedRun(
      state=state, data=data, placement=placement,
      multi_step=jit_sharded(make_multi_step(step_fn, chunk, jit=False), placement),
      single_step=jit_sharded(make_multi_step(step_fn, 1, jit=False), placement),
      evaluate=jax.jit(evaluate_real, compiler_options=compiler_options()),
      leakage=leakage and jax.jit(leakage, compiler_options=compiler_options()))


def over_seeds(cfg, step_fn):
  """One iteration of every seed replica (states stacked on axis 0): vmapped, except
  vanilla SL's, whose replicas go one after another (`lax.map`). SL's turn is a long
  scan of one client's small batches; vmapped over 3 seeds it ran at 188 ms a step
  (resnet16, C = 20, turns of 125 batches) against 24 ms for one seed, so the seeds in
  turn are 2.6x faster."""
  if cfg.client_phase == "relay":
    return lambda states, data: jax.lax.map(lambda state: step_fn(state, data), states)
  return jax.vmap(step_fn, in_axes=(0, None))


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



@dataclasses.dataclass
class Prepared:
  """Everything a run's loop reads, built once from the config."""
  cfg: algorithms.RoundConfig
  run: PlacedRun
  test: Any
  client_ids: Any
  ledger: Any
  latency: Any
  epochs_per_iteration: float  # samples a client sees per iteration over its |D_k|, mean
  fingerprint: str
  val: Any = None              # the held-out validation split's chunks, or None


def partition_seed(config) -> int:
  return config.seed if config.partition_seed is None else config.partition_seed


def split_validation(config, dataset):
  """(the dataset whose train split the clients share, the held-out validation (x, y)
  or None): `validation_size` train images drawn with the partition's seed."""
  size, n = int(config.validation_size), len(dataset.train_y)
  if not size:
    return dataset, None
  if size + int(config.num_clients) > n:
    raise ConfigError(f"config.validation_size={size} leaves {n - size} of the {n} train "
                      f"samples for {config.num_clients} clients; lower validation_size")
  kept, held = holdout(n, size, partition_seed(config))
  train = dataclasses.replace(dataset, train_x=dataset.train_x[kept],
                              train_y=dataset.train_y[kept])
  return train, (dataset.train_x[held], dataset.train_y[held])


def client_partition(config, dataset) -> tuple[np.ndarray, np.ndarray]:
  """The clients' index table and sizes, or a ConfigError naming what does not fit."""
  if int(config.num_clients) > len(dataset.train_y):
    raise ConfigError(f"config.num_clients={config.num_clients} is more than the "
                      f"{len(dataset.train_y)} train samples; lower num_clients")
  try:
    # A text corpus partitions by its samples' groups (books), images by their labels.
    labels = dataset.train_groups if dataset.tokens else dataset.train_y
    parts = make_partition(config.partition, labels, config.num_clients,
                           partition_seed(config), alpha=config.dirichlet_alpha,
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
  return idx_CxM, sizes_C


def build_model(config, dataset):
  input_shape = model_input_shape(config, dataset.train_x.shape[1:], dataset.tokens)
  try:
    return get_model(config.model, num_classes=dataset.num_classes,
                     input_shape=input_shape, **lora_options(config),
                     client_head=bool(config.get("client_head")),
                     **model_overrides(config))
  except ValueError as e:
    raise ConfigError(f"config.model={config.model!r} / config.model_overrides: {e}") from None


def load_config_dataset(config):
  """The dataset the config names, from where it says (or the usual places)."""
  return load_dataset(config.dataset, config.data_dir, download=config.data_download,
                      verify=config.data_verify, seq_len=config.input.seq_len)


def load_pretrained(config, log: Callable):
  """The pretrained backbone the config names ({'lower', 'upper'}), or None."""
  if not config.pretrained:
    return None
  try:
    backbone, pre_config = finetune.load_backbone(config.pretrained)
  except finetune.PretrainedError as e:
    raise ConfigError(str(e)) from None
  if pre_config.get("model") != config.model:
    raise ConfigError(f"config.pretrained={config.pretrained!r} is a {pre_config.get('model')} "
                      f"run, this one a {config.model}: pretrain the same model")
  log(f"backbone: {config.pretrained} ({pre_config.get('dataset')}, "
      f"{pre_config.get('num_iterations')} iterations)"
      + (f", frozen; LoRA rank {config.lora.rank} on {config.lora.segments}"
         if config.lora.rank else ", every parameter trained"))
  return backbone


def prepare(config, log: Callable, dataset=None) -> Prepared:
  """Data, partition, model, initial state, ledger and the compiled programs on the mesh
  (`dataset`: the config's, already loaded)."""
  dataset = dataset or load_config_dataset(config)
  dataset, val = split_validation(config, dataset)
  idx_CxM, sizes_C = client_partition(config, dataset)
  cfg = config_round.round_config_from(config, dataset.num_classes, sizes_C, dataset.kind)
  model = build_model(config, dataset)
  backbone = load_pretrained(config, log)
  data = make_data(dataset.train_x, dataset.train_y, idx_CxM, sizes_C)
  x_example, _ = cfg.preprocess(jnp.asarray(dataset.train_x[:config.batch_size]))
  try:
    state = init_state(cfg, model, jax.random.PRNGKey(config.seed), x_example,
                       backbone=backbone)
  except finetune.PretrainedError as e:
    raise ConfigError(f"config.pretrained={config.pretrained!r}: {e}") from None
  mesh = make_mesh(config.num_devices)
  log(f"lfmjax: {config.algorithm} (local_loss={cfg.local_loss}, fedavg={cfg.fedavg}, "
      f"smashmix={cfg.smashmix}{', U-shaped' if cfg.client_head else ''}) | "
      f"{dataset.name} from {dataset.source} | "
      f"{config.model} | C={config.num_clients} B={config.batch_size} | "
      f"{config.num_iterations} iterations on {mesh.size} {jax.devices()[0].platform} "
      f"device(s)" + (f", {jax.process_count()} processes" if jax.process_count() > 1 else "")
      + (f" | {config.num_seeds} seeds" if config.num_seeds > 1 else ""))
  ledger, latency, costs = make_accounts(config, cfg, model, state, data)
  log(accounting.describe(ledger, latency))
  if costs is not None and cfg.deadline_s is not None:
    data = data.replace(seconds_C=jnp.asarray(costs.seconds_C, jnp.float32),
                        sync_seconds_C=jnp.asarray(costs.sync_C, jnp.float32))
  run = place_run(cfg, model, mesh, config.num_seeds, state, config.seed, x_example, data,
                  config.steps_per_dispatch, probe_size(config.privacy.probe_size, sizes_C),
                  backbone)
  if costs is not None:  # the draws replayed from every seed's run key
    ledger = latency = accounting.ParticipationAccounts(
        cfg, costs, jax.device_get(run.state.key), data.weights_C, cfg.num_clients, ledger)
    dev = config.devices
    log(accounting.describe_participation(
        cfg, latency, dev.distribution + (f" (spread {dev.spread:g})"
                                          if dev.distribution == "lognormal" else "")))
  if 0 < config.eval_samples < len(dataset.test_y):
    log(f"evaluating a fixed subset of {config.eval_samples} of each split's samples "
        f"(eval_samples)")

  def chunks(x, y):
    x, y = eval_subset(x, y, config.eval_samples)
    return put_global(pad_to_chunks(x, y, min(config.eval_chunk, len(y))),
                      (run.placement.replicated,) * 3)
  test = chunks(dataset.test_x, dataset.test_y)
  client_ids_host = eval_client_ids(config.num_clients, config.eval_clients, config.seed)
  if not cfg.fedavg and len(client_ids_host) < config.num_clients:
    log(f"evaluating the mean over a seeded subset of {len(client_ids_host)} of "
        f"{config.num_clients} clients' lowers (eval_clients)")
  batches_C = (cfg.turn_steps(sizes_C) if cfg.server_mode == "relay"
               else np.ones_like(sizes_C))
  return Prepared(cfg, run, test, put_global(client_ids_host, run.placement.replicated),
                  ledger, latency,
                  # K of C clients take part in an iteration, on average
                  float(np.mean(batches_C * config.batch_size / sizes_C))
                  * cfg.num_participants / cfg.num_clients,
                  partition_fingerprint(idx_CxM, sizes_C),
                  None if val is None else chunks(*val))


def make_accounts(config, cfg, model, state, data):
  """(ledger, latency, per-client costs or None): the closed forms of the round of the
  K participants; per-client costs where the clients' devices differ or clients come
  and go (then `ParticipationAccounts` replays the draws). A deadline no client can
  meet is a ConfigError."""
  rates = accounting.Rates(config.client_flops_per_s, config.server_flops_per_s,
                           config.uplink_bytes_per_s, config.downlink_bytes_per_s)
  cfg_k, data_k = cfg, data
  if cfg.samples_clients:  # the accounts of one iteration of K participants
    cfg_k = cfg.participants_config()
    data_k = data.replace(**{f: getattr(data, f)[:cfg_k.num_clients]
                             for f in ("idx_CxM", "sizes_C", "weights_C")})
  ledger = accounting.make_ledger(cfg_k, model, state, data_k)
  latency = accounting.make_latency(cfg_k, model, state, data_k, ledger, rates)
  dev = config.devices
  try:
    client_devices = devices.make_devices(
        dev.distribution, cfg.num_clients, rates.client_flops_per_s,
        rates.uplink_bytes_per_s, rates.downlink_bytes_per_s, spread=dev.spread,
        trace=dev.trace and os.path.expanduser(dev.trace),
        seed=config.seed if dev.seed is None else dev.seed)
  except devices.DevicesError as e:
    raise ConfigError(f"config.{e}") from None
  if not cfg.samples_clients and client_devices.uniform:
    return ledger, latency, None
  steps = (float(accounting.turn_steps(cfg_k, data_k).sum()) if cfg.server_mode == "relay"
           else 1.0)
  costs = accounting.client_seconds(cfg_k, ledger, latency, client_devices,
                                    np.asarray(data.sizes_C), latency.server_flops / steps,
                                    rates.server_flops_per_s)
  # At an iteration that ends with FedAvg a participant's time includes its transfer: a
  # deadline no client meets there would leave the clients never averaged.
  fastest = float(np.min(costs.seconds_C + (costs.sync_C if cfg.fedavg else 0.0)))
  if cfg.deadline_s is not None and fastest > cfg.deadline_s:
    raise ConfigError(f"config.deadline_s={cfg.deadline_s}: no client can meet it (the "
                      f"fastest takes {fastest:.4g} simulated s an iteration"
                      f"{', FedAvg included' if cfg.fedavg else ''}); raise it")
  return ledger, latency, costs


@dataclasses.dataclass
class Workdir:
  """The run's files: checkpoints, metrics writer, and where a resume starts."""
  checkpoints: Checkpoints | None
  writer: MetricsWriter
  state: RoundState
  step: int
  train_window: list
  wall_before: float


def open_workdir(config, workdir, resuming: bool, lead: bool, prep: Prepared,
                 log: Callable) -> Workdir:
  """config.json written, checkpoints opened, and the run resumed where one was kept."""
  if workdir and lead:
    os.makedirs(workdir, exist_ok=True)
    write_atomically(os.path.join(workdir, "config.json"), config.to_json(indent=2))
  checkpoints = Checkpoints(workdir, config.keep_checkpoints) if workdir else None
  writer = MetricsWriter(workdir if lead else None, config.algorithm)
  state, step, train_window, wall_before = prep.run.state, 0, [], 0.0
  if resuming:
    try:
      state, step, train_window = resume(checkpoints, state, prep.fingerprint, writer,
                                         config.eval_every)
    except BaseException:  # orbax's threads stopped before the error leaves
      if checkpoints is not None:
        checkpoints.close()
      raise
    # wall_s counts on from the kept evaluations, so a resumed run's is its total.
    wall_before = writer.evals[-1].get("wall_s", 0.0) if writer.evals else 0.0
    log(f"resuming {workdir} from iteration {step}" if step else
        f"{workdir} has no checkpoint yet: starting from iteration 0")
  return Workdir(checkpoints, writer, state, step, train_window, wall_before)


def evaluation_line(record: dict) -> str:
  spread = (f" +- {100 * record['test_accuracy_std']:.2f}"
            if "test_accuracy_std" in record else "")
  val = (f" | val acc {100 * record['val_accuracy']:6.2f}%" if "val_accuracy" in record
         else "")
  perplexity = (f" (perplexity {record['test_perplexity']:.2f})"
                if "test_perplexity" in record else "")
  return (f"iter {record['iteration']:>6} | epoch {record['epoch']:7.2f} | test acc "
          f"{100 * record['test_accuracy']:6.2f}%{spread}{val} | test loss "
          f"{record['test_loss']:.4f}{perplexity} | L {record['loss_real']:.4f} L~ "
          f"{record['loss_mix']:.4f} L^ {record['loss_local']:.4f} | "
          f"{record['bytes_up'] / 2**20:.1f} MiB up, {record['bytes_down'] / 2**20:.1f} MiB "
          f"down | simulated {record['latency_s']:.1f}s")


def participation_record(latency, start: int, step: int, num_seeds: int) -> dict:
  """What an evaluation records of clients that differ or come and go: the late
  participants an iteration since `start`, the simulated seconds the deadline saved,
  and each seed's simulated seconds (`accounting.ParticipationAccounts`)."""
  if not isinstance(latency, accounting.ParticipationAccounts):
    return {}
  record = latency.participation(start, step)
  record.pop("participants")  # the round's own metric says it (the window's mean)
  if num_seeds > 1:
    record["latency_s_seeds"] = latency.seeds(step)
  return record


def run_loop(config, prep: Prepared, wd: Workdir, progress: Progress, t_start: float,
             log: Callable) -> tuple[RoundState, int, float | None]:
  """Dispatches, evaluations and checkpoints up to `num_iterations`: (state, step,
  compile seconds of the first dispatch)."""
  run, state, step, window = prep.run, wd.state, wd.step, wd.train_window
  last_acc = wd.writer.evals[-1]["test_accuracy"] if wd.writer.evals else None
  chunk, compile_s = config.steps_per_dispatch, None
  last_eval = wd.writer.evals[-1]["iteration"] if wd.writer.evals else 0

  def save(step_done: int) -> None:
    if wd.checkpoints is not None:
      wd.checkpoints.save(step_done, state, {"partition": prep.fingerprint,
                                             "train_window": window_to_json(window)})

  with signals_caught() as caught:
    while step < config.num_iterations:
      n = chunk if next_stop(step, config) - step >= chunk else 1
      t0 = time.perf_counter()
      new_state, metrics = (run.multi_step if n == chunk else run.single_step)(state, run.data)
      # Waiting for each dispatch keeps the progress line honest (dispatch is async).
      metrics = jax.device_get(metrics)
      check_finite(metrics, step, wd.checkpoints)
      state, step = new_state, step + n
      window.append(metrics)
      compile_s = time.perf_counter() - t0 if compile_s is None else compile_s
      if step % config.eval_every == 0 or step == config.num_iterations:
        record = evaluation_record(run.evaluate, state, run.data, prep.client_ids, prep.test,
                                   window, step, prep.epochs_per_iteration,
                                   wd.wall_before + time.perf_counter() - t_start, prep.val,
                                   run.leakage)
        record.update(prep.ledger.totals(step), latency_s=round(prep.latency.total(step), 6))
        record.update(participation_record(prep.latency, last_eval, step, config.num_seeds))
        last_eval = step
        if step % config.eval_every == 0:  # an end-of-run evaluation keeps the window
          window = []
        last_acc = record["test_accuracy"]
        wd.writer.write(record)
        progress.clear()  # the terminal's bar off, for the evaluation line
        log(evaluation_line(record))
      if (caught or step == config.num_iterations
          or config.checkpoint_every and step % config.checkpoint_every == 0):
        save(step)
      if caught:
        progress.close()
        where = (f"checkpoint saved in {wd.checkpoints.directory}; run the same command to "
                 f"resume" if wd.checkpoints else "no --workdir, so nothing was saved")
        raise Interrupted(caught[0], f"interrupted by {signal.Signals(caught[0]).name} at "
                                     f"iteration {step}: {where}")
      progress.update(step, last_acc)
  return state, step, compile_s


def summarize(config, prep: Prepared, wd: Workdir, step: int, train_s: float,
              compile_s: float | None, t_start: float) -> dict[str, Any]:
  evals = wd.writer.evals
  last_acc = evals[-1]["test_accuracy"] if evals else None
  return {
      "type": "summary",
      "algorithm": config.algorithm,
      "iterations": step,
      "final_test_accuracy": last_acc,
      **({"final_test_accuracy_std": evals[-1].get("test_accuracy_std"),
          "final_test_accuracy_seeds": evals[-1].get("test_accuracy_seeds")}
         if config.num_seeds > 1 and evals else {}),
      "best_test_accuracy": max((e["test_accuracy"] for e in evals), default=None),
      **({"final_test_perplexity": evals[-1]["test_perplexity"]}
         if evals and "test_perplexity" in evals[-1] else {}),
      **at_best_validation(evals),
      "train_s": round(train_s, 2),
      "first_dispatch_s": round(compile_s or 0.0, 2),
      "iterations_per_s": round((step - wd.step) / max(train_s, 1e-9), 3),
      "total_s": round(time.perf_counter() - t_start, 2),
      **prep.ledger.totals(step),
      "latency_s": round(prep.latency.total(step), 6),
      "latency_per_iteration_s": prep.latency.iteration_s,
      "environment": environment(),
  }


def done_line(config, summary: dict, workdir) -> str:
  last_acc = summary["final_test_accuracy"]
  acc = "-" if last_acc is None else f"{100 * last_acc:.2f}%"
  if summary.get("final_test_accuracy_std") is not None:
    acc += (f" +- {100 * summary['final_test_accuracy_std']:.2f} over {config.num_seeds} seeds "
            f"({', '.join(f'{100 * a:.2f}' for a in summary['final_test_accuracy_seeds'])})")
  if "final_test_perplexity" in summary:
    acc += f" | final test perplexity {summary['final_test_perplexity']:.2f}"
  if "test_accuracy_at_best_val" in summary:
    acc += f" | at the best validation {100 * summary['test_accuracy_at_best_val']:.2f}%"
  return (f"done: {summary['iterations']} iterations in {summary['train_s']:.1f}s "
          f"({summary['iterations_per_s']:.2f} it/s, first dispatch "
          f"{summary['first_dispatch_s']:.1f}s incl. compile) | final test accuracy {acc}"
          + (f" | results in {workdir}" if workdir else ""))


@dataclasses.dataclass
class RunResult:
  """What `train` returns: the trained state (on the mesh; seeds stacked when S > 1,
  clients padded to the devices), the evaluation records and the summary."""
  state: RoundState
  history: list[dict]
  summary: dict[str, Any]


def train(config, workdir: str | None = None, *, quiet: bool = False) -> RunResult:
  """Runs the configured simulation and returns its trained state and history.

  The workdir is checked writable and locked (`run.lock`) before anything is loaded:
  one run at a time per workdir, for the run's life.
  """
  validate(config)
  lead = jax.process_index() == 0  # only process 0 logs, writes files and locks
  lock = None
  if workdir and lead:
    check_writable(workdir)
    lock = WorkdirLock(workdir)
  try:
    return _train(config, workdir, quiet=quiet or not lead, lead=lead)
  finally:
    if lock is not None:
      lock.release()


def check_not_past(config, workdir: str) -> None:
  """Refuses to resume a run that is already past `num_iterations`."""
  steps = checkpoint_steps(workdir)
  if steps and steps[-1] > config.num_iterations:
    raise CheckpointError(f"--workdir={workdir} holds this run at iteration {steps[-1]}, past "
                          f"num_iterations={config.num_iterations}: raise num_iterations to "
                          f"continue it, or use a new --workdir")


def _train(config, workdir, *, quiet: bool, lead: bool) -> RunResult:
  t_start = time.perf_counter()
  resuming = bool(workdir) and check_workdir(workdir, config.to_json())
  if resuming:
    check_not_past(config, workdir)
  log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
  prep = prepare(config, log)
  wd = open_workdir(config, workdir, resuming, lead, prep, log)
  try:
    progress = Progress(config.num_iterations, wd.step, stream=sys.stderr if not quiet
                        else open(os.devnull, "w"))
    t_train = time.perf_counter()
    state, step, compile_s = run_loop(config, prep, wd, progress, t_start, log)
    last_acc = wd.writer.evals[-1]["test_accuracy"] if wd.writer.evals else None
    progress.update(step, last_acc, force=True)
    progress.close()
  finally:  # also on errors: orbax's threads stopped before the interpreter exits
    if wd.checkpoints is not None:
      wd.checkpoints.close()
  train_s = time.perf_counter() - t_train
  wd.writer.finish()
  summary = summarize(config, prep, wd, step, train_s, compile_s, t_start)
  wd.writer.write(summary)
  log(done_line(config, summary, workdir))
  return RunResult(state, list(wd.writer.evals), summary)


def train_and_evaluate(config, workdir: str | None = None, *, quiet: bool = False
                       ) -> dict[str, Any]:
  """`train`'s summary (final accuracy, timings), as the CLI reports it."""
  return train(config, workdir, quiet=quiet).summary
