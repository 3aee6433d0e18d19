"""Command line: `python -m lfmjax.main --config=configs/fmnist.py [--workdir=DIR]`.

Overrides take the form `--config.FIELD=VALUE`; `--list` prints the algorithms and the
component switches. The work happens in `lfmjax.train`.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lfmjax import algorithms

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/ (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for config.json, metrics.jsonl, eval.csv, accuracy.png.")
_LIST = flags.DEFINE_bool("list", False, "List the algorithms and switches, then exit.")


def listing() -> str:
  lines = ["algorithms (--config.algorithm=NAME):"]
  lines += [f"  {name:<12} {algorithms.ALGORITHM_HELP[name]}" for name in algorithms.ALGORITHMS]
  lines += ["switches (unset = the algorithm's; an ablation is e.g. "
            "--config.algorithm=psl --config.local_loss=True --config.fedavg=True):"]
  lines += [f"  {name:<12} {algorithms.SWITCH_HELP[name]}" for name in algorithms.SWITCHES]
  return "\n".join(lines)


__doc__ = f"{__doc__}\n{listing()}\n"  # absl's --help prints the main module's docstring


def main(argv):
  logging.set_verbosity(logging.WARNING)  # hides JAX's backend-probing INFO lines
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _LIST.value:
    print(listing())
    return 0
  if _CONFIG.value is None:
    print("error: --config is required, e.g. --config=configs/fmnist.py", file=sys.stderr)
    return 2
  return run_config(_CONFIG.value, _WORKDIR.value)


def run_config(config, workdir: str | None) -> int:
  """Runs one config; returns the exit status. Bad input (config, data, workdir) is one
  line and status 2; a non-finite loss, 1; SIGINT/SIGTERM, 128 + the signal's number
  after saving a checkpoint."""
  from lfmjax.checkpoint import CheckpointError  # deferred: --list and --help stay instant
  from lfmjax.data import DatasetError
  from lfmjax.mesh import initialize_distributed
  from lfmjax.train import ConfigError, Interrupted, TrainingError, train_and_evaluate
  try:
    initialize_distributed(config)  # before anything touches a device
  except (RuntimeError, ValueError) as e:
    print(f"error: config.distributed: jax.distributed.initialize failed "
          f"({str(e).splitlines()[0][:200]}); check coordinator_address, num_processes "
          f"and process_id, or the cluster's environment", file=sys.stderr)
    return 2
  try:
    train_and_evaluate(config, workdir)
  except (ConfigError, DatasetError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except TrainingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except Interrupted as e:
    print(str(e), file=sys.stderr)
    return 128 + e.signum
  return 0


def run():
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
