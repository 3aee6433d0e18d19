"""`tiny_cnn` and `mlp`: very small split models for fast unit tests of the round.

Not from a paper; they only need to compile in a blink. The decoder is InfoPro's
recipe (Wang et al., ICLR 2021) as in LocFedMix-SL (Oh et al., WWW 2022).
PyTorch-default init throughout.
"""
from __future__ import annotations

import jax
import flax.linen as nn

from lfmjax.models.layers import AuxHead, Decoder, flatten, torch_conv, torch_dense
from lfmjax.models.patch_conv import max_pool2
from lfmjax.models.util import SplitModel

TINY_DEFAULTS = dict(width=4, decoder_hidden=12)
MLP_DEFAULTS = dict(hidden=128)


class TinyLower(nn.Module):
  """conv3x3(C -> width) relu maxpool2."""
  width: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = torch_conv(self.width, x, name="conv1")
    return max_pool2(nn.relu(conv(x)))


class FlattenDense(nn.Module):
  """flatten, dense -> K: the tiny CNN's server segment and the MLP's."""
  num_classes: int
  features_only: bool = False  # a U-shaped split's body: the flattened s, no `fc`

  @nn.compact
  def __call__(self, s: jax.Array, train: bool = False) -> jax.Array:
    x = flatten(s)
    if self.features_only:
      return x
    return torch_dense(self.num_classes, x, name="fc")(x)


class MLPLower(nn.Module):
  """flatten, dense -> hidden, relu (smashed data is B x hidden)."""
  hidden: int = 128

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = flatten(x)
    return nn.relu(torch_dense(self.hidden, x, name="fc1")(x))


def build_tiny(num_classes: int, input_shape: tuple[int, int, int], *, width: int,
               decoder_hidden: int) -> SplitModel:
  h, w, c = input_shape
  return SplitModel(lower=TinyLower(width), upper=FlattenDense(num_classes),
                    decoder=Decoder((h, w), c, decoder_hidden),
                    aux_head=AuxHead(num_classes), name="tiny_cnn")


def build_mlp(num_classes: int, input_shape: tuple[int, int, int], *,
              hidden: int) -> SplitModel:
  h, w, c = input_shape
  # s is 2-D, so the decoder is a single dense layer to the H*W*C logits.
  return SplitModel(lower=MLPLower(hidden), upper=FlattenDense(num_classes),
                    decoder=Decoder((h, w), c), aux_head=AuxHead(num_classes), name="mlp")
