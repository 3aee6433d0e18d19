"""The split-model container and the pure helpers the round uses to initialise and
apply its segments."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

# The order in which `init_split` splits its key; fixed so inits are reproducible.
SEGMENTS = ("lower", "upper", "decoder", "aux_head")


class SplitModel(NamedTuple):
  """A model cut at the cut layer (LocFedMix-SL, Oh et al., WWW 2022).

  lower:    x_BxHxWxC -> s (smashed data), held by each client.
  upper:    s -> logits_BxK, held by the server.
  decoder:  s -> reconstruction logits with the input's H, W, C (local MI loss).
  aux_head: s -> logits_BxK (LocSplitFed's local classifier, InfoPro's I(s; y)).
  head:     None, or a U-shaped split's client head h -> logits_BxK; `upper` is then
            the server's body s -> h (the features), and the labels stay on the client.
  """
  lower: nn.Module
  upper: nn.Module
  decoder: nn.Module
  aux_head: nn.Module
  name: str
  head: nn.Module | None = None


def init_split(model: SplitModel, key: jax.Array, x_example_BxHxWxC: jax.Array
               ) -> dict[str, dict]:
  """Flax variables of all four segments: {'lower', 'upper', 'decoder', 'aux_head'},
  and 'head' for a U-shaped split (`SplitModel.head`).

  The key is split into one key per segment in `SEGMENTS` order. Only the shape of
  the example matters; the heads are initialised on zeros of the smashed shape.
  """
  keys = dict(zip(SEGMENTS, jax.random.split(key, len(SEGMENTS))))
  # The example's dtype: a language model's lower embeds int32 tokens.
  dtype = (x_example_BxHxWxC.dtype if jnp.issubdtype(x_example_BxHxWxC.dtype, jnp.integer)
           else jnp.float32)
  x = jnp.zeros((1,) + tuple(x_example_BxHxWxC.shape[1:]), dtype)
  variables = {"lower": model.lower.init(keys["lower"], x, train=False)}
  s_shape = jax.eval_shape(
      lambda v, x: model.lower.apply(v, x, train=False), variables["lower"], x)
  s = jnp.zeros(s_shape.shape, s_shape.dtype)
  for name in SEGMENTS[1:]:
    variables[name] = getattr(model, name).init(keys[name], s, train=False)
  if model.head is not None:  # a key of its own, so the other segments' inits stay
    h_shape = jax.eval_shape(lambda v, s: model.upper.apply(v, s, train=False),
                             variables["upper"], s)
    variables["head"] = model.head.init(jax.random.fold_in(key, len(SEGMENTS)),
                                        jnp.zeros(h_shape.shape, h_shape.dtype), train=False)
  return variables


def apply_module(module: nn.Module, variables: dict, x: jax.Array, *, train: bool,
                 method: str | None = None) -> tuple[jax.Array, dict]:
  """Applies a segment; returns (output, new_variables).

  With `train` and a 'batch_stats' collection, BatchNorm normalises over the batch and
  the returned variables carry the updated running statistics; otherwise the variables
  come back unchanged. Pure: safe under jit, grad and vmap.
  """
  if train and "batch_stats" in variables:
    out, mutated = module.apply(variables, x, train=True, method=method,
                                mutable=["batch_stats"])
    return out, {**variables, **mutated}
  return module.apply(variables, x, train=train, method=method), variables


def has_stem(module: nn.Module) -> bool:
  """Whether an upper segment is split as `head(stem(s))` with `stem` affine in s.

  Such an upper defines `stem(s, train=False)`, affine in s and without batch
  statistics, and `head(z, train=False)`, with `__call__(s) == head(stem(s))`. A
  convex combination commutes with an affine map, so SmashMix's mixed batches can be
  formed from the stem outputs of the real batches: the stem runs once, not twice.
  """
  return callable(getattr(module, "stem", None)) and callable(getattr(module, "head", None))


def check_stem(upper: nn.Module, variables: dict, s_example: jax.Array) -> None:
  """Refuses an upper whose declared `stem` is not what SmashMix-after-the-stem needs:
  affine in s (a convex mix of inputs gives the same mix of outputs) and without batch
  statistics (which would make a sample's output depend on its batch). Checked on
  random smashed data at initialisation, so a wrong declaration is an error, not a
  silently different algorithm."""
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  shape = (4,) + tuple(s_example.shape[1:])
  a, b = jax.random.normal(key_a, shape), jax.random.normal(key_b, shape)

  def stem(s):
    out, new = upper.apply(variables, s, train=True, method="stem", mutable=True)
    return out, new

  out_a, new_a = stem(a)
  before, after = variables.get("batch_stats", {}), new_a.get("batch_stats", {})
  if any(bool(jnp.any(x != y)) for x, y in zip(jax.tree.leaves(before),
                                                jax.tree.leaves(after))):
    raise ValueError(f"{type(upper).__name__}.stem updates batch statistics; SmashMix after "
                     f"the stem needs a stem without them: drop `stem`/`head` from the upper")
  mixed = stem(0.3 * a + 0.7 * b)[0]
  expected = 0.3 * out_a + 0.7 * stem(b)[0]
  scale = float(jnp.max(jnp.abs(expected))) + 1e-6
  if float(jnp.max(jnp.abs(mixed - expected))) > 1e-4 * scale:
    raise ValueError(f"{type(upper).__name__}.stem is not affine in s (a mix of inputs does "
                     f"not give the same mix of outputs); SmashMix after the stem would be "
                     f"another algorithm: drop `stem`/`head` from the upper or make the stem "
                     f"affine")


def smashed_struct(model: SplitModel, input_shape: tuple[int, ...],
                   input_dtype=jnp.float32) -> jax.ShapeDtypeStruct:
  """Shape (no batch axis) and dtype of one sample's smashed data, not computed."""
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), input_dtype)

  def forward(x):
    variables = model.lower.init(jax.random.key(0), x, train=False)
    return model.lower.apply(variables, x, train=False)

  out = jax.eval_shape(forward, x)
  return jax.ShapeDtypeStruct(tuple(out.shape[1:]), out.dtype)


def smashed_shape(model: SplitModel, input_shape: tuple[int, ...],
                  input_dtype=jnp.float32) -> tuple[int, ...]:
  """Shape of the smashed data of one sample (no batch axis), without computing it."""
  return tuple(smashed_struct(model, input_shape, input_dtype).shape)


def param_count(tree: Any) -> int:
  """Number of scalars in a pytree (e.g. a variables dict or its 'params')."""
  return sum(int(a.size) for a in jax.tree.leaves(tree))
