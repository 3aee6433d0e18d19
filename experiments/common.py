"""What the paper-claim experiments share: settings, a resumable runner, CSV and plots.

Oh et al. (LocFedMix-SL, WWW 2022) claim better scalability, faster convergence and
lower latency than sequential SL, SplitFed and LocSplitFed. The scripts beside this
file test those claims; each run here is `lfmjax.train.train_and_evaluate` (what the
CLI runs) in its own workdir `experiments/results/runs/<name>-<config digest>`, so a
killed script resumes every run from its last checkpoint, a finished run is not redone,
and experiments that need the same run (the C = 50 runs of scalability, convergence,
ablation and knobs) share it. Seeds run in one program (`num_seeds`); rows report their
mean and spread.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass

from lfmjax.checkpoint import check_workdir
from lfmjax.config import base_config
from lfmjax.train import train_and_evaluate, write_atomically

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
ALGORITHMS = ("sl", "psl", "sfl_v1", "sfl_v2", "locsplitfed", "locfedmix", "sglr", "mix2sfl")
CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def _setting(algorithm: str, dataset: str, model: str, clients: int, batch: int,
             iterations: int, seeds: int):
  """The fields every setting sets: Adam 1e-3 on both sides, as SGLR and the paper."""
  c = base_config()
  c.algorithm = algorithm
  c.dataset = dataset
  c.model = model
  c.num_clients = clients
  c.batch_size = batch
  c.client_optimizer = "adam"
  c.client_lr = 1e-3
  c.num_iterations = iterations
  c.num_seeds = seeds
  return c


def sglr_resnet16(algorithm: str, clients: int, iterations: int, seeds: int):
  """SGLR's setting as its authors ran it (issue 16): `sglr_fmnist` with 10,000 train
  images held out for validation and the rates dropped x0.1 at 80 % of the run; the
  `sglr` preset is SGLR's (SplitLr alpha_lr = 0.5, SplitAvg phi = 0.5) and `sl` hands
  the lower on after each client's local epoch."""
  c = sglr_fmnist(algorithm, clients, iterations, seeds)
  c.validation_size = 10_000
  c.client_schedule = "step"
  c.decay_fractions = (0.8,)
  c.decay_factor = 0.1
  return c


def cifar_vgg(algorithm: str, clients: int, iterations: int, seeds: int,
              partition: str = "iid", alpha: float = 0.3):
  """CIFAR-10 with the VGG-style model at full width (issue 16): `cifar` with 5,000
  train images held out for validation and the rates dropped x0.1 at 80 % of the run."""
  c = cifar(algorithm, clients, iterations, seeds, partition, alpha)
  c.validation_size = 5_000
  c.client_schedule = "step"
  c.decay_fractions = (0.8,)
  c.decay_factor = 0.1
  return c


def fmnist_mlp(algorithm: str, clients: int, iterations: int, seeds: int):
  """SGLR's data and optimiser (1,000 IID Fashion-MNIST samples per client, Adam 1e-3,
  batch 8) with the `mlp` split model on the 28x28 images in [-1, 1]: about 15x
  cheaper per sample than resnet16, so the whole grid fits the CPU budget."""
  c = sglr_fmnist(algorithm, clients, iterations, seeds)
  c.model = "mlp"
  c.input.resize_to = None
  c.input.channels = None
  return c


def sglr_fmnist(algorithm: str, clients: int, iterations: int, seeds: int):
  """SGLR's setting (SPEC.md): Fashion-MNIST as resnet16 input (32x32x3 in [-1, 1]),
  1,000 IID samples per client, Adam 1e-3 on both sides, batch 8."""
  c = _setting(algorithm, "fashion_mnist", "resnet16", clients, 8, iterations, seeds)
  c.input.resize_to = 32
  c.input.channels = 3
  c.input.normalize = "pm1"
  c.partition = "fixed"
  c.samples_per_client = 1000
  return c


