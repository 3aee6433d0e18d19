"""Layers shared by the model zoo: PyTorch-default initialisation, the InfoPro decoder
and the auxiliary classifier head.

Every model's segments take NHWC float32 inputs and have the call signature
`__call__(self, x, train: bool = False)`. Input-feature counts are never configured:
flax infers them at `init`, so one model definition serves 28x28x1 and 32x32x3 inputs.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from lfmjax.models.patch_conv import PatchConv

# PyTorch's default for nn.Conv2d / nn.Linear weights is kaiming_uniform_(a=sqrt(5)),
# i.e. U(-b, b) with b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + 5)):
# b = 1 / sqrt(fan_in). As a variance scaling that is scale 1/3, uniform, fan_in
# (flax's fan_in for a conv kernel k x k x in x out is k * k * in, as PyTorch's).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# He-normal on fan_out (std sqrt(2 / (k * k * out))), the init of InfoPro's and
# SGLR's CIFAR ResNets. Plain normal, not flax's truncated `he_normal`.
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_bias_init(fan_in: int):
  """PyTorch's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  A flax bias initialiser only sees the bias shape, so the fan-in is closed over.
  """
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# How convolutions are computed: 'patch' (default: im2col + matmul, `patch_conv.PatchConv`)
# or 'lax' (flax's nn.Conv). Vmapped over per-client weights, 'lax' becomes a grouped
# convolution whose weight gradient XLA:CPU computes slowly; measured on one bench_cnn
# PSL round (10 clients x 32, 28x28x1, 2 CPU cores): 188 ms with 'patch', 519 ms with
# 'lax'. Both have the same parameters (kernel HWIO, bias): variables are interchangeable.
CONV_IMPLS = ("lax", "patch")


def conv_layer(features: int, *, kernel: int, stride: int = 1, padding: int,
               use_bias: bool = True, kernel_init=torch_kernel_init,
               bias_init=nn.initializers.zeros, impl: str = "patch",
               name: str | None = None) -> nn.Module:
  """Every convolution of the zoo goes through here: square kernel, explicit
  symmetric padding (flax's 'SAME' pads strided convs asymmetrically, PyTorch's
  `padding=1` does not), and the implementation switch."""
  if impl == "patch":
    return PatchConv(features, kernel, stride, padding, use_bias, kernel_init, bias_init,
                     name=name)
  if impl != "lax":
    raise ValueError(f"conv_impl={impl!r} must be one of {', '.join(CONV_IMPLS)}")
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding),) * 2, use_bias=use_bias,
                 kernel_init=kernel_init, bias_init=bias_init, name=name)


def torch_conv(features: int, x: jax.Array, *, kernel: int = 3, padding: int = 1,
               impl: str = "patch", name: str | None = None) -> nn.Module:
  """A conv with PyTorch's default init (weights and bias U(-1/sqrt(fan_in), ..)).

  Call inside a compact method as `torch_conv(32, x)(x)`: `x` supplies the fan-in
  for the bias bound.
  """
  fan_in = kernel * kernel * x.shape[-1]
  return conv_layer(features, kernel=kernel, padding=padding,
                    bias_init=torch_bias_init(fan_in), impl=impl, name=name)


def torch_dense(features: int, x: jax.Array, *, name: str | None = None) -> nn.Dense:
  """nn.Dense with PyTorch's default nn.Linear init (fan-in taken from `x`)."""
  return nn.Dense(features, kernel_init=torch_kernel_init,
                  bias_init=torch_bias_init(x.shape[-1]), name=name)


