"""The progress line of a run: iterations, rate, ETA and the latest test accuracy."""
from __future__ import annotations

import math
import sys
import time


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