def cifar(algorithm: str, clients: int, iterations: int, seeds: int, partition: str = "iid",
          alpha: float = 0.3):
  """CIFAR-10 with the VGG-style model, IID or Dirichlet(alpha), Adam 1e-3, batch 32."""
  c = _setting(algorithm, "cifar10", "vgg", clients, 32, iterations, seeds)
  c.input.normalize = "standard"
  c.input.mean, c.input.std = CIFAR_STATS
  c.partition = partition
  c.dirichlet_alpha = alpha
  return c


def cifar_small(algorithm: str, clients: int, iterations: int, seeds: int,
                partition: str = "iid", alpha: float = 0.3):
  """CIFAR-10 as `cifar`, with the VGG-style model at half width (16-32-64) and batch 8:
  about 8x cheaper per iteration, for the CPU budget."""
  c = cifar(algorithm, clients, iterations, seeds, partition, alpha)
  c.batch_size = 8
  c.model_overrides.widths = (16, 32, 64)
  return c


def cifar_vit(algorithm: str, clients: int, iterations: int, seeds: int,
              partition: str = "iid", alpha: float = 0.3):
  """CIFAR-10 with the split ViT of `configs/cifar_vit.py` (issue 35: patch 4, width
  64, depth 6, 2 blocks on the client), trained from scratch as `cifar_vgg`: Adam 1e-3,
  batch 32, 5,000 train images held out for validation (and the inversion attack's
  auxiliary set), the rates dropped x0.1 at 80 % of the run."""
  c = cifar_vgg(algorithm, clients, iterations, seeds, partition, alpha)
  c.model = "vit"
  return c


def kjv_lm(algorithm: str, clients: int, iterations: int, seeds: int):
  """The split byte LM of `configs/text_lm.py` on the King James Bible's 50 client
  books, dealt by book (`groups`): Adam 1e-3, batch 16 windows of 128 bytes."""
  c = _setting(algorithm, "kjv", "lm", clients, 16, iterations, seeds)
  c.input.seq_len = 128
  c.partition = "groups"
  c.model_overrides.width = 128
  c.model_overrides.depth = 4
  c.model_overrides.cut = 1
  c.eval_chunk = 256
  c.privacy.probe_size = 0  # dCor of bytes and tokens means little here
  return c


SETTINGS = {
    "fmnist_sglr": sglr_fmnist,
    "sglr_resnet16": sglr_resnet16,
    "cifar_vgg_iid": lambda a, c, it, s: cifar_vgg(a, c, it, s, "iid"),
    "cifar_vgg_dir03": lambda a, c, it, s: cifar_vgg(a, c, it, s, "dirichlet", 0.3),
    "fmnist_mlp": fmnist_mlp,
    "cifar_iid": lambda a, c, it, s: cifar(a, c, it, s, "iid"),
    "cifar_dir03": lambda a, c, it, s: cifar(a, c, it, s, "dirichlet", 0.3),
    "cifar_small_iid": lambda a, c, it, s: cifar_small(a, c, it, s, "iid"),
    "cifar_small_dir03": lambda a, c, it, s: cifar_small(a, c, it, s, "dirichlet", 0.3),
    "cifar_vit_iid": lambda a, c, it, s: cifar_vit(a, c, it, s, "iid"),
    "cifar_vit_dir03": lambda a, c, it, s: cifar_vit(a, c, it, s, "dirichlet", 0.3),
    "kjv_lm": kjv_lm,
}


@dataclass
class Run:
  name: str                    # what the progress lines call it
  labels: dict                 # columns of its CSV row (algorithm, clients, ...)
  config: object               # an ml_collections.ConfigDict


QUICK_EVAL_SAMPLES = 1000  # --quick: a fixed subset of each evaluated split is scored


