"""Splitting a train set over clients: IID, Dirichlet label skew, shards, fixed-size.

Every partition function is a pure function of (labels, num_clients, its parameters,
seed) and returns `list[np.ndarray]`: one sorted int64 array of train indices per
client, pairwise disjoint. `client_table` packs such a list into the padded device
table that `lfmjax.data.sampling.batch_indices` samples from, and `client_weights` gives
the aggregation weights delta_k = |D_k| / sum_j |D_j|.
"""
from __future__ import annotations

import numpy as np

PARTITIONS = ("iid", "dirichlet", "shards", "fixed", "groups")
# Whole-partition redraws tried before the deterministic top-up (see `dirichlet`).
DIRICHLET_TRIES = 10


def _check_inputs(labels, num_clients: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} "
                     f"{labels.shape}")
  if int(num_clients) != num_clients or num_clients < 1:
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
  if num_clients > len(labels):
    raise ValueError(f"{num_clients} clients cannot share {len(labels)} samples")
  return labels


def _as_parts(parts) -> list[np.ndarray]:
  return [np.sort(np.asarray(p, np.int64)) for p in parts]


def iid(labels, num_clients: int, seed: int) -> list[np.ndarray]:
  """A uniform random split of all samples.

  The remainder is distributed, not dropped: with N = q * C + r, the first r clients
  get q + 1 samples and the others q, so every sample belongs to exactly one client.
  """
  labels = _check_inputs(labels, num_clients)
  order = np.random.default_rng(seed).permutation(len(labels))
  return _as_parts(np.array_split(order, num_clients))


def groups(groups_N, num_clients: int, seed: int = 0) -> list[np.ndarray]:
  """Whole groups (a corpus's books, numbered in order) dealt to clients as contiguous
  runs with about equal samples: the groups' cumulative sample count cut at the
  C-quantiles, every client at least one group. Related books stay together, so the
  split is naturally non-IID. Deterministic (`seed` is unused)."""
  groups_N = _check_inputs(groups_N, num_clients)
  ids, counts = np.unique(groups_N, return_counts=True)
  if num_clients > len(ids):
    raise ValueError(f"{num_clients} clients need at least {num_clients} groups; there are "
                     f"{len(ids)}")
  ends = np.cumsum(counts)
  cuts = np.searchsorted(ends, ends[-1] * np.arange(1, num_clients) / num_clients)
  # At least one group each: the k-th cut lies in [k, G - C + k].
  cuts = np.clip(cuts, np.arange(1, num_clients), len(ids) - num_clients + np.arange(1, num_clients))
  cuts = np.maximum.accumulate(np.maximum(cuts, np.arange(1, num_clients)))
  runs = np.split(ids, cuts)
  return _as_parts([np.flatnonzero(np.isin(groups_N, run)) for run in runs])


def fixed(labels, num_clients: int, per_client: int, seed: int) -> list[np.ndarray]:
  """`per_client` samples for each client, disjoint, drawn uniformly without
  replacement (SGLR's setting: 1,000 each); the rest of the train set is unused."""
  labels = _check_inputs(labels, num_clients)
  if per_client < 1 or num_clients * per_client > len(labels):
    raise ValueError(f"{num_clients} clients x {per_client} samples each need "
                     f"{num_clients * per_client} samples; there are {len(labels)}")
  order = np.random.default_rng(seed).permutation(len(labels))
  return _as_parts(order[:num_clients * per_client].reshape(num_clients, per_client))


def shards(labels, num_clients: int, classes_per_client: int, seed: int
           ) -> list[np.ndarray]:
  """McMahan et al.'s pathological non-IID split: sort by label, cut the sorted
  samples into num_clients * classes_per_client shards of (nearly) equal size and deal
  each client `classes_per_client` random shards. A client sees about that many
  classes (fewer when two of its shards share a class, more when a shard straddles a
  class boundary). All samples are used."""
  labels = _check_inputs(labels, num_clients)
  num_shards = num_clients * classes_per_client
  if classes_per_client < 1 or num_shards > len(labels):
    raise ValueError(f"{num_clients} clients x {classes_per_client} shards need at least "
                     f"{num_shards} samples; there are {len(labels)}")
  rng = np.random.default_rng(seed)
  # Shuffle then stable-sort: sorted by label, random order within a class.
  order = rng.permutation(len(labels))
  order = order[np.argsort(labels[order], kind="stable")]
  pieces = np.array_split(order, num_shards)
  deal = rng.permutation(num_shards).reshape(num_clients, classes_per_client)
  return _as_parts(np.concatenate([pieces[s] for s in row]) for row in deal)


