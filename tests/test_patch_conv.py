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