def common_flags(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--quick", action="store_true", help="small C set, few iterations")
  p.add_argument("--setting", choices=sorted(SETTINGS), default="fmnist_sglr")
  p.add_argument("--iterations", type=int, default=None, help="default: the script's")
  p.add_argument("--seeds", type=int, default=3, help="seeds in one program per run")
  p.add_argument("--model", default=None, help="override the setting's model")
  p.add_argument("--data_dir", default=None, help="dataset directory (else the usual places)")
  p.add_argument("--out", default=None, help="results directory (default experiments/results)")
  p.add_argument("--eval_every", type=int, default=None)
  p.add_argument("--eval_clients", type=int, default=None,
                 help="clients whose own lowers are evaluated without FedAvg (default 20)")
  p.add_argument("--devices", type=int, default=0, help="devices to spread clients over (0: all)")
  p.add_argument("--eval_samples", type=int, default=None,
                 help="samples of each evaluated split scored, a fixed subset (default: all; "
                      f"{QUICK_EVAL_SAMPLES} with --quick)")
  p.add_argument("--extend_from", type=int, default=None,
                 help="continue the finished runs of this many iterations to --iterations")
  return p


def make_config(args, algorithm: str, clients: int, iterations: int):
  """The setting's config for one run, with the command line's overrides. Evaluations
  default to every tenth of the run in every script, so runs are shared between them
  and every run has a curve that shows whether it reached a plateau; an extended run
  keeps the shorter run's grid."""
  default_eval = max(1, (args.extend_from or iterations) // 10)
  config = SETTINGS[args.setting](algorithm, clients, iterations, args.seeds)
  if args.model:
    config.model = args.model
  config.data_dir = args.data_dir
  config.num_devices = args.devices
  config.eval_every = args.eval_every or default_eval
  if algorithm == "sl":  # an SL iteration is a local epoch of every client: same epochs
    config.num_iterations = in_epochs(config, iterations)
    config.eval_every = in_epochs(config, config.eval_every)
  config.checkpoint_every = config.eval_every
  if args.eval_clients:
    config.eval_clients = args.eval_clients
  config.eval_samples = (args.eval_samples if args.eval_samples is not None
                         else QUICK_EVAL_SAMPLES if args.quick else 0)
  return config


TRAIN_SIZES = {"fashion_mnist": 60_000, "cifar10": 50_000,
               "kjv": 21_946, "kjv_public": 7_113}  # kjv: 128-byte windows


def mean_client_size(config) -> float:
  """|D_k| on average, from the setting (the partition itself is made by the run)."""
  if config.partition == "fixed":
    return float(config.samples_per_client)
  return (TRAIN_SIZES[config.dataset] - config.validation_size) / config.num_clients


def in_epochs(config, iterations: int) -> int:
  """Parallel iterations as vanilla SL's iterations (one local epoch of every client
  each, `sl_turn_steps` unset): the same number of samples per client, at least 1."""
  return max(1, round(iterations * config.batch_size / mean_client_size(config)))


def evaluations(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r.get("type") == "eval"]


def listed_runs(base: str, experiment: str) -> list[tuple[dict, str]]:
  """(CSV row, workdir) of each run an experiment lists: its `<experiment>_runs.csv`
  (convergence, whose main CSV is the curve) or `<experiment>.csv`; none if neither."""
  for name in (f"{experiment}_runs", experiment):
    path = os.path.join(base, experiment, f"{name}.csv")
    if os.path.exists(path):
      return [(row, os.path.normpath(os.path.join(base, experiment, row["workdir"])))
              for row in read_csv(path)]
  return []


# Config groups added after runs were committed: left out of the digest while at their
# defaults, so those runs keep their workdir names.
LATER_GROUPS = ("privacy", "devices")
# Top-level fields added after runs were named: left out of the digest at their defaults.
LATER_FIELDS = ("clients_per_round", "participant_sampling", "dropout_prob", "deadline_s",
                "client_head", "privacy.grad_noise_std", "privacy.grad_max_norm",
                "privacy.grad_keep_fraction", "privacy.grad_quantize_bits",
                "privacy.label_rr_epsilon", "eval_samples")
# Fields issue 35 added (the transformers), which the runs named before it lack: a run
# is looked up under the digest without them too (`run_dir`), so those runs are found.
ISSUE35_FIELDS = ("lora", "pretrained", "input.seq_len", "model_overrides.depth",
                  "model_overrides.heads", "model_overrides.mlp_dim", "model_overrides.patch",
                  "model_overrides.pool")


def config_digest(config, legacy: bool = False) -> str:
  """What a run computes: the digest of its config without where the data lives, nor
  the fields added later at their defaults (`legacy`: nor issue 35's)."""
  from lfmjax.config import base_config
  fields = json.loads(config.to_json_best_effort(sort_keys=True))
  fields.pop("data_dir", None)
  defaults = json.loads(base_config().to_json_best_effort(sort_keys=True))
  for name in LATER_GROUPS + LATER_FIELDS + (ISSUE35_FIELDS if legacy else ()):
    group, _, field = name.rpartition(".")
    node, default = (fields, defaults) if not group else (fields.get(group, {}),
                                                          defaults.get(group, {}))
    if node.get(field) == default.get(field):
      node.pop(field, None)
  return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]


def run_dir(base: str, config) -> str:
  """A run's workdir is named by its config alone, so every experiment that needs the
  same run finds it: `runs/<algorithm>_C<clients>-<config digest>`."""
  def named(legacy):
    return os.path.join(base, "runs", f"{config.algorithm}_C{config.num_clients}-"
                        f"{config_digest(config, legacy)}")
  legacy = named(True)
  return legacy if os.path.isdir(legacy) else named(False)


def _take_over(base: str, config, workdir: str, extend_from: int) -> None:
  """Renames the same run made with `extend_from` iterations to this run's workdir, so
  it resumes from its last checkpoint instead of starting again (the iteration count
  is the one field a resumed run may change)."""
  shorter = config.copy_and_resolve_references()
  shorter.num_iterations = extend_from
  old = run_dir(base, shorter)
  if os.path.isdir(old) and not os.path.exists(workdir):
    os.rename(old, workdir)


def wall_seconds(evals: list[dict]) -> float:
  """A run's wall time over all the processes that made it. lfmjax's `wall_s` counts on
  across a resume; in runs made before it did, each resume (a crash, or
  `--extend_from`) restarted it, which shows as a drop."""
  total = last = 0.0
  for e in evals:
    wall = e.get("wall_s", 0.0)
    if wall < last:
      total += last
    last = wall
  return total + last


def run_all(experiment: str, runs: list[Run], out: str | None = None,
            csv_name: str | None = None, extend_from: int | None = None,
            keep: list[dict] = ()) -> list[dict]:
  """Runs (or resumes, or re-reads) every run; writes `<experiment>/<csv_name>.csv`
  (default: the experiment's name), after `keep`'s rows, after each. With
  `extend_from`, a finished run of that many iterations is continued rather than
  redone."""
  base = out or RESULTS
  root = os.path.join(base, experiment)
  rows = []
  for i, run in enumerate(runs):
    workdir = run_dir(base, run.config)
    if extend_from:
      _take_over(base, run.config, workdir, extend_from)
    t0 = time.perf_counter()
    summary = (finished_summary(run.config, workdir)
               or train_and_evaluate(run.config, workdir, quiet=True))
    row = {**run.labels, **accuracy_columns(summary),
           "iterations": summary["iterations"],
           "epochs": evaluations(workdir)[-1]["epoch"] if summary["iterations"] else 0.0,
           "latency_s": round(summary["latency_s"], 2),
           "wall_s": round(wall_seconds(evaluations(workdir)) or time.perf_counter() - t0, 1),
           "workdir": os.path.relpath(workdir, root)}
    rows.append(row)
    print(f"[{experiment} {i + 1}/{len(runs)} {run.name}] {row}", flush=True)
    write_csv(os.path.join(root, f"{csv_name or experiment}.csv"), [*keep, *rows])
  return rows


def finished_summary(config, workdir: str) -> dict | None:
  """The summary this run wrote when it finished, if `workdir` holds it finished.

  Re-reading a finished run from its metrics.jsonl loads no data and restores no
  checkpoint (seconds instead of a minute a run, which a restarted script pays for
  every run it has done), and leaves the summary with the training's own timings.
  None when the run is not there, not finished, or is being extended.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path) or not check_workdir(workdir, config.to_json()):
    return None
  try:
    with open(path) as f:
      summaries = [r for r in map(json.loads, f) if r.get("type") == "summary"]
  except ValueError:  # a torn last line: the run's own resume repairs it
    return None
  if summaries and summaries[-1]["iterations"] == config.num_iterations:
    return summaries[-1]
  return None


def rows_not_run(csv_path: str, runs: list[Run], keys=("algorithm", "clients")) -> list[dict]:
  """The rows of an experiment's CSV whose labels no run of this invocation has, so an
  invocation for some C values (or algorithms) updates their rows and keeps the others."""
  if not os.path.exists(csv_path):
    return []
  mine = {tuple(str(run.labels[k]) for k in keys) for run in runs}
  return [row for row in read_csv(csv_path) if tuple(row[k] for k in keys) not in mine]


def accuracy_columns(summary: dict) -> dict:
  """A run's final test accuracy (mean, std, each seed's) and at its best validation
  evaluation, in percent, as the experiments' CSVs give them."""
  seeds = summary.get("final_test_accuracy_seeds") or [summary["final_test_accuracy"]]
  return {"test_accuracy": round(100 * summary["final_test_accuracy"], 2),
          "test_accuracy_std": round(100 * (summary.get("final_test_accuracy_std") or 0.0), 2),
          "test_accuracy_seeds": " ".join(f"{100 * a:.2f}" for a in seeds),
          **best_validation_columns(summary)}


