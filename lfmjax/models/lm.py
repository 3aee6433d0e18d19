"""`lm`: a small byte-level causal language model (a GPT-style pre-LN decoder-only
transformer) split for LocFedMix-SL (Oh et al., WWW 2022): the clients hold the token
embedding and the first `cut` blocks, the server the rest and the next-token head.

Blocks are `transformer.EncoderBlock` with a causal mask (layout of big_vision's ViT
block, see transformer.py). The token (`embedding`, nn.Embed) and position
(`pos_embedding`, 1 x T x D) embeddings are normal(0.02), as GPT-2; dense kernels
xavier_uniform, biases zero. `num_classes` is the vocabulary (256 for bytes) and
input_shape = (T,) the sequence length the positions are built for (shorter inputs use
the first positions).

Inputs are int tokens B x T; the lower casts to int32 inside, so `init` may be called
with float zeros of the right shape (a float input is truncated, not rounded).
Outputs: upper -> next-token logits B x T x V (position t predicts token t+1).
The decoder is the Loc term for text: logits B x T x V of the *input* token at each
position, reconstructed from s (cross-entropy against the input tokens); the aux head
is a local next-token classifier. Both are LayerNorm + dense to V. Every output at t
depends only on inputs at <= t. `lora` (a `LoRASpec`) adds adapters by layer name.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from lfmjax.models.lora import LoRADense, LoRASpec
from lfmjax.models.transformer import check_cut, check_width, run_blocks, token_positions
from lfmjax.models.util import SplitModel

DEFAULTS = dict(width=128, depth=4, heads=4, mlp_dim=512, cut=1)
EMBED_STDDEV = 0.02


class LMLower(nn.Module):
  """Client segment: token + position embeddings, causal blocks 0..cut-1."""
  vocab: int
  max_len: int
  width: int
  cut: int
  heads: int
  mlp_dim: int
  lora: LoRASpec | None = None

  @nn.compact
  def __call__(self, x_BxT: jax.Array, train: bool = False) -> jax.Array:
    embed = nn.Embed(self.vocab, self.width,
                     embedding_init=nn.initializers.normal(EMBED_STDDEV), name="embedding")
    x_BxTxD = embed(x_BxT.astype(jnp.int32))
    x_BxTxD = x_BxTxD + token_positions(self, x_BxT.shape[-1], self.width, self.max_len,
                                        EMBED_STDDEV)
    return run_blocks(x_BxTxD, first=0, count=self.cut, num_heads=self.heads,
                      mlp_dim=self.mlp_dim, causal=True, lora=self.lora)


class LMUpper(nn.Module):
  """Server segment: causal blocks first_block.., `encoder_norm`, `lm_head` -> V."""
  vocab: int
  first_block: int
  count: int
  heads: int
  mlp_dim: int
  lora: LoRASpec | None = None
  features_only: bool = False  # a U-shaped split's body: the normed tokens, no `lm_head`

  @nn.compact
  def __call__(self, s_BxTxD: jax.Array, train: bool = False) -> jax.Array:
    x_BxTxD = run_blocks(s_BxTxD, first=self.first_block, count=self.count,
                         num_heads=self.heads, mlp_dim=self.mlp_dim, causal=True,
                         lora=self.lora)
    x_BxTxD = nn.LayerNorm(name="encoder_norm")(x_BxTxD)
    if self.features_only:
      return x_BxTxD
    return LoRADense(self.vocab, self.lora, name="lm_head")(x_BxTxD)


class TokenLogits(nn.Module):
  """Per-position LayerNorm + dense `fc` -> V: the decoder and the aux head."""
  vocab: int

  @nn.compact
  def __call__(self, s_BxTxD: jax.Array, train: bool = False) -> jax.Array:
    return LoRADense(self.vocab, name="fc")(nn.LayerNorm(name="norm")(s_BxTxD))


def _check_input_shape(input_shape) -> int:
  shape = tuple(input_shape)
  if (len(shape) != 1 or isinstance(shape[0], bool) or not isinstance(shape[0], int)
      or shape[0] < 1):
    raise ValueError(f"lm: input_shape={shape!r} must be (T,), T a positive int "
                     f"(the sequence length)")
  return shape[0]


def build(num_classes: int, input_shape: tuple[int], *, width: int, depth: int,
          heads: int, mlp_dim: int, cut: int, lora: LoRASpec | None = None
          ) -> SplitModel:
  t = _check_input_shape(input_shape)
  check_width("lm", width, heads)
  check_cut("lm", cut, depth)
  return SplitModel(
      lower=LMLower(num_classes, t, width, cut, heads, mlp_dim, lora),
      upper=LMUpper(num_classes, cut, depth - cut, heads, mlp_dim, lora),
      decoder=TokenLogits(num_classes), aux_head=TokenLogits(num_classes), name="lm")
