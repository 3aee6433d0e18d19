"""The label-privacy pieces (`lfmjax.label_privacy`), each against what it guarantees
or its definition written out in NumPy."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfmjax import label_privacy as lp
from lfmjax.algorithms import SpecError

from test_round import algorithm_cfg


def gradients(seed=0, batch=16, shape=(4, 3)):
  rng = np.random.default_rng(seed)
  scales = rng.uniform(0.1, 3.0, (batch,) + (1,) * len(shape))
  return jnp.asarray(rng.normal(size=(batch,) + shape) * scales, jnp.float32)


def test_max_norm_brings_every_expected_squared_norm_to_the_batch_maximum():
  g = gradients()
  sq = np.sum(np.asarray(g).reshape(16, -1) ** 2, axis=1)
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  noised = jax.vmap(lambda k: lp.max_norm_noise(k, g))(keys)
  mean_sq = np.mean(np.sum(np.asarray(noised).reshape(4000, 16, -1) ** 2, axis=2), axis=0)
  np.testing.assert_allclose(mean_sq, sq.max(), rtol=0.05)
  # the largest gradient is left as it is; the noise is zero-mean
  np.testing.assert_array_equal(noised[:, sq.argmax()], jnp.broadcast_to(g[sq.argmax()],
                                                                         noised[:, 0].shape))
  np.testing.assert_allclose(np.mean(noised, axis=0), g, atol=0.25)  # 5 standard errors


def test_gradient_noise_has_the_configured_scale():
  g = gradients(batch=64, shape=(32,))
  out = lp.defend_gradient(jax.random.PRNGKey(1), g, noise_std=0.3)
  np.testing.assert_allclose(np.std(np.asarray(out - g)), 0.3, rtol=0.05)
  assert lp.defend_gradient(jax.random.PRNGKey(1), g) is g  # all off: g itself


@pytest.mark.parametrize("keep", [0.1, 0.5, 1 / 12])
def test_sparsification_keeps_each_samples_largest_elements(keep):
  g = gradients()
  out = np.asarray(lp.sparsify(g, keep)).reshape(16, -1)
  flat = np.asarray(g).reshape(16, -1)
  k = int(np.ceil(keep * 12))
  for row, kept in zip(flat, out):
    assert np.count_nonzero(kept) == k
    top = np.argsort(-np.abs(row))[:k]
    np.testing.assert_array_equal(kept[top], row[top])


def test_gradient_quantisation_lies_on_each_samples_grid():
  g = gradients()
  out = np.asarray(lp.defend_gradient(jax.random.PRNGKey(0), g, quantize_bits=3))
  for row, q in zip(np.asarray(g).reshape(16, -1), out.reshape(16, -1)):
    lo, step = row.min(), (row.max() - row.min()) / 7
    codes = (q - lo) / step
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert len(np.unique(np.round(codes))) <= 8


@pytest.mark.parametrize("epsilon,classes", [(1.0, 10), (0.5, 3), (3.0, 10)])
def test_randomized_response_flips_at_its_rate_to_the_other_labels_uniformly(epsilon,
                                                                           classes):
  n = 40_000
  y = jnp.asarray(np.arange(n) % classes, jnp.int32)
  out = np.asarray(lp.sample_labels_rr(jax.random.PRNGKey(2), jnp.arange(n), y, classes,
                                       epsilon))
  keep = np.exp(epsilon) / (np.exp(epsilon) + classes - 1)
  flipped = out != np.asarray(y)
  tolerance = 4 * np.sqrt(keep * (1 - keep) / n)
  assert abs(flipped.mean() - (1 - keep)) < tolerance
  shifts = ((out - np.asarray(y)) % classes)[flipped]
  counts = np.bincount(shifts, minlength=classes)[1:]
  expected = flipped.sum() / (classes - 1)
  assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
  # one release a sample: the same sample reports the same label at every step
  again = lp.sample_labels_rr(jax.random.PRNGKey(2), jnp.arange(n)[::-1], y[::-1], classes,
                              epsilon)
  np.testing.assert_array_equal(np.asarray(again)[::-1], out)


def plain_auc(score, positive):
  pos, neg = score[positive], score[~positive]
  if not len(pos) or not len(neg):
    return np.nan
  return np.mean([1.0 if p > q else 0.5 if p == q else 0.0
                  for p, q in itertools.product(pos, neg)])


def test_class_auc_is_the_mann_whitney_statistic():
  rng = np.random.default_rng(3)
  score = np.round(rng.normal(size=40), 1)  # ties
  positive = rng.random(40) < 0.3
  np.testing.assert_allclose(lp.class_auc(jnp.asarray(score), jnp.asarray(positive)),
                             plain_auc(score, positive), rtol=1e-6)
  assert float(lp.class_auc(jnp.arange(4.0), jnp.asarray([False, False, True, True]))) == 1
  assert np.isnan(float(lp.class_auc(jnp.arange(4.0), jnp.zeros(4, bool))))


def test_probe_auc_is_one_where_the_norm_gives_the_class_and_a_half_where_not():
  y = jnp.asarray(np.arange(60) % 3, jnp.int32)
  direction = jax.random.normal(jax.random.PRNGKey(0), (60, 8))
  unit = direction / jnp.linalg.norm(direction, axis=1, keepdims=True)
  by_class = unit * (1.0 + y[:, None])  # norm 1, 2, 3 by class
  # One class against the rest: the smallest and the largest norms separate (AUC 0 and
  # 1, oriented 1), the middle class does not (0.5): a norm ranks, it does not bin.
  np.testing.assert_allclose(lp.label_leak_auc(by_class, y, 3), (1 + 0.5 + 1) / 3)
  binary = y % 2
  assert float(lp.label_leak_auc(unit * (1.0 + binary[:, None]), binary, 3)) == 1.0
  random = jax.random.normal(jax.random.PRNGKey(1), (3000, 8))
  y_random = jnp.asarray(np.arange(3000) % 3, jnp.int32)
  assert abs(float(lp.label_leak_auc(random, y_random, 3)) - 0.5) < 0.05


def test_direction_scores_are_cosines_with_the_reference():
  g = gradients(shape=(5,))
  scores = np.asarray(lp.direction_scores(g, g[0]))
  flat = np.asarray(g)
  expected = flat @ flat[0] / (np.linalg.norm(flat, axis=1) * np.linalg.norm(flat[0]))
  np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_label_defences_refused_where_they_cannot_act():
  with pytest.raises(SpecError, match="label_rr_epsilon=1.0: a U-shaped split"):
    algorithm_cfg("psl", client_head=True, label_rr_epsilon=1.0)
  with pytest.raises(SpecError, match="with client_gradient='none' \\(LocSplitFed\\) it "
                                      "sends none"):
    algorithm_cfg("locsplitfed", grad_noise_std=0.1)
  with pytest.raises(SpecError, match="grad_keep_fraction=0.0"):
    algorithm_cfg("psl", grad_keep_fraction=0.0)

