"""One iteration of every client as a single jitted XLA program, for all SL algorithms.

`make_round_step(cfg, model)` returns `round_step(state, data) -> (state, metrics)`
computing, per SPEC.md and Oh et al. (LocFedMix-SL, WWW 2022):

  1. each client's mini-batch, sampled on the device from (key, step);
  2. client forward s_k = lower(w_c,k, x_k), vmapped over clients;
  3. the local losses (Loc's MI decoder, an aux head's CE) and their gradients;
  4. the server phase (`cfg.server_mode`): one step of a single server on
     sum_k delta_k (L_k + L~_k) with SmashMix (Mix), per-client server copies (SFL-V1),
     or a scan of per-client steps in a random order (SFL-V2);
  5. the gradients to the clients: g_k = dL_k/ds_k, GradMix's mean for a fraction of clients, or nothing;
  6. the client update opt_c(VJP_lower(g_k) + local gradients);
  7. FedAvg of the client segments every T_c iterations (Fed).

PSL is the single-server round with every switch off. The clients' side is one of three
named phases, which `cfg.client_phase` chooses:
  per_client  every client with its own segments (`make_per_client_phase`);
  averaged    where FedAvg follows every iteration and the client optimiser is linear,
              every client holds the same segments at the start of each iteration and
              FedAvg of their steps is one step on the delta-weighted gradient: steps 2,
              3, 6 and 7 run as one model over all clients' data, and the state holds
              one copy of the client segments (`make_averaged_client_phase`);
  relay       vanilla SL, a scan over clients of steps 2-6 carrying the lower model
              (`make_relay_round`).
The convolutions choose their kernels from what is batched (`models.patch_conv`), so
none of this code sets a flag for them.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lfmjax import components, finetune, label_privacy, participation, privacy
from lfmjax.algorithms import RoundConfig
from lfmjax.client_phase import (ClientCopiesError, client_group_size,  # noqa: F401
                                 head_extra, make_averaged_client_phase,
                                 make_client_forward, make_client_update,
                                 make_per_client_phase)
from lfmjax.data import batch_indices, client_batch_indices
from lfmjax.lifting import CLIENTS, TAG_BATCH, TAG_GRADMIX, map_clients  # noqa: F401
from lfmjax.models import SplitModel
from lfmjax.models.patch_conv import compiler_options
from lfmjax.optim import learning_rate_at
from lfmjax.server import (make_server_loss, make_server_phase,  # noqa: F401
                           make_server_step_one)
from lfmjax.state import (ClientState, RoundData, RoundState, ServerState, check_head,
                          per_client, with_optimizers)

def sample_batch(cfg: RoundConfig, state: RoundState, data: RoundData):
  """Every client's mini-batch for this step: (x_model, x01, y, y_server), each
  C x B x ...; y_server the labels the server receives (`server_labels`)."""
  idx_CxB = batch_indices(jax.random.fold_in(state.key, TAG_BATCH), state.step,
                          data.idx_CxM, data.sizes_C, cfg.batch_size, ids_C=data.ids_C)
  x_model, x01 = cfg.preprocess(data.train_x[idx_CxB])
  y = data.train_y[idx_CxB]
  return x_model, x01, y, server_labels(cfg, state.key, idx_CxB, y)


def server_labels(cfg: RoundConfig, key, idx, y):
  """The labels the server receives for the training samples `idx`: y, or with
  `label_rr_epsilon` each sample's randomised response, drawn once for the run
  (`label_privacy.sample_labels_rr`). The clients' own terms keep the true labels."""
  if cfg.label_rr_epsilon is None:
    return y
  return label_privacy.sample_labels_rr(key, idx, y, cfg.num_classes, cfg.label_rr_epsilon)


def gradient_key(key, stream_step, client):
  """The key of the gradient defence of client `client` at its stream step."""
  return jax.random.fold_in(jax.random.fold_in(
      jax.random.fold_in(key, label_privacy.TAG_GRAD_NOISE), stream_step), client)


def gradient_keys(cfg: RoundConfig, key, step, ids_C):
  """Every client's gradient-defence key (None where no gradient is defended)."""
  if not cfg.defends_gradient:
    return None
  return jax.vmap(lambda k: gradient_key(key, step, k))(ids_C)


