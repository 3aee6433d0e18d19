"""The progress line of a run: iterations, rate, ETA and the latest test accuracy.

A tqdm bar on a terminal. Into a file or a pipe (a batch job's log) the same line,
formatted by tqdm, is printed on its own line at most every `LOG_INTERVAL_S` seconds,
since a carriage-return bar would be one unreadable line there.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_INTERVAL_S = 10.0
BAR_FORMAT = "{l_bar}{bar:30}| {n_fmt}/{total_fmt} it | {rate_fmt} | ETA {remaining} | "


def bar_format(accuracy: float | None) -> str:
  """tqdm's bar with the latest test accuracy at its end (plain text, no braces)."""
  return BAR_FORMAT + "test acc " + ("-" if accuracy is None else f"{100 * accuracy:.2f}%")


class Progress:
  """Iterations `start`..`total`; the rate counts this process's iterations only."""

  def __init__(self, total: int, start: int, stream=sys.stderr):
    self.total, self.start, self.stream = total, start, stream
    self.tty = stream.isatty()
    self.t0 = time.perf_counter()
    self.last_print = 0.0
    self.bar = (tqdm(total=total, initial=start, file=stream, unit="it",
                     bar_format=bar_format(None), mininterval=0.5)
                if self.tty else None)

  def update(self, step: int, accuracy: float | None, force: bool = False) -> None:
    if self.bar is not None:
      self.bar.bar_format = bar_format(accuracy)
      self.bar.update(step - self.bar.n)
      if force:
        self.bar.refresh()
      return
    now = time.perf_counter()
    if not force and now - self.last_print < LOG_INTERVAL_S:
      return
    self.last_print = now
    line = tqdm.format_meter(step, self.total, now - self.t0, ncols=None, unit="it",
                             bar_format=bar_format(accuracy), initial=self.start)
    print(line, file=self.stream, flush=True)

  def clear(self) -> None:
    """Takes the bar off the terminal so that a log line can be printed; the next
    update draws it again."""
    if self.bar is not None:
      self.bar.clear()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
