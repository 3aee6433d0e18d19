"""`bench_cnn`: the speed-benchmark CNN of `bench/torch_reference.py`, layer for layer.

lower:   conv3x3(C->32, pad 1) relu maxpool2, conv3x3(32->64) relu maxpool2
upper:   conv3x3(64->128) relu maxpool2, flatten, dense ->256 relu, dense ->K
decoder: bilinear upsample to H x W, conv3x3(64->12) relu, conv3x3(12->C)
For 32x32x3 input s is 8x8x64 and the first dense layer has 2048 inputs; for 28x28
inputs the pools floor (28 -> 14 -> 7 -> 3) and it has 3*3*128 = 1152. Every conv and
dense layer is initialised as PyTorch's defaults (weights and biases
U(-1/sqrt(fan_in), 1/sqrt(fan_in))) so training behaves like the torch peer. The
model itself is the benchmark's, not a published one; the decoder is InfoPro's
(Wang et al., ICLR 2021) as used by LocFedMix-SL (Oh et al., WWW 2022).
"""
from __future__ import annotations

import jax
import flax.linen as nn

from lfmjax.models.layers import (AuxHead, Decoder, conv_layer, flatten, torch_bias_init,
                                  torch_conv, torch_dense_fan_in)
from lfmjax.models.patch_conv import max_pool2
from lfmjax.models.util import SplitModel

DEFAULTS = dict(decoder_hidden=12)


class BenchLower(nn.Module):
  """Client segment: two conv-relu-pool stages (C -> 32 -> 64 channels).

  Computed as relu(pool(conv(x))): the same numbers as torch's relu-then-pool (max
  commutes with the monotone relu), with the relu on a quarter of the values.
  """

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.relu(torch_conv(32, x, pool=True, name="conv1")(x))
    return nn.relu(torch_conv(64, x, pool=True, name="conv2")(x))


class BenchUpper(nn.Module):
  """Server segment: conv-relu-pool (-> 128), flatten, dense 256 relu, dense K.

  Split as `head(stem(s))` with `stem` = conv3, affine in s: the round then computes
  SmashMix's mixed batches from the stem outputs of the real ones (`models.util`).
  `in_channels` and `flat_features` fix the layers' fan-ins (PyTorch's init) up front.
  """
  num_classes: int
  in_channels: int = 64
  flat_features: int = 2048
  features_only: bool = False  # a U-shaped split's body: fc1's features, no `fc2`

  def setup(self):
    self.conv3 = conv_layer(128, kernel=3, padding=1,
                            bias_init=torch_bias_init(9 * self.in_channels))
    self.fc1 = torch_dense_fan_in(256, self.flat_features)
    if not self.features_only:
      self.fc2 = torch_dense_fan_in(self.num_classes, 256)

  def stem(self, s: jax.Array, train: bool = False) -> jax.Array:
    return self.conv3(s)

  def head(self, z: jax.Array, train: bool = False) -> jax.Array:
    x = nn.relu(self.fc1(flatten(nn.relu(max_pool2(z)))))
    return x if self.features_only else self.fc2(x)

  def __call__(self, s: jax.Array, train: bool = False) -> jax.Array:
    return self.head(self.stem(s, train), train)


def build(num_classes: int, input_shape: tuple[int, int, int], *,
          decoder_hidden: int) -> SplitModel:
  h, w, c = input_shape
  flat_features = (h // 2 // 2 // 2) * (w // 2 // 2 // 2) * 128  # three floor-ing pools
  return SplitModel(lower=BenchLower(),
                    upper=BenchUpper(num_classes, 64, flat_features),
                    decoder=Decoder((h, w), c, decoder_hidden),
                    aux_head=AuxHead(num_classes), name="bench_cnn")
