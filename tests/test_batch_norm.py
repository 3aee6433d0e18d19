"""lfmjax's BatchNorm (sums as matrix-vector products, custom VJP) equals flax's."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from lfmjax.models.batch_norm import BatchNorm

KW = dict(momentum=0.9, epsilon=1e-5)


def train_step(module, variables, x, w):
  """(loss, new batch_stats), d loss / d (params, x) of sum(tanh(bn(x)) * w)."""
  def loss(params, x):
    y, new = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                          mutable=["batch_stats"])
    return jnp.sum(jnp.tanh(y) * w), new["batch_stats"]
  return jax.value_and_grad(loss, (0, 1), has_aux=True)(variables["params"], x)


@pytest.mark.parametrize("shape", [(4, 6, 6, 5), (7, 3), (2, 5, 5, 1)])
def test_batch_norm_equals_flax_in_training(shape):
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), shape) + 1.0
  w = jax.random.normal(jax.random.PRNGKey(1), shape)
  ours, flax_bn = BatchNorm(**KW), nn.BatchNorm(use_running_average=False, **KW)
  variables = flax_bn.init(jax.random.PRNGKey(2), x)
  chex.assert_trees_all_equal_structs(ours.init(jax.random.PRNGKey(2), x), variables)
  c = shape[-1]
  variables = {"params": {"scale": jnp.linspace(0.5, 1.5, c), "bias": jnp.linspace(-1, 1, c)},
               "batch_stats": {"mean": jnp.linspace(0, 1, c), "var": jnp.linspace(1, 2, c)}}
  chex.assert_trees_all_close(train_step(ours, variables, x, w),
                              train_step(flax_bn, variables, x, w), atol=1e-4, rtol=1e-4)


def test_batch_norm_equals_flax_with_running_statistics():
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 4, 4, 6))
  variables = {"params": {"scale": jnp.full(6, 2.0), "bias": jnp.full(6, 0.5)},
               "batch_stats": {"mean": jnp.linspace(-1, 1, 6), "var": jnp.linspace(0.5, 3, 6)}}
  chex.assert_trees_all_close(
      BatchNorm(use_running_average=True, **KW).apply(variables, x),
      nn.BatchNorm(use_running_average=True, **KW).apply(variables, x), atol=1e-6)


def test_batch_norm_gradients_under_nested_vmap():
  """Seeds over clients, per-client parameters and data, as the round maps them."""
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 3, 5, 4, 4, 3))
  w = jax.random.normal(jax.random.PRNGKey(5), x.shape[2:])
  variables = {"params": {"scale": jnp.ones((2, 3, 3)), "bias": jnp.zeros((2, 3, 3))},
               "batch_stats": {"mean": jnp.zeros((2, 3, 3)), "var": jnp.ones((2, 3, 3))}}

  def nested(module):
    return jax.vmap(jax.vmap(lambda v, x: train_step(module, v, x, w)))(variables, x)

  chex.assert_trees_all_close(nested(BatchNorm(**KW)),
                              nested(nn.BatchNorm(use_running_average=False, **KW)),
                              atol=1e-4, rtol=1e-4)


def test_batch_norm_gradient_through_its_statistics():
  """The custom VJP also carries the direct paths of the batch mean and variance."""
  from lfmjax.models.batch_norm import normalize_batch
  x = jax.random.normal(jax.random.PRNGKey(6), (6, 4))

  def reference(x):
    mean = x.mean(0)
    var = jnp.maximum(0.0, (x * x).mean(0) - mean * mean)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5), mean, var

  def loss(fn, x):
    y, mean, var = fn(x)
    return jnp.sum(jnp.sin(y)) + jnp.sum(mean ** 2) + jnp.sum(jnp.cos(var))

  ours = lambda x: normalize_batch(x, jnp.ones(4), jnp.zeros(4), 1e-5)
  chex.assert_trees_all_close(jax.grad(lambda x: loss(ours, x))(x),
                              jax.grad(lambda x: loss(reference, x))(x), atol=1e-5)
