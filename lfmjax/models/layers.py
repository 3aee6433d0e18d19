"""Layers shared by the model zoo: PyTorch-default initialisation, the InfoPro decoder
and the auxiliary classifier head.

Every model's segments take NHWC float32 inputs and have the call signature
`__call__(self, x, train: bool = False)`. Input-feature counts are never configured:
flax infers them at `init`, so one model definition serves 28x28x1 and 32x32x3 inputs.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from lfmjax.models.patch_conv import PatchConv, add_bias

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


def conv_layer(features: int, *, kernel: int, stride: int = 1, padding: int,
               use_bias: bool = True, kernel_init=torch_kernel_init,
               bias_init=nn.initializers.zeros, pool: bool = False,
               name: str | None = None) -> nn.Module:
  """Every convolution of the zoo goes through here: a `PatchConv` (square kernel,
  explicit symmetric padding: flax's 'SAME' pads strided convs asymmetrically,
  PyTorch's `padding=1` does not). Its kernels are chosen by `patch_conv` itself, from
  the backend and from what is batched. `pool=True` appends PyTorch's MaxPool2d(2)
  (fused into the layer where that pays)."""
  return PatchConv(features, kernel, stride, padding, use_bias, kernel_init, bias_init,
                   pool=pool, name=name)


def torch_conv(features: int, x: jax.Array, *, kernel: int = 3, padding: int = 1,
               pool: bool = False, name: str | None = None) -> nn.Module:
  """A conv with PyTorch's default init (weights and bias U(-1/sqrt(fan_in), ..)).

  Call inside a compact method as `torch_conv(32, x)(x)`: `x` supplies the fan-in
  for the bias bound.
  """
  fan_in = kernel * kernel * x.shape[-1]
  return conv_layer(features, kernel=kernel, padding=padding,
                    bias_init=torch_bias_init(fan_in), pool=pool, name=name)


def torch_dense_fan_in(features: int, fan_in: int, *, name: str | None = None) -> nn.Dense:
  """nn.Dense with PyTorch's default nn.Linear init for a given fan-in."""
  return nn.Dense(features, kernel_init=torch_kernel_init,
                  bias_init=torch_bias_init(fan_in), name=name)


def torch_dense(features: int, x: jax.Array, *, name: str | None = None) -> nn.Dense:
  """nn.Dense with PyTorch's default nn.Linear init (fan-in taken from `x`)."""
  return nn.Dense(features, kernel_init=torch_kernel_init,
                  bias_init=torch_bias_init(x.shape[-1]), name=name)


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
  The upsampling and the first conv are computed together (`UpsampleConv`).
  PyTorch-default init, as the torch peer's decoder.
  """
  out_hw: tuple[int, int]
  out_channels: int
  hidden: int = 12

  @nn.compact
  def __call__(self, s: jax.Array, train: bool = False) -> jax.Array:
    h, w = self.out_hw
    if s.ndim == 2:
      logits = torch_dense(h * w * self.out_channels, s, name="fc")(s)
      return logits.reshape((s.shape[0], h, w, self.out_channels))
    x = nn.relu(UpsampleConv(self.hidden, self.out_hw, name="conv1")(s))
    return torch_conv(self.out_channels, x, name="conv2")(x)


def conv3x3_tap_matrices(out_n: int, in_n: int) -> np.ndarray:
  """1-D operators of "bilinear upsampling in_n -> out_n, then tap a of a 3-tap,
  zero-padded convolution": `M[a] = S_(a-1) @ U` (3 x out_n x in_n), U being the
  interpolation matrix of `bilinear_resize` and S_d the shift by d with zeros outside."""
  with jax.ensure_compile_time_eval():
    eye = jnp.eye(in_n, dtype=jnp.float32)
    u = np.asarray(jax.image.resize(eye, (out_n, in_n), method="bilinear"), np.float64)
  padded = np.pad(u, ((1, 1), (0, 0)))
  return np.stack([padded[a:a + out_n] for a in range(3)]).astype(np.float32)


def upsample_conv3x3(s_BxhxwxC: jax.Array, kernel_3x3xCxF: jax.Array,
                     out_hw: Sequence[int]) -> jax.Array:
  """conv3x3(bilinear_resize(s, out_hw), kernel) with padding 1, computed cheaply.

  Upsampling acts on space and the kernel on channels, both linearly, so they commute:
  the nine taps are applied to the small map first (one matmul to 9F channels at the
  low resolution), then each spatial axis is upsampled *and* its three taps summed by
  one small dense operator per axis (`conv3x3_tap_matrices`), so no 9F-channel map is
  ever formed at the high resolution. Equal to the direct form up to float rounding,
  with about (H*W)/(h*w) times fewer multiply-adds when F is small (the decoder's 12
  channels) and a fraction of the memory traffic.
  """
  b, h, w, c = s_BxhxwxC.shape
  f = kernel_3x3xCxF.shape[-1]
  taps_BxhxwxAxBxF = jnp.dot(
      s_BxhxwxC, kernel_3x3xCxF.transpose(2, 0, 1, 3).reshape(c, 9 * f)
  ).reshape(b, h, w, 3, 3, f)
  return _tap_upsampler(tuple(out_hw), (h, w, f))(taps_BxhxwxAxBxF)


def _upsample_taps(taps_BxhxwxAxBxF: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Each axis upsampled with its three taps summed (`conv3x3_tap_matrices`)."""
  _, h, w, _, _, _ = taps_BxhxwxAxBxF.shape
  rows_AxHxh = jnp.asarray(conv3x3_tap_matrices(out_hw[0], h))
  cols_AxWxw = jnp.asarray(conv3x3_tap_matrices(out_hw[1], w))
  y_BxHxwxBxF = jnp.einsum("aHi,biwacf->bHwcf", rows_AxHxh, taps_BxhxwxAxBxF)
  return jnp.einsum("cWj,bHjcf->bHWf", cols_AxWxw, y_BxHxwxBxF)


@functools.lru_cache(maxsize=None)
def _tap_upsampler(out_hw: tuple[int, int], hwf: tuple[int, int, int]):
  """`_upsample_taps` as a linear custom VJP whose forward and transpose fold any vmapped
  axes into the samples: it has no weights, and vmapped einsums over seeds and clients
  became transposes that cost more than the einsums (155 ms of a 1.6 s iteration at 4
  seeds x 10 clients x 32)."""
  h, w, f = hwf
  forward = _fold_batches(lambda t: _upsample_taps(t, out_hw))

  def transpose(g):
    taps = jax.ShapeDtypeStruct((g.shape[0], h, w, 3, 3, f), g.dtype)
    return jax.linear_transpose(lambda t: _upsample_taps(t, out_hw), taps)(g)[0]

  backward = _fold_batches(transpose)
  upsample = jax.custom_vjp(lambda t: forward(t))
  upsample.defvjp(lambda t: (forward(t), None), lambda _, g: (backward(g),))
  return upsample


def _fold_batches(fn):
  """fn (of one array, samples first) whose vmapped axes are folded into the samples."""
  op = jax.custom_batching.custom_vmap(fn)

  @op.def_vmap
  def rule(axis_size, in_batched, a):
    out = op(a.reshape((-1,) + a.shape[2:]))
    return out.reshape((axis_size, -1) + out.shape[1:]), True

  return op


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
    return add_bias(upsample_conv3x3(s, kernel, self.out_hw), bias)


class AuxHead(nn.Module):
  """Auxiliary classifier on the smashed data: global average pool (for 4-D s) + dense.

  The local classifier of LocSplitFed (Han et al., 2021) and InfoPro's I(s; y) term.
  """
  num_classes: int

  @nn.compact
  def __call__(self, s: jax.Array, train: bool = False) -> jax.Array:
    x = s.mean(axis=(1, 2)) if s.ndim == 4 else flatten(s)
    return torch_dense(self.num_classes, x, name="fc")(x)


class ClassifierHead(nn.Module):
  """An upper segment's last dense layer, held by the client: the head of a U-shaped
  split (Vepakomma et al., "Split learning for health", 2018), in which the server's
  upper is the body up to the features and the labels never leave the client.

  `layer` is the name the upper gives that dense layer, so the head's parameters are
  the upper's under the same name: moved back into the upper they make today's model.
  `kind`: 'torch' (PyTorch's nn.Linear init, the CNNs') or 'xavier' (the transformers'
  `LoRADense`). Per position for inputs with more axes (a language model's tokens).
  """
  num_classes: int
  layer: str = "fc"
  kind: str = "torch"

  @nn.compact
  def __call__(self, h: jax.Array, train: bool = False) -> jax.Array:
    if self.kind == "torch":
      return torch_dense(self.num_classes, h, name=self.layer)(h)
    from lfmjax.models.lora import LoRADense  # a leaf module; imported where it is used
    return LoRADense(self.num_classes, name=self.layer)(h)
