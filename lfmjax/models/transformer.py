"""Transformer pieces shared by the split ViT (`vit.py`) and the split causal language
model (`lm.py`) of the LocFedMix-SL simulator (Oh et al., WWW 2022).

The encoder block is the pre-LayerNorm block of ViT (Dosovitskiy et al., ICLR 2021),
laid out as google-research/big_vision's models/vit.py: x + MHA(LN(x)), then
x + MLP(LN(x)), with an MLP of dense, gelu, dense. Differences from big_vision: no
dropout (training needs no RNG), zero biases everywhere (big_vision draws the MLP
biases from normal(1e-6)), and every dense layer is a `LoRADense` (Hu et al., ICLR
2022), so a `LoRASpec` can put adapters on any of them by name. Kernels are
xavier_uniform, as big_vision's attention and MLP.

Blocks are named `block{i}` by their index in the whole encoder (`run_blocks`), so a
parameter's name does not depend on where the model is cut.
"""
from __future__ import annotations

import jax
import flax.linen as nn

from lfmjax.models.lora import LoRADense, LoRASpec


class MultiHeadAttention(nn.Module):
  """Self-attention over B x T x D with `num_heads` heads of D / num_heads each.

  Projections `query`, `key`, `value` (D -> D, split into heads) and `out` (D -> D).
  Any leading axes are folded into one batch axis for `jax.nn.dot_product_attention`
  (which takes exactly B x T x N x H); its default implementation is XLA's.
  """
  num_heads: int
  causal: bool = False
  lora: LoRASpec | None = None

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    *lead, t, d = x_BxTxD.shape
    if d % self.num_heads:
      raise ValueError(f"MultiHeadAttention: width {d} is not divisible by "
                       f"num_heads={self.num_heads}")
    x_BxTxD = x_BxTxD.reshape((-1, t, d))
    heads = (x_BxTxD.shape[0], t, self.num_heads, d // self.num_heads)

    def project(name: str) -> jax.Array:
      return LoRADense(d, self.lora, name=name)(x_BxTxD).reshape(heads)

    q_BxTxNxH, k_BxTxNxH, v_BxTxNxH = map(project, ("query", "key", "value"))
    y_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH,
                                             is_causal=self.causal)
    y_BxTxD = LoRADense(d, self.lora, name="out")(y_BxTxNxH.reshape((-1, t, d)))
    return y_BxTxD.reshape((*lead, t, d))


class MlpBlock(nn.Module):
  """dense D -> mlp_dim (`mlp1`), gelu, dense mlp_dim -> D (`mlp2`)."""
  mlp_dim: int
  lora: LoRASpec | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.gelu(LoRADense(self.mlp_dim, self.lora, name="mlp1")(x))
    return LoRADense(x.shape[-1], self.lora, name="mlp2")(h)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  num_heads: int
  mlp_dim: int
  causal: bool = False
  lora: LoRASpec | None = None

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    attn = MultiHeadAttention(self.num_heads, self.causal, self.lora, name="attn")
    x_BxTxD = x_BxTxD + attn(nn.LayerNorm(name="ln1")(x_BxTxD))
    mlp = MlpBlock(self.mlp_dim, self.lora, name="mlp")
    return x_BxTxD + mlp(nn.LayerNorm(name="ln2")(x_BxTxD))


def run_blocks(x_BxTxD: jax.Array, *, first: int, count: int, num_heads: int,
               mlp_dim: int, causal: bool, lora: LoRASpec | None) -> jax.Array:
  """Blocks `first` .. `first + count - 1`, named `block{i}`; call inside a compact
  method (the blocks become its children)."""
  for i in range(first, first + count):
    x_BxTxD = EncoderBlock(num_heads, mlp_dim, causal, lora, name=f"block{i}")(x_BxTxD)
  return x_BxTxD


def check_width(model: str, width: int, heads: int) -> None:
  """The one-line error for a width the heads do not divide, naming the override."""
  if width % heads:
    raise ValueError(f"{model}: override width={width} must be divisible by "
                     f"heads={heads}; pick a width that is a multiple of heads")


def check_cut(model: str, cut: int, depth: int) -> None:
  """cut in 1..depth: the client holds at least one block; at cut == depth the server
  holds only the final norm and the head."""
  if isinstance(cut, bool) or not isinstance(cut, int) or not 1 <= cut <= depth:
    raise ValueError(f"{model}: override cut={cut!r} must be in 1..depth={depth}; "
                     f"lower cut or raise depth")


def token_positions(model: nn.Module, t: int, d: int, max_len: int | None = None,
                    stddev: float = 0.02) -> jax.Array:
  """A learned position embedding `pos_embedding` (1 x max_len x D, normal(stddev)),
  sliced to the first t positions; max_len defaults to t."""
  max_len = t if max_len is None else max_len
  if t > max_len:
    raise ValueError(f"{type(model).__name__}: sequence of {t} tokens is longer than "
                     f"the {max_len} positions the model was built for")
  pos_1xLxD = model.param("pos_embedding", nn.initializers.normal(stddev), (1, max_len, d))
  return pos_1xLxD[:, :t]


__all__ = ["EncoderBlock", "MlpBlock", "MultiHeadAttention", "check_cut", "check_width",
           "run_blocks", "token_positions"]
