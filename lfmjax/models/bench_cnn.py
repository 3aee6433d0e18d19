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

from lfmjax.models.layers import AuxHead, Decoder, flatten, max_pool2, torch_conv, torch_dense
from lfmjax.models.util import SplitModel

DEFAULTS = dict(decoder_hidden=12, conv_impl="patch")


class BenchLower(nn.Module):
  """Client segment: two conv-relu-pool stages (C -> 32 -> 64 channels)."""
  conv_impl: str = "patch"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = max_pool2(nn.relu(torch_conv(32, x, impl=self.conv_impl, name="conv1")(x)))
    return max_pool2(nn.relu(torch_conv(64, x, impl=self.conv_impl, name="conv2")(x)))


class BenchUpper(nn.Module):
  """Server segment: conv-relu-pool (-> 128), flatten, dense 256 relu, dense K."""
  num_classes: int
  conv_impl: str = "patch"

  @nn.compact
  def __call__(self, s: jax.Array, train: bool = False) -> jax.Array:
    x = flatten(max_pool2(nn.relu(torch_conv(128, s, impl=self.conv_impl, name="conv3")(s))))
    x = nn.relu(torch_dense(256, x, name="fc1")(x))
    return torch_dense(self.num_classes, x, name="fc2")(x)


def build(num_classes: int, input_shape: tuple[int, int, int], *,
          decoder_hidden: int, conv_impl: str) -> SplitModel:
  h, w, c = input_shape
  return SplitModel(lower=BenchLower(conv_impl), upper=BenchUpper(num_classes, conv_impl),
                    decoder=Decoder((h, w), c, decoder_hidden, conv_impl),
                    aux_head=AuxHead(num_classes), name="bench_cnn")
