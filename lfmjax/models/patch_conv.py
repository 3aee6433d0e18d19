"""A 2-D convolution written as shifted slices and one matmul, for per-client weights.

Vmapping `lax.conv_general_dilated` over a client axis of *weights* lowers to a grouped
convolution, whose weight gradient XLA:CPU computes very slowly. Written as im2col
(the k*k shifted views of the padded input, concatenated on the channel axis) followed
by a matmul, the vmapped convolution becomes a batched matmul in the forward and in
both gradients, which XLA handles well on every backend. Parameters are named and laid
out as `flax.linen.Conv`'s (`kernel` HWIO, `bias`), so the two are interchangeable.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


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
  """Cross-correlation (as lax.conv) through im2col + matmul."""
  k, _, c, f = kernel_KxKxCxF.shape
  patches = im2col(x_BxHxWxC, k, stride, padding)
  return jnp.dot(patches, kernel_KxKxCxF.reshape(k * k * c, f))


class PatchConv(nn.Module):
  """Drop-in for `nn.Conv` (square kernel, symmetric padding) computed by `conv2d`."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  use_bias: bool = True
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Any] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    y = conv2d(x, kernel.astype(x.dtype), self.stride, self.padding)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(x.dtype)
    return y
