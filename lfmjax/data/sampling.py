"""On-device mini-batches: which samples each client uses at a step, and preprocessing.

Everything here is pure JAX and jittable, so a training step samples and preprocesses
its batches inside the same XLA program, without a host round trip: the batch of a step
is a function of (key, step) alone, which also makes runs reproducible and resumable.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZATIONS = ("none", "pm1", "standard")


def batch_indices(key: jax.Array, step: jax.Array | int, idx_CxM: jax.Array,
                  sizes_C: jax.Array, batch: int, *, max_epochs: int = 2,
                  ids_C: jax.Array | None = None) -> jax.Array:
  """int32 C x batch global train indices for every client at `step`.

  Client k reads its data as a stream of epochs, each a fresh permutation of its
  `sizes_C[k]` table entries, without replacement within an epoch: stream position
  i = step * batch + b is sample p = i % size of epoch e = i // size, and epoch e's
  order is argsort of uniform noise from fold_in(fold_in(key, k), e), with the padded
  table entries (columns >= size) pushed to the end so they are never drawn.

  A batch spans at most 1 + ceil((batch - 1) / size) epochs. The permutations of
  `max_epochs` consecutive epochs are computed (static: that many argsorts of M per
  client); the default 2 is exact whenever batch <= size + 1 for every client (see
  `epochs_per_batch` to pick it for tinier clients). Positions beyond the last computed
  epoch reuse its order, so they are still the client's own samples, not garbage.

  `step` may be a traced int32 scalar; step * batch must stay below 2**31. `ids_C`:
  the rows' client ids k (default 0..C-1), so a drawn subset of clients reads each
  client's own stream.
  """
  idx_CxM = jnp.asarray(idx_CxM)
  sizes_C = jnp.asarray(sizes_C, jnp.int32)
  one = lambda k, row_M, size: client_batch_indices(key, k, step, row_M, size, batch,
                                                    max_epochs=max_epochs)
  clients = (jnp.arange(idx_CxM.shape[0], dtype=jnp.int32) if ids_C is None
             else jnp.asarray(ids_C, jnp.int32))
  return jax.vmap(one)(clients, idx_CxM, sizes_C).astype(jnp.int32)


def client_batch_indices(key: jax.Array, k, step, row_M: jax.Array, size, batch: int, *,
                         max_epochs: int = 2) -> jax.Array:
  """int32 `batch` global train indices of client k at `step`: row k of `batch_indices`
  (client k's stream depends on k, its own table row and size alone). Vanilla SL's turns
  draw one client's batches at a time with it."""
  width = row_M.shape[0]
  size = jnp.maximum(jnp.asarray(size, jnp.int32), 1)  # weight 0: reads a padding entry
  start = jnp.asarray(step, jnp.int32) * batch
  pos_B = start + jnp.arange(batch, dtype=jnp.int32)
  epoch_B, p_B = pos_B // size, pos_B % size
  first = start // size
  key_k = jax.random.fold_in(key, k)
  valid_M = jnp.arange(width) < size

  def order(j):
    noise = jax.random.uniform(jax.random.fold_in(key_k, first + j), (width,))
    # Uniform draws are < 1, so 2 sorts every pad entry after every real one.
    return jnp.argsort(jnp.where(valid_M, noise, 2.0))

  orders_ExM = jax.vmap(order)(jnp.arange(max_epochs, dtype=jnp.int32))
  j_B = jnp.clip(epoch_B - first, 0, max_epochs - 1)
  return row_M[orders_ExM[j_B, p_B]].astype(jnp.int32)


def epochs_per_batch(sizes_C, batch: int) -> int:
  """The `max_epochs` that makes `batch_indices` exact for these client sizes (host)."""
  smallest = int(np.min(np.asarray(sizes_C)))
  return 1 + -(-(batch - 1) // smallest) if batch > 1 else 1


def gather(x_N: jax.Array, idx_CxB: jax.Array) -> jax.Array:
  """x_N[idx_CxB]: C x B x ... rows, in the dtype of x_N (uint8 stays uint8)."""
  return x_N[idx_CxB]


def preprocess(x_uint8: jax.Array, *, resize_to: int | None = None,
               channels: int | None = None, normalize: str = "none",
               mean: Sequence[float] | float | None = None,
               std: Sequence[float] | float | None = None
               ) -> tuple[jax.Array, jax.Array]:
  """uint8 images (..., H, W, C) -> (x_model, x01), both float32.

  x01 = x / 255 after an optional bilinear resize to resize_to x resize_to and an
  optional 1 -> `channels` channel repeat; it is the reconstruction target of a
  decoder. x_model is what the network reads: x01 ("none"), 2 * x01 - 1 ("pm1", SGLR's
  [-1, 1]) or (x01 - mean) / std per channel ("standard", mean/std required).
  """
  x = jnp.asarray(x_uint8).astype(jnp.float32) / 255.0
  if x.ndim < 3:
    raise ValueError(f"images must be (..., H, W, C), got shape {x.shape}")
  if resize_to is not None and x.shape[-3:-1] != (resize_to, resize_to):
    # Resize before the channel repeat: fewer channels to interpolate. Bilinear is a
    # convex combination, so x01 stays in [0, 1].
    x = jax.image.resize(x, (*x.shape[:-3], resize_to, resize_to, x.shape[-1]),
                         method="bilinear")
  if channels is not None and channels != x.shape[-1]:
    if x.shape[-1] != 1:
      raise ValueError(f"cannot turn {x.shape[-1]} channels into {channels}")
    x = jnp.repeat(x, channels, axis=-1)
  return _normalize(x, normalize, mean, std), x


def _normalize(x01: jax.Array, normalize: str, mean, std) -> jax.Array:
  match normalize:
    case "none":
      return x01
    case "pm1":
      return 2.0 * x01 - 1.0
    case "standard":
      if mean is None or std is None:
        raise ValueError("normalize='standard' needs the dataset's per-channel mean and std")
      mean = jnp.asarray(mean, jnp.float32)
      std = jnp.asarray(std, jnp.float32)
      if mean.size not in (1, x01.shape[-1]) or std.size not in (1, x01.shape[-1]):
        raise ValueError(f"mean/std have {mean.size}/{std.size} entries for "
                         f"{x01.shape[-1]} channels")
      return (x01 - mean.reshape(-1)) / std.reshape(-1)
  raise ValueError(f"unknown normalize {normalize!r}; valid: {', '.join(NORMALIZATIONS)}")
