"""One iteration of every client as a single jitted XLA program, for all SL algorithms.

`make_round_step(cfg, model)` returns `round_step(state, data) -> (state, metrics)`
computing, per SPEC.md and Oh et al. (LocFedMix-SL, WWW 2022):

  1. each client's mini-batch, sampled on the device from (key, step);
  2. client forward s_k = lower(w_c,k, x_k), vmapped over clients;
  3. the local losses (Loc's MI decoder, an aux head's CE) and their gradients;
  4. the server phase (`cfg.server_mode`): one shared step on
     sum_k delta_k (L_k + L~_k) with SmashMix (Mix), per-client server copies (SFL-V1),
     or a scan of per-client steps in a random order (SFL-V2);
  5. the download: g_k = dL_k/ds_k, GradMix's mean for a fraction of clients, or nothing;
  6. the client update opt_c(VJP_lower(g_k) + local gradients);
  7. FedAvg of the client segments every T_c iterations (Fed).

Vanilla SL (`relay`) is a scan over clients of steps 2-6 carrying the lower model.
PSL is the shared round with every switch off.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from lfmjax import components
from lfmjax.algorithms import RoundConfig
from lfmjax.data import batch_indices
from lfmjax.models import SplitModel, apply_module
from lfmjax.state import (ClientState, RoundData, RoundState, ServerState,
                          client_optimizer, server_optimizer)

# fold_in tags: one independent stream of randomness per purpose.
TAG_BATCH, TAG_MIX, TAG_ORDER, TAG_GRADMIX = 0, 1, 2, 3


def _apply(module, params, stats, x, train: bool):
  """Applies a flax module; returns (output, updated non-param collections)."""
  out, variables = apply_module(module, {"params": params, **stats}, x, train=train)
  new_stats = {k: v for k, v in variables.items() if k != "params"}
  return out, new_stats


def sample_batch(cfg: RoundConfig, state: RoundState, data: RoundData):
  """Every client's mini-batch for this step: (x_model, x01, y), each C x B x ...."""
  idx_CxB = batch_indices(jax.random.fold_in(state.key, TAG_BATCH), state.step,
                          data.idx_CxM, data.sizes_C, cfg.batch_size)
  x_model, x01 = cfg.preprocess(data.train_x[idx_CxB])
  return x_model, x01, data.train_y[idx_CxB]


def make_client_forward(cfg: RoundConfig, model: SplitModel):
  """Per client: s, the VJP of the lower, and the local losses with their gradients."""

  def local_losses(s, params, stats, x01, y):
    """Gradients of the local terms w.r.t. s and the client-side heads."""
    zeros_s = jnp.zeros_like(s)
    grads = {"decoder": jax.tree.map(jnp.zeros_like, params["decoder"]),
             "aux_head": jax.tree.map(jnp.zeros_like, params["aux_head"])}
    new_stats = {"decoder": stats["decoder"], "aux_head": stats["aux_head"]}
    ds, loss_local, loss_aux = zeros_s, jnp.zeros(()), jnp.zeros(())
    if cfg.uses_decoder:
      def rec(s, p):
        logits, st = _apply(model.decoder, p, stats["decoder"], s, train=True)
        return components.reconstruction_loss(logits, x01, cfg.local_loss_kind), st
      (loss_local, new_stats["decoder"]), (ds_rec, grads["decoder"]) = jax.value_and_grad(
          rec, argnums=(0, 1), has_aux=True)(s, params["decoder"])
      ds = ds + cfg.local_loss_weight * ds_rec
    if cfg.uses_aux_head:
      def aux(s, p):
        logits, st = _apply(model.aux_head, p, stats["aux_head"], s, train=True)
        return components.cross_entropy(logits, y), st
      (loss_aux, new_stats["aux_head"]), (ds_aux, grads["aux_head"]) = jax.value_and_grad(
          aux, argnums=(0, 1), has_aux=True)(s, params["aux_head"])
      ds = ds + cfg.local_ce_weight * ds_aux
    return ds, grads, new_stats, loss_local, loss_aux

  def client_forward(params, stats, x_model, x01, y):
    def lower(p):
      return _apply(model.lower, p, stats["lower"], x_model, train=True)
    s, lower_vjp, lower_stats = jax.vjp(lower, params["lower"], has_aux=True)
    ds_local, head_grads, head_stats, loss_local, loss_aux = local_losses(
        jax.lax.stop_gradient(s), params, stats, x01, y)
    new_stats = {"lower": lower_stats, **head_stats}
    return s, lower_vjp, ds_local, head_grads, new_stats, loss_local, loss_aux

  return client_forward


