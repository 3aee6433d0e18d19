"""Checkpoints of a whole run, and the check that a workdir belongs to the same run.

A checkpoint (orbax-checkpoint's `CheckpointManager`, one step directory per save under
`WORKDIR/checkpoints/`) holds the complete `RoundState` (every client's and the
server's parameters, statistics and optimiser states, the step and the run's PRNG key)
and a JSON item with what the training loop carries between evaluations (the train
metrics since the last evaluation), the partition's fingerprint and the config.
Everything else a run has is a function of the config and the step: the partition
(seeded), the communication ledger and the latency model (`accounting`), the batches
and mixup draws (`fold_in(key, tag, step)`). So a run resumed from iteration k is the
uninterrupted run from k on, bit for bit on the CPU.

Orbax writes a step into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact; the half-written directory is
ignored and removed when the next run opens the manager.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Config fields a resumed run may change: they do not change what the run computes.
RESUMABLE_CHANGES = ("num_iterations", "checkpoint_every", "keep_checkpoints", "data_dir",
                     "data_download", "eval_chunk", "distributed.coordinator_address",
                     "distributed.process_id")
CONFIG_FILE = "config.json"
# Fields an earlier lfmjax wrote under other names: a workdir it made still resumes.
RENAMED_FIELDS = {"loc": "local_loss", "fed": "fedavg", "mix": "smashmix",
                  "mu": "local_loss_weight", "download": "data_download"}


class CheckpointError(ValueError):
  """A workdir or checkpoint that cannot be resumed; the message says why and what to do."""


def partition_fingerprint(idx_CxM: np.ndarray, sizes_C: np.ndarray) -> str:
  digest = hashlib.sha256(np.ascontiguousarray(idx_CxM, np.int64).tobytes())
  digest.update(np.ascontiguousarray(sizes_C, np.int64).tobytes())
  return digest.hexdigest()[:16]


def config_differences(saved: dict, current: dict, prefix: str = "",
                       defaults: dict | None = None) -> list[str]:
  """The fields, as dotted names, whose values differ (nested dicts compared by field).

  A field the saved config lacks (written by an earlier lfmjax) counts as its default.
  """
  defaults = defaults or {}
  if not prefix:
    saved = {RENAMED_FIELDS.get(k, k): v for k, v in saved.items()}
  out = []
  for field in sorted(set(saved) | set(current)):
    name = prefix + field
    a = saved.get(field, defaults.get(field, "<unset>"))
    b = current.get(field, "<unset>")
    if isinstance(a, dict) and isinstance(b, dict):
      sub = defaults.get(field) if isinstance(defaults.get(field), dict) else {}
      out += config_differences(a, b, name + ".", sub)
    elif _normal(a) != _normal(b) and name not in RESUMABLE_CHANGES:
      out.append(f"{name}: {a!r} in the workdir, {b!r} now")
  return out


def _normal(value):
  return list(value) if isinstance(value, tuple) else value


def check_workdir(workdir: str, config_json: str) -> bool:
  """True when `workdir` holds this run (resume it); False when it holds no run.

  Raises CheckpointError, naming the differing fields, when it holds another run, and
  when it holds a run's checkpoints or metrics without a readable config.json (the run
  could no longer be resumed, and another config's records would mix with it).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    left = [name for name in ("checkpoints", "metrics.jsonl", "eval.csv")
            if os.path.exists(os.path.join(workdir, name))]
    if left:
      raise CheckpointError(f"--workdir={workdir} holds a run's {' and '.join(left)} but no "
                            f"{CONFIG_FILE}; put that run's {CONFIG_FILE} back to resume it, "
                            f"or use a new --workdir")
    return False
  saved = _read_config(workdir, path)
  from lfmjax.config import base_config
  differences = config_differences(saved, json.loads(config_json),
                                   defaults=json.loads(base_config().to_json()))
  if differences:
    shown = "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "")
    raise CheckpointError(f"--workdir={workdir} holds another run ({shown}); use a new "
                          f"--workdir, or the same config to resume it")
  return True


def _read_config(workdir: str, path: str) -> dict:
  def refuse(why: str) -> CheckpointError:
    return CheckpointError(f"--workdir={workdir} has an unreadable {CONFIG_FILE} ({why}); "
                           f"put that run's {CONFIG_FILE} back, or use a new --workdir")
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise refuse(str(e)) from None
  if not isinstance(saved, dict) or not isinstance(saved.get("algorithm"), str):
    raise refuse(f"a JSON {type(saved).__name__} without the config's fields")
  return saved


