"""The U-shaped split: the clients hold the model's last layer and the loss, so the
server never receives a label (Vepakomma et al., "Split learning for health", 2018;
the label-protecting configuration that Li et al., ICLR 2022, and Liu et al., arXiv
2203.05222, attack through the gradients).

An iteration of client k: lower -> s_k (upload) -> the server's body -> h_k (download)
-> the client's head and loss with its labels -> dL_k/dh_k (upload, "the returned
gradient") -> the body's backward -> g_k = dL_k/ds_k (download) -> the lower's update.
The server's functions here take no labels: the client-side loss is a function of the
heads and the features the server sends, with the labels bound on the clients' side
(`head_objective`).

SmashMix on a U-shaped split (SPEC is silent; BUILD.md "U-shaped split"): the server
mixes smashed data as in LocFedMix-SL, s~ = lam s_k + (1 - lam) s_j[perm], and sends
the mixed features h~ = body(s~) to both clients whose samples they mix. Client k
scores h~ with its head against its own label, weighted lam; client j with its head
against its own, weighted 1 - lam; the server adds the two returned gradients. Soft
cross-entropy is linear in the target, so where the two heads are the same (FedAvg'd)
this is exactly the mixed loss CE(head(h~), lam y_k + (1 - lam) y_j) of the server-
labelled round, and no client learns another's label, nor the server any.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lfmjax import components
from lfmjax.algorithms import RoundConfig
from lfmjax.lifting import apply_segment
from lfmjax.models import SplitModel
from lfmjax.state import ServerState, server_optimizer


def per_sample_ce(logits_BxK: jax.Array, y_B: jax.Array) -> jax.Array:
  """Cross-entropy of each sample (a language model's: the mean over its positions)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxK, y_B)
  return ce.reshape(ce.shape[0], -1).mean(axis=1)


def make_head_loss(model: SplitModel):
  """One client's loss on the features it receives: (head, h_BxF, y_B) -> (L, acc)."""

  def head_loss(head_params, h_BxF, y_B):
    logits, _ = apply_segment(model.head, head_params, {}, h_BxF, train=True)
    return components.cross_entropy(logits, y_B), jnp.mean(jnp.argmax(logits, -1) == y_B)

  return head_loss


def make_mixed_share(model: SplitModel):
  """A client's share of some mixed batches: sum over them of mean_b w_b CE(head(h~_b),
  y_b), with w = lam for the client whose batch it is and 1 - lam for the partner."""

  def share(head_params, h_mix_NxBxF, y_NxB, w_NxB):
    flat = h_mix_NxBxF.reshape((-1,) + h_mix_NxBxF.shape[2:])
    logits, _ = apply_segment(model.head, head_params, {}, flat, train=True)
    ce = per_sample_ce(logits, y_NxB.reshape((-1,) + y_NxB.shape[2:]))
    return jnp.sum(w_NxB.reshape(-1) * ce) / w_NxB.shape[1]

  return share


def head_objective(model: SplitModel, y_CxB, weights_C, draws):
  """The clients' side as one function of what the server sends: `objective(heads_C,
  h_CxBxF, h_mix_CxNxBxF | None) -> (sum_k delta_k (L_k + L~_k), (loss_real, loss_mix,
  accuracy))`, the labels and the mixing weights bound here, on the clients' side."""
  head_loss = make_head_loss(model)
  share = make_mixed_share(model)

  def objective(heads_C, h_CxBxF, h_mix):
    loss_C, acc_C = jax.vmap(head_loss)(heads_C, h_CxBxF, y_CxB)
    loss_real = components.weighted_sum(weights_C, loss_C)
    loss_mix = jnp.zeros((), loss_real.dtype)
    if h_mix is not None:
      partner_CxN, perm_CxNxB, lam_CxNxB = draws
      num_mixed = lam_CxNxB.shape[1]
      y_own = jnp.broadcast_to(y_CxB[:, None], (y_CxB.shape[0], num_mixed) + y_CxB.shape[1:])
      own_C = jax.vmap(share)(heads_C, h_mix, y_own, lam_CxNxB)
      # Each mixed batch's partner share, scored by the partner's head: the batches are
      # gathered to the partner's head, not the heads to the batches' owners.
      heads_CxN = jax.tree.map(lambda a: a[partner_CxN], heads_C)
      y_partner = y_CxB[partner_CxN[:, :, None], perm_CxNxB]
      partner_CxN_loss = jax.vmap(jax.vmap(
          lambda head, h, y, w: share(head, h[None], y[None], w[None])))(
              heads_CxN, h_mix, y_partner, 1.0 - lam_CxNxB)
      loss_mix = components.weighted_sum(weights_C, (own_C + partner_CxN_loss.sum(1))
                                         / num_mixed)
    return loss_real + loss_mix, (loss_real, loss_mix, jnp.mean(acc_C))

  return objective


def make_single_server(cfg: RoundConfig, model: SplitModel, body_forward):
  """The single server's step with the heads on the clients (see the module): body
  forward on every upload (and SmashMix's mixed batches), the clients' head losses and
  returned gradients, the body's backward and step. Returns the step with
  `server.make_single_server`'s signature; `body_forward` is its
  `make_server_forward`."""
  from lfmjax.server import mix_draws  # the server module imports this one
  opt_s = server_optimizer(cfg)

  def single(server, s_CxBxS, y_CxB, weights_C, key_mix, heads_C, keys_C=None):
    draws = mix_draws(cfg, key_mix, s_CxBxS, weights_C)

    def body(params, s):
      return body_forward(params, server.stats, s, draws)

    (h_CxBxF, h_mix), body_vjp, stats = jax.vjp(body, server.params, s_CxBxS, has_aux=True)
    # What each client computes from the features it receives, and returns.
    objective = head_objective(model, y_CxB, weights_C, draws)
    (_, (loss_real, loss_mix, acc)), (dheads_C, dh_CxBxF, dh_mix) = jax.value_and_grad(
        objective, argnums=(0, 1, 2), has_aux=True)(heads_C, h_CxBxF, h_mix)
    if keys_C is not None:
      dh_CxBxF, dh_mix = defend_returned(cfg, keys_C, weights_C, dh_CxBxF, dh_mix)
    grads, ds_CxBxS = body_vjp((dh_CxBxF, dh_mix))
    updates, opt_state = opt_s.update(grads, server.opt_state, server.params)
    new_server = ServerState(optax.apply_updates(server.params, updates), stats, opt_state)
    # Per client, the gradients of its own loss (d-weighted sums over delta_k).
    g = components.per_weight(weights_C, ds_CxBxS)
    head_grads_C = jax.tree.map(lambda a: components.per_weight(weights_C, a), dheads_C)
    return new_server, g, {"loss_real": loss_real, "loss_mix": loss_mix,
                           "train_accuracy": acc}, head_grads_C

  return single


def defend_returned(cfg: RoundConfig, keys_C, weights_C, dh_CxBxF, dh_mix):
  """The returned gradients as the clients send them (`RoundConfig.defend_gradient`):
  each the gradient of the client's own loss (of a mixed batch's mean share), defended,
  then weighted back into the server's sum. A mixed batch's two shares are defended as
  one message (noise of one sigma on their sum)."""
  def defended(keys, d, scale):
    own = components.per_weight(weights_C, d) * scale
    return components.scale_clients(weights_C, jax.vmap(cfg.defend_gradient)(keys, own)
                                    / scale)

  dh_CxBxF = defended(keys_C, dh_CxBxF, 1.0)
  if dh_mix is not None:
    num_mixed = dh_mix.shape[1]
    keys_CxN = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, 1), num_mixed))(
        keys_C)
    per_batch = jnp.swapaxes(dh_mix, 0, 1)  # N x C x B x F: one message a batch
    dh_mix = jnp.swapaxes(jax.vmap(lambda k, d: defended(k, d, float(num_mixed)))(
        jnp.swapaxes(keys_CxN, 0, 1), per_batch), 0, 1)
  return dh_CxBxF, dh_mix


def make_step_one(cfg: RoundConfig, model: SplitModel):
  """One body step on one client's batch with that client's head (SFL-V1's copies,
  SFL-V2's sequence, vanilla SL's turns): `step(server, s_BxS, y_B, head) -> (server,
  (g, L, acc, the head's gradient))`, all gradients at the weights before the step."""
  opt_s = server_optimizer(cfg)
  head_loss = make_head_loss(model)

  def step(server: ServerState, s_BxS, y_B, head, key=None):
    def body(params, s):
      return apply_segment(model.upper, params, server.stats, s, train=True)

    h_BxF, body_vjp, stats = jax.vjp(body, server.params, s_BxS, has_aux=True)
    (loss_k, acc), (head_grad, dh_BxF) = jax.value_and_grad(
        head_loss, argnums=(0, 1), has_aux=True)(head, h_BxF, y_B)
    if key is not None:  # the returned gradient, as the client sends it
      dh_BxF = cfg.defend_gradient(key, dh_BxF)
    grads, g_BxS = body_vjp(dh_BxF)
    updates, opt_state = opt_s.update(grads, server.opt_state, server.params)
    return ServerState(optax.apply_updates(server.params, updates), stats, opt_state), (
        g_BxS, loss_k, acc, head_grad)

  return step
