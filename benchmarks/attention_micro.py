"""Where the split ViT's time goes (BUILD.md, Speed): one attention layer and one dense
layer of `configs/cifar_vit.py` at 256 images, forward and backward, in JAX and in
PyTorch, on this machine.

    python benchmarks/attention_micro.py            # about a minute

Attention: 256 x 65 tokens (64 patches and the class token), 4 heads of 16, float32,
`jax.nn.dot_product_attention` (what `lfmjax.models.transformer` calls), the same as three
batched `dot_general`s with a hand-written backward (the variant BUILD.md's "Tried, not
kept" reports), and torch's `F.scaled_dot_product_attention` (the peer's). Dense: the
16,640 x 64 activations by 64 x N kernels. Prints milliseconds a call, medians of
10 timed calls after a warm-up.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

B, T, N, H = 256, 65, 4, 16


def timed(fn, *args, calls: int = 10) -> float:
  """Median milliseconds of one call of `fn(*args)`, its JAX outputs waited for (torch
  runs eagerly: its calls return when done)."""
  fn(*args)
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def _nt(a, b):  # G x T x H, G x S x H -> G x T x S
  return lax.dot_general(a, b, (((2,), (2,)), ((0,), (0,))))


def _nn(a, b):  # G x T x S, G x S x H -> G x T x H
  return lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))))


def _tn(a, b):  # G x S x T, G x S x H -> G x T x H
  return lax.dot_general(a, b, (((1,), (1,)), ((0,), (0,))))


@jax.custom_vjp
def _core(q, k, v):
  return _nn(jax.nn.softmax(_nt(q, k), -1), v)


def _core_fwd(q, k, v):
  p = jax.nn.softmax(_nt(q, k), -1)
  return _nn(p, v), (q, k, v, p)


def _core_bwd(res, do):
  q, k, v, p = res
  dp = _nt(do, v)
  ds = p * (dp - jnp.sum(dp * p, -1, keepdims=True))
  return _nn(ds, k), _tn(ds, q), _tn(p, do)


_core.defvjp(_core_fwd, _core_bwd)


def custom_attention(q, k, v):
  """B x T x N x H attention as batched matmuls over B*N heads, hand-written backward."""
  b, t, n, h = q.shape
  heads = lambda x: x.transpose(0, 2, 1, 3).reshape(b * n, t, h)
  y = _core(heads(q) * h ** -0.5, heads(k), heads(v))
  return y.reshape(b, n, t, h).transpose(0, 2, 1, 3)


def jax_rows() -> list[tuple[str, float, float]]:
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, dy = (jax.random.normal(key, (B, T, N, H)) for key in keys)
  rows = []
  for name, attn in (("jax.nn.dot_product_attention", jax.nn.dot_product_attention),
                     ("custom_vjp batched dot_general", custom_attention)):
    fwd = jax.jit(attn)
    both = jax.jit(lambda q, k, v, dy, attn=attn: jax.vjp(attn, q, k, v)[1](dy))
    rows.append((f"attention {name}", timed(fwd, q, k, v), timed(both, q, k, v, dy)))
  for width in (64, 128):
    x = jax.random.normal(keys[0], (B * T, 64))
    w = jax.random.normal(keys[1], (64, width))
    dy = jax.random.normal(keys[2], (B * T, width))
    fwd = jax.jit(lambda x, w: x @ w)
    both = jax.jit(lambda x, w, dy: jax.vjp(lambda x, w: x @ w, x, w)[1](dy))
    rows.append((f"dense 64 -> {width} (jax)", timed(fwd, x, w), timed(both, x, w, dy)))
  return rows


def torch_rows() -> list[tuple[str, float, float]]:
  try:
    import torch
  except ImportError:
    return []
  torch.manual_seed(0)
  q, k, v = (torch.randn(B, N, T, H, requires_grad=True) for _ in range(3))
  dy = torch.randn(B, N, T, H)
  sdpa = torch.nn.functional.scaled_dot_product_attention
  rows = []

  def attn_fwd():
    with torch.no_grad():
      sdpa(q, k, v)

  rows.append(("attention torch scaled_dot_product_attention", timed(attn_fwd),
               timed(lambda: sdpa(q, k, v).backward(dy))))
  for width in (64, 128):
    x = torch.randn(B * T, 64, requires_grad=True)
    w = torch.randn(64, width, requires_grad=True)
    dy = torch.randn(B * T, width)

    def dense_fwd():
      with torch.no_grad():
        x @ w

    rows.append((f"dense 64 -> {width} (torch)", timed(dense_fwd),
                 timed(lambda: (x @ w).backward(dy))))
  return rows


def main() -> None:
  print(f"{'what':<48} {'forward ms':>11} {'fwd + bwd ms':>13}")
  for name, fwd, both in jax_rows() + torch_rows():
    print(f"{name:<48} {fwd:>11.2f} {both:>13.2f}")


if __name__ == "__main__":
  main()
