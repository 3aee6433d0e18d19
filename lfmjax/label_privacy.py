"""What the gradients at the cut say about the labels, and the defences that limit it.

A client's labels leave it in three ways: the server of a (non-U-shaped) split holds
them; the gradient of the loss with respect to the cut carries them (Li et al., "Label
Leakage and Protection in Two-party Split Learning", ICLR 2022: its norm and its
direction; Liu et al., "Similarity-based Label Inference Attack against Training and
Inference of Split Learning", arXiv 2203.05222: the cosine similarity of gradients and
the distance of smashed data); and, in a U-shaped split, the gradient the client returns
to the server's body. This module holds the pure pieces:

* the scores: `class_auc` (the area under the ROC curve of a score for one class
  against the rest), `norm_scores`/`direction_scores` (Li et al.'s attacks),
  `label_leak_auc` (the in-program probe's number);
* the defences on the gradient the label holder sends (the server's download, or a
  U-shaped client's returned gradient): `max_norm_noise` (Li et al.'s max norm),
  isotropic Gaussian noise, top-k sparsification and k-bit quantisation, composed by
  `defend_gradient`; and randomised response on the labels the server receives
  (`randomized_response`, label differential privacy, Warner 1965; Ghazi et al. 2021).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lfmjax import privacy

# fold_in tags of these random streams (round.py's are 0-3, privacy.py's 4-5).
TAG_GRAD_NOISE, TAG_LABEL_RR = 6, 7


def flat_norms(g_BxS: jax.Array) -> jax.Array:
  """The L2 norm of each sample's gradient (B)."""
  return jnp.linalg.norm(g_BxS.reshape(g_BxS.shape[0], -1).astype(jnp.float32), axis=1)


def max_norm_noise(key: jax.Array, g_BxS: jax.Array) -> jax.Array:
  """Li et al.'s max-norm perturbation: each sample's gradient plus isotropic Gaussian
  noise whose per-element variance (max_j |g_j|^2 - |g_i|^2) / d brings its expected
  squared norm up to the batch's largest, so the norm no longer tells the samples apart."""
  batch = g_BxS.shape[0]
  d = math.prod(g_BxS.shape[1:])
  sq = flat_norms(g_BxS) ** 2
  sigma_B = jnp.sqrt(jnp.maximum(jnp.max(sq) - sq, 0.0) / d).astype(g_BxS.dtype)
  noise = jax.random.normal(key, g_BxS.shape, g_BxS.dtype)
  return g_BxS + sigma_B.reshape((batch,) + (1,) * (g_BxS.ndim - 1)) * noise


def sparsify(g_BxS: jax.Array, keep_fraction: float) -> jax.Array:
  """Each sample's gradient with all but its ceil(keep_fraction * d) largest-magnitude
  elements set to 0 (ties at the threshold kept in index order)."""
  batch = g_BxS.shape[0]
  flat = g_BxS.reshape(batch, -1)
  keep = max(1, math.ceil(keep_fraction * flat.shape[1]))
  _, top_BxK = jax.lax.top_k(jnp.abs(flat), keep)
  mask = jnp.zeros(flat.shape, bool).at[jnp.arange(batch)[:, None], top_BxK].set(True)
  return jnp.where(mask, flat, 0.0).reshape(g_BxS.shape)


def defend_gradient(key: jax.Array, g_BxS: jax.Array, *, noise_std: float = 0.0,
                    max_norm: bool = False, keep_fraction: float = 1.0,
                    quantize_bits: int = 0) -> jax.Array:
  """What the label holder sends in place of the gradient g: max-norm noise, then
  isotropic N(0, noise_std^2) noise, then top-k sparsification, then k-bit quantisation
  (`privacy.quantize`), each where on. g itself when all are off."""
  key_max, key_noise = jax.random.split(key)
  if max_norm:
    g_BxS = max_norm_noise(key_max, g_BxS)
  if noise_std > 0:
    g_BxS = g_BxS + noise_std * jax.random.normal(key_noise, g_BxS.shape, g_BxS.dtype)
  if keep_fraction < 1.0:
    g_BxS = sparsify(g_BxS, keep_fraction)
  if quantize_bits:
    g_BxS = privacy.quantize(g_BxS, quantize_bits)
  return g_BxS