def dirichlet(labels, num_clients: int, alpha: float, seed: int, min_size: int = 10
              ) -> list[np.ndarray]:
  """Label skew (Hsu et al., 2019): for every class, the shares of the clients are
  drawn from Dirichlet(alpha, ..., alpha); small alpha -> few classes per client. All
  samples are used.

  Minimum-size policy, bounded so it never hangs: the whole partition is redrawn at
  most `DIRICHLET_TRIES` times until every client holds >= `min_size` samples; if the
  last draw still falls short, samples are moved deterministically (given the seed)
  from the currently largest client to each short client, in client order, until it
  reaches `min_size`. That is at most C moves per short client. Raises ValueError when
  num_clients * min_size > len(labels), where no policy could succeed.
  """
  labels = _check_inputs(labels, num_clients)
  if not alpha > 0:
    raise ValueError(f"the Dirichlet concentration alpha must be > 0, got {alpha}")
  if min_size < 0 or num_clients * min_size > len(labels):
    raise ValueError(f"{num_clients} clients x min_size {min_size} need "
                     f"{num_clients * min_size} samples; there are {len(labels)}")
  rng = np.random.default_rng(seed)
  by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
  for _ in range(DIRICHLET_TRIES):
    parts = _dirichlet_draw(by_class, num_clients, alpha, rng)
    if min(len(p) for p in parts) >= min_size:
      break
  return _as_parts(_top_up(parts, min_size, rng))


def _dirichlet_draw(by_class: list[np.ndarray], num_clients: int, alpha: float,
                    rng: np.random.Generator) -> list[np.ndarray]:
  buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
  for idx in by_class:
    p = rng.dirichlet(np.full(num_clients, float(alpha)))
    if not np.all(np.isfinite(p)) or p.sum() <= 0:  # underflow at tiny alpha
      p = np.eye(num_clients)[rng.integers(num_clients)]
    cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
    for bucket, chunk in zip(buckets, np.split(idx, np.clip(cuts, 0, len(idx)))):
      bucket.append(chunk)
  return [np.concatenate(b) for b in buckets]


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator
            ) -> list[np.ndarray]:
  """Moves random samples of the largest client to every client below `min_size`."""
  parts = list(parts)
  sizes = np.array([len(p) for p in parts])
  for k in np.flatnonzero(sizes < min_size):
    while sizes[k] < min_size:
      # A donor above min_size exists because sum(sizes) >= C * min_size.
      donor = int(np.argmax(sizes))
      take = int(min(min_size - sizes[k], sizes[donor] - min_size))
      moved = rng.choice(sizes[donor], take, replace=False)
      parts[k] = np.concatenate([parts[k], parts[donor][moved]])
      parts[donor] = np.delete(parts[donor], moved)
      sizes[k] += take
      sizes[donor] -= take
  return parts


def make_partition(kind: str, labels, num_clients: int, seed: int, *, alpha: float = 0.5,
                   classes_per_client: int = 2, per_client: int = 1000,
                   min_size: int = 10) -> list[np.ndarray]:
  """Dispatches to `iid`, `dirichlet` (alpha, min_size), `shards` (classes_per_client),
  `fixed` (per_client) or `groups` (labels read as groups) by name."""
  match kind:
    case "iid":
      return iid(labels, num_clients, seed)
    case "dirichlet":
      return dirichlet(labels, num_clients, alpha, seed, min_size=min_size)
    case "shards":
      return shards(labels, num_clients, classes_per_client, seed)
    case "fixed":
      return fixed(labels, num_clients, per_client, seed)
    case "groups":  # `labels` are the samples' groups (a text corpus's books)
      return groups(labels, num_clients, seed)
  raise ValueError(f"unknown partition {kind!r}; valid: {', '.join(PARTITIONS)}")


def client_table(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(idx_CxM int32, sizes_C int32): row k holds client k's indices, padded to the
  largest size M by repeating the client's own indices cyclically, so a pad entry is
  always a valid index of that client (the sampler never draws it anyway)."""
  if not parts:
    raise ValueError("client_table needs at least one client")
  sizes = np.array([len(p) for p in parts], np.int64)
  if (sizes == 0).any():
    raise ValueError(f"clients {np.flatnonzero(sizes == 0).tolist()} have no samples")
  if max(int(np.max(p)) for p in parts) >= 2**31:
    raise ValueError("train indices do not fit in int32")
  width = int(sizes.max())
  table = np.stack([np.resize(np.asarray(p), width) for p in parts])
  return table.astype(np.int32), sizes.astype(np.int32)


def client_weights(sizes_C) -> np.ndarray:
  """float32 delta_k = |D_k| / sum_j |D_j|."""
  sizes = np.asarray(sizes_C, np.float64)
  if sizes.ndim != 1 or (sizes < 0).any() or sizes.sum() <= 0:
    raise ValueError(f"sizes must be non-negative with a positive sum, got {sizes_C}")
  return (sizes / sizes.sum()).astype(np.float32)


def holdout(num_train: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(kept, held_out): sorted train indices, `size` of them drawn uniformly without
  replacement for validation (SGLR holds out 10,000), the rest for the clients."""
  if not 0 <= size < num_train:
    raise ValueError(f"cannot hold out {size} of {num_train} train samples")
  held = np.zeros(num_train, bool)
  held[np.random.default_rng(seed).permutation(num_train)[:size]] = True
  return np.flatnonzero(~held), np.flatnonzero(held)

