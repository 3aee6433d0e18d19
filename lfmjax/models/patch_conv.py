"""2-D convolutions that are fast on XLA:CPU whether the weights are per client or shared.

Two situations arise in a split-learning round (Oh et al., LocFedMix-SL, WWW 2022):

* Per-client weights, vmapped over the client axis (PSL, SGLR, anything without FedAvg
  every iteration). Vmapping `lax.conv_general_dilated` over a client axis of *weights*
  lowers to a grouped convolution, which XLA:CPU computes slowly in the forward and
  very slowly in the weight gradient. `conv2d` below is im2col (the k*k shifted views of
  the padded input, concatenated on the channel axis) followed by a matmul, so the
  vmapped convolution becomes a batched matmul in the forward and both gradients.
* Weights shared by every client (the round's FedAvg shortcut, the server's segment,
  evaluation). Then XLA's own convolution is the fastest forward and input gradient,
  but its weight gradient is slow; `shared_conv2d` keeps XLA's forward and input
  gradient and computes the weight gradient as im2col + matmul in cache-sized chunks
  (custom VJP, `conv_weight_grad`).

`PatchConv(impl='auto')` picks between them by the context: inside
`with shared_weights():` (set by the round while it traces code whose weights have no
client axis) it uses `shared_conv2d`, elsewhere `conv2d`. Both compute the same
function; only the speed differs. Parameters are named and laid out as
`flax.linen.Conv`'s (`kernel` HWIO, `bias`), so the implementations are interchangeable.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

_SHARED_WEIGHTS = contextvars.ContextVar("lfmjax_shared_weights", default=False)


@contextlib.contextmanager
def _flag(var: contextvars.ContextVar, enabled: bool):
  token = var.set(enabled)
  try:
    yield
  finally:
    var.reset(token)


def shared_weights(enabled: bool = True):
  """Within this block (at trace time), 'auto' convolutions assume unbatched weights."""
  return _flag(_SHARED_WEIGHTS, enabled)


def weights_are_shared() -> bool:
  return _SHARED_WEIGHTS.get()


_PARTITIONED = contextvars.ContextVar("lfmjax_partitioned", default=False)


def partitioned(enabled: bool = True):
  """Within this block (at trace time) the sample axis may be split over devices: the
  cache-sized chunk loops below become one chunk, since a loop over a split axis would
  make the compiler gather it onto every device."""
  return _flag(_PARTITIONED, enabled)


def is_partitioned() -> bool:
  return _PARTITIONED.get()


def im2col(x_BxHxWxC: jax.Array, kernel: int, stride: int, padding: int) -> jax.Array:
  """The k*k shifted views of x, concatenated on channels in (kh, kw, c) order."""
  x = jnp.pad(x_BxHxWxC, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  h_out = (x.shape[1] - kernel) // stride + 1
  w_out = (x.shape[2] - kernel) // stride + 1
  views = [x[:, i:i + stride * (h_out - 1) + 1:stride, j:j + stride * (w_out - 1) + 1:stride, :]
           for i in range(kernel) for j in range(kernel)]
  return views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)


def conv2d(x_BxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array, stride: int = 1,
           padding: int = 0) -> jax.Array:
  """Cross-correlation (as lax.conv) through im2col + matmul: for per-client weights."""
  k, _, c, f = kernel_KxKxCxF.shape
  patches = im2col(x_BxHxWxC, k, stride, padding)
  return jnp.dot(patches, kernel_KxKxCxF.reshape(k * k * c, f))


def lax_conv2d(x_BxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array, stride: int = 1,
               padding: int = 0) -> jax.Array:
  """XLA's convolution, NHWC x HWIO, symmetric padding."""
  return jax.lax.conv_general_dilated(
      x_BxHxWxC, kernel_KxKxCxF, (stride, stride), ((padding, padding),) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Bytes of im2col patches per chunk of `conv_weight_grad` and `chunked_conv2d`: small enough to stay in
# a core's L2 cache (memory bandwidth, not arithmetic, bounds a materialised im2col).
_WEIGHT_GRAD_CHUNK_BYTES = 1 << 20


def _chunk_size(n: int, target: int) -> int:
  """A chunk of about `target` samples, preferably dividing n (padding copies); all n
  when `partitioned()`."""
  if is_partitioned():
    return n
  target = max(1, min(n, target))
  divisor = max(d for d in range(1, target + 1) if n % d == 0)
  return divisor if 2 * divisor >= target else target


def _chunked(x_Bx: jax.Array, chunk: int) -> jax.Array:
  """B x ... -> (B / chunk) x chunk x ..., zero-padding B to a multiple of chunk."""
  pad = -x_Bx.shape[0] % chunk
  if pad:
    x_Bx = jnp.pad(x_Bx, ((0, pad),) + ((0, 0),) * (x_Bx.ndim - 1))
  return x_Bx.reshape((-1, chunk) + x_Bx.shape[1:])


def chunked_conv2d(x_BxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array, stride: int = 1,
                   padding: int = 0) -> jax.Array:
  """`conv2d` (im2col + matmul) a cache-sized chunk of samples at a time (`lax.map`).

  For inputs with few channels (an image's 3), whose im2col is a large copy for little
  arithmetic and which XLA's own convolution handles poorly: conv3x3 3 -> 32 at 32x32
  for 800 samples takes 53 ms this way on 2 CPU cores, 92 ms with `lax_conv2d`.
  """
  n = x_BxHxWxC.shape[0]
  k, _, c, f = kernel_KxKxCxF.shape
  rows = x_BxHxWxC.shape[1] * x_BxHxWxC.shape[2] // (stride * stride)
  chunk = _chunk_size(n, _WEIGHT_GRAD_CHUNK_BYTES // (4 * rows * k * k * c))
  y = jax.lax.map(lambda xc: conv2d(xc, kernel_KxKxCxF, stride, padding),
                  _chunked(x_BxHxWxC, chunk))
  return y.reshape((-1,) + y.shape[2:])[:n]


# XLA's convolution is slow when k*k*C, the contraction, is this small.
_SMALL_CONTRACTION = 32


def conv_weight_grad(x_BxHxWxC: jax.Array, dy_BxHxWxF: jax.Array, kernel: int,
                     stride: int, padding: int) -> jax.Array:
  """d(sum dy * conv(x, w))/dw (K x K x C x F) as im2col + matmul, a chunk at a time.

  A `lax.scan` over chunks of samples accumulates patches^T dy, so the patches of a
  chunk are written to and read back from cache instead of memory: on 2 CPU cores,
  conv3x3 32 -> 64 at 16x16 for 800 samples takes 66 ms this way, 155 ms with one
  whole im2col, 268 ms with XLA's own weight-gradient convolution. For a "same"
  stride-1 convolution with fewer output than input channels, the patches are taken of
  dy instead (sum_q x[q] dy[q - t], the same sum reindexed): fewer channels to copy.
  """
  n, c, f = x_BxHxWxC.shape[0], x_BxHxWxC.shape[-1], dy_BxHxWxF.shape[-1]
  patches_of_dy = stride == 1 and 2 * padding == kernel - 1 and f < c
  rows = dy_BxHxWxF.shape[1] * dy_BxHxWxF.shape[2]
  cols = kernel * kernel * (f if patches_of_dy else c)
  chunk = _chunk_size(n, _WEIGHT_GRAD_CHUNK_BYTES // (4 * rows * cols))
  x = _chunked(x_BxHxWxC, chunk)  # zero samples of padding add nothing to the sum
  dy = _chunked(dy_BxHxWxF, chunk)

  def add_chunk(acc, chunk_xy):
    xc, dyc = chunk_xy
    if patches_of_dy:
      return acc + jnp.dot(xc.reshape(-1, c).T,
                           im2col(dyc, kernel, 1, padding).reshape(-1, cols)), None
    return acc + jnp.dot(im2col(xc, kernel, stride, padding).reshape(-1, cols).T,
                         dyc.reshape(-1, f)), None

  shape = (c, cols) if patches_of_dy else (cols, f)
  acc, _ = jax.lax.scan(add_chunk, jnp.zeros(shape, jnp.result_type(x, dy)), (x, dy))
  if patches_of_dy:  # acc[c, (u_h, u_w, f)] with u = K - 1 - tap
    acc = acc.reshape(c, kernel, kernel, f)[:, ::-1, ::-1, :]
    return acc.transpose(1, 2, 0, 3)
  return acc.reshape(kernel, kernel, c, f)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def shared_conv2d(x_BxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array, stride: int = 1,
                  padding: int = 0) -> jax.Array:
  """XLA's convolution (`chunked_conv2d` for few input channels) with the weight
  gradient of `conv_weight_grad`: for unbatched weights."""
  return _shared_forward(x_BxHxWxC, kernel_KxKxCxF, stride, padding)


def _shared_forward(x, kernel, stride, padding):
  # The barrier materialises x: fused into the convolution, its producer (a pooling,
  # a ReLU) would be recomputed for every tap that reads it.
  x = jax.lax.optimization_barrier(x)
  k, _, c, _ = kernel.shape
  if k * k * c <= _SMALL_CONTRACTION:
    return chunked_conv2d(x, kernel, stride, padding)
  return lax_conv2d(x, kernel, stride, padding)


def _shared_conv2d_fwd(x, kernel, stride, padding):
  return _shared_forward(x, kernel, stride, padding), (x, kernel)


def _shared_conv2d_bwd(stride, padding, residuals, dy):
  x, kernel = residuals
  dy = jax.lax.optimization_barrier(dy)  # as in `_shared_forward`
  k = kernel.shape[0]
  if stride == 1 and 2 * padding == k - 1:
    # The input gradient of a "same" convolution is the convolution of dy with the
    # flipped, transposed kernel. Written as such it keeps the HWIO kernel layout that
    # XLA:CPU sends to its fast convolution; the transpose XLA derives itself (HWOI)
    # took a generic path several times slower (1.6 s vs 0.45 s for conv3x3 64 -> 32
    # at 16x16 over 8000 samples).
    dx = lax_conv2d(dy, kernel[::-1, ::-1].transpose(0, 1, 3, 2), 1, padding)
  else:
    (dx,) = jax.linear_transpose(lambda x: lax_conv2d(x, kernel, stride, padding), x)(dy)
  dkernel = conv_weight_grad(x, dy, kernel.shape[0], stride, padding)
  return dx, dkernel.astype(kernel.dtype)


shared_conv2d.defvjp(_shared_conv2d_fwd, _shared_conv2d_bwd)


@jax.custom_vjp
def add_bias(y_Bx: jax.Array, bias_F: jax.Array) -> jax.Array:
  """y + bias over the last axis, whose bias gradient is a matrix-vector product.

  The gradient of a broadcast add is a sum over every other axis; XLA:CPU rewrites
  such large reductions into padded reduce-windows that can be very slow (271 ms for
  the decoder's 1000 x 32 x 32 x 12 on 2 cores); ones^T g is one pass.
  """
  return y_Bx + bias_F


def _add_bias_fwd(y, bias):
  return y + bias, None


def _add_bias_bwd(_, g):
  g_MxF = g.reshape(-1, g.shape[-1])
  return g, jnp.dot(jnp.ones((g_MxF.shape[0],), g.dtype), g_MxF)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def max_pool2(x_BxHxWxC: jax.Array) -> jax.Array:
  """PyTorch's MaxPool2d(2): 2x2 windows, stride 2, odd sizes floor (7 -> 3).

  Its gradient goes to the first maximum of each window (row-major), as PyTorch's
  does. Written as four strided views and a custom VJP rather than `nn.max_pool`
  (whose select-and-scatter gradient XLA:CPU computes slowly) or a reshape + max
  (whose gradient recounts ties over the full-size input): the forward keeps only a
  one-byte window index, and the backward writes the full-size gradient in one pass.
  """
  b, h, w, c = x_BxHxWxC.shape
  return _max_pool2_even(x_BxHxWxC[:, :h // 2 * 2, :w // 2 * 2, :])


def _window_views(x_BxHxWxC):
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(b, h // 2, 2, w // 2, 2, c)
  return [x[:, :, i, :, j, :] for i in range(2) for j in range(2)]


@jax.custom_vjp
def _max_pool2_even(x_BxHxWxC: jax.Array) -> jax.Array:
  return _max_pool2_fwd(x_BxHxWxC)[0]


def _max_pool2_fwd(x):
  v0, v1, v2, v3 = _window_views(x)
  top, bottom = jnp.maximum(v0, v1), jnp.maximum(v2, v3)
  # The first maximum: strict comparisons keep the earlier view on ties.
  top_idx = jnp.where(v1 > v0, 1, 0).astype(jnp.int8)
  bottom_idx = jnp.where(v3 > v2, 3, 2).astype(jnp.int8)
  idx = jnp.where(bottom > top, bottom_idx, top_idx)
  return jnp.maximum(top, bottom), idx


def _max_pool2_bwd(idx, g):
  b, h, w, c = g.shape
  pieces = [jnp.where(idx == t, g, jnp.zeros_like(g)) for t in range(4)]
  dx = jnp.stack(pieces, axis=3).reshape(b, h, w, 2, 2, c)  # (i, j) = divmod(t, 2)
  return (dx.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c),)


_max_pool2_even.defvjp(_max_pool2_fwd, _max_pool2_bwd)


class PatchConv(nn.Module):
  """Drop-in for `nn.Conv` (square kernel, symmetric padding).

  impl='auto' uses `shared_conv2d` inside `shared_weights()` and `conv2d` elsewhere;
  impl='patch' always uses `conv2d`. With `pool=True` it returns
  max_pool2(conv(x) + bias), computed as max_pool2(conv(x)) + bias: the same numbers
  (adding a constant commutes with max, rounding included), the bias added to a
  quarter of the values.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  use_bias: bool = True
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Any] = nn.initializers.zeros
  impl: str = "auto"
  pool: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32).astype(x.dtype)
    if self.impl == "auto" and weights_are_shared():
      y = shared_conv2d(x, kernel, self.stride, self.padding)
    else:
      y = conv2d(x, kernel, self.stride, self.padding)
    if self.pool:
      y = max_pool2(y)
    if self.use_bias:
      y = add_bias(y, self.param("bias", self.bias_init, (self.features,),
                                 jnp.float32).astype(x.dtype))
    return y
