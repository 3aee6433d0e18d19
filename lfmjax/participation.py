"""Clients that come and go: K of the C clients take part in an iteration, and some of
them drop out (at random, or past a deadline).

Federated and split deployments sample a subset of clients per round, and slow devices
miss synchronous deadlines (Bonawitz et al., MLSys 2019); LocFedMix-SL's latency claim
(Oh et al., WWW 2022) is about exactly these waits. Here one iteration is:

  1. K participants drawn from (key, step): uniformly, or in proportion to their data
     (`draw_participants`), without replacement, in ascending id order;
  2. each one present unless it drops out (probability `dropout_prob`, drawn per client
     and step) or its simulated iteration time exceeds `deadline_s`
     (`present_participants`): its split step (`RoundData.seconds_C`) and, at an
     iteration that ends with FedAvg, its model's transfer (`sync_seconds_C`);
  3. their rows gathered from the C-stacked state (client segments, their optimiser
     states and statistics; SFL-V1's server copies) and the round of K clients run on
     them, the absent ones with weight 0, so the program's cost scales with K;
  4. the rows scattered back, an absent participant's unchanged; where the round
     averaged the clients (FedAvg), the average goes to all C.

With K = C and no dropouts the round is the plain one (`RoundConfig.samples_clients`).
Every draw is a function of (key, step), so runs stay reproducible and resumable, and
the ledger replays the same draws (`accounting`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lfmjax import components
from lfmjax.algorithms import RoundConfig
from lfmjax.state import ClientState, RoundData, RoundState, ServerState

# fold_in tags of the participation draws (round.py uses 0-3, privacy 4-5).
TAG_PARTICIPANTS, TAG_DROPOUT = 6, 7


def draw_participants(cfg: RoundConfig, key, step, weights_C) -> jax.Array:
  """int32 K: the ids of this step's participants, ascending. 'uniform': the first K of
  a random permutation; 'by_size': successive sampling in proportion to |D_k| without
  replacement (Gumbel top-k of log delta_k)."""
  num_clients = weights_C.shape[0]
  key = jax.random.fold_in(jax.random.fold_in(key, TAG_PARTICIPANTS), step)
  if cfg.participant_sampling == "by_size":
    scores = jnp.log(weights_C) + jax.random.gumbel(key, (num_clients,))
    chosen = jax.lax.top_k(scores, cfg.num_participants)[1]
  else:
    chosen = jax.random.permutation(key, num_clients)[:cfg.num_participants]
  return jnp.sort(chosen).astype(jnp.int32)


def iteration_seconds(cfg: RoundConfig, step, seconds_K, sync_K=None):
  """Each participant's simulated seconds in this step: its split step, plus its FedAvg
  transfer when the step ends with FedAvg (the server waits for the models too, so the
  deadline covers them)."""
  if seconds_K is None or sync_K is None or not cfg.fedavg:
    return seconds_K
  return seconds_K + jnp.where((step + 1) % cfg.fedavg_every == 0, sync_K, 0.0)


def present_participants(cfg: RoundConfig, key, step, ids_K, seconds_K=None) -> jax.Array:
  """bool K: the participants whose upload arrives: not dropped out (each with
  probability `dropout_prob`, a draw per client and step) and within the deadline."""
  present = jnp.ones(ids_K.shape, bool)
  if cfg.dropout_prob > 0:
    key = jax.random.fold_in(jax.random.fold_in(key, TAG_DROPOUT), step)
    u_K = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(key, k)))(ids_K)
    present = present & (u_K >= cfg.dropout_prob)
  if cfg.deadline_s is not None:
    if seconds_K is None:
      raise ValueError("deadline_s needs each client's simulated seconds an iteration: "
                       "build the data with make_data(..., seconds_C=...)")
    present = present & (seconds_K <= cfg.deadline_s)
  return present


def participant_weights(sizes_K, present_K) -> jax.Array:
  """float32 K: delta over the present participants, |D_k| / sum of theirs (0 absent)."""
  sizes = jnp.where(present_K, sizes_K.astype(jnp.float32), 0.0)
  return sizes / jnp.maximum(jnp.sum(sizes), 1.0)


def rows(tree, ids_K):
  return jax.tree.map(lambda a: a[ids_K], tree)


def put_rows(tree, ids_K, new_rows):
  return jax.tree.map(lambda a, r: a.at[ids_K].set(r), tree, new_rows)


def keep_absent(present_K, new, old):
  """new's rows of the present participants, old's of the absent ones."""
  def pick(a, b):
    return jnp.where(present_K.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
  return jax.tree.map(pick, new, old)


def to_all(tree_K, num_clients: int):
  """Row 0 (the FedAvg result every participant holds) for all C clients."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a[0], (num_clients,) + a.shape[1:]), tree_K)


