"""Command line: `python -m lfmjax.main --config=configs/fmnist.py [--workdir=DIR]`.

Overrides take the form `--config.FIELD=VALUE`; `--list` prints the algorithms and the
component switches. The work happens in `lfmjax.train`.
"""
from __future__ import annotations

import os
import re
import sys

from lfmjax import interrupt

if __name__ == "__main__":  # (lfmjax/__init__ has installed it already for `-m`)
  interrupt.install()

from absl import app, flags, logging
from ml_collections import config_flags

from lfmjax import algorithms

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/ (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for config.json, metrics.jsonl, eval.csv, accuracy.png.")
_LIST = flags.DEFINE_bool("list", False, "List the algorithms and switches, then exit.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show full tracebacks and the libraries' log lines (default: one "
    "line per error, the traceback of an unexpected one in <workdir>/error.log).")


def listing() -> str:
  lines = ["algorithms (--config.algorithm=NAME):"]
  lines += [f"  {name:<12} {algorithms.ALGORITHM_HELP[name]}" for name in algorithms.ALGORITHMS]
  lines += ["switches (unset = the algorithm's; an ablation is e.g. "
            "--config.algorithm=psl --config.local_loss=True --config.fedavg=True):"]
  lines += [f"  {name:<12} {algorithms.SWITCH_HELP[name]}" for name in algorithms.SWITCHES]
  return "\n".join(lines)


__doc__ = f"{__doc__}\n{listing()}\n"  # absl's --help prints the main module's docstring


def main(argv):
  # JAX's backend-probing INFO lines hidden; orbax's own error logs too unless --verbose
  # (an error is reported once, as one line).
  logging.set_verbosity(logging.WARNING if _VERBOSE.value else logging.FATAL)
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}; flags take the form "
          f"--name=value", file=sys.stderr)
    return 2
  if _LIST.value:
    print(listing())
    return 0
  config = loaded_config()
  if config is None:
    print("error: --config is required, e.g. --config=configs/fmnist.py", file=sys.stderr)
    return 2
  return run_config(config, _WORKDIR.value, verbose=_VERBOSE.value)


def run_config(config, workdir: str | None, verbose: bool = False) -> int:
  """Runs one config; returns the exit status. Bad input (config, data, workdir, a disk
  that fills) is one line and status 2; a non-finite loss, 1; SIGINT/SIGTERM, 128 + the
  signal's number (after saving a checkpoint once the loop runs). An unexpected error is
  one line and status 1, its traceback in <workdir>/error.log (printed with `verbose`)."""
  from lfmjax.checkpoint import CheckpointError  # deferred: --list and --help stay instant
  from lfmjax.data import DatasetError
  from lfmjax.mesh import initialize_distributed
  from lfmjax.run.lock import WorkdirError
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
  except (ConfigError, DatasetError, CheckpointError, WorkdirError) as e:
    return fail(str(e), 2)
  except TrainingError as e:
    return fail(str(e), 1)
  except Interrupted as e:
    print(str(e), file=sys.stderr)
    return 128 + e.signum
  except KeyboardInterrupt:
    return fail("interrupted (SIGINT) before training started; nothing was saved", 130)
  except OSError as e:
    return fail(f"{e.filename or 'a file'} could not be written or read ({e.strerror or e}); "
                f"free space or fix the permissions, then run the same command to resume", 2)
  except Exception as e:  # a bug: one line here, the traceback kept
    if verbose:
      raise
    where = save_traceback(workdir)
    return fail(f"unexpected {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                f" ({where}); please report it", 1)
  return 0


def fail(message: str, status: int) -> int:
  print(f"error: {message}", file=sys.stderr)
  return status


def save_traceback(workdir: str | None) -> str:
  """Writes the current exception's traceback to <workdir>/error.log; says where it is."""
  import traceback
  if workdir:
    try:
      path = os.path.join(workdir, "error.log")
      with open(path, "a") as f:
        traceback.print_exc(file=f)
      return f"traceback in {path}"
    except OSError:
      pass
  return "rerun with --verbose for the traceback"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, its errors (an unknown config field, a value of the wrong type,
  a config file that fails) as one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: a field the config lacks
    while e.args and isinstance(e.args[0], BaseException):  # a KeyError in an AttributeError
      e = e.args[0]
    text = str(e.args[0]) if e.args else str(e)
    named = re.match(r"""\W*'([^']+)'""", text)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    message = unknown_field(argv, named.group(1) if named else text.strip("\"' "))
    if hint:
      message += f" (did you mean {hint.group(1)!r}?)"
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if "config file" in lines[0]:  # get_config raised: its error is the last line
      message = f"{flag_named(argv, '--config=')}: {lines[-1]}"
    else:
      message = f"{str(e).splitlines()[0]}; give a value of the field's type"
  except (ValueError, TypeError, SyntaxError, OSError) as e:  # the config file's own
    message = (f"{flag_named(argv, '--config=')}: "
               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def flag_named(argv: list[str], prefix: str) -> str:
  return next((a for a in argv if a.startswith(prefix)), prefix.rstrip("="))


def loaded_config():
  """The --config's ConfigDict; a file that cannot be loaded (ml_collections defers that
  error to the first use) is one line and exit status 2."""
  try:
    config = _CONFIG.value
    if config is not None:
      config.get("algorithm")
    return config
  except (OSError, ValueError, TypeError, SyntaxError) as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    print(f"error: --config: {lines[-1] if lines else type(e).__name__}; check the path "
          f"(relative to the current directory) and the file", file=sys.stderr)
    sys.exit(2)


def unknown_field(argv: list[str], field: str) -> str:
  """The line for an override of a field the config does not have, with the valid
  fields at that level."""
  from lfmjax.config import base_config
  arg = next((a for a in argv if a.startswith("--config.")
              and a.split("=")[0].split(".")[-1] == field), f"--config.{field}")
  node = base_config()
  for part in arg.split("=")[0].split(".")[1:-1]:
    node = node.get(part) if hasattr(node, "get") else None
  valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "see lfmjax/config.py"
  return f"{arg.split('=')[0]}: the config has no field {field!r}; valid here: {valid}"


def exit_with(status: int) -> None:
  """Exits; after an error at once, so that library threads still winding down (orbax's,
  after a failed save) print nothing after the error line. Files are closed by then."""
  if status:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(0)


def run():
  interrupt.install()
  app.run(lambda argv: exit_with(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
  run()