def defend_downloads(cfg: RoundConfig, g_CxBxS, keys_C):
  """What each client downloads: `cfg.defend_gradient` of the gradient the server sends,
  where the server holds the labels (a U-shaped split defends the returned gradient)."""
  if keys_C is None or cfg.client_head:
    return g_CxBxS
  return jax.vmap(cfg.defend_gradient)(keys_C, g_CxBxS)

def gradmix_clients(key, step, num_clients: int, num_mixed: int) -> jax.Array:
  """The clients whose gradients GradMix averages at this step (bool mask C)."""
  chosen = jax.random.permutation(
      jax.random.fold_in(jax.random.fold_in(key, TAG_GRADMIX), step), num_clients)[:num_mixed]
  return jnp.zeros((num_clients,), bool).at[chosen].set(True)


def upload_key(key, stream_step, client):
  """The key of client `client`'s defence noise at its stream step (the iteration, or
  in vanilla SL's turns the client's mini-batch count)."""
  return jax.random.fold_in(jax.random.fold_in(
      jax.random.fold_in(key, privacy.TAG_NOISE), stream_step), client)


def defend_uploads(cfg: RoundConfig, s_CxBxS, key, step, ids_C):
  """What the server receives from every client (`ids_C`): `cfg.defend` of each upload."""
  if not cfg.defends_upload:
    return s_CxBxS
  return jax.vmap(lambda s, k: cfg.defend(upload_key(key, step, k), s))(s_CxBxS, ids_C)


def gradients_to_clients(cfg: RoundConfig, g_CxBxS, key, step):
  """What each client receives: its own gradient, GradMix's mean for the chosen, or none."""
  if cfg.client_gradient == "none":
    return jnp.zeros_like(g_CxBxS)
  if cfg.num_gradmix:
    mask_C = gradmix_clients(key, step, g_CxBxS.shape[0], cfg.num_gradmix)
    mask = mask_C.reshape((-1,) + (1,) * (g_CxBxS.ndim - 1))
    mean = jnp.sum(jnp.where(mask, g_CxBxS, 0.0), axis=0) / cfg.num_gradmix
    return jnp.where(mask, mean, g_CxBxS)
  return g_CxBxS

def learning_rates(cfg: RoundConfig, step, client_steps=1, server_steps=None
                   ) -> dict[str, jax.Array]:
  """The scheduled rates this iteration applies (at its first update), for the sides
  whose optimiser is a spec (a user's optax transformation declares none): `lr_client`,
  `lr_server`. `client_steps`/`server_steps`: updates per iteration (vanilla SL's turns)."""
  if server_steps is None:
    server_steps = cfg.server_updates_per_iteration
  rates = {}
  if cfg.client_tx is None:
    rates["lr_client"] = learning_rate_at(cfg.client_opt, step * client_steps)
  if cfg.server_tx is None:
    rates["lr_server"] = learning_rate_at(cfg.server_spec, step * server_steps)
  return rates


def make_round_step(cfg: RoundConfig, model: SplitModel, *, jit: bool = True,
                    mesh: Mesh | None = None,
                    client_tx: optax.GradientTransformation | None = None,
                    server_tx: optax.GradientTransformation | None = None
                    ) -> Callable[[RoundState, RoundData], tuple[RoundState, dict]]:
  """Returns `round_step(state, data) -> (state, metrics)`: one iteration, all clients.

  With `jit=True` (default) the function is jitted with the state donated; it is
  traced once for a run, since nothing in it depends on Python values of the state.
  `mesh`: the devices the clients are split over (`lfmjax.mesh`), if several; on the
  CPU the per-client loops then run per device (`map_clients`).
  `client_tx`/`server_tx`: optax transformations in place of the config's optimiser
  specs (pass the same to `init_state`).
  The clients' phase is the one `cfg.client_phase` names, chosen there alone. With
  `clients_per_round` K < C, dropouts or a deadline, it runs on the K participants it
  draws (`lfmjax.participation`).
  """
  cfg = with_optimizers(cfg, client_tx, server_tx)
  check_head(cfg, model)
  if cfg.samples_clients:  # K participants, or dropouts: the round of K, gathered
    round_step = participation.make_participation_round(
        cfg, make_all_clients_round(cfg.participants_config(), model, mesh))
  else:
    round_step = make_all_clients_round(cfg, model, mesh)
  if jit:
    return jax.jit(round_step, donate_argnums=0, compiler_options=compiler_options())
  return round_step


