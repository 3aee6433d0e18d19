"""What the server learns from the smashed data, and the defences that limit it.

Split learning keeps raw inputs on the clients, but the smashed data s = lower(x) the
server receives still carries information about x; LocFedMix-SL's Loc term (Oh et al.,
WWW 2022) even *maximises* a lower bound of I(x; s). This module holds the pure,
one-client pieces that measure and limit that leakage:

* `distance_correlation(x, s)`: dCor over a batch (Szekely, Rizzo and Bakirov, 2007),
  the leakage measure and the regulariser of NoPeek (Vepakomma et al., 2020);
* `gradient_cosine`: how far the gradient a client downloads is from its own loss
  gradient (GradMix, SGLR's SplitAvg, replaces it by a mean);
* the defences on what a client uploads: Gaussian noise (`add_noise`: a fixed sigma or a
  target SNR) and k-bit quantisation (`quantize`), composed by `defend`, and the bytes
  a quantised upload takes (`smashed_bytes`).

The round applies `defend` to every upload and passes the server's gradient with respect
to the defended data back unchanged (the straight-through estimator for quantisation;
additive noise has the identity Jacobian), so a defence changes what the server sees and
not how a client differentiates its own lower.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# fold_in tags of the defences' random streams (round.py's are 0-3).
TAG_NOISE, TAG_EVAL_NOISE = 4, 5
MAX_QUANTIZE_BITS = 16


def _centred_distances(a_BxD: jax.Array) -> jax.Array:
  """The doubly centred matrix of Euclidean distances between the rows of a."""
  sq = jnp.sum(a_BxD * a_BxD, axis=1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * a_BxD @ a_BxD.T, 0.0)
  # The gradient of sqrt at 0 (the diagonal) is infinite: take it where d2 > 0 only.
  positive = d2 > 0
  d = jnp.where(positive, jnp.sqrt(jnp.where(positive, d2, 1.0)), 0.0)
  return d - d.mean(axis=0, keepdims=True) - d.mean(axis=1, keepdims=True) + d.mean()


def distance_correlation(x_Bx: jax.Array, s_Bx: jax.Array) -> jax.Array:
  """Sample distance correlation dCor(x, s) in [0, 1] of two batches of B samples
  (any trailing shapes, flattened): the V-statistic of Szekely et al. (2007), as
  NoPeek (Vepakomma et al., 2020) computes it. 0 for a constant batch."""
  batch = x_Bx.shape[0]
  a = _centred_distances(x_Bx.reshape(batch, -1).astype(jnp.float32))
  b = _centred_distances(s_Bx.reshape(batch, -1).astype(jnp.float32))
  dcov2_xy = jnp.mean(a * b)
  dvar2 = jnp.mean(a * a) * jnp.mean(b * b)
  positive = dvar2 > 0
  ratio = jnp.where(positive, dcov2_xy / jnp.sqrt(jnp.where(positive, dvar2, 1.0)), 0.0)
  # dCor^2 can round below 0; sqrt's gradient at 0 is infinite, so take it above 0 only.
  above = ratio > 0
  return jnp.where(above, jnp.sqrt(jnp.where(above, ratio, 1.0)), 0.0)


def gradient_cosine(g_true: jax.Array, g_down: jax.Array) -> jax.Array:
  """cos(g_true, g_down) over all their elements; 0 where either is zero (a client that
  receives nothing, LocSplitFed)."""
  a, b = g_true.reshape(-1), g_down.reshape(-1)
  norms = jnp.linalg.norm(a) * jnp.linalg.norm(b)
  return jnp.where(norms > 0, jnp.dot(a, b) / jnp.where(norms > 0, norms, 1.0), 0.0)


def noise_sigma(s_BxS: jax.Array, noise_std: float, noise_snr_db: float | None) -> jax.Array:
  """The noise's standard deviation: `noise_std`, or the one giving the target SNR
  mean(s^2) / sigma^2 = 10^(snr/10) on this batch."""
  if noise_snr_db is None:
    return jnp.asarray(noise_std, s_BxS.dtype)
  power = jnp.mean(jnp.square(s_BxS))
  return jnp.sqrt(power / 10.0 ** (noise_snr_db / 10.0)).astype(s_BxS.dtype)


def add_noise(key: jax.Array, s_BxS: jax.Array, noise_std: float,
              noise_snr_db: float | None) -> jax.Array:
  """s + N(0, sigma^2) elementwise (`noise_sigma`)."""
  sigma = noise_sigma(s_BxS, noise_std, noise_snr_db)
  return s_BxS + sigma * jax.random.normal(key, s_BxS.shape, s_BxS.dtype)


def quantize(s_BxS: jax.Array, bits: int) -> jax.Array:
  """Uniform k-bit quantisation of each sample between its own min and max (what the
  server reconstructs from k bits an element plus two float32s a sample)."""
  batch = s_BxS.shape[0]
  flat = s_BxS.reshape(batch, -1)
  lo = flat.min(axis=1, keepdims=True)
  span = flat.max(axis=1, keepdims=True) - lo
  levels = 2 ** bits - 1
  step = jnp.where(span > 0, span / levels, 1.0)
  q = jnp.round((flat - lo) / step)
  return (lo + q * step).reshape(s_BxS.shape).astype(s_BxS.dtype)


def defend(key: jax.Array, s_BxS: jax.Array, noise_std: float = 0.0,
           noise_snr_db: float | None = None, quantize_bits: int = 0) -> jax.Array:
  """What a client uploads in place of s: noise added, then quantised (each if on).

  Equal to s when both are off. The result carries no gradient back to s; the round
  hands the server's gradient with respect to it to the client as is."""
  u = s_BxS
  if noise_std > 0 or noise_snr_db is not None:
    u = add_noise(key, u, noise_std, noise_snr_db)
  if quantize_bits:
    u = quantize(u, quantize_bits)
  return u


def smashed_bytes(elements_per_sample: int, batch: int, itemsize: int,
                  quantize_bits: int = 0) -> int:
  """Bytes of one uploaded batch of smashed data: B * S * itemsize, or with k-bit
  quantisation B * (ceil(S * k / 8) + 8), the 8 being each sample's float32 min and
  step."""
  if not quantize_bits:
    return batch * elements_per_sample * itemsize
  return batch * (math.ceil(elements_per_sample * quantize_bits / 8) + 8)
