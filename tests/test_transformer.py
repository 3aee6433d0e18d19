"""Tests of the transformer split models (lfmjax/models/{lora,transformer,vit,lm}.py):
LoRA's algebra and checkpoint compatibility, the adapter split/merge helpers, the split
ViT's and the split causal LM's shapes, cut-independent parameter names, causality,
and vmap over a client axis of parameters. Tiny widths: seconds on 2 cores."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from lfmjax.models import lm, vit
from lfmjax.models.lora import (LoRADense, LoRASpec, adapter_labels, merge, merged_weight,
                                split_adapters)
from lfmjax.models.util import has_stem, init_split

TINY_VIT = dict(vit.DEFAULTS, patch=4, width=16, depth=2, heads=2, mlp_dim=32, cut=1,
                decoder_hidden=8)
TINY_LM = dict(width=16, depth=2, heads=2, mlp_dim=32, cut=1)
IMAGE = (8, 8, 3)
T, V, K = 8, 256, 5


def key(seed: int) -> jax.Array:
  return jax.random.key(seed, impl="rbg")


def shapes(tree):
  return jax.tree.map(lambda a: a.shape, tree)


def dense_params(spec: LoRASpec, d_in: int = 6, d_out: int = 4):
  layer = LoRADense(d_out, spec, name="query")
  x = jax.random.normal(key(1), (2, 3, d_in))
  return layer, x, layer.init(key(0), x)["params"]


def test_lora_dense_equals_merged_weight():
  spec = LoRASpec(rank=2, alpha=3.0)
  layer, x, params = dense_params(spec)
  params["lora_b"] = jax.random.normal(key(2), params["lora_b"].shape)
  y = layer.apply({"params": params}, x)
  w = merged_weight(params["kernel"], params["lora_a"], params["lora_b"], spec)
  np.testing.assert_allclose(y, x @ w + params["bias"], rtol=1e-5, atol=1e-5)
  assert not np.allclose(y, x @ params["kernel"] + params["bias"])


def test_lora_dense_starts_as_dense():
  layer, x, params = dense_params(LoRASpec(rank=2))
  assert set(params) == {"kernel", "bias", "lora_a", "lora_b"}
  plain = nn.Dense(4).apply({"params": {"kernel": params["kernel"],
                                        "bias": params["bias"]}}, x)
  np.testing.assert_allclose(layer.apply({"params": params}, x), plain, rtol=1e-6)


def test_lora_spec_targets_and_hash():
  spec = LoRASpec(rank=4, alpha=8.0, targets=["query"])
  assert spec.scale == 2.0 and spec.applies("query") and not spec.applies("key")
  assert not LoRASpec(rank=0).applies("query")
  hash(spec)
  _, _, params = dense_params(LoRASpec(rank=2, targets=("mlp1",)))
  assert set(params) == {"kernel", "bias"}


def vit_params(lora=None, **overrides):
  model = vit.build(K, IMAGE, **dict(TINY_VIT, **overrides), lora=lora)
  return model, jax.eval_shape(
      lambda: init_split(model, key(0), jnp.zeros((1,) + IMAGE)))


def test_backbone_checkpoint_loads_into_lora_model():
  _, plain = vit_params()
  _, adapted = vit_params(LoRASpec(rank=2, targets=("query", "value", "mlp1", "head")))
  for seg in plain:
    adapters, frozen = split_adapters(adapted[seg]["params"])
    assert shapes(frozen) == shapes(plain[seg]["params"]), seg
  adapters = split_adapters(adapted["lower"]["params"])[0]
  assert set(adapters["block0"]["attn"]) == {"query", "value"}
  assert set(adapters["block0"]["mlp"]) == {"mlp1"}
  assert "head" in split_adapters(adapted["upper"]["params"])[0]


def test_split_merge_round_trip_and_clash():
  _, variables = vit_params(LoRASpec(rank=2))
  params = variables["lower"]["params"]
  adapters, frozen = split_adapters(params)
  assert shapes(merge(adapters, frozen)) == shapes(params)
  labels = jax.tree.leaves(adapter_labels(params))
  assert labels.count("adapter") == len(jax.tree.leaves(adapters)) == 8
  with pytest.raises(ValueError, match="block0/attn/query/kernel"):
    merge(frozen, {"block0": {"attn": {"query": {"kernel": 0}}}})


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_vit_shapes(pool):
  model, _ = vit_params(pool=pool)

  def outputs(x):  # shapes only: traced, not compiled
    variables = init_split(model, key(0), x)
    s = model.lower.apply(variables["lower"], x)
    return [s] + [getattr(model, seg).apply(variables[seg], s)
                  for seg in ("upper", "decoder", "aux_head")]

  s, logits, recon, aux = jax.eval_shape(outputs, jnp.zeros((2,) + IMAGE))
  assert s.shape == (2, 4 + (pool == "cls"), 16)
  assert logits.shape == aux.shape == (2, K)
  assert recon.shape == (2,) + IMAGE
  assert not has_stem(model.upper)


def test_vit_param_names_independent_of_cut():
  def names(cut):
    _, v = vit_params(cut=cut, pool="cls")
    return {**shapes(v["lower"]["params"]), **shapes(v["upper"]["params"])}
  at_1, at_2 = names(1), names(2)
  assert at_1 == at_2 and {"block0", "block1", "cls", "head"} <= set(at_1)


@pytest.mark.parametrize("override, match", [
    (dict(patch=3), "patch=3"), (dict(cut=3), "cut=3"), (dict(cut=0), "cut=0"),
    (dict(width=15), "width=15"), (dict(pool="max"), "pool='max'")])
def test_vit_bad_overrides(override, match):
  with pytest.raises(ValueError, match=match):
    vit.build(K, IMAGE, **dict(TINY_VIT, **override))


def lm_model():
  return lm.build(V, (T,), **TINY_LM)


def lm_variables(model, rng: np.random.Generator):
  """Random variables in the shapes init_split gives (traced, not compiled: XLA:CPU
  takes ~1.5 s to compile the random init). init_split zeros an int example as int32
  (float zeros would do: the lower casts)."""
  structure = jax.eval_shape(
      lambda: init_split(model, key(0), jnp.zeros((1, T), jnp.int32)))
  return random_like(structure, rng)


def random_like(tree, rng: np.random.Generator):
  """Random normal(0, 0.2) values in a tree's shapes and dtypes."""
  return jax.tree.map(lambda a: rng.normal(0.0, 0.2, a.shape).astype(a.dtype), tree)


