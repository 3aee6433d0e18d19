"""2-D convolutions for XLA:CPU that are fast whatever carries a client axis.

A split-learning round (Oh et al., LocFedMix-SL, WWW 2022) applies the same layer in
several situations, and which one it is shows in the batching, not in the code:

* one set of weights on one batch (a client inside SL's scan, the server, evaluation);
* one set of weights on every client's batch (a `vmap` over clients whose weights are
  not batched: the FedAvg shortcut, a segment shared by every client);
* weights per client (a `vmap` over clients, or over seeds, of the weights too: PSL,
  SGLR, Adam, anything without FedAvg after every iteration).

Vmapping XLA's convolution over a client axis of *weights* gives a grouped convolution,
which XLA:CPU computes at a few GFLOP/s. So on the CPU, `fast_conv2d` is a custom VJP
whose three parts (the forward, the input gradient and the weight gradient) are
`jax.custom_batching.custom_vmap` functions. Their batching rules pick the kernel from
what is batched: a batch axis on the data alone is folded into the samples (one large
convolution); a batch axis on the weights becomes a `lax.map` over it, each step running
the one-client kernel: XLA's convolution forward, the input gradient as a stride-1
convolution (the flipped kernel, or the stride's phases as output channels), and the
weight gradient as a convolution laid out the way XLA:CPU's fast (Eigen) path takes
it. A user's `jax.vmap` over seeds or clients, nested or not, gets the same kernels
with no flag to set. On other backends (GPU, TPU) `fast_conv2d` is XLA's own
convolution and its own gradients; `kernel_backend()` tells which.

On the CPU these kernels are fast only without XLA's YNNPACK convolutions, which on
this machine's AVX-512 cores run at half the speed of the Eigen path they replace
(conv3x3 32 -> 64 at 16x16, 256 samples: 16.5 ms against 7.3 ms, forward).
`compiler_options()` turns them off; every program lfmjax compiles passes it to
`jax.jit`, and a user who jits `round_step` inside their own program should too.

`PatchConv`, the layer the models use, names and lays out its parameters as
`flax.linen.Conv` does (`kernel` HWIO, `bias`): variables are interchangeable with flax's.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def kernel_backend() -> str:
  """'cpu' where the kernels of this module pay (XLA:CPU), 'xla' elsewhere: GPUs and
  TPUs run XLA's own convolutions, whose constants were not tuned on this machine."""
  return "cpu" if jax.default_backend() == "cpu" else "xla"


def compiler_options() -> dict[str, str]:
  """XLA options for `jax.jit(..., compiler_options=...)` of programs using these
  kernels: on the CPU no YNNPACK fusions (its convolutions are the slow ones here; its
  matmuls measured no faster than XLA's own), nothing elsewhere."""
  if kernel_backend() == "cpu":
    return {"xla_cpu_experimental_ynn_fusion_type": ""}
  return {}