def make_server_loss(cfg: RoundConfig, model: SplitModel):
  """sum_k delta_k (L_k + L~_k) as a function of (upper params, s_CxBxS)."""

  def server_loss(params, stats, s_CxBxS, y_CxB, weights_C, key_mix):
    num_clients, batch = y_CxB.shape
    flat_s = s_CxBxS.reshape((num_clients * batch,) + s_CxBxS.shape[2:])
    # The server normalises over the concatenated batch it receives (BatchNorm).
    logits, new_stats = _apply(model.upper, params, stats, flat_s, train=True)
    logits_CxBxK = logits.reshape(num_clients, batch, -1)
    loss_C = jax.vmap(components.cross_entropy)(logits_CxBxK, y_CxB)
    loss_real = jnp.sum(weights_C * loss_C)
    correct = jnp.mean(jnp.argmax(logits_CxBxK, -1) == y_CxB)
    loss_mix = jnp.zeros(())
    if cfg.smashmix:
      s_src = s_CxBxS if cfg.mix_grad_to_clients else jax.lax.stop_gradient(s_CxBxS)
      s_mix, y_mix = components.smashmix(key_mix, s_src, y_CxB, cfg.num_classes,
                                         cfg.mixup_alpha, cfg.num_mixed)
      n = cfg.num_mixed
      # Mixed batches are normalised by their own statistics; the running
      # statistics follow the real batch alone.
      mix_logits, _ = _apply(model.upper, params, stats,
                             s_mix.reshape((-1,) + s_CxBxS.shape[2:]), train=True)
      mix_loss_CxN = jax.vmap(jax.vmap(components.soft_cross_entropy))(
          mix_logits.reshape(num_clients, n, batch, -1), y_mix)
      loss_mix = jnp.sum(weights_C * mix_loss_CxN.mean(axis=1))
    total = loss_real + loss_mix
    return total, (new_stats, loss_real, loss_mix, correct)

  return server_loss


def make_server_step_one(cfg: RoundConfig, model: SplitModel):
  """One server step on one client's batch: (server, s_BxS, y_B) -> (server, g, L, acc).

  The step of SFL-V1's per-client copies, SFL-V2's sequential server and vanilla SL;
  g = dL_k/ds_k is computed with the server weights before the step.
  """
  opt_s = server_optimizer(cfg)

  def loss(params, stats, s_BxS, y_B):
    logits, new_stats = _apply(model.upper, params, stats, s_BxS, train=True)
    correct = jnp.mean(jnp.argmax(logits, -1) == y_B)
    return components.cross_entropy(logits, y_B), (new_stats, correct)

  def step(server: ServerState, s_BxS, y_B):
    (loss_k, (stats, acc)), (grads, g_BxS) = jax.value_and_grad(
        loss, argnums=(0, 2), has_aux=True)(server.params, server.stats, s_BxS, y_B)
    updates, opt_state = opt_s.update(grads, server.opt_state, server.params)
    return ServerState(optax.apply_updates(server.params, updates), stats, opt_state), (
        g_BxS, loss_k, acc)

  return step


