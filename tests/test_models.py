"""Tests of the model zoo (lfmjax/models): shapes, parameter counts against the torch
peer, initialisation, BatchNorm state handling, the bilinear upsampling against
PyTorch's semantics, and the pure apply helper under grad/vmap.

Shape checks use jax.eval_shape, so they compile nothing; the 2-core CI budget goes to
the few tests that need real numbers.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfmjax.models import (MODEL_NAMES, SEGMENTS, SplitModel, apply_module,
                           bilinear_resize, get_model, init_split, param_count,
                           smashed_shape)

SHAPES = [(28, 28, 1), (32, 32, 3)]
K = 10


def key(seed: int) -> jax.Array:
  """An 'rbg' PRNG key: XLA:CPU compiles its random draws several times faster than
  threefry's (resnet16's init: ~3 s instead of ~10 s on 2 cores)."""
  return jax.random.key(seed, impl="rbg")


def abstract_init(model: SplitModel, input_shape, batch: int = 2):
  """init_split's variables as ShapeDtypeStructs (no compilation)."""
  x = jnp.zeros((batch,) + tuple(input_shape))
  return jax.eval_shape(lambda k: init_split(model, k, x), key(0))


def abstract_outputs(model: SplitModel, input_shape, batch: int = 2):
  """Output shapes of all four segments, train=True, without computing them."""
  x = jnp.zeros((batch,) + tuple(input_shape))

  def forward(k):
    v = init_split(model, k, x)
    s, _ = apply_module(model.lower, v["lower"], x, train=True)
    outs = {name: apply_module(getattr(model, name), v[name], s, train=True)[0]
            for name in ("upper", "decoder", "aux_head")}
    return {"lower": s, **outs}

  return jax.eval_shape(forward, key(0))


def kernel_paths(tree) -> list[str]:
  """'/'-joined paths of every conv/dense kernel in a params tree."""
  paths = []
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [p.key for p in path]
    if keys[-1] == "kernel":
      paths.append("/".join(keys))
  return paths


# ----------------------------------------------------------------------------- shapes

# The language model reads (T,) tokens: tests/test_transformer.py checks its shapes.
IMAGE_MODELS = tuple(name for name in MODEL_NAMES if name != "lm")


@pytest.mark.parametrize("input_shape", SHAPES)
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_segment_shapes(name, input_shape):
  model = get_model(name, num_classes=K, input_shape=input_shape)
  out = abstract_outputs(model, input_shape, batch=3)
  s_shape = smashed_shape(model, input_shape)
  chex.assert_shape(out["lower"], (3,) + s_shape)
  chex.assert_shape(out["upper"], (3, K))
  chex.assert_shape(out["aux_head"], (3, K))
  chex.assert_shape(out["decoder"], (3,) + input_shape)  # reconstruction = input shape
  assert all(o.dtype == jnp.float32 for o in jax.tree.leaves(out))


def test_smashed_shapes_of_the_default_cuts():
  expected = {("bench_cnn", 32): (8, 8, 64), ("bench_cnn", 28): (7, 7, 64),
              ("resnet16", 32): (16, 16, 32), ("resnet16", 28): (14, 14, 32),
              ("vgg", 32): (8, 8, 64), ("tiny_cnn", 28): (14, 14, 4), ("mlp", 32): (128,)}
  for (name, side), shape in expected.items():
    c = 3 if side == 32 else 1
    model = get_model(name, num_classes=K, input_shape=(side, side, c))
    assert smashed_shape(model, (side, side, c)) == shape, name


def test_cut_overrides_move_the_split():
  r1 = get_model("resnet16", num_classes=K, input_shape=(32, 32, 3), cut_stage=1)
  r3 = get_model("resnet16", num_classes=K, input_shape=(32, 32, 3), cut_stage=3)
  assert smashed_shape(r1, (32, 32, 3)) == (32, 32, 16)
  assert smashed_shape(r3, (32, 32, 3)) == (8, 8, 64)
  v3 = get_model("vgg", num_classes=K, input_shape=(32, 32, 3), cut=3)
  assert smashed_shape(v3, (32, 32, 3)) == (4, 4, 128)
  for model in (r1, r3, v3):
    chex.assert_shape(abstract_outputs(model, (32, 32, 3))["upper"], (2, K))


# ------------------------------------------------------------------------- bench_cnn

