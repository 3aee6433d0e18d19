"""What the attacking experiments share (privacy.py, issue 17; labels.py, issue 36): their
flags, a kept attack report, and a run trained again where its checkpoints are gone.

Checkpoints are not committed, so a committed run has none on a new machine: to attack
it, it is trained again beside its committed copy and compared with it bit for bit.
"""
from __future__ import annotations

import json
import os

import common
from lfmjax.checkpoint import checkpoint_steps
from lfmjax.train import train_and_evaluate


def attack_flags(description: str):
  """common_flags plus the attacking experiments' own."""
  p = common.common_flags(description)
  p.add_argument("--clients", type=int, default=None)
  p.add_argument("--variants", default=None,
                 help="comma-separated run names to keep, e.g. psl,locfedmix_mu0")
  p.add_argument("--attack_steps", type=int, default=500, help="the inverse network's steps")
  p.add_argument("--attack_hidden", type=int, default=32, help="its channels")
  p.add_argument("--replot", action="store_true",
                 help="redraw the plots from the finished CSV; trains and attacks nothing")
  return p


def kept_report(workdir: str, name: str, settings, iterations: int,
                keys: tuple[str, ...] | None = None) -> dict | None:
  """The report `name` in workdir if it was made with these settings (all of them, or
  only `keys`) at the run's last checkpoint (or, where the checkpoints are gone, at its
  last iteration); else None."""
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    report = json.load(f)
  made_with = report.get("settings") or {}
  same = (made_with == settings.to_dict() if keys is None
          else all(made_with.get(k) == settings[k] for k in keys))
  steps = checkpoint_steps(workdir)
  if same and report.get("iteration") == (steps[-1] if steps else iterations):
    return report
  return None


def retrained(config, workdir: str, log, subdir: str = "retrained") -> tuple[str, dict]:
  """A finished run whose checkpoints are gone trained again in `<workdir>/<subdir>`
  (resumed there if it was cut off), and how its final accuracies compare with the
  committed ones: a check, across machines and code versions, that a run is reproduced
  bit for bit. Each experiment has its own subdir, so one's attacks do not stale
  another's."""
  again = os.path.join(workdir, subdir)
  committed = common.finished_summary(config, workdir)
  if committed is None:
    raise SystemExit(f"error: {workdir} has neither a checkpoint nor a finished run; "
                     f"run the experiment again to train it")
  log(f"{workdir} kept no checkpoint: training it again in {again}")
  summary = (common.finished_summary(config, again)
             or train_and_evaluate(config, again, quiet=True))

  def seeds(s):
    return s.get("final_test_accuracy_seeds") or [s["final_test_accuracy"]]

  diffs = [abs(a - b) for a, b in zip(seeds(summary), seeds(committed))]
  # The row's accuracy is the attacked model's; the committed run's stays beside it.
  return again, {**common.accuracy_columns(summary),
                 "committed_accuracy": round(100 * committed["final_test_accuracy"], 2),
                 "retrained": True, "bit_equal": seeds(summary) == seeds(committed),
                 "retrain_max_diff": round(100 * max(diffs), 4)}
