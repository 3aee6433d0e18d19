"""LoRA: low-rank adapters on dense layers (Hu et al., "LoRA: Low-Rank Adaptation of
Large Language Models", ICLR 2022), for fine-tuning the transformer split models of
LocFedMix-SL (Oh et al., WWW 2022) with only the adapters trained and exchanged.

`LoRADense` is a drop-in `nn.Dense` whose `kernel` and `bias` are named and shaped as
flax's, so a checkpoint of the model without LoRA loads into its non-adapter leaves.
When its `LoRASpec` targets the layer's name it adds `lora_a` (in x r) and `lora_b`
(r x out) and computes

    y = x @ kernel + bias + (alpha / r) * (x @ lora_a) @ lora_b,

the low-rank path as two thin matmuls: the in x out update is never formed.
`lora_b` starts at zero, so the adapted model starts equal to the backbone (Hu et al.
Sec. 4.1). The helpers split a params tree into adapters and frozen backbone and merge
them back (`split_adapters`, `merge`), and label leaves for an optimizer mask
(`adapter_labels`, e.g. for `optax.multi_transform`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

ADAPTER_LEAVES = ("lora_a", "lora_b")
# The dense layers of `models.transformer` an adapter can target.
LORA_TARGETS = ("query", "key", "value", "out", "mlp1", "mlp2")

# lora_a's init: PyTorch's kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), as
# the reference implementations (loralib, HF peft) draw A. Hu et al. only say "random
# Gaussian"; the uniform form keeps the torch peers' numbers comparable, and its
# 1/sqrt(in) scale keeps x @ A of order |x| whatever the input width.
lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class LoRASpec:
  """Which dense layers get adapters, and their rank and scale. rank 0: none.

  Frozen (hence hashable): it is a static attribute of the flax modules.
  `targets` are layer names (`LoRADense.name`): the attention projections by default;
  add "mlp1", "mlp2", "embedding", "head" or "lm_head" to adapt those too.
  """
  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = ("query", "key", "value", "out")

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
      raise ValueError(f"LoRASpec: rank={self.rank!r} must be an int >= 0")
    # a list would make the spec unhashable
    object.__setattr__(self, "targets", tuple(self.targets))

  @property
  def scale(self) -> float:
    """alpha / r (Hu et al. Sec. 4.1): the update's size does not change with r.
    0 at rank 0 (no adapters)."""
    return self.alpha / self.rank if self.rank else 0.0

  def applies(self, name: str | None) -> bool:
    return self.rank > 0 and name in self.targets


class LoRADense(nn.Module):
  """`nn.Dense` (kernel in x out, bias out) with an optional low-rank adapter.

  Contracts the last axis of x, so any number of leading axes is fine. The default
  kernel init is xavier_uniform (the transformers' choice), not nn.Dense's lecun_normal.
  """
  features: int
  lora: LoRASpec | None = None
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_in = x.shape[-1]
    kernel_IxO = self.param("kernel", self.kernel_init, (d_in, self.features))
    bias_O = self.param("bias", self.bias_init, (self.features,))
    y = jnp.dot(x, kernel_IxO) + bias_O
    if self.lora is None or not self.lora.applies(self.name):
      return y
    a_IxR = self.param("lora_a", lora_a_init, (d_in, self.lora.rank))
    b_RxO = self.param("lora_b", nn.initializers.zeros, (self.lora.rank, self.features))
    return y + self.lora.scale * jnp.dot(jnp.dot(x, a_IxR), b_RxO)


def merged_weight(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                  spec: LoRASpec) -> jax.Array:
  """kernel + (alpha / r) A B: the dense weight equal to the adapted layer (reference
  form; also what one folds into the backbone after fine-tuning)."""
  return kernel + spec.scale * jnp.dot(lora_a, lora_b)


def _leaf_name(path) -> Any:
  last = path[-1]
  return getattr(last, "key", getattr(last, "name", None))


def is_adapter(path) -> bool:
  """Whether a jax tree path (as from tree_map_with_path) ends at a LoRA leaf."""
  return bool(path) and _leaf_name(path) in ADAPTER_LEAVES


def adapter_labels(params: Any) -> Any:
  """The tree of params with each leaf replaced by "adapter" or "frozen"."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "adapter" if is_adapter(path) else "frozen", params)


def _partition(tree: Mapping, keep: Callable[[str], bool]) -> dict:
  """The nested dict of the leaves whose key `keep` accepts; empty sub-dicts dropped."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      sub = _partition(v, keep)
      if sub:
        out[k] = sub
    elif keep(k):
      out[k] = v
  return out


def split_adapters(params: Mapping) -> tuple[dict, dict]:
  """(adapters, frozen): the LoRA leaves and all others, each in the params' nesting."""
  return (_partition(params, lambda k: k in ADAPTER_LEAVES),
          _partition(params, lambda k: k not in ADAPTER_LEAVES))


def merge(a: Mapping, b: Mapping, _path: tuple = ()) -> dict:
  """Deep merge of two nested dicts with disjoint leaves (undoes `split_adapters`).

  Raises ValueError where both hold the same key and it is not a dict in both.
  """
  out = dict(a)
  for k, v in b.items():
    if k not in out:
      out[k] = v
    elif isinstance(out[k], Mapping) and isinstance(v, Mapping):
      out[k] = merge(out[k], v, _path + (k,))
    else:
      raise ValueError(f"merge: both trees hold {'/'.join(map(str, _path + (k,)))}")
  return out