def torch_bench_counts(c: int, side: int, k: int) -> dict[str, tuple[int, int]]:
  """(weight, bias) element counts of the torch model's layers, written out by hand."""
  flat = (side // 8) ** 2 * 128  # three floor-ing 2x2 pools
  return {
      "lower/conv1": (3 * 3 * c * 32, 32), "lower/conv2": (3 * 3 * 32 * 64, 64),
      "upper/conv3": (3 * 3 * 64 * 128, 128), "upper/fc1": (flat * 256, 256),
      "upper/fc2": (256 * k, k),
      "decoder/conv1": (3 * 3 * 64 * 12, 12), "decoder/conv2": (3 * 3 * 12 * c, c)}


@pytest.mark.parametrize("input_shape", SHAPES)
def test_bench_cnn_parameter_counts_match_torch(input_shape):
  model = get_model("bench_cnn", num_classes=K, input_shape=input_shape)
  variables = abstract_init(model, input_shape)
  expected = torch_bench_counts(input_shape[2], input_shape[0], K)
  got = {}
  for seg in ("lower", "upper", "decoder"):
    for layer, p in variables[seg]["params"].items():
      got[f"{seg}/{layer}"] = (p["kernel"].size, p["bias"].size)
  assert got == expected
  # 32x32x3: exactly the torch reference's 2048 -> 256 dense layer.
  if input_shape == (32, 32, 3):
    assert variables["upper"]["params"]["fc1"]["kernel"].shape == (2048, 256)
    assert sum(param_count(variables[s]) for s in ("lower", "upper")) == 620362


def test_bench_cnn_init_is_pytorch_default():
  model = get_model("bench_cnn", num_classes=K, input_shape=(32, 32, 3))
  variables = jax.jit(lambda k: init_split(model, k, jnp.zeros((1, 32, 32, 3))))(
      key(0))
  for seg in ("lower", "upper", "decoder", "aux_head"):
    for layer, p in variables[seg]["params"].items():
      fan_in = int(np.prod(p["kernel"].shape[:-1]))  # k*k*in for convs, in for dense
      bound = 1.0 / np.sqrt(fan_in)
      for leaf in ("kernel", "bias"):
        a = np.abs(np.asarray(p[leaf]))
        assert a.max() <= bound * (1 + 1e-6), (seg, layer, leaf)
      # Uniform over the whole interval, not a narrower distribution.
      assert np.abs(np.asarray(p["kernel"])).max() > 0.9 * bound, (seg, layer)
      assert np.asarray(p["kernel"]).std() == pytest.approx(bound / np.sqrt(3), rel=0.2)


# -------------------------------------------------------------------------- resnet16

@pytest.mark.parametrize("cut,client,server", [(1, 5, 11), (2, 9, 7), (3, 15, 1)])
def test_resnet16_weight_layer_counts(cut, client, server):
  """Conv/dense layers, shortcut 1x1 convs not counted (SPEC: 9 client, 7 server)."""
  model = get_model("resnet16", num_classes=K, input_shape=(32, 32, 3), cut_stage=cut)
  variables = abstract_init(model, (32, 32, 3))
  count = lambda seg: sum("shortcut" not in p for p in kernel_paths(variables[seg]["params"]))
  assert (count("lower"), count("upper")) == (client, server)
  assert "batch_stats" in variables["lower"]
  # Shortcuts exactly where the shape changes: stages 2 and 3 enter with stride 2.
  shortcuts = [p for s in ("lower", "upper") for p in kernel_paths(variables[s]["params"])
               if "shortcut" in p]
  assert sorted(shortcuts) == ["stage2_block0/shortcut_conv/kernel",
                               "stage3_block0/shortcut_conv/kernel"]


@pytest.fixture(scope="module")
def resnet_small():
  """resnet16 with 8x8 inputs: same parameters as at 32x32, much cheaper to run."""
  model = get_model("resnet16", num_classes=K, input_shape=(8, 8, 3))
  x = jax.random.normal(key(1), (4, 8, 8, 3)) * 2.0 + 1.0
  return model, jax.jit(init_split, static_argnums=0)(model, key(0), x), x


def test_resnet16_he_normal_init(resnet_small):
  model, variables, _ = resnet_small
  for seg in ("lower", "upper"):
    for path, w in jax.tree_util.tree_flatten_with_path(variables[seg]["params"])[0]:
      keys = [p.key for p in path]
      if keys[-1] != "kernel" or keys[-2] == "fc":
        continue
      k, _, _, out = w.shape
      assert k in (1, 3) and "bias" not in keys
      expected = np.sqrt(2.0 / (k * k * out))
      tol = 0.25 if w.size < 2000 else 0.1
      assert np.asarray(w).std() == pytest.approx(expected, rel=tol), keys
      assert abs(np.asarray(w).mean()) < 0.1 * expected + 3 * expected / np.sqrt(w.size)


def test_resnet16_batch_stats_update_only_in_training(resnet_small):
  model, variables, x = resnet_small
  lower = variables["lower"]
  _, frozen = apply_module(model.lower, lower, x, train=False)
  assert frozen is lower
  s, trained = apply_module(model.lower, lower, x, train=True)
  chex.assert_trees_all_equal(trained["params"], lower["params"])
  chex.assert_trees_all_equal_structs(trained["batch_stats"], lower["batch_stats"])
  old = lower["batch_stats"]["bn1"]
  new = trained["batch_stats"]["bn1"]
  # momentum 0.9: running = 0.9 * running + 0.1 * batch statistic.
  h = jax.lax.conv_general_dilated(
      x, lower["params"]["conv1"]["kernel"], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * h.mean((0, 1, 2)),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * h.var((0, 1, 2)),
                             rtol=1e-4, atol=1e-5)
  # The server's segment has its own statistics and updates them too.
  _, upper_new = apply_module(model.upper, variables["upper"], s, train=True)
  assert not np.allclose(upper_new["batch_stats"]["stage3_block0"]["bn1"]["mean"], 0.0)


# --------------------------------------------------------------- bilinear upsampling

def torch_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """PyTorch's 1-D interpolation weights for align_corners=False, as an n_out x n_in
  matrix: source = (i + 0.5) * n_in / n_out - 0.5, clamped at 0; the upper neighbour
  is clamped to the last pixel (aten's upsample_bilinear2d)."""
  src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0
  w = np.zeros((n_out, n_in))
  np.add.at(w, (np.arange(n_out), i0), 1.0 - frac)
  np.add.at(w, (np.arange(n_out), i1), frac)
  return w


@pytest.mark.parametrize("in_hw,out_hw", [((8, 8), (32, 32)), ((7, 7), (28, 28)),
                                          ((5, 6), (17, 23))])
def test_bilinear_matches_torch_align_corners_false(in_hw, out_hw):
  x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
  wh = torch_bilinear_matrix(in_hw[0], out_hw[0])
  ww = torch_bilinear_matrix(in_hw[1], out_hw[1])
  expected = np.einsum("ih,bhwc,jw->bijc", wh, x, ww)
  got = bilinear_resize(jnp.asarray(x), out_hw)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ apply_module: grad/vmap

@pytest.fixture(scope="module")
def tiny():
  """tiny_cnn on 8x8x2 inputs, initialised for 3 clients from different keys (one
  compiled init, called thrice), and the jitted init_split."""
  model = get_model("tiny_cnn", num_classes=K, input_shape=(8, 8, 2))
  init = jax.jit(init_split, static_argnums=0)
  x = jnp.zeros((2, 8, 8, 2))
  per_client = [init(model, k, x) for k in jax.random.split(key(0), 3)]
  return model, init, per_client


def test_apply_module_differentiable_and_vmappable_over_clients(tiny):
  model, _, per_client = tiny
  variables = jax.tree.map(lambda *a: jnp.stack(a), *per_client)  # leading client axis
  x = jax.random.uniform(key(1), (3, 4, 8, 8, 2))
  upper = per_client[0]["upper"]

  def loss(lower_vars, x):
    s, new_vars = apply_module(model.lower, lower_vars, x, train=True)
    logits, _ = apply_module(model.upper, upper, s, train=True)
    return jnp.mean(logits ** 2), new_vars

  grads, new_vars = jax.jit(jax.vmap(jax.grad(loss, has_aux=True)))(variables["lower"], x)
  chex.assert_trees_all_equal_shapes(grads, variables["lower"])
  chex.assert_trees_all_equal(new_vars, variables["lower"])  # no BN: unchanged
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in jax.tree.leaves(grads))
  # Clients were initialised from different keys: their gradients differ.
  g = grads["params"]["conv1"]["kernel"]
  assert not np.allclose(g[0], g[1])