def max_pool2(x_BxHxWxC: jax.Array) -> jax.Array:
  """PyTorch's MaxPool2d(2): 2x2 windows, stride 2, odd sizes floor (7 -> 3).

  Written as a reshape and a max rather than `nn.max_pool`: XLA:CPU's gradient of the
  latter (select-and-scatter) is several times slower. The gradient differs only for
  exact ties within a window, which it shares among them instead of picking one.
  """
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC[:, :h // 2 * 2, :w // 2 * 2, :]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def flatten(x: jax.Array) -> jax.Array:
  """Flattens all but the batch axis (NHWC order; PyTorch flattens NCHW, which is a
  fixed permutation of the same features and so irrelevant when training from scratch)."""
  return x.reshape((x.shape[0], -1))


def bilinear_resize(x_BxHxWxC: jax.Array, out_hw: Sequence[int]) -> jax.Array:
  """Bilinear resize to `out_hw` with half-pixel centres.

  For upsampling this equals PyTorch's `F.interpolate(mode='bilinear',
  align_corners=False)`: source coordinate (i + 0.5) * in / out - 0.5, with samples
  outside the image clamped to the edge (jax renormalises the triangle kernel over the
  in-range pixels, which gives the edge pixel the same weight 1).
  Difference: when *down*sampling, `jax.image.resize` antialiases (widens the kernel)
  while PyTorch's default does not; the decoders here only ever upsample.
  """
  b, _, _, c = x_BxHxWxC.shape
  return jax.image.resize(x_BxHxWxC, (b, out_hw[0], out_hw[1], c), method="bilinear")


class Decoder(nn.Module):
  """InfoPro's reconstruction decoder (Wang et al., ICLR 2021), used by LocFedMix-SL's
  local MI regulariser ("Localize", Oh et al., WWW 2022).

  For 4-D smashed data: bilinear upsampling to the input's H x W, conv3x3 to `hidden`
  (12) channels, ReLU, conv3x3 to the input's channels. Returns reconstruction
  *logits*; the loss applies the sigmoid. For 2-D smashed data (the MLP) there is no
  spatial map to upsample, so a single dense layer produces the H*W*C logits.
  PyTorch-default init, as the torch peer's decoder.
  """
  out_hw: tuple[int, int]
  out_channels: int
  hidden: int = 12
  conv_impl: str = "patch"

  @nn.compact
  def __call__(self, s: jax.Array, train: bool = False) -> jax.Array:
    h, w = self.out_hw
    if s.ndim == 2:
      logits = torch_dense(h * w * self.out_channels, s, name="fc")(s)
      return logits.reshape((s.shape[0], h, w, self.out_channels))
    if self.conv_impl == "patch":
      x = UpsampleConv(self.hidden, self.out_hw, name="conv1")(s)
    else:
      x = bilinear_resize(s, self.out_hw)
      x = torch_conv(self.hidden, x, impl=self.conv_impl, name="conv1")(x)
    x = nn.relu(x)
    return torch_conv(self.out_channels, x, impl=self.conv_impl, name="conv2")(x)


def upsample_conv3x3(s_BxhxwxC: jax.Array, kernel_3x3xCxF: jax.Array,
                     out_hw: Sequence[int]) -> jax.Array:
  """conv3x3(bilinear_resize(s, out_hw), kernel) with padding 1, computed cheaply.

  Upsampling acts on space and the kernel on channels, both linearly, so they commute:
  each of the nine taps is applied to the small map first (one matmul to 9F channels at
  the low resolution), then the 9F-channel result is upsampled and the taps are summed
  at their shifts. Equal to the direct form up to float rounding, with about
  (H*W)/(h*w) times fewer multiply-adds when F is small (the decoder's 12 channels).
  """
  b, h, w, c = s_BxhxwxC.shape
  f = kernel_3x3xCxF.shape[-1]
  taps = jnp.dot(s_BxhxwxC, kernel_3x3xCxF.transpose(2, 0, 1, 3).reshape(c, 9 * f))
  up = jnp.pad(bilinear_resize(taps, out_hw), ((0, 0), (1, 1), (1, 1), (0, 0)))
  height, width = out_hw
  out = 0.0
  for i in range(3):
    for j in range(3):
      tap = (i * 3 + j) * f
      out = out + up[:, i:i + height, j:j + width, tap:tap + f]
  return out


class UpsampleConv(nn.Module):
  """Bilinear upsampling then conv3x3 (padding 1) with PyTorch's default init, in the
  factored form of `upsample_conv3x3`; parameters as `nn.Conv`'s (kernel HWIO, bias)."""
  features: int
  out_hw: tuple[int, int]

  @nn.compact
  def __call__(self, s: jax.Array) -> jax.Array:
    fan_in = 9 * s.shape[-1]
    kernel = self.param("kernel", torch_kernel_init, (3, 3, s.shape[-1], self.features))
    bias = self.param("bias", torch_bias_init(fan_in), (self.features,))
    return upsample_conv3x3(s, kernel, self.out_hw) + bias


class AuxHead(nn.Module):
  """Auxiliary classifier on the smashed data: global average pool (for 4-D s) + dense.

  The local classifier of LocSplitFed (Han et al., 2021) and InfoPro's I(s; y) term.
  """
  num_classes: int

  @nn.compact
  def __call__(self, s: jax.Array, train: bool = False) -> jax.Array:
    x = s.mean(axis=(1, 2)) if s.ndim == 4 else flatten(s)
    return torch_dense(self.num_classes, x, name="fc")(x)
