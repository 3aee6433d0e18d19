"""PatchConv (im2col + matmul) equals flax's nn.Conv, forward and gradients, vmapped."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from lfmjax.models.patch_conv import PatchConv


@pytest.mark.parametrize("kernel,stride,padding,hw", [(3, 1, 1, 8), (3, 2, 1, 9), (1, 2, 0, 8),
                                                      (3, 1, 0, 7)])
def test_patch_conv_equals_lax_conv(kernel, stride, padding, hw):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, hw, hw, 4))  # clients x batch
  ours = PatchConv(5, kernel, stride, padding)
  ref = nn.Conv(5, (kernel, kernel), (stride, stride), ((padding, padding),) * 2)
  params = jax.vmap(lambda k: ours.init(k, x[0]))(jax.random.split(jax.random.PRNGKey(1), 3))

  def loss(module, p, x):
    return jnp.sum(jnp.sin(jax.vmap(module.apply)(p, x)))

  chex.assert_trees_all_close(jax.vmap(ours.apply)(params, x),
                              jax.vmap(ref.apply)(params, x), atol=1e-5)
  chex.assert_trees_all_close(jax.grad(loss, (1, 2))(ours, params, x),
                              jax.grad(loss, (1, 2))(ref, params, x), atol=1e-4)


def test_factored_upsample_conv_equals_resize_then_conv():
  from lfmjax.models.layers import bilinear_resize, upsample_conv3x3
  s = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 7, 6))
  kernel = jax.random.normal(jax.random.PRNGKey(3), (3, 3, 6, 4))
  direct = jax.lax.conv_general_dilated(bilinear_resize(s, (28, 28)), kernel, (1, 1),
                                        ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  chex.assert_trees_all_close(upsample_conv3x3(s, kernel, (28, 28)), direct, atol=1e-4)


@pytest.mark.parametrize("name", ["bench_cnn", "resnet16", "vgg"])
def test_model_outputs_equal_across_conv_impls(name):
  from lfmjax.models import get_model, init_split
  patch = get_model(name, num_classes=10, input_shape=(28, 28, 1))
  lax_ = get_model(name, num_classes=10, input_shape=(28, 28, 1), conv_impl="lax")
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 28, 28, 1))
  v = init_split(patch, jax.random.PRNGKey(1), x)
  for seg in ("lower", "decoder"):
    inp = x if seg == "lower" else patch.lower.apply(v["lower"], x)
    chex.assert_trees_all_close(getattr(patch, seg).apply(v[seg], inp),
                                getattr(lax_, seg).apply(v[seg], inp), atol=1e-4, rtol=1e-4)


# ------------------------------------------------- the shared-weights fast paths
from lfmjax.models import patch_conv  # noqa: E402
from lfmjax.models.patch_conv import (add_bias, conv_weight_grad, lax_conv2d,  # noqa: E402
                                      max_pool2, shared_conv2d, shared_weights)


# (samples, side, in, out, kernel, stride, padding): a small contraction (chunked
# forward), fewer outputs than inputs (patches of dy), a strided conv (XLA's own input
# gradient), a 1x1 conv, and a prime sample count (padded chunks).
SHARED_CASES = [(5, 9, 3, 7, 3, 1, 1), (7, 8, 12, 3, 3, 1, 1), (3, 9, 4, 6, 3, 2, 1),
                (4, 8, 5, 2, 1, 1, 0), (13, 6, 16, 24, 3, 1, 1)]


@pytest.mark.parametrize("n,hw,c,f,k,stride,padding", SHARED_CASES)
def test_shared_conv2d_equals_lax_conv_and_its_gradients(n, hw, c, f, k, stride, padding,
                                                         monkeypatch):
  monkeypatch.setattr(patch_conv, "_WEIGHT_GRAD_CHUNK_BYTES", 4 * hw * hw * k * k * c * 2)
  x = jax.random.normal(jax.random.PRNGKey(0), (n, hw, hw, c))
  w = jax.random.normal(jax.random.PRNGKey(1), (k, k, c, f)) / (k * k * c) ** 0.5

  def loss(conv, x, w):
    return jnp.sum(jnp.sin(conv(x, w, stride, padding)))

  chex.assert_trees_all_close(shared_conv2d(x, w, stride, padding),
                              lax_conv2d(x, w, stride, padding), atol=1e-5)
  chex.assert_trees_all_close(jax.grad(loss, (1, 2))(shared_conv2d, x, w),
                              jax.grad(loss, (1, 2))(lax_conv2d, x, w), atol=1e-4, rtol=1e-4)


def test_conv_weight_grad_chunks_and_pads(monkeypatch):
  x = jax.random.normal(jax.random.PRNGKey(2), (11, 6, 6, 4))
  dy = jax.random.normal(jax.random.PRNGKey(3), (11, 6, 6, 5))
  w = jnp.zeros((3, 3, 4, 5))
  (expected,) = jax.linear_transpose(lambda w: lax_conv2d(x, w, 1, 1), w)(dy)
  for chunk_bytes in (1, 4 * 36 * 36 * 3, 1 << 30):  # 1 sample, 3 (11 padded to 12), all
    monkeypatch.setattr(patch_conv, "_WEIGHT_GRAD_CHUNK_BYTES", chunk_bytes)
    chex.assert_trees_all_close(conv_weight_grad(x, dy, 3, 1, 1), expected, atol=1e-4)


def test_auto_conv_is_the_same_function_inside_and_outside_shared_weights():
  x = jax.random.normal(jax.random.PRNGKey(4), (6, 8, 8, 3))
  conv = PatchConv(8, 3, 1, 1, pool=True)
  params = conv.init(jax.random.PRNGKey(5), x)

  def loss(p, x):
    return jnp.sum(jnp.sin(conv.apply(p, x)))

  with shared_weights():
    shared = jax.jit(jax.value_and_grad(loss, (0, 1)))(params, x)
  plain = jax.jit(jax.value_and_grad(loss, (0, 1)))(params, x)
  chex.assert_trees_all_close(shared, plain, atol=1e-4, rtol=1e-4)


def reference_pool(x):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def test_max_pool2_values_and_gradient_equal_reduce_window():
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 7, 6, 3))  # odd height floors
  g = jax.random.normal(jax.random.PRNGKey(7), (2, 3, 3, 3))
  chex.assert_trees_all_close(max_pool2(x), reference_pool(x))
  chex.assert_trees_all_close(jax.vjp(max_pool2, x)[1](g), jax.vjp(reference_pool, x)[1](g))


def test_max_pool2_gradient_goes_to_the_first_maximum_as_torch():
  x = jnp.array([[1.0, 3.0], [3.0, 3.0]]).reshape(1, 2, 2, 1)
  (dx,) = jax.vjp(max_pool2, x)[1](jnp.ones((1, 1, 1, 1)))
  assert dx.ravel().tolist() == [0.0, 1.0, 0.0, 0.0]


def test_add_bias_gradient_is_the_sum():
  y = jax.random.normal(jax.random.PRNGKey(8), (3, 4, 5, 6))
  b = jnp.arange(6.0)

  def loss(add, y, b):
    return jnp.sum(jnp.sin(add(y, b)))

  chex.assert_trees_all_close(jax.grad(loss, (1, 2))(add_bias, y, b),
                              jax.grad(loss, (1, 2))(lambda y, b: y + b, y, b), atol=1e-5)


def test_bench_upper_stem_then_head_is_the_upper():
  from lfmjax.models import get_model, has_stem
  model = get_model("bench_cnn", num_classes=10, input_shape=(32, 32, 3))
  assert has_stem(model.upper)
  s = jax.random.normal(jax.random.PRNGKey(9), (4, 8, 8, 64))
  variables = model.upper.init(jax.random.PRNGKey(10), s)
  z = model.upper.apply(variables, s, method="stem")
  chex.assert_trees_all_close(model.upper.apply(variables, z, method="head"),
                              model.upper.apply(variables, s))
  # The stem is affine in s: a convex combination passes through it.
  lam = 0.3
  s2 = jax.random.normal(jax.random.PRNGKey(11), s.shape)
  mixed = model.upper.apply(variables, lam * s + (1 - lam) * s2, method="stem")
  chex.assert_trees_all_close(mixed, lam * z + (1 - lam) * model.upper.apply(
      variables, s2, method="stem"), atol=1e-5)