def test_apply_module_vmaps_batch_stats_per_client(resnet_small):
  """Each client normalises over its own batch and keeps its own running statistics."""
  model, variables, _ = resnet_small
  lower = jax.tree.map(lambda a: jnp.stack([a, a]), variables["lower"])
  shift = jnp.array([0.0, 3.0]).reshape(2, 1, 1, 1, 1)  # clients see different data
  x = jax.random.normal(key(2), (2, 3, 8, 8, 3)) + shift

  def loss(params, stats, x):
    s, new = apply_module(model.lower, {"params": params, **stats}, x, train=True)
    return jnp.mean(s), new["batch_stats"]

  step = jax.jit(jax.vmap(jax.value_and_grad(loss, has_aux=True)))
  (_, new_stats), grads = step(lower["params"], {"batch_stats": lower["batch_stats"]}, x)
  chex.assert_trees_all_equal_shapes(grads, lower["params"])
  mean = new_stats["bn1"]["mean"]
  chex.assert_shape(mean, (2, 16))
  assert not np.allclose(mean[0], mean[1])


# ---------------------------------------------------------------- init and errors

def test_init_split_is_deterministic_with_one_key_per_segment(tiny):
  model, init, per_client = tiny
  a = per_client[0]
  key0 = jax.random.split(key(0), 3)[0]
  b = init(model, key0, jnp.ones((5, 8, 8, 2)))  # the batch is irrelevant
  chex.assert_trees_all_equal(a, b)
  assert set(a) == {"lower", "upper", "decoder", "aux_head"}
  assert all(set(v) == {"params"} for v in a.values())
  assert not np.allclose(a["lower"]["params"]["conv1"]["kernel"],
                         per_client[1]["lower"]["params"]["conv1"]["kernel"])
  # The key is split once, one key per segment in SEGMENTS order.
  keys = dict(zip(SEGMENTS, jax.random.split(key0, len(SEGMENTS))))
  s = jnp.zeros((1,) + smashed_shape(model, (8, 8, 2)))
  chex.assert_trees_all_equal(jax.jit(model.decoder.init)(keys["decoder"], s), a["decoder"])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_take_no_kernel_switch(name):
  """Kernels are patch_conv's choice, not a model's: conv_impl is an unknown override."""
  with pytest.raises(ValueError, match=r"unknown override\(s\) conv_impl; valid: ") as err:
    get_model(name, num_classes=K, input_shape=(32, 32, 3), conv_impl="lax")
  assert "conv_impl" not in str(err.value).split("valid: ")[1]