def lax_conv2d(x_BxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array, stride: int = 1,
               padding: int = 0) -> jax.Array:
  """XLA's convolution, NHWC x HWIO, symmetric padding."""
  return jax.lax.conv_general_dilated(
      x_BxHxWxC, kernel_KxKxCxF, (stride, stride), ((padding, padding),) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Bytes of input per chunk of the fused conv + pool's window matmuls: small enough to
# stay in a core's L2 cache (memory bandwidth, not arithmetic, bounds a materialised
# patch matrix).
_CHUNK_BYTES = 1 << 20


def _chunk_size(n: int, target: int) -> int:
  """A chunk of about `target` samples, preferably dividing n (padding copies)."""
  target = max(1, min(n, target))
  divisor = max(d for d in range(1, target + 1) if n % d == 0)
  return divisor if 2 * divisor >= target else target


def _chunked(x_Bx: jax.Array, chunk: int) -> jax.Array:
  """B x ... -> (B / chunk) x chunk x ..., zero-padding B to a multiple of chunk."""
  pad = -x_Bx.shape[0] % chunk
  if pad:
    x_Bx = jnp.pad(x_Bx, ((0, pad),) + ((0, 0),) * (x_Bx.ndim - 1))
  return x_Bx.reshape((-1, chunk) + x_Bx.shape[1:])


def conv_weight_grad(x_BxHxWxC: jax.Array, dy_BxHoxWoxF: jax.Array, kernel: int,
                     stride: int, padding: int) -> jax.Array:
  """d(sum dy * conv(x, w))/dw (K x K x C x F) as one convolution in canonical layout.

  dw[i, j, c, f] = sum_{b, p, q} x[b, s p + i - pad, s q + j - pad, c] dy[b, p, q, f]
  is a convolution of x (channels as its batch, samples as its features) with dy
  (dilated by the stride) as the window. Transposed explicitly to C x H x W x B and
  Ho x Wo x B x F it is an NHWC x HWIO convolution, which XLA:CPU runs on its fast
  path; the weight gradient XLA derives itself keeps other layouts and took a generic
  path inside the per-client loop (2.35 s against 15 ms for conv2 of bench_cnn over 256
  samples). Against the former im2col + matmul over cache-sized chunks: 15.1 against
  20.3 ms for conv3x3 32 -> 64 at 16x16 over 256 samples, 0.55 against 1.43 ms for
  resnet16's 16 -> 16 at 32x32 over 8.
  """
  h, w = x_BxHxWxC.shape[1:3]
  ho, wo = dy_BxHoxWoxF.shape[1:3]
  # High padding: the window's reach past the input (negative where a stride skips
  # the input's last rows).
  pads = [(padding, kernel - 1 + (o - 1) * stride + 1 - n - padding)
          for n, o in ((h, ho), (w, wo))]
  dw_CxKxKxF = jax.lax.conv_general_dilated(
      x_BxHxWxC.transpose(3, 1, 2, 0), dy_BxHoxWoxF.transpose(1, 2, 0, 3), (1, 1), pads,
      rhs_dilation=(stride, stride), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return dw_CxKxKxF.transpose(1, 2, 0, 3)


def _forward(x, kernel, stride, padding):
  """The one-client forward on the CPU: XLA's convolution."""
  # The barrier materialises x: fused into the convolution, its producer (a pooling,
  # a ReLU) would be recomputed for every tap that reads it.
  x = jax.lax.optimization_barrier(x)
  return lax_conv2d(x, kernel, stride, padding)


def _input_grad(dy, kernel, x_hwc, stride, padding):
  """d(sum dy * conv(x, w))/dx for one client."""
  dy = jax.lax.optimization_barrier(dy)  # as in `_forward`
  k = kernel.shape[0]
  if stride == 1 and 2 * padding == k - 1:
    # The input gradient of a "same" convolution is the convolution of dy with the
    # flipped, transposed kernel. Written as such it keeps the HWIO kernel layout that
    # XLA:CPU sends to its fast convolution; the transpose XLA derives itself (HWOI)
    # took a generic path several times slower (1.6 s vs 0.45 s for conv3x3 64 -> 32
    # at 16x16 over 8000 samples).
    return lax_conv2d(dy, kernel[::-1, ::-1].transpose(0, 1, 3, 2), 1, padding)
  return _strided_input_grad(dy, kernel, x_hwc, stride, padding)


def _phase_taps(kernel: int, stride: int, padding: int) -> list[list[tuple[int, int]]]:
  """Per input phase r (rows s m + r), the (dy offset a, kernel tap t) pairs through
  which y[m + a] reads x[s m + r]: t = r + padding - s a, 0 <= t < kernel."""
  return [[(a, r + padding - stride * a) for a in range(-kernel, kernel + 1)
           if 0 <= r + padding - stride * a < kernel] for r in range(stride)]


def _strided_input_grad(dy_BxHoxWoxF, kernel_KxKxCxF, x_hwc, stride, padding):
  """The input gradient of a strided convolution as one stride-1 convolution of dy
  whose output channels are the stride x stride input phases, then depth to space:
  dx[s m + r] = sum_a dy[m + a] w[r + pad - s a].

  XLA's own transpose is an input-dilated convolution, which XLA:CPU runs on a generic
  path: resnet16's stage-2 conv1 (16 -> 32, stride 2, 8 samples) took 2.3 ms a client
  that way. Spreading dy out by zeros and convolving was slower still (XLA folds the
  spreading back). The phase kernel holds zeros where a phase has fewer taps (16 taps
  for a 3x3 kernel's 9), cheap at these sizes.
  """
  k, _, c, f = kernel_KxKxCxF.shape
  h, w, _ = x_hwc
  taps = _phase_taps(k, stride, padding)
  offsets = [a for phase in taps for a, _ in phase]
  lo, span = min(offsets), max(offsets) - min(offsets) + 1
  kernel_AxAxFxSxSxC = jnp.zeros((span, span, f, stride, stride, c), kernel_KxKxCxF.dtype)
  for rh, phase_h in enumerate(taps):
    for rw, phase_w in enumerate(taps):
      for ah, th in phase_h:
        for aw, tw in phase_w:
          kernel_AxAxFxSxSxC = kernel_AxAxFxSxSxC.at[ah - lo, aw - lo, :, rh, rw, :].set(
              kernel_KxKxCxF[th, tw].T)
  m_h, m_w = -(-h // stride), -(-w // stride)  # rows and columns of each phase
  ho, wo = dy_BxHoxWoxF.shape[1:3]
  pads = [(-lo, m - 1 + lo + span - 1 - (o - 1)) for m, o in ((m_h, ho), (m_w, wo))]
  phases = jax.lax.conv_general_dilated(
      dy_BxHoxWoxF, kernel_AxAxFxSxSxC.reshape(span, span, f, stride * stride * c),
      (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  b = dy_BxHoxWoxF.shape[0]
  dx = phases.reshape(b, m_h, m_w, stride, stride, c).transpose(0, 1, 3, 2, 4, 5)
  return dx.reshape(b, m_h * stride, m_w * stride, c)[:, :h, :w, :]


def _fold(a, batched: bool):
  """N x B x ... -> (N B) x ... where batched."""
  return a.reshape((-1,) + a.shape[2:]) if batched else a


def _batched_by_map(fn: Callable, weights: tuple[int, ...]):
  """`fn(*args)` (one client's arrays) with a batching rule that never lets `vmap` turn
  it into a grouped convolution.

  `weights` names the arguments that are weights. A batch axis on every data argument
  and on no weight is folded into the sample axis (one large call); otherwise the batch
  axis becomes a `lax.map` over it, each step one unbatched call of this same function
  (so a nested vmap, seeds over clients, maps twice). `fn` returns an array or a tuple
  of arrays, each with the samples on its leading axis.
  """
  op = jax.custom_batching.custom_vmap(fn)

  @op.def_vmap
  def rule(axis_size, in_batched, *args):
    data = [i for i in range(len(args)) if i not in weights]
    if data and all(in_batched[i] for i in data) and not any(in_batched[i] for i in weights):
      out = op(*(_fold(a, i in data) for i, a in enumerate(args)))
      unfold = lambda o: o.reshape((axis_size, -1) + o.shape[1:])
      return jax.tree.map(unfold, out), jax.tree.map(lambda _: True, out)
    batched = [a for a, b in zip(args, in_batched) if b]

    def one(sliced):
      it = iter(sliced)
      return op(*(next(it) if b else a for a, b in zip(args, in_batched)))

    out = jax.lax.map(one, batched)
    return out, jax.tree.map(lambda _: True, out)

  return op


@functools.lru_cache(maxsize=None)
def _cpu_conv(stride: int, padding: int, kernel: int):
  """The convolution of one (stride, padding, kernel size) as a custom VJP whose
  forward, input gradient and weight gradient each batch by `_batched_by_map`."""
  forward = _batched_by_map(lambda x, w: _forward(x, w, stride, padding), weights=(1,))
  weight_grad = _batched_by_map(
      lambda x, dy: conv_weight_grad(x, dy, kernel, stride, padding), weights=(0, 1))

  @functools.lru_cache(maxsize=None)
  def input_grad_of(x_hwc):
    return _batched_by_map(lambda dy, w: _input_grad(dy, w, x_hwc, stride, padding),
                           weights=(1,))

  return _assemble_vjp(lambda x, w: (forward(x, w), ()), input_grad_of, weight_grad)


def _assemble_vjp(forward, input_grad_of, weight_grad):
  """conv(x, w) as a custom VJP of its batched pieces. `forward(x, w) -> (y, saved)`
  with `saved` a tuple kept for the backward (the pooling's window index);
  `input_grad_of(x_hwc)(dy, *saved, w)` and `weight_grad(x, dy, *saved)`."""
  conv = jax.custom_vjp(lambda x, w: forward(x, w)[0])

  def fwd(x, w):
    y, saved = forward(x, w)
    return y, (x, w, saved)

  def bwd(residuals, dy):
    x, w, saved = residuals
    dx = input_grad_of(tuple(x.shape[1:]))(dy, *saved, w)
    return dx, weight_grad(x, dy, *saved).astype(w.dtype)

  conv.defvjp(fwd, bwd)
  return conv


def cpu_conv2d(x_BxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array, stride: int = 1,
               padding: int = 0) -> jax.Array:
  """XLA:CPU's fast convolution for one client, batched by `lax.map` over weights."""
  return _cpu_conv(stride, padding, kernel_KxKxCxF.shape[0])(x_BxHxWxC, kernel_KxKxCxF)


# ---------------------------------------------------------------- conv3x3 + max-pool 2
# A 3x3 "same" convolution of an input with few channels (an image's 3) followed by
# PyTorch's MaxPool2d(2) is one matmul per pooling window: the window's four outputs
# read a 4x4 patch of the input, so patches of 16 C values (space to depth) times a
# 16C x 4F matrix (the kernel placed at the four offsets) give all four, and the pool
# takes their maximum. Against im2col's K = 9 C = 27 contraction with F = 32 outputs, the
# matmul is 48 x 128, and the full-resolution output never leaves the cache: conv1 of
# bench_cnn (3 -> 32 at 32x32) forward for 320 samples took 28 ms as a chunked im2col
# and 43 ms as XLA's convolution + pooling.


def _window_patches(x_BxHxWxC: jax.Array) -> jax.Array:
  """The 4x4 input patch of every 2x2 pooling window of a padded-by-1 3x3 convolution:
  B x H/2 x W/2 x 16C, in (block row, block column, row in block, column in block,
  channel) order. Space to depth first (2x2 blocks of the padded input), then the 2x2
  blocks of blocks: four shifted views, not sixteen strided ones."""
  b, h, w, c = x_BxHxWxC.shape
  x = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  s2d = x.reshape(b, h // 2 + 1, 2, w // 2 + 1, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      b, h // 2 + 1, w // 2 + 1, 4 * c)
  return jnp.concatenate([s2d[:, i:i + h // 2, j:j + w // 2, :] for i in range(2)
                          for j in range(2)], axis=-1)


def _window_kernel(kernel_3x3xCxF: jax.Array) -> jax.Array:
  """16C x 4F, rows in `_window_patches`' order: column block t = 2u + v is the kernel
  at offset (u, v) of the 4x4 patch."""
  c, f = kernel_3x3xCxF.shape[2:]
  placed = [jnp.pad(kernel_3x3xCxF, ((u, 1 - u), (v, 1 - v), (0, 0), (0, 0)))
            for u in range(2) for v in range(2)]
  big = jnp.stack(placed, axis=3)  # patch row p = 2 bi + pi, column q = 2 bj + pj
  return big.reshape(2, 2, 2, 2, c, 4 * f).transpose(0, 2, 1, 3, 4, 5).reshape(
      16 * c, 4 * f)


def _first_max(v0, v1, v2, v3):
  """The maximum of a 2x2 window's four values (row-major) and the position of the
  first one holding it, as PyTorch's pooling: strict comparisons keep the earlier on
  ties."""
  top, bottom = jnp.maximum(v0, v1), jnp.maximum(v2, v3)
  top_idx = jnp.where(v1 > v0, 1, 0).astype(jnp.int8)
  bottom_idx = jnp.where(v3 > v2, 3, 2).astype(jnp.int8)
  return jnp.maximum(top, bottom), jnp.where(bottom > top, bottom_idx, top_idx)


def _chunk_of_windows(n: int, h: int, w: int, c: int) -> int:
  return _chunk_size(n, _CHUNK_BYTES // (4 * (h // 2) * (w // 2) * 16 * c))


def _pool_conv_forward(x, kernel):
  """(max_pool2(conv3x3(x)), (window index,)) for one client, a chunk of samples at a
  time."""
  n, h, w, c = x.shape
  f = kernel.shape[-1]
  big = _window_kernel(kernel)

  def chunk(xc):
    y = jnp.dot(_window_patches(xc), big).reshape(xc.shape[0], h // 2, w // 2, 4, f)
    return _first_max(*(y[..., t, :] for t in range(4)))

  pooled, idx = jax.lax.map(chunk, _chunked(x, _chunk_of_windows(n, h, w, c)))
  unchunk = lambda a: a.reshape((-1,) + a.shape[2:])[:n]
  return unchunk(pooled), (unchunk(idx),)


def _routed(g_BxhxwxF, idx_BxhxwxF):
  """The pooled gradient routed to the window position that won: B x h x w x 4F."""
  return jnp.stack([jnp.where(idx_BxhxwxF == t, g_BxhxwxF, 0.0) for t in range(4)], axis=3
                   ).reshape(g_BxhxwxF.shape[:3] + (4 * g_BxhxwxF.shape[-1],))


def _pool_conv_weight_grad(x, g, idx):
  """d/dkernel for one client: patches^T routed-g, accumulated over chunks, folded from
  the 16C x 4F window kernel back to 3x3xCxF."""
  n, h, w, c = x.shape
  f = g.shape[-1]
  chunk = _chunk_of_windows(n, h, w, c)

  def add_chunk(acc, xgi):
    xc, gc, ic = xgi
    return acc + jnp.dot(_window_patches(xc).reshape(-1, 16 * c).T,
                         _routed(gc, ic).reshape(-1, 4 * f)), None

  acc, _ = jax.lax.scan(add_chunk, jnp.zeros((16 * c, 4 * f), x.dtype),
                        (_chunked(x, chunk), _chunked(g, chunk), _chunked(idx, chunk)))
  # Back to patch (row, column) order, then each offset's 3x3 block summed.
  acc = acc.reshape(2, 2, 2, 2, c, 4, f).transpose(0, 2, 1, 3, 4, 5, 6).reshape(
      4, 4, c, 4, f)
  return sum(acc[u:u + 3, v:v + 3, :, 2 * u + v, :] for u in range(2) for v in range(2))


def _pool_conv_input_grad(g, idx, kernel, x_hwc):
  """d/dx for one client: the routed gradient through the window matmul, scattered back
  through the (linear) patch extraction."""
  big = _window_kernel(kernel)
  d_patches = jnp.dot(_routed(g, idx), big.T)
  x = jax.ShapeDtypeStruct((g.shape[0],) + x_hwc, g.dtype)
  (dx,) = jax.linear_transpose(_window_patches, x)(d_patches)
  return dx


@functools.lru_cache(maxsize=None)
def _cpu_pool_conv():
  """conv3x3 (padding 1) + max_pool2 as a custom VJP of `_batched_by_map` pieces."""
  forward = _batched_by_map(_pool_conv_forward, weights=(1,))
  weight_grad = _batched_by_map(_pool_conv_weight_grad, weights=(0, 1, 2))

  @functools.lru_cache(maxsize=None)
  def input_grad_of(x_hwc):
    return _batched_by_map(lambda g, idx, k: _pool_conv_input_grad(g, idx, k, x_hwc),
                           weights=(2,))

  return _assemble_vjp(forward, input_grad_of, weight_grad)


def pooled_conv3x3(x_BxHxWxC: jax.Array, kernel_3x3xCxF: jax.Array) -> jax.Array:
  """max_pool2(conv3x3(x, kernel, padding 1)) as `_cpu_pool_conv` (H and W even)."""
  return _cpu_pool_conv()(x_BxHxWxC, kernel_3x3xCxF)


# The fused conv + pool pays where the contraction k*k*C is this small (an image's 3
# channels): there the convolution is bound by memory, not arithmetic.
_SMALL_CONTRACTION = 32


def _fuses_pool(x_shape, kernel_shape, stride: int, padding: int) -> bool:
  k, _, c, _ = kernel_shape
  return (kernel_backend() == "cpu" and k == 3 and stride == 1 and padding == 1
          and k * k * c <= _SMALL_CONTRACTION and x_shape[1] % 2 == 0
          and x_shape[2] % 2 == 0)


def fast_conv2d(x_BxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array, stride: int = 1,
                padding: int = 0) -> jax.Array:
  """The convolution the models use: `cpu_conv2d` on the CPU, XLA's elsewhere."""
  if kernel_backend() == "cpu":
    return cpu_conv2d(x_BxHxWxC, kernel_KxKxCxF, stride, padding)
  return lax_conv2d(x_BxHxWxC, kernel_KxKxCxF, stride, padding)


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
  return _first_max(*_window_views(x))


def _max_pool2_bwd(idx, g):
  b, h, w, c = g.shape
  pieces = [jnp.where(idx == t, g, jnp.zeros_like(g)) for t in range(4)]
  dx = jnp.stack(pieces, axis=3).reshape(b, h, w, 2, 2, c)  # (i, j) = divmod(t, 2)
  return (dx.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c),)


_max_pool2_even.defvjp(_max_pool2_fwd, _max_pool2_bwd)


class PatchConv(nn.Module):
  """Drop-in for `nn.Conv` (square kernel, symmetric padding).

  Computed by `fast_conv2d`, whose kernels are chosen by what is batched and by the
  backend (with `pool=True` on the CPU, a 3x3 conv of few input channels fuses the
  pooling: `pooled_conv3x3`); there is no switch to set. With `pool=True` it returns
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
  pool: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32).astype(x.dtype)
    if self.pool and _fuses_pool(x.shape, shape, self.stride, self.padding):
      y = pooled_conv3x3(x, kernel)
    else:
      y = fast_conv2d(x, kernel, self.stride, self.padding)
      if self.pool:
        y = max_pool2(y)
    if self.use_bias:
      y = add_bias(y, self.param("bias", self.bias_init, (self.features,),
                                 jnp.float32).astype(x.dtype))
    return y
