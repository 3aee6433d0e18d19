"""TensorBoard event files of a run's evaluations, beside metrics.jsonl and eval.csv.

Written with tensorboardX (no TensorFlow needed), under `<workdir>/tensorboard/`, one
scalar per evaluated metric, tagged `<algorithm>/<group>/<metric>` so that runs of
several algorithms compare in one TensorBoard (`tensorboard --logdir runs`). The file is
rewritten from the run's evaluation records at every evaluation: after a resume it
holds exactly the uninterrupted run's points, never the killed run's duplicates.
"""
from __future__ import annotations

import os
import shutil

from tensorboardX import SummaryWriter

DIRNAME = "tensorboard"
# (record field, tag below the algorithm)
SCALARS = (
    ("test_accuracy", "test/accuracy"), ("test_loss", "test/loss"),
    ("test_perplexity", "test/perplexity"),
    ("loss_real", "train/loss_real"), ("loss_mix", "train/loss_mix"),
    ("loss_local", "train/loss_local"), ("loss_aux", "train/loss_aux"),
    ("train_accuracy", "train/accuracy"),
    ("lr_client", "optim/lr_client"), ("lr_server", "optim/lr_server"),
    ("bytes_up", "comm/bytes_up"), ("bytes_down", "comm/bytes_down"),
    ("latency_s", "comm/simulated_seconds"),
    ("dcor", "privacy/dcor"), ("dcor_std", "privacy/dcor_std"),
    ("label_auc", "privacy/label_auc"), ("label_auc_std", "privacy/label_auc_std"),
    ("grad_cosine", "privacy/grad_cosine"), ("grad_cosine_std", "privacy/grad_cosine_std"),
)


def write_events(evals: list[dict], workdir: str, algorithm: str) -> str:
  """Rewrites `<workdir>/tensorboard/` from the evaluation records; returns the dir."""
  directory = os.path.join(workdir, DIRNAME)
  shutil.rmtree(directory, ignore_errors=True)
  with SummaryWriter(directory) as writer:
    for record in evals:
      for field, tag in SCALARS:
        if record.get(field) is not None:
          writer.add_scalar(f"{algorithm}/{tag}", record[field], record["iteration"])
  return directory