def rr_keep_probability(epsilon: float, num_classes: int) -> float:
  """Randomised response's probability of reporting the true label: e^eps / (e^eps + K - 1)
  (each other label with (1 - that) / (K - 1)): eps-label-DP."""
  return math.exp(epsilon) / (math.exp(epsilon) + num_classes - 1)


def randomized_response(key: jax.Array, y: jax.Array, num_classes: int,
                        epsilon: float) -> jax.Array:
  """K-ary randomised response of integer labels (any shape): the true label with
  `rr_keep_probability`, else one of the other K - 1 uniformly."""
  key_keep, key_other = jax.random.split(key)
  keep = jax.random.uniform(key_keep, y.shape) < rr_keep_probability(epsilon, num_classes)
  shift = jax.random.randint(key_other, y.shape, 1, num_classes)
  return jnp.where(keep, y, (y + shift) % num_classes).astype(y.dtype)


def sample_labels_rr(key: jax.Array, sample_ids: jax.Array, y: jax.Array,
                     num_classes: int, epsilon: float) -> jax.Array:
  """The labels the server holds for the training samples `sample_ids`: each sample's
  randomised response drawn once for the run, from fold_in(fold_in(key, 7), its index),
  so a sample seen again reports the same label (one eps-DP release per label)."""
  stream = jax.random.fold_in(key, TAG_LABEL_RR)

  def one(i, label):
    return randomized_response(jax.random.fold_in(stream, i), label, num_classes, epsilon)

  flat_ids = sample_ids.reshape(-1)
  flat_y = y.reshape((flat_ids.shape[0],) + y.shape[sample_ids.ndim:])
  return jax.vmap(one)(flat_ids, flat_y).reshape(y.shape)


def class_auc(score_B: jax.Array, positive_B: jax.Array) -> jax.Array:
  """The area under the ROC curve of `score` for the positives against the rest: the
  probability that a positive scores above a negative, ties counting half (the
  Mann-Whitney statistic). NaN where either group is empty."""
  pos, neg = positive_B, ~positive_B
  above = (score_B[:, None] > score_B[None, :]).astype(jnp.float32)
  ties = (score_B[:, None] == score_B[None, :]).astype(jnp.float32)
  pairs = (pos[:, None] & neg[None, :]).astype(jnp.float32)
  count = jnp.sum(pairs)
  return jnp.where(count > 0, jnp.sum(pairs * (above + 0.5 * ties))
                   / jnp.maximum(count, 1.0), jnp.nan)


def norm_scores(g_BxS: jax.Array) -> jax.Array:
  """Li et al.'s norm attack: each sample's score is its gradient's norm."""
  return flat_norms(g_BxS)


def direction_scores(g_BxS: jax.Array, reference_S: jax.Array) -> jax.Array:
  """Li et al.'s direction attack: each sample's cosine with the gradient of a sample
  whose label the attacker knows."""
  flat = g_BxS.reshape(g_BxS.shape[0], -1).astype(jnp.float32)
  ref = reference_S.reshape(-1).astype(jnp.float32)
  norms = jnp.linalg.norm(flat, axis=1) * jnp.linalg.norm(ref)
  return jnp.where(norms > 0, flat @ ref / jnp.where(norms > 0, norms, 1.0), 0.0)


def per_class_auc(scores_KxB: jax.Array, y_B: jax.Array) -> jax.Array:
  """Row c of `scores` scored for class c against the rest: the K AUCs (NaN for a
  class absent from the batch, or the whole of it)."""
  classes = jnp.arange(scores_KxB.shape[0])
  return jax.vmap(lambda s, c: class_auc(s, y_B == c))(scores_KxB, classes)


def label_leak_auc(g_BxS: jax.Array, y_B: jax.Array, num_classes: int) -> jax.Array:
  """The in-program probe: the norm attack's AUC for each class against the rest,
  averaged over the classes present, each taken as max(AUC, 1 - AUC) (an attacker who
  knows one label orients the score); 0.5 is no leakage, 1 complete. A scalar."""
  norms = norm_scores(g_BxS)
  auc_K = per_class_auc(jnp.broadcast_to(norms, (num_classes,) + norms.shape), y_B)
  oriented = jnp.maximum(auc_K, 1.0 - auc_K)
  present = ~jnp.isnan(auc_K)
  return jnp.sum(jnp.where(present, oriented, 0.0)) / jnp.maximum(jnp.sum(present), 1)
