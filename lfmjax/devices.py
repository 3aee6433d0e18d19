"""Heterogeneous client devices for the simulated latency: per-client compute rate,
uplink and downlink.

Real deployments' devices differ by an order of magnitude in compute and bandwidth, and
a synchronous round waits for its slowest participant (LocFedMix-SL's latency claim,
Oh et al., WWW 2022, is about such waits). The rates are drawn once per run, on the
host, from a named distribution around the configured ones, or read from a CSV trace:

  homogeneous  every client at the configured rates (the default);
  lognormal    each rate r * exp(spread * z), z ~ N(0, 1) independently per client and
               rate: the configured rate is the median, `spread` the sigma of log-rate;
  trace        a CSV with columns client, flops_per_s, up_bytes_per_s, down_bytes_per_s,
               one row per client 0..C-1.
"""
from __future__ import annotations

import csv
import dataclasses
import math

import numpy as np

DISTRIBUTIONS = ("homogeneous", "lognormal", "trace")
TRACE_COLUMNS = ("client", "flops_per_s", "up_bytes_per_s", "down_bytes_per_s")


class DevicesError(ValueError):
  """A device distribution or trace that cannot be used; the message says the fix."""


@dataclasses.dataclass(frozen=True)
class ClientDevices:
  """float64 C arrays: each client's FLOP/s, uplink and downlink bytes/s."""
  flops_per_s: np.ndarray
  up_bytes_per_s: np.ndarray
  down_bytes_per_s: np.ndarray

  @property
  def uniform(self) -> bool:
    """Whether every client has the same rates (today's homogeneous model)."""
    return all(np.all(a == a[0]) for a in (self.flops_per_s, self.up_bytes_per_s,
                                           self.down_bytes_per_s))


def homogeneous(num_clients: int, flops_per_s: float, up_bytes_per_s: float,
                down_bytes_per_s: float) -> ClientDevices:
  full = lambda v: np.full(num_clients, float(v))
  return ClientDevices(full(flops_per_s), full(up_bytes_per_s), full(down_bytes_per_s))


def lognormal(num_clients: int, flops_per_s: float, up_bytes_per_s: float,
              down_bytes_per_s: float, spread: float, seed: int) -> ClientDevices:
  """Each rate times exp(spread z), z ~ N(0, 1), drawn from `seed` (NumPy's PCG64)."""
  if not 0.0 <= spread <= 10.0:
    raise DevicesError(f"devices.spread={spread}: the sigma of log-rate must lie in "
                       f"[0, 10] (1: rates spread over about e^±1)")
  z = np.random.default_rng(seed).standard_normal((3, num_clients))
  factor = np.exp(spread * z)
  return ClientDevices(flops_per_s * factor[0], up_bytes_per_s * factor[1],
                       down_bytes_per_s * factor[2])


def read_trace(path: str, num_clients: int) -> ClientDevices:
  """The rates of clients 0..C-1 from a CSV trace (extra clients are ignored)."""
  try:
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      missing = [c for c in TRACE_COLUMNS if c not in (reader.fieldnames or [])]
      if missing:
        raise DevicesError(f"devices.trace={path} lacks the columns {', '.join(missing)}; "
                           f"a trace has the columns {', '.join(TRACE_COLUMNS)}")
      rows = {}
      for line, row in enumerate(reader, start=2):
        try:
          client = int(row["client"])
          rates = tuple(float(row[c]) for c in TRACE_COLUMNS[1:])
        except (TypeError, ValueError):
          raise DevicesError(f"devices.trace={path}, line {line}: client must be an "
                             f"integer and the rates numbers") from None
        if not all(0 < r < math.inf for r in rates):
          raise DevicesError(f"devices.trace={path}, line {line}: client {client} has a "
                             f"non-positive rate; every rate must be > 0")
        rows[client] = rates
  except OSError as e:
    raise DevicesError(f"devices.trace={path} cannot be read ({e.strerror}); give the "
                       f"path of a CSV trace") from None
  absent = [k for k in range(num_clients) if k not in rows]
  if absent:
    shown = ", ".join(map(str, absent[:5])) + (" ..." if len(absent) > 5 else "")
    raise DevicesError(f"devices.trace={path} has no row for clients {shown} "
                       f"({len(absent)} of {num_clients}); add them or lower num_clients")
  table = np.array([rows[k] for k in range(num_clients)], np.float64)
  return ClientDevices(table[:, 0], table[:, 1], table[:, 2])


def make_devices(distribution: str, num_clients: int, flops_per_s: float,
                 up_bytes_per_s: float, down_bytes_per_s: float, *, spread: float = 1.0,
                 trace: str | None = None, seed: int = 0) -> ClientDevices:
  """The clients' devices for one run (see the module docstring)."""
  if distribution == "homogeneous":
    return homogeneous(num_clients, flops_per_s, up_bytes_per_s, down_bytes_per_s)
  if distribution == "lognormal":
    return lognormal(num_clients, flops_per_s, up_bytes_per_s, down_bytes_per_s, spread,
                     seed)
  if distribution == "trace":
    if not trace:
      raise DevicesError("devices.distribution='trace' needs devices.trace=PATH.csv")
    return read_trace(trace, num_clients)
  raise DevicesError(f"devices.distribution={distribution!r} is unknown; use one of "
                     f"{', '.join(DISTRIBUTIONS)}")