def make_all_clients_round(cfg: RoundConfig, model: SplitModel, mesh: Mesh | None = None):
  """The round in which every client of `cfg` takes part (weight 0: absent). A frozen
  backbone in the state (`RoundState.frozen`) is bound to the model's segments at
  trace time (`finetune.bind_frozen`): an argument of the program, held once."""

  def build(model: SplitModel):
    if cfg.client_phase == "relay":
      return make_relay_round(cfg, model)
    split = mesh is not None and mesh.size > 1  # no loops over groups of split clients
    phase = (make_averaged_client_phase(cfg, model, split)
             if cfg.client_phase == "averaged" else make_per_client_phase(cfg, model, mesh))
    return make_parallel_round(cfg, model, phase, mesh)

  def round_step(state: RoundState, data: RoundData):
    return build(finetune.bind_frozen(model, state.frozen))(state, data)

  return round_step

def average_clients(cfg: RoundConfig, clients: ClientState, weights_C) -> ClientState:
  """FedAvg of the clients' segments (and, if configured, of their optimiser states)."""
  params = components.fedavg(clients.params, weights_C)
  stats = components.fedavg(clients.stats, weights_C)
  opt_state = (components.fedavg(clients.opt_state, weights_C)
               if cfg.fedavg_opt_state else clients.opt_state)
  return ClientState(params, stats, opt_state)


def average_server(server: ServerState, weights_C) -> ServerState:
  """SFL-V1: the server's per-client copies averaged (optimiser states stay)."""
  return ServerState(components.fedavg(server.params, weights_C),
                     components.fedavg(server.stats, weights_C), server.opt_state)

def client_heads(cfg: RoundConfig, clients: ClientState, num_clients: int):
  """A U-shaped split's heads, one row per client (the averaged phase's one copy
  repeated); None where the server holds the last layer."""
  if not cfg.client_head:
    return None
  return per_client(clients, num_clients).params["head"]


def make_parallel_round(cfg: RoundConfig, model: SplitModel, clients_forward,
                        mesh: Mesh | None = None):
  """Every algorithm whose clients compute at the same time (all but vanilla SL), with
  the clients' side `clients_forward` (the averaged or the per-client phase)."""
  server_phase = make_server_phase(cfg, model, mesh)

  def fedavg(new_clients, new_server, step, weights_C):
    do_average = (step + 1) % cfg.fedavg_every == 0
    if cfg.client_phase == "per_client":  # the averaged phase has averaged already
      new_clients = jax.lax.cond(do_average, functools.partial(average_clients, cfg),
                                 lambda c, w: c, new_clients, weights_C)
    if cfg.server_mode == "per_client":
      new_server = jax.lax.cond(do_average, average_server, lambda c, w: c,
                                new_server, weights_C)
    return new_clients, new_server

  def round_step(state: RoundState, data: RoundData):
    x_model, x01, y_CxB, y_server_CxB = sample_batch(cfg, state, data)
    keys_C = gradient_keys(cfg, state.key, state.step, data.client_ids())
    s_CxBxS, finish = clients_forward(state.clients, x_model, x01, y_CxB, data.weights_C)
    s_CxBxS = components.only_present(data.weights_C, s_CxBxS)
    u_CxBxS = defend_uploads(cfg, s_CxBxS, state.key, state.step, data.client_ids())
    new_server, g_true_CxBxS, server_metrics, head_grads_C = server_phase(
        state.server, u_CxBxS, y_server_CxB, data.weights_C, state.key, state.step,
        client_heads(cfg, state.clients, y_CxB.shape[0]), keys_C)
    # The gradient with respect to the upload goes back as the gradient for s.
    g_CxBxS = defend_downloads(cfg, gradients_to_clients(cfg, g_true_CxBxS, state.key,
                                                         state.step), keys_C)
    new_clients, loss_local, loss_aux = finish(g_CxBxS, head_grads_C)
    if cfg.fedavg:
      new_clients, new_server = fedavg(new_clients, new_server, state.step, data.weights_C)
    metrics = {**server_metrics, "loss_local": loss_local, "loss_aux": loss_aux,
               **learning_rates(cfg, state.step),
               "grad_cosine_clients": jax.vmap(privacy.gradient_cosine)(g_true_CxBxS,
                                                                        g_CxBxS)}
    new_state = state.replace(step=state.step + 1, clients=new_clients, server=new_server)
    return new_state, metrics

  return round_step