def best_validation_columns(summary: dict) -> dict:
  """The test accuracy at each seed's best validation evaluation, where the setting
  holds a validation split out (mean, std, each seed's), in percent."""
  if "test_accuracy_at_best_val" not in summary:
    return {}
  seeds = (summary.get("test_accuracy_at_best_val_seeds")
           or [summary["test_accuracy_at_best_val"]])
  return {"test_at_best_val": round(100 * summary["test_accuracy_at_best_val"], 2),
          "test_at_best_val_std": round(
              100 * (summary.get("test_accuracy_at_best_val_std") or 0.0), 2),
          "test_at_best_val_seeds": " ".join(f"{100 * a:.2f}" for a in seeds)}


def write_csv(path: str, rows: list[dict]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
  writer.writeheader()
  writer.writerows(rows)
  write_atomically(path, text.getvalue())


def read_csv(path: str) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@contextlib.contextmanager
def figure(path: str, **subplots):
  """(fig, axes) of `plt.subplots(**subplots)`, saved to `path` at the block's end."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(**subplots)
  try:
    yield fig, axes
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
  finally:
    plt.close(fig)


def plot(path: str, series: dict[str, tuple[list, list, list | None]], xlabel: str,
         ylabel: str, title: str, logx: bool = False) -> None:
  """One line per series name: (x, y, y spread or None)."""
  with figure(path, figsize=(6, 4)) as (fig, ax):
    for name, (x, y, err) in series.items():
      if err is None:
        ax.plot(x, y, "o-", label=name, markersize=3)
      else:
        ax.errorbar(x, y, yerr=err, fmt="o-", label=name, markersize=3, capsize=2)
    if logx:
      ax.set_xscale("log")
      ticks = sorted({v for x, _, _ in series.values() for v in x})
      if len(ticks) <= 8:  # a grid (the C values): ticks at its values, not powers of ten
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