def os_error_in(error: BaseException) -> OSError | None:
  """The OSError that caused `error`, following its chain of causes."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def checkpoint_steps(workdir: str) -> list[int]:
  """The iterations of the checkpoints kept in `workdir` (orbax names a step's directory
  by its number), without opening a manager."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


class Checkpoints:
  """The run's checkpoints: save every `every` iterations, keep the last `keep`."""

  def __init__(self, workdir: str, keep: int):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.log_path = os.path.join(workdir, "error.log")
    self.closed = False
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=True),
        item_names=("state", "loop"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, loop: dict[str, Any]) -> None:
    """Saves atomically (orbax renames a complete step into place). A failed write (a
    full disk, a read-only filesystem) is one CheckpointError with the earlier steps
    kept; what orbax's threads print while failing goes to <workdir>/error.log."""
    ocp = self._ocp
    try:
      with stderr_to(self.log_path):
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop)), force=True)
        self.manager.wait_until_finished()
    except Exception as e:  # orbax and TensorStore wrap the OSError in their own types
      with stderr_to(self.log_path):  # its threads report the failure again as they stop
        self.manager.close()
        self.closed = True
      kept = checkpoint_steps(os.path.dirname(self.directory))
      cause = os_error_in(e)
      why = (cause.strerror or str(cause)) if cause is not None else str(e).splitlines()[0]
      raise CheckpointError(
          f"the checkpoint of iteration {step} could not be written in {self.directory} "
          f"({why[:160]}); "
          + (f"the checkpoint of iteration {kept[-1]} is kept: " if kept else "")
          + "free space (or make it writable) and run the same command to resume") from None

  def restore(self, step: int, like_state) -> tuple[Any, dict[str, Any]]:
    """The state saved at `step`, with `like_state`'s structure, shapes and dtypes."""
    ocp = self._ocp
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), loop=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for a damaged or foreign checkpoint
      try:  # an older lfmjax's, holding more (the unused heads): the state's part of it
        return self._restore_part(step, like_state)
      except Exception:
        pass
      raise CheckpointError(f"the checkpoint of iteration {step} in {self.directory} cannot "
                            f"be restored ({type(e).__name__}: {str(e).splitlines()[0][:200]});"
                            f" remove that step's directory to resume from an earlier one, or "
                            f"use a new --workdir") from None
    return restored.state, dict(restored.loop)

  def _restore_part(self, step: int, like_state) -> tuple[Any, dict[str, Any]]:
    """`like_state`'s leaves from a checkpoint that holds them among others: lfmjax
    before issue 18 kept every client segment, the decoder and aux head too where the
    round never trains them. Each leaf must match `like_state`'s shape and dtype."""
    ocp = self._ocp
    raw = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), loop=ocp.args.JsonRestore()))
    paths, treedef = jax.tree_util.tree_flatten_with_path(like_state)
    leaves = []
    for path, like in paths:
      node = raw.state
      for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        node = node[str(name)] if isinstance(node, dict) and str(name) in node else node[name]
      value = np.asarray(node)
      if value.shape != like.shape or value.dtype != like.dtype:
        raise ValueError(f"{jax.tree_util.keystr(path)}: {value.shape} {value.dtype}")
      sharding = getattr(like, "sharding", None)
      leaves.append(jax.device_put(value, sharding) if sharding is not None
                    else jnp.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, leaves), dict(raw.loop)

  def close(self) -> None:
    if not self.closed:
      self.manager.close()
      self.closed = True


@contextlib.contextmanager
def stderr_to(path: str):
  """File descriptor 2 appended to `path` within the block, then restored (if `path`
  cannot be opened, stderr stays as it is). Catches what library threads print."""
  try:
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  except OSError:
    yield
    return
  sys.stderr.flush()
  saved, saved_stream = os.dup(2), sys.stderr
  os.dup2(log, 2)
  sys.stderr = _Quiet(os.fdopen(os.dup(log), "w"))  # what Python prints, threads included
  try:
    yield
  finally:
    sys.stderr.close()
    sys.stderr = saved_stream
    os.dup2(saved, 2)
    os.close(saved)
    os.close(log)


class _Quiet:
  """A text stream whose writes never raise (the log may sit on the disk that is full)."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> int:
    try:
      return self.stream.write(text)
    except (OSError, ValueError):
      return len(text)

  def flush(self) -> None:
    try:
      self.stream.flush()
    except (OSError, ValueError):
      pass

  def close(self) -> None:
    try:
      self.stream.close()
    except (OSError, ValueError):
      pass

  def __getattr__(self, name):
    return getattr(self.stream, name)
