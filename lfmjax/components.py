"""The pure components of parallel split learning, written for one client.

LocFedMix-SL (Oh et al., "LocFedMix-SL: Localize, Federate, and Mix for Improved
Scalability, Convergence, and Latency in Split Learning", WWW 2022) is a composition of
a few small functions: the client forward, the local mutual-information regulariser
("Localize", after InfoPro, Wang et al., ICLR 2021), the server's loss on real smashed
data, SmashMix (manifold mixup across clients, "Mix") and FedAvg of the client segments
("Federate"). Each function here takes one client's arrays; `round.py` lifts them with
`jax.vmap` over the leading client axis. Shape suffixes name the axes: C clients,
B batch, N mixed batches per client, K classes, S the smashed-data sample shape.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits_BxK: jax.Array, labels_B: jax.Array) -> jax.Array:
  """Mean cross-entropy against integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxK, labels_B).mean()


def soft_cross_entropy(logits_BxK: jax.Array, targets_BxK: jax.Array) -> jax.Array:
  """Mean cross-entropy against soft labels (SmashMix's mixed one-hots)."""
  return optax.softmax_cross_entropy(logits_BxK, targets_BxK).mean()


def reconstruction_loss(logits_BxHxWxC: jax.Array, x01_BxHxWxC: jax.Array,
                        kind: str) -> jax.Array:
  """InfoPro's reconstruction loss R(x, sigmoid(decoder(s))), a lower bound on I(x; s).

  `kind="bce"` is binary cross-entropy against x in [0, 1] (InfoPro's choice, computed
  from logits for stability); `kind="mse"` is the mean squared error of the sigmoid;
  `kind="ce"` (token inputs, x01 the tokens) the cross-entropy of the input tokens.
  """
  if kind == "bce":
    return optax.sigmoid_binary_cross_entropy(logits_BxHxWxC, x01_BxHxWxC).mean()
  if kind == "mse":
    return jnp.mean((jax.nn.sigmoid(logits_BxHxWxC) - x01_BxHxWxC) ** 2)
  if kind == "ce":  # token inputs: the decoder predicts each input token back
    return cross_entropy(logits_BxHxWxC, x01_BxHxWxC.astype(jnp.int32))
  raise ValueError(f"reconstruction loss kind {kind!r} is not 'bce', 'mse' or 'ce'")


def mix_partners(key: jax.Array, num_clients: int, num_mixed: int) -> jax.Array:
  """Partner client j != k for each client k and mixed batch, drawn uniformly.

  With one client the partner is the client itself (its batch is permuted anyway).
  Returns int32 `partner_CxN`.
  """
  if num_clients == 1:
    return jnp.zeros((1, num_mixed), jnp.int32)
  offset_CxN = jax.random.randint(key, (num_clients, num_mixed), 1, num_clients)
  return (jnp.arange(num_clients)[:, None] + offset_CxN) % num_clients


def present_partners(key: jax.Array, present_C: jax.Array, num_mixed: int) -> jax.Array:
  """`mix_partners` among the present clients only (a dropped participant's upload never
  arrives): for each client k a partner j != k drawn uniformly from the present ones,
  k itself when it is the only one. int32 `partner_CxN`."""
  num_clients = present_C.shape[0]
  noise_CxNxC = jax.random.uniform(key, (num_clients, num_mixed, num_clients))
  others_CxC = present_C[None, :] & ~jnp.eye(num_clients, dtype=bool)
  alone_C = ~jnp.any(others_CxC, axis=1)
  eligible_CxC = others_CxC | (alone_C[:, None] & jnp.eye(num_clients, dtype=bool))
  scores = jnp.where(eligible_CxC[:, None, :], noise_CxNxC, -1.0)
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def smashmix_draws(key: jax.Array, num_clients: int, batch: int, num_mixed: int,
                   alpha: float, present_C: jax.Array | None = None, dtype=jnp.float32):
  """SmashMix's random draws (SPEC 4), which the server makes: for client k's n-th mixed
  batch a partner client j != k (`mix_partners`; among the present ones with
  `present_C`), a permutation of j's batch and a per-sample lambda ~ Beta(alpha, alpha).
  Sample b of that batch mixes k's sample b with j's sample perm[b] as lam[b] : 1 - lam[b].
  Returns (partner_CxN int32, perm_CxNxB int32, lam_CxNxB); a pure function of `key`."""
  key_partner, key_mix = jax.random.split(key)
  partner_CxN = (mix_partners(key_partner, num_clients, num_mixed) if present_C is None
                 else present_partners(key_partner, present_C, num_mixed))
  keys_CxN = jax.random.split(key_mix, (num_clients, num_mixed))

  def one(k):
    key_perm, key_lam = jax.random.split(k)
    return (jax.random.permutation(key_perm, batch),
            jax.random.beta(key_lam, alpha, alpha, (batch,), dtype=dtype))

  perm_CxNxB, lam_CxNxB = jax.vmap(jax.vmap(one))(keys_CxN)
  return partner_CxN, perm_CxNxB.astype(jnp.int32), lam_CxNxB


