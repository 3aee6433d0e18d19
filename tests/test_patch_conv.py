"""PatchConv and its kernels (patch_conv) equal flax's nn.Conv / XLA's convolution,
forward and gradients, vmapped; and so do the models built from them."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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


def lax_reference_convs():
  """A `nn.intercept_methods` interceptor that computes every `PatchConv` of a model as
  flax's nn.Conv would, with XLA's convolution on the layer's own variables (then PyTorch's
  max-pool for pool=True), and every decoder `UpsampleConv` as bilinear resize then that
  convolution; and the count of layers it replaced."""
  from lfmjax.models.layers import UpsampleConv, bilinear_resize
  from lfmjax.models.patch_conv import PatchConv
  replaced = []

  def conv(x, params, stride, padding):
    y = jax.lax.conv_general_dilated(x, params["kernel"], (stride, stride),
                                     ((padding, padding),) * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + params["bias"] if "bias" in params else y

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (PatchConv, UpsampleConv)):
      return next_fun(*args, **kwargs)
    (x,) = args
    params = module.variables["params"]
    replaced.append(tuple(module.scope.path))
    if isinstance(module, UpsampleConv):
      return conv(bilinear_resize(x, module.out_hw), params, 1, 1)
    assert params["kernel"].shape[:2] == (module.kernel_size,) * 2
    assert ("bias" in params) == module.use_bias
    y = conv(x, params, module.stride, module.padding)
    return reference_pool(y) if module.pool else y

  return interceptor, replaced


# Every conv model, with and without BatchNorm, with strided convolutions (resnet16), the
# fused conv + pool (bench_cnn's conv1: 3 input channels) and odd sides that pooling floors.
# resnet16 at 14x14: its stride-2 convolutions meet an odd side (7), as at 28x28.
MODEL_CASES = [("bench_cnn", (16, 16, 3), {}), ("resnet16", (14, 14, 1), {}),
               ("vgg", (16, 16, 3), dict(batch_norm=True, cut=1))]


@pytest.mark.parametrize("name,shape,overrides", MODEL_CASES)
def test_models_compute_what_flax_conv_computes(name, shape, overrides):
  """Each segment's output, and the gradient of a loss of it (the custom VJPs), over
  two clients' own weights under vmap (the batching rules), equal the same model with
  every conv replaced by XLA's convolution on the same variables."""
  from lfmjax.models import get_model, init_split
  model = get_model(name, num_classes=10, input_shape=shape, **overrides)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 3) + shape)  # clients x batch
  # 'rbg' keys: XLA:CPU compiles their draws several times faster than threefry's.
  v = jax.jit(jax.vmap(lambda k, x: init_split(model, k, x)))(
      jax.random.split(jax.random.key(1, impl="rbg"), 2), x)
  s = jax.jit(jax.vmap(model.lower.apply))(v["lower"], x)
  interceptor, replaced = lax_reference_convs()

  def value_and_grads(seg, inp):
    module = getattr(model, seg)

    def loss(p, vs, a):
      y = module.apply({**vs, "params": p}, a)
      return jnp.sum(jnp.sin(y)), y

    def one(vs, a):
      (_, y), g = jax.value_and_grad(loss, (0, 2), has_aux=True)(vs["params"], vs, a)
      return y, g

    # A new function each call: jit's cache cannot hand the reference our program.
    return jax.jit(jax.vmap(one))(v[seg], inp)

  for seg, inp in (("lower", x), ("upper", s), ("decoder", s)):
    convs = [tuple(k.key for k in keys[:-1])  # with a client axis, HWIO kernels are 5-D
             for keys, leaf in jax.tree_util.tree_flatten_with_path(v[seg]["params"])[0]
             if keys[-1].key == "kernel" and leaf.ndim == 5]
    if not convs:  # tiny_cnn's upper: dense only
      continue
    ours = value_and_grads(seg, inp)
    replaced.clear()
    with nn.intercept_methods(interceptor):
      ref = value_and_grads(seg, inp)
    assert sorted(replaced) == sorted(convs), (seg, replaced, convs)
    chex.assert_trees_all_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_reference_convs_do_not_run_patch_conv(monkeypatch):
  """The reference above is computed apart from PatchConv's kernels: with those made
  wrong (a flipped kernel), the model no longer matches it."""
  from lfmjax.models import get_model, init_split
  model = get_model("tiny_cnn", num_classes=10, input_shape=(8, 8, 2))
  x = jax.random.uniform(jax.random.PRNGKey(2), (3, 8, 8, 2))
  v = jax.jit(init_split, static_argnums=0)(model, jax.random.key(3, impl="rbg"), x)
  interceptor, replaced = lax_reference_convs()
  monkeypatch.setattr(patch_conv, "fast_conv2d",
                      lambda x, k, s, p: lax_conv2d(x, k[::-1, ::-1], s, p))
  with nn.intercept_methods(interceptor):
    ref = model.lower.apply(v["lower"], x)
  assert replaced == [("conv1",)]
  assert not np.allclose(model.lower.apply(v["lower"], x), ref, atol=1e-3)


