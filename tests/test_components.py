"""Each component against a plain reference: SmashMix, the MI loss, FedAvg."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfmjax import components


def test_smashmix_mixes_each_client_with_a_different_partner():
  C, N, B, K = 5, 3, 6, 6
  key = jax.random.PRNGKey(0)
  s = jax.random.normal(key, (C, B, 2, 2, 3))
  # Client k's labels are all k, so lambda is read off the soft label of class k.
  y = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32)[:, None], (C, B))
  s_mix, y_mix = components.smashmix(jax.random.PRNGKey(2), s, y, K, 2.0, N)
  chex.assert_shape(s_mix, (C, N, B, 2, 2, 3))
  chex.assert_shape(y_mix, (C, N, B, K))
  s_np, y_np = np.asarray(s), np.asarray(y)
  for k in range(C):
    for n in range(N):
      # Recover lambda from the soft labels and find the partner sample it implies.
      lam = np.asarray(y_mix[k, n])[np.arange(B), y_np[k]]
      for b in range(B):
        rest = (np.asarray(s_mix[k, n, b]) - lam[b] * s_np[k, b]) / (1 - lam[b])
        matches = [(j, i) for j in range(C) for i in range(B)
                   if np.allclose(rest, s_np[j, i], atol=1e-4)]
        assert len(matches) == 1
        j, i = matches[0]
        assert j != k  # the partner is another client
        expected = np.zeros(K)
        expected[y_np[k, b]] += lam[b]
        expected[y_np[j, i]] += 1 - lam[b]
        np.testing.assert_allclose(y_mix[k, n, b], expected, atol=1e-5)
      np.testing.assert_allclose(np.asarray(y_mix[k, n]).sum(-1), 1.0, atol=1e-5)


def test_smashmix_partner_batch_is_a_permutation_and_lambda_is_beta():
  C, B, K = 2, 2000, 3
  # Client 0's smashed data are zeros and client 1's are 0..B-1, with distinct labels,
  # so client 0's mixed batch reveals lambda (its label weight) and the permutation.
  s = jnp.stack([jnp.zeros((B, 1)), jnp.arange(B, dtype=jnp.float32)[:, None]])
  y = jnp.stack([jnp.zeros(B, jnp.int32), jnp.ones(B, jnp.int32)])
  s_mix, y_mix = components.smashmix(jax.random.PRNGKey(3), s, y, K, 2.0, 1)
  lam = np.asarray(y_mix[0, 0, :, 0])
  partner_values = np.asarray(s_mix[0, 0, :, 0]) / (1.0 - lam)
  np.testing.assert_allclose(np.sort(partner_values), np.arange(B), atol=0.05)
  # Beta(2, 2): mean 1/2, variance 1/20.
  assert abs(lam.mean() - 0.5) < 0.02 and abs(lam.var() - 0.05) < 0.006


def test_smashmix_single_client_mixes_with_itself():
  s = jnp.arange(8, dtype=jnp.float32).reshape(1, 8, 1)
  y = jnp.arange(8, dtype=jnp.int32).reshape(1, 8) % 4
  s_mix, y_mix = components.smashmix(jax.random.PRNGKey(0), s, y, 4, 2.0, 2)
  chex.assert_shape(s_mix, (1, 2, 8, 1))
  assert np.all(np.isfinite(np.asarray(s_mix)))
  np.testing.assert_allclose(np.asarray(y_mix).sum(-1), 1.0, atol=1e-6)


def test_mix_partners_never_self_and_uniform():
  partners = np.asarray(components.mix_partners(jax.random.PRNGKey(0), 4, 3000))
  for k in range(4):
    assert not np.any(partners[k] == k)
    counts = np.bincount(partners[k], minlength=4)
    others = np.delete(counts, k)
    assert others.min() > 900 and others.max() < 1100


@pytest.mark.parametrize("kind", ["bce", "mse"])
def test_reconstruction_loss_matches_plain_formula(kind):
  logits = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2)) * 3
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 4, 4, 2))
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  xn = np.asarray(x, np.float64)
  if kind == "bce":
    expected = -np.mean(xn * np.log(p) + (1 - xn) * np.log(1 - p))
  else:
    expected = np.mean((p - xn) ** 2)
  np.testing.assert_allclose(components.reconstruction_loss(logits, x, kind), expected,
                             rtol=1e-5)


def test_fedavg_is_the_delta_weighted_mean():
  C = 4
  weights = jnp.asarray([0.1, 0.2, 0.3, 0.4])
  tree = {"a": jax.random.normal(jax.random.PRNGKey(0), (C, 3, 2)),
          "b": {"c": jnp.arange(C, dtype=jnp.float32)}}
  out = components.fedavg(tree, weights)
  expected_a = sum(float(weights[k]) * np.asarray(tree["a"][k]) for k in range(C))
  for k in range(C):
    np.testing.assert_allclose(out["a"][k], expected_a, rtol=1e-6)
    np.testing.assert_allclose(out["b"]["c"][k], 0.0 * 0.1 + 0.2 + 0.6 + 1.2, rtol=1e-6)


def test_cross_entropies_match_plain_formulas():
  logits = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
  y = jnp.asarray([0, 2, 1, 1, 0])
  logp = np.log(np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(-1, keepdims=True))
  np.testing.assert_allclose(components.cross_entropy(logits, y),
                             -logp[np.arange(5), np.asarray(y)].mean(), rtol=1e-5)
  t = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(1), (5, 3)))
  np.testing.assert_allclose(components.soft_cross_entropy(logits, t),
                             -(np.asarray(t) * logp).sum(-1).mean(), rtol=1e-5)