def make_participation_round(cfg: RoundConfig, participants_round):
  """`round_step(state, data)` over C clients from `participants_round`, the round of
  `cfg.participants_config()` (K clients): steps 1-4 of the module docstring."""
  per_client_rows = cfg.client_copies == cfg.num_clients
  per_client_server = cfg.server_mode == "per_client"
  relay = cfg.client_phase == "relay"

  def gather(state: RoundState, ids_K) -> RoundState:
    clients = rows(state.clients, ids_K) if per_client_rows else state.clients
    if relay:  # the first turn starts from the latest lower, which the last row holds
      clients = with_last_lower(clients, state.clients)
    server = rows(state.server, ids_K) if per_client_server else state.server
    return state.replace(clients=clients, server=server)

  def scatter(state: RoundState, new_K: RoundState, old_K: RoundState, ids_K, present_K,
              averaged) -> RoundState:
    """The C-client state after the round of K: absent participants' rows unchanged, and
    with no upload at all nothing changed but the step. That is decided on the K rows
    and the shared copies, never by a select over all C rows (a copy of the state)."""
    num_clients = cfg.num_clients
    any_present = jnp.any(present_K)
    unless_none = lambda new, old: components.select_tree(any_present, new, old)
    clients = (None if per_client_rows  # its rows are kept below
               else unless_none(new_K.clients, old_K.clients))
    server = None if per_client_server else unless_none(new_K.server, old_K.server)
    if per_client_rows:
      kept = keep_absent(present_K, new_K.clients, old_K.clients)
      clients = put_rows(state.clients, ids_K, kept)
      if cfg.fedavg:
        shared = to_all(new_K.clients, num_clients)
        clients = ClientState(
            components.select_tree(averaged, shared.params, clients.params),
            components.select_tree(averaged, shared.stats, clients.stats),
            (components.select_tree(averaged, shared.opt_state, clients.opt_state)
             if cfg.fedavg_opt_state else clients.opt_state))
      if relay:  # the lower handed on is the newest: the last row keeps it
        clients = with_last_lower(clients, unless_none(new_K.clients, old_K.clients))
    if per_client_server:
      kept = keep_absent(present_K, new_K.server, old_K.server)
      server = put_rows(state.server, ids_K, kept)
      if cfg.fedavg:
        shared = to_all(new_K.server, num_clients)
        server = ServerState(components.select_tree(averaged, shared.params, server.params),
                             components.select_tree(averaged, shared.stats, server.stats),
                             server.opt_state)
    return new_K.replace(clients=clients, server=server)

  def round_step(state: RoundState, data: RoundData):
    ids_K = draw_participants(cfg, state.key, state.step, data.weights_C)
    global_ids_K = data.client_ids()[ids_K]
    seconds_K = iteration_seconds(
        cfg, state.step, None if data.seconds_C is None else data.seconds_C[ids_K],
        None if data.sync_seconds_C is None else data.sync_seconds_C[ids_K])
    present_K = present_participants(cfg, state.key, state.step, global_ids_K, seconds_K)
    any_present = jnp.any(present_K)
    data_K = RoundData(data.train_x, data.train_y, data.idx_CxM[ids_K], data.sizes_C[ids_K],
                       participant_weights(data.sizes_C[ids_K], present_K),
                       ids_C=global_ids_K)
    state_K = gather(state, ids_K)
    new_K, metrics = participants_round(state_K, data_K)
    averaged = any_present & ((state.step + 1) % cfg.fedavg_every == 0)
    new_state = scatter(state, new_K, state_K, ids_K, present_K, averaged)
    metrics = {name: (_per_client_metric(value, ids_K, present_K, cfg.num_clients)
                      if name.endswith("_clients") else value)
               for name, value in metrics.items()}
    dropped = jnp.sum(~present_K).astype(jnp.float32)
    metrics.update(participants=cfg.num_participants - dropped, dropped=dropped)
    return new_state, metrics

  return round_step


def with_last_lower(clients: ClientState, source: ClientState) -> ClientState:
  """`clients` with the lower (parameters and statistics) of `source`'s last row in its
  own last row: vanilla SL's newest lower."""
  def last_of(name):
    return jax.tree.map(lambda a, b: a.at[-1].set(b[-1]),
                        getattr(clients, name)["lower"], getattr(source, name)["lower"])
  return clients.replace(params={**clients.params, "lower": last_of("params")},
                         stats={**clients.stats, "lower": last_of("stats")})


def _per_client_metric(values_K, ids_K, present_K, num_clients: int):
  """A per-participant metric on the C clients: NaN for those not present."""
  full = jnp.full((num_clients,) + values_K.shape[1:], jnp.nan, values_K.dtype)
  return full.at[ids_K].set(jnp.where(present_K, values_K, jnp.nan))
