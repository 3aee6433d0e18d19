"""`vgg`: a VGG-style CIFAR model (Simonyan & Zisserman, 2015) with reduced widths, for
the CIFAR-10 experiments of LocFedMix-SL (Oh et al., WWW 2022) on a small CPU.

Architecture (defaults): three conv blocks, each two conv3x3 (pad 1) [+ BN] + ReLU
followed by maxpool2 — widths 32, 64, 128, i.e. [32, 32, M, 64, 64, M | 128, 128, M] —
then flatten, dense 256, ReLU, dense to the classes. The full VGG-11 widths
(64..512) are too slow on 2 CPU cores. For 32x32 input the flatten has 4*4*128 = 2048
features (28x28: 3*3*128 = 1152, pools floor).

Overrides: `cut` (conv blocks on the client, 1..len(widths), default 2: s is
8x8x64 for 32x32 input), `batch_norm` (default False; when True each conv is
bias-free and followed by BatchNorm, momentum 0.9 flax / 0.1 PyTorch, eps 1e-5),
`widths` (channels per block), `hidden` (the dense layer, default 256),
`decoder_hidden` (12). No dropout, so training needs no RNG. PyTorch-default init for
every conv and dense layer. The decoder is InfoPro's (Wang et al., ICLR 2021).
"""
from __future__ import annotations

from typing import Sequence

import jax
import flax.linen as nn

from lfmjax.models.batch_norm import BatchNorm
from lfmjax.models.layers import AuxHead, Decoder, conv_layer, flatten, torch_conv, torch_dense
from lfmjax.models.patch_conv import max_pool2
from lfmjax.models.util import SplitModel

DEFAULTS = dict(cut=2, batch_norm=False, widths=(32, 64, 128), hidden=256,
                decoder_hidden=12)
CONVS_PER_BLOCK = 2


def conv_bn_relu(x: jax.Array, features: int, batch_norm: bool, train: bool,
                 name: str) -> jax.Array:
  """conv3x3 [+ BN] + ReLU; call inside a compact method."""
  if not batch_norm:
    return nn.relu(torch_conv(features, x, name=name)(x))
  x = conv_layer(features, kernel=3, padding=1, use_bias=False, name=name)(x)
  x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   name=f"{name}_bn")(x)
  return nn.relu(x)


def run_blocks(x: jax.Array, widths: Sequence[int], first: int, batch_norm: bool,
               train: bool) -> jax.Array:
  """Conv blocks numbered from `first` (0-based) so names do not depend on the cut."""
  for i, features in enumerate(widths, start=first):
    for j in range(CONVS_PER_BLOCK):
      x = conv_bn_relu(x, features, batch_norm, train, f"block{i + 1}_conv{j + 1}")
    x = max_pool2(x)
  return x


class VGGLower(nn.Module):
  """Client segment: the first `len(widths)` conv blocks."""
  widths: tuple[int, ...]
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return run_blocks(x, self.widths, 0, self.batch_norm, train)


class VGGUpper(nn.Module):
  """Server segment: the remaining conv blocks, flatten, dense hidden relu, dense K."""
  widths: tuple[int, ...]
  first_block: int
  num_classes: int
  hidden: int = 256
  batch_norm: bool = False
  features_only: bool = False  # a U-shaped split's body: fc1's features, no `fc2`

  @nn.compact
  def __call__(self, s: jax.Array, train: bool = False) -> jax.Array:
    x = run_blocks(s, self.widths, self.first_block, self.batch_norm, train)
    x = flatten(x)
    x = nn.relu(torch_dense(self.hidden, x, name="fc1")(x))
    if self.features_only:
      return x
    return torch_dense(self.num_classes, x, name="fc2")(x)


def build(num_classes: int, input_shape: tuple[int, int, int], *, cut: int,
          batch_norm: bool, widths: tuple[int, ...], hidden: int,
          decoder_hidden: int) -> SplitModel:
  widths = tuple(widths)
  if not widths or not all(isinstance(w, int) and w > 0 for w in widths):
    raise ValueError(f"vgg: override widths={widths!r} must be positive ints")
  if not 1 <= cut <= len(widths):
    raise ValueError(f"vgg: override cut={cut!r} must be in 1..{len(widths)}")
  h, w, c = input_shape
  return SplitModel(
      lower=VGGLower(widths[:cut], batch_norm),
      upper=VGGUpper(widths[cut:], cut, num_classes, hidden, batch_norm),
      decoder=Decoder((h, w), c, decoder_hidden),
      aux_head=AuxHead(num_classes), name="vgg")