# ------------------------------------------------- the CPU kernels and their batching
from lfmjax.models import patch_conv  # noqa: E402
from lfmjax.models.patch_conv import add_bias, cpu_conv2d, lax_conv2d, max_pool2  # noqa: E402


# (samples, side, in, out, kernel, stride, padding): an image's 3 channels, fewer
# outputs than inputs, strided convolutions (the input gradient by phases: 3x3 and 1x1
# at stride 2 on even and odd sides, stride 3 with a 5x5 kernel, a stride that skips
# the input's last row), a 1x1 conv, a valid (unpadded) 3x3.
CPU_CASES = [(5, 9, 3, 7, 3, 1, 1), (7, 8, 12, 3, 3, 1, 1), (3, 9, 4, 6, 3, 2, 1),
             (3, 8, 4, 6, 3, 2, 1), (3, 8, 4, 6, 1, 2, 0), (3, 9, 4, 6, 1, 2, 0),
             (2, 11, 3, 4, 5, 3, 2), (2, 8, 3, 4, 3, 2, 0), (4, 8, 5, 2, 1, 1, 0),
             (13, 6, 16, 24, 3, 1, 1), (3, 7, 4, 5, 3, 1, 0)]


@pytest.mark.parametrize("n,hw,c,f,k,stride,padding", CPU_CASES)
def test_cpu_conv2d_equals_lax_conv_and_its_gradients(n, hw, c, f, k, stride, padding):
  x = jax.random.normal(jax.random.PRNGKey(0), (n, hw, hw, c))
  w = jax.random.normal(jax.random.PRNGKey(1), (k, k, c, f)) / (k * k * c) ** 0.5

  def loss(conv, x, w):
    return jnp.sum(jnp.sin(conv(x, w, stride, padding)))

  chex.assert_trees_all_close(cpu_conv2d(x, w, stride, padding),
                              lax_conv2d(x, w, stride, padding), atol=1e-5)
  chex.assert_trees_all_close(jax.grad(loss, (1, 2))(cpu_conv2d, x, w),
                              jax.grad(loss, (1, 2))(lax_conv2d, x, w), atol=1e-4, rtol=1e-4)


# in_axes of (x, w) under two nested vmaps (seeds over clients): per-client weights,
# shared weights on per-client data, and per-client weights on shared data.
BATCHINGS = [(0, 0), (0, None), (None, 0)]


def nested_value_and_grads(fn, a, b, in_axes):
  """value_and_grad of sum(sin(fn(a, b))) under two nested vmaps with `in_axes`; `a` and
  `b` carry two leading axes, dropped (first element) where an axis is None."""
  a = a if in_axes[0] == 0 else a[0, 0]
  b = b if in_axes[1] == 0 else b[0, 0]
  f = jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(fn(a, b))), (0, 1))
  return jax.jit(jax.vmap(jax.vmap(f, in_axes), in_axes))(a, b)


@pytest.mark.parametrize("in_axes", BATCHINGS)
def test_cpu_conv2d_under_nested_vmap_equals_lax_conv(in_axes):
  """Whatever is batched, and under grad inside or outside the vmaps, the batching
  rules compute XLA's convolution and its gradients (a strided case: XLA's own input
  gradient; the unstrided kernels are compared above)."""
  n, hw, c, f, k, stride, padding = CPU_CASES[2]
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 3, n, hw, hw, c))
  w = jax.random.normal(jax.random.PRNGKey(3), (2, 3, k, k, c, f)) / (k * k * c) ** 0.5
  x = x if in_axes[0] == 0 else x[0, 0]
  w = w if in_axes[1] == 0 else w[0, 0]

  def loss(conv, x, w):
    return jnp.sum(jnp.sin(conv(x, w, stride, padding)))

  def grad_inside(conv):
    g = jax.grad(lambda x, w: loss(conv, x, w), (0, 1))
    return jax.jit(jax.vmap(jax.vmap(g, in_axes), in_axes))(x, w)

  def grad_outside(conv):
    def total(x, w):
      y = jax.vmap(jax.vmap(lambda a, b: conv(a, b, stride, padding), in_axes), in_axes)(x, w)
      return jnp.sum(jnp.sin(y))
    return jax.jit(jax.grad(total, (0, 1)))(x, w)

  chex.assert_trees_all_close(grad_inside(cpu_conv2d), grad_inside(lax_conv2d),
                              atol=1e-4, rtol=1e-4)
  chex.assert_trees_all_close(grad_outside(cpu_conv2d), grad_outside(lax_conv2d),
                              atol=1e-4, rtol=1e-4)


def test_per_client_weights_are_a_map_not_a_grouped_convolution():
  """vmap over per-client weights lowers to a loop of ungrouped convolutions."""
  x = jnp.zeros((4, 2, 8, 8, 16))
  w = jnp.zeros((4, 3, 3, 16, 8))
  hlo = jax.jit(jax.vmap(lambda a, b: cpu_conv2d(a, b, 1, 1))).lower(x, w).as_text()
  assert "feature_group_count = 4" not in hlo and "while" in hlo
  lax_hlo = jax.jit(jax.vmap(lambda a, b: lax_conv2d(a, b, 1, 1))).lower(x, w).as_text()
  assert "feature_group_count = 4" in lax_hlo


