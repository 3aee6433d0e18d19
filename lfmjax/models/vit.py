"""`vit`: a small Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16
Words", ICLR 2021) split for LocFedMix-SL (Oh et al., WWW 2022), laid out as
google-research/big_vision's models/vit.py.

Client (lower): patches of patch x patch x C flattened and embedded by a dense layer
`embedding` (the patch conv with kernel = stride = patch, as a matmul: its kernel is
the conv's HWIO kernel reshaped to (p*p*C) x D), plus a learned `pos_embedding`
(1 x T x D, normal(0.02) as the original ViT), then, with pool="cls", the class token
`cls` (zeros; prepended after the position embedding, as big_vision), then encoder
blocks 0..cut-1. The smashed data are the tokens s_BxTxD (T = (H/p)(W/p), +1 with cls).
Server (upper): blocks cut..depth-1, LayerNorm `encoder_norm`, pooling (mean over
tokens, or the cls token), dense `head` to the classes. The head is xavier_uniform, not
big_vision's zero init: a zero head would pass no gradient to the client on the first
step. The embedding is lecun_normal (flax's conv default, as big_vision's).

Overrides (defaults in DEFAULTS): patch, width, depth, heads, mlp_dim, cut (1..depth;
at cut == depth the server holds only the norm and head), pool ("mean" | "cls"),
decoder_hidden. `lora` (a `LoRASpec`) puts adapters on the dense layers it names.

The decoder (`TokenDecoder`) is the Loc term's reconstruction of the input from s, per
token (InfoPro-style local loss, Wang et al., ICLR 2021); the aux head
(`TokenAuxHead`) is the local classifier. No dropout, so training needs no RNG.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from lfmjax.models.lora import LoRADense, LoRASpec
from lfmjax.models.transformer import check_cut, check_width, run_blocks, token_positions
from lfmjax.models.util import SplitModel

DEFAULTS = dict(patch=4, width=64, depth=6, heads=4, mlp_dim=128, cut=2, pool="mean",
                decoder_hidden=64)
POOLS = ("mean", "cls")


def _swap_patch_axes(x: jax.Array, n: int) -> jax.Array:
  """(.., a, p, b, q, C) <-> (.., a, b, p, q, C) after n leading axes (an involution)."""
  lead = tuple(range(n))
  return x.transpose(lead + (n, n + 2, n + 1, n + 3, n + 4))


def patchify(x_BxHxWxC: jax.Array, p: int) -> jax.Array:
  """B x H x W x C -> B x T x (p*p*C), patches in row-major order."""
  *lead, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape((*lead, h // p, p, w // p, p, c))
  return _swap_patch_axes(x, len(lead)).reshape((*lead, (h // p) * (w // p), p * p * c))


def unpatchify(y_BxTxP: jax.Array, hw: tuple[int, int], p: int, c: int) -> jax.Array:
  """The inverse of `patchify`: B x T x (p*p*C) -> B x H x W x C."""
  *lead, _, _ = y_BxTxP.shape
  h, w = hw
  y = y_BxTxP.reshape((*lead, h // p, w // p, p, p, c))
  return _swap_patch_axes(y, len(lead)).reshape((*lead, h, w, c))


class ViTLower(nn.Module):
  """Client segment: patch embedding, positions [, cls token], blocks 0..cut-1."""
  patch: int
  width: int
  cut: int
  heads: int
  mlp_dim: int
  pool: str = "mean"
  lora: LoRASpec | None = None

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
    patches_BxTxP = patchify(x_BxHxWxC.astype(jnp.float32), self.patch)
    embed = LoRADense(self.width, self.lora, kernel_init=nn.initializers.lecun_normal(),
                      name="embedding")
    x_BxTxD = embed(patches_BxTxP)
    x_BxTxD = x_BxTxD + token_positions(self, x_BxTxD.shape[-2], self.width)
    if self.pool == "cls":
      cls_1x1xD = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
      cls_Bx1xD = jnp.broadcast_to(cls_1x1xD, (*x_BxTxD.shape[:-2], 1, self.width))
      x_BxTxD = jnp.concatenate([cls_Bx1xD, x_BxTxD], axis=-2)
    return run_blocks(x_BxTxD, first=0, count=self.cut, num_heads=self.heads,
                      mlp_dim=self.mlp_dim, causal=False, lora=self.lora)


class ViTUpper(nn.Module):
  """Server segment: blocks first_block.., `encoder_norm`, pooling, `head`."""
  first_block: int
  count: int
  heads: int
  mlp_dim: int
  num_classes: int
  pool: str = "mean"
  lora: LoRASpec | None = None
  features_only: bool = False  # a U-shaped split's body: the pooled tokens, no `head`

  @nn.compact
  def __call__(self, s_BxTxD: jax.Array, train: bool = False) -> jax.Array:
    x_BxTxD = run_blocks(s_BxTxD, first=self.first_block, count=self.count,
                         num_heads=self.heads, mlp_dim=self.mlp_dim, causal=False,
                         lora=self.lora)
    x_BxTxD = nn.LayerNorm(name="encoder_norm")(x_BxTxD)
    x_BxD = x_BxTxD[..., 0, :] if self.pool == "cls" else x_BxTxD.mean(axis=-2)
    if self.features_only:
      return x_BxD
    return LoRADense(self.num_classes, self.lora, name="head")(x_BxD)


class TokenDecoder(nn.Module):
  """Reconstruction logits B x H x W x C from the tokens: drop the cls token, then per
  token LayerNorm, dense `hidden`, gelu, dense p*p*C, and unpatchify. The round applies
  the sigmoid (BCE against x in [0, 1])."""
  out_hw: tuple[int, int]
  out_channels: int
  patch: int
  hidden: int = 64
  has_cls: bool = False

  @nn.compact
  def __call__(self, s_BxTxD: jax.Array, train: bool = False) -> jax.Array:
    x_BxTxD = s_BxTxD[..., 1:, :] if self.has_cls else s_BxTxD
    x_BxTxD = nn.LayerNorm(name="norm")(x_BxTxD)
    x_BxTxD = nn.gelu(LoRADense(self.hidden, name="fc1")(x_BxTxD))
    p, c = self.patch, self.out_channels
    y_BxTxP = LoRADense(p * p * c, name="fc2")(x_BxTxD)
    return unpatchify(y_BxTxP, self.out_hw, p, c)


class TokenAuxHead(nn.Module):
  """Local classifier on the tokens: LayerNorm, mean over tokens, dense `fc` -> K."""
  num_classes: int

  @nn.compact
  def __call__(self, s_BxTxD: jax.Array, train: bool = False) -> jax.Array:
    x_BxD = nn.LayerNorm(name="norm")(s_BxTxD).mean(axis=-2)
    return LoRADense(self.num_classes, name="fc")(x_BxD)


def _check(input_shape, *, patch: int, width: int, depth: int, heads: int, cut: int,
           pool: str) -> None:
  h, w, _ = input_shape
  if h % patch or w % patch:
    raise ValueError(f"vit: override patch={patch} must divide the image's H={h} and "
                     f"W={w}; pick a divisor of both")
  check_width("vit", width, heads)
  check_cut("vit", cut, depth)
  if pool not in POOLS:
    raise ValueError(f"vit: override pool={pool!r} must be one of {', '.join(POOLS)}")


def build(num_classes: int, input_shape: tuple[int, int, int], *, patch: int,
          width: int, depth: int, heads: int, mlp_dim: int, cut: int, pool: str,
          decoder_hidden: int, lora: LoRASpec | None = None) -> SplitModel:
  _check(input_shape, patch=patch, width=width, depth=depth, heads=heads, cut=cut,
         pool=pool)
  h, w, c = input_shape
  return SplitModel(
      lower=ViTLower(patch, width, cut, heads, mlp_dim, pool, lora),
      upper=ViTUpper(cut, depth - cut, heads, mlp_dim, num_classes, pool, lora),
      decoder=TokenDecoder((h, w), c, patch, decoder_hidden, pool == "cls"),
      aux_head=TokenAuxHead(num_classes), name="vit")