def make_server_phase(cfg: RoundConfig, model: SplitModel):
  """The server's part of a parallel iteration, by `cfg.server_mode`.

  Returns `phase(server, s_CxBxS, y_CxB, weights_C, key, step) -> (server, g_CxBxS,
  {loss_real, loss_mix, train_accuracy})`, g_k being the gradient of client k's own loss.
  """
  opt_s = server_optimizer(cfg)
  server_loss = make_server_loss(cfg, model)
  step_one = make_server_step_one(cfg, model)

  def shared(server, s_CxBxS, y_CxB, weights_C, key, step):
    key_mix = jax.random.fold_in(jax.random.fold_in(key, TAG_MIX), step)
    (_, (stats, loss_real, loss_mix, acc)), (grads, ds_CxBxS) = jax.value_and_grad(
        server_loss, argnums=(0, 2), has_aux=True)(
            server.params, server.stats, s_CxBxS, y_CxB, weights_C, key_mix)
    updates, opt_state = opt_s.update(grads, server.opt_state, server.params)
    new_server = ServerState(optax.apply_updates(server.params, updates), stats, opt_state)
    # d(sum_j delta_j L_j)/ds_k / delta_k: the gradient of client k's own mean loss.
    w_shape = (-1,) + (1,) * (ds_CxBxS.ndim - 1)
    g = ds_CxBxS / weights_C.reshape(w_shape).astype(ds_CxBxS.dtype)
    return new_server, g, {"loss_real": loss_real, "loss_mix": loss_mix,
                           "train_accuracy": acc}

  def per_client(server, s_CxBxS, y_CxB, weights_C, key, step):
    new_server, (g, loss_C, acc_C) = jax.vmap(step_one)(server, s_CxBxS, y_CxB)
    return new_server, g, {"loss_real": jnp.sum(weights_C * loss_C),
                           "loss_mix": jnp.zeros(()), "train_accuracy": jnp.mean(acc_C)}

  def sequential(server, s_CxBxS, y_CxB, weights_C, key, step):
    order_C = client_order(key, step, y_CxB.shape[0])

    def body(server, k):
      return step_one(server, s_CxBxS[k], y_CxB[k])

    new_server, (g_in_order, loss_in_order, acc) = jax.lax.scan(body, server, order_C)
    g = jnp.zeros_like(g_in_order).at[order_C].set(g_in_order)
    return new_server, g, {"loss_real": jnp.sum(weights_C[order_C] * loss_in_order),
                           "loss_mix": jnp.zeros(()), "train_accuracy": jnp.mean(acc)}

  return {"shared": shared, "per_client": per_client, "sequential": sequential}[
      cfg.server_mode]


def client_order(key, step, num_clients: int) -> jax.Array:
  """SFL-V2's random order of clients at this step."""
  return jax.random.permutation(
      jax.random.fold_in(jax.random.fold_in(key, TAG_ORDER), step), num_clients)


def gradmix_clients(key, step, num_clients: int, num_mixed: int) -> jax.Array:
  """The clients whose gradients GradMix averages at this step (bool mask C)."""
  chosen = jax.random.permutation(
      jax.random.fold_in(jax.random.fold_in(key, TAG_GRADMIX), step), num_clients)[:num_mixed]
  return jnp.zeros((num_clients,), bool).at[chosen].set(True)


def download(cfg: RoundConfig, g_CxBxS, key, step):
  """What each client receives: its own gradient, GradMix's mean for the chosen, or none."""
  if cfg.download == "none":
    return jnp.zeros_like(g_CxBxS)
  if cfg.num_gradmix:
    mask_C = gradmix_clients(key, step, g_CxBxS.shape[0], cfg.num_gradmix)
    mask = mask_C.reshape((-1,) + (1,) * (g_CxBxS.ndim - 1))
    mean = jnp.sum(jnp.where(mask, g_CxBxS, 0.0), axis=0) / cfg.num_gradmix
    return jnp.where(mask, mean, g_CxBxS)
  return g_CxBxS


def make_client_update(cfg: RoundConfig):
  """Per client: opt_c(VJP_lower(g + dL_local/ds)) and the heads' own gradients."""
  opt_c = client_optimizer(cfg)

  def client_update(params, opt_state, lower_vjp, g, ds_local, head_grads):
    (lower_grad,) = lower_vjp(g + ds_local)
    grads = {"lower": lower_grad, **head_grads}
    updates, opt_state = opt_c.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return client_update


def make_round_step(cfg: RoundConfig, model: SplitModel, *, jit: bool = True
                    ) -> Callable[[RoundState, RoundData], tuple[RoundState, dict]]:
  """Returns `round_step(state, data) -> (state, metrics)`: one iteration, all clients.

  With `jit=True` (default) the function is jitted with the state donated; it is
  traced once for a run, since nothing in it depends on Python values of the state.
  """
  if cfg.server_mode == "relay":
    round_step = make_relay_round(cfg, model)
  else:
    round_step = make_parallel_round(cfg, model)
  if jit:
    return jax.jit(round_step, donate_argnums=0)
  return round_step


