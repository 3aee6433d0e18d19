"""The workdir's lock and its early checks: one run at a time in a workdir, and a
workdir that cannot be written is found before any data is loaded or compiled.

The lock is `fcntl.flock` on `<workdir>/.lock`, held for the run's life by process 0.
The kernel drops it when the process ends, however it ends, so a killed run never
blocks the next one; the file only records who holds it (pid, host, start time).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

LOCK_FILE = ".lock"


class WorkdirError(ValueError):
  """A workdir that cannot hold this run; the message says why and what to do."""


def check_writable(workdir: str) -> None:
  """Creates `workdir` if needed and proves it writable: a probe file created, renamed
  and removed (what checkpoints and metrics need)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory; name a directory "
                       f"(it is created if missing)")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".probe-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("lfmjax")
    os.replace(probe, probe + ".renamed")
    os.remove(probe + ".renamed")
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be written ({e.strerror or e}); pick a "
                       f"directory you can write, on a filesystem with free space") from None


class WorkdirLock:
  """An exclusive lock on a workdir for this process's life (or until `release`)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = self._holder()
      os.close(self.fd)
      self.fd = None
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
        raise
      raise WorkdirError(f"--workdir={workdir} is in use by another run ({holder}); wait "
                         f"for it to end or use another --workdir") from None
    os.ftruncate(self.fd, 0)
    os.write(self.fd, json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(),
        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }).encode())
    os.fsync(self.fd)

  def _holder(self) -> str:
    try:
      with open(self.path) as f:
        info = json.load(f)
      return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
      return "holder unknown"

  def release(self) -> None:
    if self.fd is not None:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()
