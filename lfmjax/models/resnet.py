"""`resnet16`: SGLR's InfoPro-style CIFAR ResNet (Pal et al., "Server-Side Local
Gradient Averaging and Learning Rate Acceleration for Scalable Split Learning",
FL-AAAI-22 / arXiv 2112.05929; architecture of InfoPro's CIFAR ResNets, Wang et al.,
ICLR 2021).

conv1 3x3 (16, no bias) + BN + ReLU; stage 1: 2 BasicBlocks of 16 channels; stage 2: 2
blocks of 32, stride 2; stage 3: 3 blocks of 64, stride 2; global average pooling;
dense to the classes. A BasicBlock is conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (a
1x1 conv + BN where the shape changes, else the identity), then ReLU.

The cut (override `cut_stage`, default 2) puts conv1 and stages 1..cut_stage on the
client. Weight layers (conv/dense, not counting shortcut 1x1 convs), as SPEC.md counts:
cut 1: client 5, server 11; cut 2: client 9, server 7; cut 3: client 15, server 1
(pool + dense only). Other override: `decoder_hidden` (12).

Init as InfoPro's code: convs He-normal on fan_out (std sqrt(2 / (k*k*out))), BN
scale 1 and bias 0, the dense layer PyTorch's default. BatchNorm: momentum 0.9 in
flax's convention (PyTorch's 0.1), epsilon 1e-5, statistics in 'batch_stats'. One
difference from PyTorch: flax updates the running variance with the biased batch
variance (PyTorch uses the unbiased one); negligible except for tiny batches.
"""
from __future__ import annotations

import jax
import flax.linen as nn

from lfmjax.models.batch_norm import BatchNorm
from lfmjax.models.layers import AuxHead, Decoder, conv_layer, he_normal_fan_out, torch_dense
from lfmjax.models.util import SplitModel

# (channels, blocks, stride of the first block) per stage.
STAGES = ((16, 2, 1), (32, 2, 2), (64, 3, 2))
DEFAULTS = dict(cut_stage=2, decoder_hidden=12)


def conv(features: int, kernel: int, stride: int, name: str) -> nn.Module:
  """Bias-free conv with PyTorch's padding (k // 2 each side) and He-normal init."""
  return conv_layer(features, kernel=kernel, stride=stride, padding=kernel // 2,
                    use_bias=False, kernel_init=he_normal_fan_out, name=name)


def batch_norm(train: bool, name: str) -> BatchNorm:
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      name=name)


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU (He et al., 2016)."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    f = self.features
    y = nn.relu(batch_norm(train, "bn1")(conv(f, 3, self.stride, "conv1")(x)))
    y = batch_norm(train, "bn2")(conv(f, 3, 1, "conv2")(y))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != f:
      shortcut = batch_norm(train, "shortcut_bn")(
          conv(f, 1, self.stride, "shortcut_conv")(x))
    return nn.relu(y + shortcut)


def run_stages(x: jax.Array, stages: range, train: bool) -> jax.Array:
  """Applies the given stages (0-based indices into STAGES); call inside compact."""
  for i in stages:
    features, blocks, stride = STAGES[i]
    for b in range(blocks):
      x = BasicBlock(features, stride if b == 0 else 1,
                     name=f"stage{i + 1}_block{b}")(x, train)
  return x


class ResNetLower(nn.Module):
  """Client segment: conv1 + BN + ReLU, stages 1..cut_stage."""
  cut_stage: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.relu(batch_norm(train, "bn1")(conv(16, 3, 1, "conv1")(x)))
    return run_stages(x, range(self.cut_stage), train)


class ResNetUpper(nn.Module):
  """Server segment: stages cut_stage+1..3, global average pooling, dense."""
  num_classes: int
  cut_stage: int = 2
  features_only: bool = False  # a U-shaped split's body: the pooled features, no `fc`

  @nn.compact
  def __call__(self, s: jax.Array, train: bool = False) -> jax.Array:
    stages = range(self.cut_stage, len(STAGES))
    x = run_stages(s, stages, train).mean(axis=(1, 2))
    if self.features_only:
      return x
    return torch_dense(self.num_classes, x, name="fc")(x)


def build(num_classes: int, input_shape: tuple[int, int, int], *, cut_stage: int,
          decoder_hidden: int) -> SplitModel:
  if cut_stage not in (1, 2, 3):
    raise ValueError(f"resnet16: override cut_stage={cut_stage!r} must be 1, 2 or 3")
  h, w, c = input_shape
  return SplitModel(lower=ResNetLower(cut_stage),
                    upper=ResNetUpper(num_classes, cut_stage),
                    decoder=Decoder((h, w), c, decoder_hidden),
                    aux_head=AuxHead(num_classes), name="resnet16")