def make_parallel_round(cfg: RoundConfig, model: SplitModel):
  """Every algorithm whose clients compute at the same time (all but vanilla SL)."""
  client_forward = make_client_forward(cfg, model)
  server_phase = make_server_phase(cfg, model)
  client_update = make_client_update(cfg)

  def average_clients(clients: ClientState, weights_C) -> ClientState:
    params = components.fedavg(clients.params, weights_C)
    stats = components.fedavg(clients.stats, weights_C)
    opt_state = (components.fedavg(clients.opt_state, weights_C)
                 if cfg.fedavg_opt_state else clients.opt_state)
    return ClientState(params, stats, opt_state)

  def average_server(server: ServerState, weights_C) -> ServerState:
    """SFL-V1: the server's per-client copies averaged (optimiser states stay)."""
    return ServerState(components.fedavg(server.params, weights_C),
                       components.fedavg(server.stats, weights_C), server.opt_state)

  def round_step(state: RoundState, data: RoundData):
    x_model, x01, y_CxB = sample_batch(cfg, state, data)
    clients = state.clients

    s_CxBxS, lower_vjp, ds_local, head_grads, new_client_stats, loss_local_C, loss_aux_C = (
        jax.vmap(client_forward)(clients.params, clients.stats, x_model, x01, y_CxB))
    new_server, g_CxBxS, server_metrics = server_phase(
        state.server, s_CxBxS, y_CxB, data.weights_C, state.key, state.step)
    g_CxBxS = download(cfg, g_CxBxS, state.key, state.step)

    new_params, new_opt = jax.vmap(client_update)(
        clients.params, clients.opt_state, lower_vjp, g_CxBxS, ds_local, head_grads)
    new_clients = ClientState(new_params, new_client_stats, new_opt)
    if cfg.fedavg:
      do_average = (state.step + 1) % cfg.fedavg_every == 0
      new_clients = jax.lax.cond(do_average, average_clients, lambda c, w: c,
                                 new_clients, data.weights_C)
      if cfg.server_mode == "per_client":
        new_server = jax.lax.cond(do_average, average_server, lambda c, w: c,
                                  new_server, data.weights_C)

    metrics = {
        **server_metrics,
        "loss_local": jnp.sum(data.weights_C * loss_local_C),
        "loss_aux": jnp.sum(data.weights_C * loss_aux_C),
    }
    new_state = RoundState(step=state.step + 1, key=state.key, clients=new_clients,
                           server=new_server)
    return new_state, metrics

  return round_step


def make_relay_round(cfg: RoundConfig, model: SplitModel):
  """Vanilla sequential SL: a scan over clients in order, inside the one program.

  Client k starts from the lower that client k-1 just updated (client 0 from the last
  client's of the previous iteration), the server steps on L_k, and client k updates
  with dL_k/ds_k. Decoders, heads and optimiser states stay with their clients.
  """
  client_forward = make_client_forward(cfg, model)
  server_step = make_server_step_one(cfg, model)
  client_update = make_client_update(cfg)

  def round_step(state: RoundState, data: RoundData):
    x_model, x01, y_CxB = sample_batch(cfg, state, data)
    clients = state.clients
    last = lambda tree: jax.tree.map(lambda a: a[-1], tree)

    def body(carry, inputs):
      lower_params, lower_stats, server = carry
      params, stats, opt_state, x, x01_k, y = inputs
      params = {**params, "lower": lower_params}
      stats = {**stats, "lower": lower_stats}
      s, lower_vjp, ds_local, head_grads, new_stats, loss_local, loss_aux = client_forward(
          params, stats, x, x01_k, y)
      server, (g, loss_k, acc) = server_step(server, s, y)
      params, opt_state = client_update(params, opt_state, lower_vjp, g, ds_local, head_grads)
      return (params["lower"], new_stats["lower"], server), (
          params, new_stats, opt_state, loss_k, acc, loss_local, loss_aux)

    carry = (last(clients.params["lower"]), last(clients.stats["lower"]), state.server)
    (_, _, new_server), (params, stats, opt_state, loss_C, acc_C, local_C, aux_C) = (
        jax.lax.scan(body, carry, (clients.params, clients.stats, clients.opt_state,
                                   x_model, x01, y_CxB)))
    w = data.weights_C
    metrics = {"loss_real": jnp.sum(w * loss_C), "loss_mix": jnp.zeros(()),
               "train_accuracy": jnp.mean(acc_C), "loss_local": jnp.sum(w * local_C),
               "loss_aux": jnp.sum(w * aux_C)}
    new_state = RoundState(step=state.step + 1, key=state.key,
                           clients=ClientState(params, stats, opt_state), server=new_server)
    return new_state, metrics

  return round_step


def make_multi_step(round_step, num_steps: int, *, jit: bool = True):
  """`num_steps` iterations in one dispatch (lax.scan); metrics stacked on axis 0."""

  def multi_step(state: RoundState, data: RoundData):
    def body(state, _):
      return round_step(state, data)
    return jax.lax.scan(body, state, None, length=num_steps)

  if jit:
    return jax.jit(multi_step, donate_argnums=0)
  return multi_step