def make_relay_round(cfg: RoundConfig, model: SplitModel):
  """Vanilla sequential SL by turns: a scan over clients in order, and inside each
  client's turn a scan over its mini-batches, all in the one program.

  Client k starts its turn from the lower that client k-1 handed on (client 0 from the
  last client's of the previous iteration), processes `cfg.turn_steps` mini-batches (one
  local epoch by default) from its own stream, the server stepping on each L_k and the
  client updating with dL_k/ds_k, then hands the lower on. Decoders, heads and optimiser
  states stay with their clients. One iteration is one turn of every client.
  """
  client_forward = make_client_forward(cfg, model)
  server_step = make_server_step_one(cfg, model)
  client_update = make_client_update(cfg)
  # What is handed from client to client: the lower, and a U-shaped split's head (the
  # client's part of the model is both).
  relayed = ("lower", "head") if cfg.client_head else ("lower",)

  def round_step(state: RoundState, data: RoundData):
    clients = state.clients
    steps_per_turn = cfg.turn_length(data.idx_CxM.shape[1])
    turns_C = cfg.turn_steps(data.sizes_C, data.weights_C)
    key_batch = jax.random.fold_in(state.key, TAG_BATCH)
    last = lambda tree: jax.tree.map(lambda a: a[-1], tree)

    def turn(carry, inputs):
      relayed_params, relayed_stats, server = carry
      k, own_params, own_stats, own_opt, row_M, size, n = inputs

      def batch_step(inner, t):
        params, stats, opt_state, server, sums = inner
        # Client k's stream goes on where its last turn stopped: n batches a turn.
        idx_B = client_batch_indices(key_batch, k, state.step * n + t, row_M, size,
                                     cfg.batch_size)
        x, x01 = cfg.preprocess(data.train_x[idx_B])
        y = data.train_y[idx_B]
        s, lower_vjp, ds_local, head_grads, new_stats, loss_local, loss_aux = client_forward(
            params, stats, x, x01, y)
        u = cfg.defend(upload_key(state.key, state.step * n + t, k), s)
        key_g = gradient_key(state.key, state.step * n + t, k)
        new_server, (g, loss, acc, head_grad) = server_step(
            server, u, server_labels(cfg, state.key, idx_B, y), params.get("head"), key_g)
        if not cfg.client_head:  # the server's download, as the client receives it
          g = cfg.defend_gradient(key_g, g)
        new_params, new_opt = client_update(params, opt_state, lower_vjp, g, ds_local,
                                            {**head_grads, **head_extra(head_grad)})
        done = (new_params, new_stats, new_opt, new_server,
                sums + jnp.stack([loss, acc, loss_local, loss_aux]))
        # Steps past the client's turn (a shorter client, or weight 0) change nothing.
        return components.select_tree(t < n, done, inner), None

      inner = ({**own_params, **relayed_params}, {**own_stats, **relayed_stats},
               own_opt, server, jnp.zeros((4,), jnp.float32))
      (params, stats, opt_state, server, sums), _ = jax.lax.scan(
          batch_step, inner, jnp.arange(steps_per_turn, dtype=jnp.int32))
      # The lower handed on is recorded in the client's slot too, so the last slot
      # always holds the latest lower (a client of weight 0 passes it on unchanged).
      return (({n: params[n] for n in relayed}, {n: stats[n] for n in relayed}, server),
              (params, stats, opt_state, sums / jnp.maximum(n, 1)))

    carry = ({n: last(clients.params[n]) for n in relayed},
             {n: last(clients.stats[n]) for n in relayed}, state.server)
    ids_C = data.client_ids()
    (_, _, new_server), (params, stats, opt_state, means_Cx4) = jax.lax.scan(
        turn, carry, (ids_C, clients.params, clients.stats, clients.opt_state,
                      data.idx_CxM, data.sizes_C, turns_C))
    w = data.weights_C
    loss_C, acc_C, local_C, aux_C = means_Cx4.T
    metrics = {"loss_real": components.weighted_sum(w, loss_C), "loss_mix": jnp.zeros(()),
               "train_accuracy": components.weighted_sum(w, acc_C),
               "loss_local": components.weighted_sum(w, local_C),
               "loss_aux": components.weighted_sum(w, aux_C),
               **learning_rates(cfg, state.step, client_steps=steps_per_turn,
                                server_steps=jnp.sum(turns_C))}
    new_state = state.replace(step=state.step + 1,
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
    return jax.jit(multi_step, donate_argnums=0, compiler_options=compiler_options())
  return multi_step