def lm_forward(model):
  """Jitted (variables, tokens) -> (s, logits, decoder logits, aux logits): one compile
  instead of one per op."""
  def forward(variables, tokens):
    s = model.lower.apply(variables["lower"], tokens)
    return [s] + [getattr(model, seg).apply(variables[seg], s)
                  for seg in ("upper", "decoder", "aux_head")]
  return jax.jit(forward)


def test_lm_shapes_and_causality():
  model = lm_model()
  rng = np.random.default_rng(1)
  variables = lm_variables(model, rng)
  forward = lm_forward(model)
  tokens = rng.integers(0, V, (2, T), dtype=np.int32)
  s, logits, recon, aux = forward(variables, tokens)
  assert s.shape == (2, T, 16)
  assert logits.shape == recon.shape == aux.shape == (2, T, V)
  t = 3
  changed = tokens.copy()
  changed[:, t + 1:] = (tokens[:, t + 1:] + 7) % V
  other = forward(variables, changed)[1]
  np.testing.assert_allclose(other[:, :t + 1], logits[:, :t + 1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(other[:, t + 1:], logits[:, t + 1:])


def test_lm_vmap_over_clients():
  model = lm_model()
  rng = np.random.default_rng(0)
  clients = [lm_variables(model, rng) for _ in range(3)]
  stacked = jax.tree.map(lambda *a: np.stack(a), *clients)
  forward = lm_forward(model)
  tokens = rng.integers(0, V, (3, 2, T), dtype=np.int32)
  batched = jax.jit(jax.vmap(lambda v, x: forward(v, x)[1]))(stacked, tokens)
  looped = [forward(v, x)[1] for v, x in zip(clients, tokens)]
  np.testing.assert_allclose(batched, jnp.stack(looped), rtol=1e-5, atol=1e-5)
  assert not np.allclose(looped[0], looped[1])  # the clients differ


@pytest.mark.parametrize("shape, override, match", [
    ((8, 8), {}, "input_shape"), ((0,), {}, "input_shape"),
    ((T,), dict(cut=3), "cut=3"), ((T,), dict(width=15), "width=15")])
def test_lm_bad_shapes_and_overrides(shape, override, match):
  with pytest.raises(ValueError, match=match):
    lm.build(V, shape, **dict(TINY_LM, **override))