def test_round_compiles_without_ynnpack_convolutions():
  """`compiler_options()` reaches the round's jit: no YNNPACK fusion (the slow
  convolutions on this CPU) in the compiled program, where a plain jit has some."""
  from lfmjax.algorithms import RoundConfig
  from lfmjax.optim import OptimizerSpec
  from lfmjax.models import get_model
  from lfmjax.round import make_round_step
  from lfmjax.state import init_state, make_data
  import numpy as np
  cfg = RoundConfig(num_clients=2, batch_size=4, num_classes=10,
                    client_opt=OptimizerSpec("adam", 1e-3))
  model = get_model("bench_cnn", num_classes=10, input_shape=(16, 16, 3))
  state = init_state(cfg, model, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  data = make_data(np.zeros((16, 16, 16, 3), np.uint8), np.zeros(16, np.int32),
                   np.arange(16).reshape(2, 8), np.full(2, 8))
  compiled = make_round_step(cfg, model).lower(state, data).compile().as_text()
  assert "ynn_fusion" not in compiled
  x, w = jnp.zeros((8, 16, 16, 32)), jnp.zeros((3, 3, 32, 64))
  plain = jax.jit(lambda a, b: lax_conv2d(a, b, 1, 1)).lower(x, w).compile().as_text()
  assert "ynn_fusion" in plain


@pytest.mark.parametrize("backend", ["cpu", "xla"])
def test_both_kernel_backends_compute_the_same_model(backend, monkeypatch):
  """The CPU kernels and XLA's own (GPU/TPU), forced on the CPU, give the same round
  gradients for per-client weights."""
  monkeypatch.setattr(patch_conv, "kernel_backend", lambda: backend)
  conv = PatchConv(8, 3, 1, 1, pool=True)
  x = jax.random.normal(jax.random.PRNGKey(4), (3, 6, 8, 8, 3))
  params = jax.vmap(lambda k: conv.init(k, x[0]))(jax.random.split(jax.random.PRNGKey(5), 3))

  def loss(p, x):
    return jnp.sum(jnp.sin(jax.vmap(conv.apply)(p, x)))

  ref = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)))

  def ref_loss(p, x):
    return jnp.sum(jnp.sin(jax.vmap(lambda p, x: max_pool2(ref.apply(p, x)))(p, x)))

  chex.assert_trees_all_close(jax.jit(jax.value_and_grad(loss, (0, 1)))(params, x),
                              jax.jit(jax.value_and_grad(ref_loss, (0, 1)))(params, x),
                              atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("in_axes", BATCHINGS)
def test_pooled_conv3x3_equals_conv_then_pool_under_nested_vmap(in_axes):
  from lfmjax.models.patch_conv import pooled_conv3x3
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 3, 5, 6, 10, 3))
  w = jax.random.normal(jax.random.PRNGKey(7), (2, 3, 3, 3, 3, 7))
  chex.assert_trees_all_close(
      nested_value_and_grads(pooled_conv3x3, x, w, in_axes),
      nested_value_and_grads(lambda a, b: max_pool2(lax_conv2d(a, b, 1, 1)), x, w, in_axes),
      atol=1e-4, rtol=1e-4)


def test_pooled_conv3x3_chunks(monkeypatch):
  from lfmjax.models.patch_conv import pooled_conv3x3
  monkeypatch.setattr(patch_conv, "_CHUNK_BYTES", 1)  # one sample a chunk
  x = jax.random.normal(jax.random.PRNGKey(8), (7, 8, 8, 3))
  w = jax.random.normal(jax.random.PRNGKey(9), (3, 3, 3, 5))

  def value_and_grads(conv):
    return jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(conv(a, b))), (0, 1))(x, w)

  chex.assert_trees_all_close(
      value_and_grads(pooled_conv3x3),
      value_and_grads(lambda a, b: max_pool2(lax_conv2d(a, b, 1, 1))), atol=1e-4, rtol=1e-4)


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


@pytest.mark.parametrize("in_axes", BATCHINGS)
def test_factored_upsample_conv_under_nested_vmap(in_axes):
  """The tap upsampler folds vmapped axes into samples; values and gradients stay."""
  from lfmjax.models.layers import bilinear_resize, upsample_conv3x3
  s = jax.random.normal(jax.random.PRNGKey(10), (2, 3, 4, 7, 7, 6))
  k = jax.random.normal(jax.random.PRNGKey(11), (2, 3, 3, 3, 6, 4))
  chex.assert_trees_all_close(
      nested_value_and_grads(lambda a, b: upsample_conv3x3(a, b, (28, 28)), s, k, in_axes),
      nested_value_and_grads(lambda a, b: lax_conv2d(bilinear_resize(a, (28, 28)), b, 1, 1),
                             s, k, in_axes),
      atol=1e-3, rtol=1e-3)
