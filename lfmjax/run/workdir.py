"""What a run keeps in its workdir besides checkpoints: metrics.jsonl, eval.csv, the
accuracy plot and TensorBoard events, the train window carried across a resume, and
the resume itself (the workdir's records cut back to the checkpoint's step)."""
from __future__ import annotations

import csv
import json
import os
from typing import Any

import jax
import numpy as np

from lfmjax import tensorboard
from lfmjax.checkpoint import CheckpointError, Checkpoints
from lfmjax.state import RoundState


class MetricsWriter:
  """Appends JSON lines to metrics.jsonl and evaluation rows to eval.csv."""

  EVAL_FIELDS = ("iteration", "epoch", "test_accuracy", "test_loss", "test_perplexity",
                 "val_accuracy", "val_loss", "val_perplexity", "loss_real",
                 "loss_mix", "loss_local", "loss_aux", "train_accuracy", "lr_client",
                 "lr_server", "dcor", "dcor_std", "label_auc", "label_auc_std",
                 "grad_cosine", "grad_cosine_std",
                 "bytes_up", "bytes_down", "latency_s", "wall_s")

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


PER_CLIENT = "_clients"  # a train metric with one value per client (last axis)


def mean_metrics(stacked: dict) -> dict[str, Any]:
  """Each train metric averaged over the window; the learning rates (`lr_*`) as of its
  last iteration, the rate the evaluated model was last stepped with. A per-client
  metric `NAME_clients` gives each client's mean over the window (and seeds) as
  `NAME_clients`, and their mean and spread over clients as `NAME` and `NAME_std`."""
  out = {}
  for k, v in jax.device_get(stacked).items():
    v = np.asarray(v)
    if k.endswith(PER_CLIENT):  # NaN: not a participant (`participation`)
      v = v.reshape(-1, v.shape[-1])
      out.update(per_client_summary(k[:-len(PER_CLIENT)], _nanmean(v, axis=0)
                                    if np.isnan(v).any() else v.mean(axis=0)))
    else:
      out[k] = float(np.mean(v[-1] if k.startswith("lr_") else v))
  return out


def per_client_summary(name: str, values_C) -> dict[str, Any]:
  """{name: mean over clients, name_std: their spread, name_clients: each client's}."""
  values_C = np.asarray(values_C, np.float64)
  if np.isnan(values_C).any():  # clients that never took part in the window: null
    known = values_C[~np.isnan(values_C)]
    return {name: float(known.mean()) if known.size else None,
            f"{name}_std": float(known.std()) if known.size else None,
            f"{name}{PER_CLIENT}": [None if np.isnan(v) else round(float(v), 6)
                                    for v in values_C]}
  return {name: float(values_C.mean()), f"{name}_std": float(values_C.std()),
          f"{name}{PER_CLIENT}": [round(float(v), 6) for v in values_C]}


def _nanmean(a, axis):
  """np.nanmean without the warning for all-NaN columns (NaN stays)."""
  counts = np.sum(~np.isnan(a), axis=axis)
  sums = np.nansum(a, axis=axis)
  return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def write_atomically(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


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


def evaluation_record(evaluate, state: RoundState, data, client_ids, test, train_window,
                      step: int, epochs_per_iteration: float, wall_s: float, val=None,
                      leakage=None) -> dict[str, Any]:
  """Test (and, with a held-out validation split `val`, validation) accuracy and loss,
  the mean over seeds with each seed's and the spread when there are several, the
  leakage dCor(x, u) per client (mean over seeds) with its mean and spread over
  clients, and the train metrics averaged since the last evaluation."""
  record = {"type": "eval", "iteration": step,
            "epoch": round(step * epochs_per_iteration, 4)}
  for split, chunks in (("test", test), ("val", val)):
    if chunks is not None:
      record.update(split_scores(split, evaluate(state, data.weights_C, client_ids, chunks)))
  if leakage is not None:
    for name, values in jax.device_get(leakage(state, data)).items():  # dcor, label_auc
      values = np.asarray(values)
      record.update(per_client_summary(name, values.reshape(-1, values.shape[-1]).mean(0)))
  train = mean_metrics(joined_window(train_window))
  return {**record, **train, "wall_s": round(wall_s, 2)}


def split_scores(split: str, result: dict) -> dict[str, Any]:
  result = jax.device_get(result)
  accuracy, loss = np.asarray(result["accuracy"]), np.asarray(result["loss"])
  scores = {f"{split}_accuracy": float(accuracy.mean()), f"{split}_loss": float(loss.mean())}
  if accuracy.ndim:  # num_seeds > 1
    scores.update({f"{split}_accuracy_std": float(accuracy.std()),
                   f"{split}_accuracy_seeds": [float(a) for a in accuracy],
                   f"{split}_loss_seeds": [float(v) for v in loss]})
  if "perplexity" in result:  # a seed's exp(mean loss); the mean over seeds
    perplexity = np.asarray(result["perplexity"])
    scores[f"{split}_perplexity"] = float(perplexity.mean())
    if perplexity.ndim:
      scores[f"{split}_perplexity_seeds"] = [float(p) for p in perplexity]
  return scores


def at_best_validation(evals: list[dict]) -> dict[str, Any]:
  """The test accuracy at each seed's best validation evaluation (the first where
  several tie), its mean (and spread and seeds with several), and the iterations."""
  if not evals or "val_accuracy" not in evals[-1]:
    return {}
  seeds = "val_accuracy_seeds" in evals[-1]
  column = lambda name: np.array([e[f"{name}_seeds"] if seeds else [e[name]] for e in evals])
  val_ExS, test_ExS = column("val_accuracy"), column("test_accuracy")
  best_S = val_ExS.argmax(axis=0)
  test_S = test_ExS[best_S, np.arange(val_ExS.shape[1])]
  iterations = [int(evals[i]["iteration"]) for i in best_S]
  out = {"test_accuracy_at_best_val": float(test_S.mean()),
         "best_val_accuracy": float(val_ExS.max(axis=0).mean()),
         "best_val_iteration": iterations if seeds else iterations[0]}
  if seeds:
    out.update(test_accuracy_at_best_val_std=float(test_S.std()),
               test_accuracy_at_best_val_seeds=[float(a) for a in test_S])
  return out