def mix_rows(draws, a_CxBx: jax.Array) -> jax.Array:
  """The mixed batches of `a` (smashed data, or what the server computes from it):
  a~_knb = lam a_kb + (1 - lam) a_j,perm[b]. Returns a_mix_CxNxBx."""
  partner_CxN, perm_CxNxB, lam_CxNxB = draws
  partner_a = a_CxBx[partner_CxN[:, :, None], perm_CxNxB]  # C x N x B x ...
  lam = lam_CxNxB.reshape(lam_CxNxB.shape + (1,) * (a_CxBx.ndim - 2)).astype(a_CxBx.dtype)
  return lam * a_CxBx[:, None] + (1.0 - lam) * partner_a


def mix_labels(draws, y_CxB: jax.Array, num_classes: int, dtype=jnp.float32) -> jax.Array:
  """The same convex combination of the one-hot labels: y_mix_CxNxBxK. Labels with
  more axes than the batch (a language model's next tokens, B x T) mix position by
  position with their sample's lambda (C x N x B x T x K)."""
  partner_CxN, perm_CxNxB, lam_CxNxB = draws
  onehot = jax.nn.one_hot(y_CxB, num_classes, dtype=dtype)
  return mix_rows(draws, onehot)


def smashmix(key: jax.Array, s_CxBxS: jax.Array, y_CxB: jax.Array, num_classes: int,
             alpha: float, num_mixed: int, present_C: jax.Array | None = None):
  """SmashMix for every client: `num_mixed` mixed batches each (manifold mixup, SPEC 4).

  Returns (s_mix_CxNxBxS, y_mix_CxNxBxK). Random draws come from `key` alone
  (`smashmix_draws`), so the result is a pure function of (key, s, y). `present_C`:
  partners are drawn among these clients alone (`present_partners`); None: among all.
  """
  num_clients, batch = y_CxB.shape[:2]
  draws = smashmix_draws(key, num_clients, batch, num_mixed, alpha, present_C,
                         s_CxBxS.dtype)
  return mix_rows(draws, s_CxBxS), mix_labels(draws, y_CxB, num_classes, s_CxBxS.dtype)


def _per_client(weights_C: jax.Array, a_Cx: jax.Array) -> jax.Array:
  return weights_C.astype(a_Cx.dtype).reshape((-1,) + (1,) * (a_Cx.ndim - 1))


def scale_clients(weights_C: jax.Array, a_Cx: jax.Array) -> jax.Array:
  """w_k * a_k for every client k (the weights broadcast over a's other axes); exactly
  0 for a client of weight 0, whatever its values (NaN included): a client without
  data contributes nothing."""
  return only_present(weights_C, _per_client(weights_C, a_Cx) * a_Cx)


def weighted_sum(weights_C: jax.Array, a_Cx: jax.Array) -> jax.Array:
  """sum_k w_k a_k over the leading client axis (`scale_clients`)."""
  return jnp.sum(scale_clients(weights_C, a_Cx), axis=0)


def per_weight(weights_C: jax.Array, a_Cx: jax.Array) -> jax.Array:
  """a_k / w_k for every client, 0 where w_k = 0 (no division by zero)."""
  w = _per_client(weights_C, a_Cx)
  return only_present(weights_C, a_Cx / jnp.where(w > 0, w, 1))


def only_present(weights_C: jax.Array, a_Cx: jax.Array) -> jax.Array:
  """a with the rows of weight-0 clients zeroed: what the server receives from them."""
  return jnp.where(_per_client(weights_C, a_Cx) > 0, a_Cx, jnp.zeros_like(a_Cx))


def select_tree(take_new: jax.Array, new, old):
  """new where the scalar `take_new`, else old (a skipped turn of a weight-0 client)."""
  return jax.tree.map(lambda a, b: jnp.where(take_new, a, b), new, old)


def weighted_mean(tree_C, weights_C: jax.Array):
  """Tree-wise weighted mean over the leading client axis: sum_k w_k leaf_k."""
  return jax.tree.map(lambda leaf: weighted_sum(weights_C, leaf), tree_C)


def fedavg(tree_C, weights_C: jax.Array):
  """FedAvg: every client's copy replaced by the delta-weighted mean (SPEC 8)."""
  num_clients = weights_C.shape[0]
  return jax.tree.map(lambda m: jnp.broadcast_to(m, (num_clients,) + m.shape),
                      weighted_mean(tree_C, weights_C))