def test_vgg_batch_norm_override():
  model = get_model("vgg", num_classes=K, input_shape=(32, 32, 3), batch_norm=True)
  variables = abstract_init(model, (32, 32, 3))
  assert "batch_stats" in variables["lower"] and "batch_stats" in variables["upper"]
  assert "bias" not in variables["lower"]["params"]["block1_conv1"]
  plain = abstract_init(get_model("vgg", num_classes=K, input_shape=(32, 32, 3)), (32, 32, 3))
  assert set(plain["lower"]) == {"params"}


def test_unknown_model_name_lists_valid_names():
  with pytest.raises(ValueError) as err:
    get_model("resnet50", num_classes=K, input_shape=(32, 32, 3))
  msg = str(err.value)
  assert "\n" not in msg and "resnet50" in msg
  assert all(name in msg for name in MODEL_NAMES)


@pytest.mark.parametrize("name,overrides,field", [
    ("resnet16", dict(cut_stage=4), "cut_stage"),
    ("resnet16", dict(cut_stage=True), "cut_stage"),
    ("resnet16", dict(cut=2), "cut"),
    ("vgg", dict(batch_norm="yes"), "batch_norm"),
    ("vgg", dict(cut=0), "cut"),
    ("vgg", dict(cut=4), "cut"),
    ("vgg", dict(widths=5), "widths"),
    ("tiny_cnn", dict(width=0), "width"),
    ("mlp", dict(hidden=2.5), "hidden"),
    ("bench_cnn", dict(decoder_hiden=8), "decoder_hiden"),
])
def test_bad_override_names_the_field(name, overrides, field):
  with pytest.raises(ValueError, match=field) as err:
    get_model(name, num_classes=K, input_shape=(32, 32, 3), **overrides)
  assert "\n" not in str(err.value)


def test_overrides_accept_lists_and_change_the_model():
  model = get_model("vgg", num_classes=K, input_shape=(32, 32, 3), widths=[8, 16], cut=1,
                    hidden=32, decoder_hidden=4)
  variables = abstract_init(model, (32, 32, 3))
  assert variables["upper"]["params"]["fc1"]["kernel"].shape == (8 * 8 * 16, 32)
  assert variables["decoder"]["params"]["conv1"]["kernel"].shape == (3, 3, 8, 4)
  with pytest.raises(ValueError, match="input_shape"):
    get_model("tiny_cnn", num_classes=K, input_shape=(32, 32))
