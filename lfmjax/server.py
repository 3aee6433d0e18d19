"""The server's side of a parallel iteration (LocFedMix-SL, Oh et al., WWW 2022), by
`RoundConfig.server_mode`: one server stepping once on sum_k delta_k (L_k + L~_k) with
SmashMix (PSL, LocFedMix-SL, SGLR, Mix2SFL), per-client server copies (SplitFed V1), or
one server stepping client after client (SplitFed V2; vanilla SL's turns use the same
step). With a U-shaped split the server holds the body and no labels; its steps are in
`lfmjax.ushape`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lfmjax import components, ushape
from lfmjax.algorithms import RoundConfig
from lfmjax.lifting import TAG_MIX, TAG_ORDER, apply_segment as _apply, map_clients
from lfmjax.models import SplitModel, has_stem
from lfmjax.state import ServerState, server_optimizer


def stem_twice(stem_apply, params, stats, s):
  """(z, z) with z = stem_apply(params, stats, s), computed once; the cotangent of the
  second copy (SmashMix's, whose s is detached) reaches the parameters but not s.
  The parameter gradient of both copies is one VJP of their summed cotangents."""

  @jax.custom_vjp
  def twice(params, stats, s):
    z = stem_apply(params, stats, s)
    return z, z

  def fwd(params, stats, s):
    z, vjp = jax.vjp(stem_apply, params, stats, s)
    return (z, z), (vjp, stats)

  def bwd(residuals, cotangents):
    vjp, stats = residuals
    dz, dz_mix = cotangents
    dparams, _, _ = vjp(dz + dz_mix)
    _, _, ds = vjp(dz)
    return dparams, jax.tree.map(jnp.zeros_like, stats), ds

  twice.defvjp(fwd, bwd)
  return twice(params, stats, s)


def mix_draws(cfg: RoundConfig, key_mix, s_CxBxS, weights_C):
  """This step's SmashMix draws (`components.smashmix_draws`), partners among the
  present clients where a participant may be missing; None without SmashMix."""
  if not cfg.smashmix:
    return None
  num_clients, batch = s_CxBxS.shape[:2]
  return components.smashmix_draws(key_mix, num_clients, batch, cfg.num_mixed,
                                   cfg.mixup_alpha, weights_C > 0 if cfg.may_drop else None,
                                   s_CxBxS.dtype)


def make_server_forward(cfg: RoundConfig, model: SplitModel):
  """`forward(params, stats, s_CxBxS, draws) -> ((out_CxBx, out_mix_CxNxBx | None),
  new_stats)`: the upper on the concatenated real batch and on SmashMix's mixed batches
  (logits; a U-shaped split's features). The mixed batches' gradient reaches s only
  with `mix_grad_to_clients`.

  When the upper is split as head(stem(s)) with an affine stem (`models.has_stem`),
  the mixed batches are formed from the stem outputs (lam stem(s_k) + (1 - lam)
  stem(s_j) = stem(lam s_k + (1 - lam) s_j)), so the stem's forward and weight
  gradient run once over the real batches instead of twice.
  """
  mix_after_stem = cfg.smashmix and has_stem(model.upper)

  def mixed(params, stats, a_CxBx, draws, method):
    # Mixed batches are normalised by their own statistics; the running statistics
    # follow the real batch alone.
    a_mix = components.mix_rows(draws, a_CxBx)
    out, _ = _apply(model.upper, params, stats, a_mix.reshape((-1,) + a_CxBx.shape[2:]),
                    train=True, method=method)
    return out.reshape(a_mix.shape[:3] + out.shape[1:])

  def forward(params, stats, s_CxBxS, draws):
    num_clients, batch = s_CxBxS.shape[:2]
    flat_s = s_CxBxS.reshape((num_clients * batch,) + s_CxBxS.shape[2:])
    # The server normalises over the concatenated batch it receives (BatchNorm).
    if mix_after_stem:
      def stem(p, st, s):
        return _apply(model.upper, p, st, s, train=True, method="stem")[0]
      if cfg.mix_grad_to_clients:
        z = z_for_mix = stem(params, stats, flat_s)
      else:
        z, z_for_mix = stem_twice(stem, params, stats, flat_s)
      out, new_stats = _apply(model.upper, params, stats, z, train=True, method="head")
    else:
      out, new_stats = _apply(model.upper, params, stats, flat_s, train=True)
    out_CxBx = out.reshape((num_clients, batch) + out.shape[1:])
    out_mix = None
    if mix_after_stem:
      out_mix = mixed(params, stats, z_for_mix.reshape((num_clients, batch) + z.shape[1:]),
                      draws, "head")
    elif cfg.smashmix:
      s_src = s_CxBxS if cfg.mix_grad_to_clients else jax.lax.stop_gradient(s_CxBxS)
      out_mix = mixed(params, stats, s_src, draws, None)
    return (out_CxBx, out_mix), new_stats

  return forward


def make_server_loss(cfg: RoundConfig, model: SplitModel):
  """sum_k delta_k (L_k + L~_k) as a function of (upper params, s_CxBxS), the server
  holding the labels (`make_server_forward`)."""
  forward = make_server_forward(cfg, model)

  def server_loss(params, stats, s_CxBxS, y_CxB, weights_C, key_mix):
    draws = mix_draws(cfg, key_mix, s_CxBxS, weights_C)
    (logits_CxBxK, mix_logits), new_stats = forward(params, stats, s_CxBxS, draws)
    loss_C = jax.vmap(components.cross_entropy)(logits_CxBxK, y_CxB)
    loss_real = components.weighted_sum(weights_C, loss_C)
    correct = jnp.mean(jnp.argmax(logits_CxBxK, -1) == y_CxB)
    loss_mix = jnp.zeros(())
    if cfg.smashmix:
      y_mix = components.mix_labels(draws, y_CxB, cfg.num_classes, s_CxBxS.dtype)
      mix_loss_CxN = jax.vmap(jax.vmap(components.soft_cross_entropy))(mix_logits, y_mix)
      loss_mix = components.weighted_sum(weights_C, mix_loss_CxN.mean(axis=1))
    return loss_real + loss_mix, (new_stats, loss_real, loss_mix, correct)

  return server_loss


def make_server_step_one(cfg: RoundConfig, model: SplitModel):
  """One server step on one client's batch: (server, s_BxS, y_B, head) -> (server,
  (g, L, acc, the head's gradient)).

  The step of SFL-V1's per-client copies, SFL-V2's sequential server and vanilla SL;
  g = dL_k/ds_k is computed with the server weights before the step. In a U-shaped
  split (`ushape.make_step_one`) the client's `head` scores the server's features; here
  the server holds the labels, `head` is None and so is its gradient.
  """
  if cfg.client_head:
    return ushape.make_step_one(cfg, model)
  opt_s = server_optimizer(cfg)

  def loss(params, stats, s_BxS, y_B):
    logits, new_stats = _apply(model.upper, params, stats, s_BxS, train=True)
    correct = jnp.mean(jnp.argmax(logits, -1) == y_B)
    return components.cross_entropy(logits, y_B), (new_stats, correct)

  def step(server: ServerState, s_BxS, y_B, head=None, key=None):
    (loss_k, (stats, acc)), (grads, g_BxS) = jax.value_and_grad(
        loss, argnums=(0, 2), has_aux=True)(server.params, server.stats, s_BxS, y_B)
    updates, opt_state = opt_s.update(grads, server.opt_state, server.params)
    return ServerState(optax.apply_updates(server.params, updates), stats, opt_state), (
        g_BxS, loss_k, acc, None)

  return step


def make_single_server(cfg: RoundConfig, model: SplitModel):
  """The single server's step on every client's upload at once (`server_mode='single'`):
  `single(server, s_CxBxS, y_CxB, weights_C, key_mix, heads_C) -> (server, g_CxBxS,
  metrics, head grads)`, g_k the gradient of client k's own loss."""
  if cfg.client_head:
    return ushape.make_single_server(cfg, model, make_server_forward(cfg, model))
  opt_s = server_optimizer(cfg)
  server_loss = make_server_loss(cfg, model)

  def single(server, s_CxBxS, y_CxB, weights_C, key_mix, heads_C=None, keys_C=None):
    (_, (stats, loss_real, loss_mix, acc)), (grads, ds_CxBxS) = jax.value_and_grad(
        server_loss, argnums=(0, 2), has_aux=True)(
            server.params, server.stats, s_CxBxS, y_CxB, weights_C, key_mix)
    updates, opt_state = opt_s.update(grads, server.opt_state, server.params)
    new_server = ServerState(optax.apply_updates(server.params, updates), stats, opt_state)
    # d(sum_j delta_j L_j)/ds_k / delta_k: the gradient of client k's own mean loss.
    g = components.per_weight(weights_C, ds_CxBxS)
    return new_server, g, {"loss_real": loss_real, "loss_mix": loss_mix,
                           "train_accuracy": acc}, None

  return single


def make_server_phase(cfg: RoundConfig, model: SplitModel, mesh: Mesh | None = None):
  """The server's part of a parallel iteration, by `cfg.server_mode`.

  Returns `phase(server, s_CxBxS, y_CxB, weights_C, key, step, heads_C=None,
  keys_C=None) -> (server, g_CxBxS, {loss_real, loss_mix, train_accuracy},
  head_grads_C)`, g_k being the gradient of client k's own loss. In a U-shaped split
  `heads_C` are the clients' heads (a leading client axis), `head_grads_C` the gradients
  of each client's own loss with respect to its head, and `keys_C` (None: no defence)
  key each client's defence of its returned gradient; otherwise heads and head grads
  are None and the keys unused (the round defends the download).
  """
  single_server = make_single_server(cfg, model)
  step_one = make_server_step_one(cfg, model)

  def single(server, s_CxBxS, y_CxB, weights_C, key, step, heads_C=None, keys_C=None):
    key_mix = jax.random.fold_in(jax.random.fold_in(key, TAG_MIX), step)
    return single_server(server, s_CxBxS, y_CxB, weights_C, key_mix, heads_C, keys_C)

  def per_client(server, s_CxBxS, y_CxB, weights_C, key, step, heads_C=None, keys_C=None):
    args = (server, s_CxBxS, y_CxB) + (() if heads_C is None else (heads_C, keys_C))
    new_server, (g, loss_C, acc_C, head_grads_C) = map_clients(step_one, mesh)(*args)
    return new_server, g, {"loss_real": components.weighted_sum(weights_C, loss_C),
                           "loss_mix": jnp.zeros(()), "train_accuracy": jnp.mean(acc_C)
                           }, head_grads_C

  def sequential(server, s_CxBxS, y_CxB, weights_C, key, step, heads_C=None, keys_C=None):
    order_C = client_order(key, step, y_CxB.shape[0])

    def body(server, k):
      head = None if heads_C is None else jax.tree.map(lambda a: a[k], heads_C)
      key_k = None if keys_C is None else keys_C[k]
      stepped, out = step_one(server, s_CxBxS[k], y_CxB[k], head, key_k)
      return components.select_tree(weights_C[k] > 0, stepped, server), out

    new_server, (g_in_order, loss_in_order, acc, head_grads) = jax.lax.scan(
        body, server, order_C)
    unorder = lambda a: jnp.zeros_like(a).at[order_C].set(a)
    g = unorder(g_in_order)
    head_grads_C = None if heads_C is None else jax.tree.map(unorder, head_grads)
    return new_server, g, {"loss_real": components.weighted_sum(weights_C[order_C],
                                                                loss_in_order),
                           "loss_mix": jnp.zeros(()), "train_accuracy": jnp.mean(acc)
                           }, head_grads_C

  return {"single": single, "per_client": per_client, "sequential": sequential}[
      cfg.server_mode]


def client_order(key, step, num_clients: int) -> jax.Array:
  """SFL-V2's random order of clients at this step."""
  return jax.random.permutation(
      jax.random.fold_in(jax.random.fold_in(key, TAG_ORDER), step), num_clients)
