"""The clients spread over every device (and host): a `Mesh` with one axis, `clients`.

Layout (C clients padded to C' = a multiple of the device count D, C'/D per device):

    state.clients.*        C' x ...   P('clients')   client k on device k // (C'/D)
                                                     (the averaged phase's one copy: P())
    state.server.*         ...        P()            replicated (SFL-V1's copies: P('clients'))
    state.frozen.*         ...        P()            replicated: a frozen backbone (LoRA), once
    state.step, state.key  scalar     P()
    data.idx_CxM, sizes_C, weights_C  P('clients')   each process feeds its own clients' rows
    data.train_x, train_y  N x ...    P()            the raw train split, on every device
    metrics                scalars    P()

With `num_seeds` S > 1 every state leaf has a leading seed axis, replicated:
P(None, 'clients') for client leaves. `jax.jit` gets these as in/out shardings and the
compiler places the collectives: the FedAvg and server-loss reductions over the client
axis become all-reduces, the server's gradient a sum over devices.

Padding: the C' - C extra clients are copies of client 0 with weight 0. The round runs
on the real clients only (`padded_round` slices them out inside the program and writes
the new rows back), so the padded clients contribute exactly nothing: not to FedAvg,
not to the server's batch (its BatchNorm statistics included), not to SmashMix's
partners or SFL-V2's order, and their rows come back unchanged.

Multi-host: `initialize_distributed(config)` calls `jax.distributed.initialize` from
the config or the environment; `put_global` builds each global array from the host
copy every process holds, transferring only the shards on that process's devices.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lfmjax.algorithms import RoundConfig
from lfmjax.models.patch_conv import compiler_options
from lfmjax.round import CLIENTS
from lfmjax.state import RoundData, RoundState


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'clients' over `devices` (default: every device of every host; an
  int n: the first n)."""
  if devices is None or devices == 0:
    devices = jax.devices()
  elif isinstance(devices, int):
    devices = jax.devices()[:devices]
  return Mesh(np.asarray(list(devices)), (CLIENTS,))


def padded_num_clients(num_clients: int, num_devices: int) -> int:
  return -(-num_clients // num_devices) * num_devices


def _server_is_per_client(cfg: RoundConfig) -> bool:
  return cfg.server_mode == "per_client"


def _clients_are_per_client(cfg: RoundConfig) -> bool:
  """False in the averaged phase, whose one copy is replicated, never padded or split."""
  return cfg.client_copies == cfg.num_clients


def state_specs(cfg: RoundConfig, state: RoundState, seeds: bool = False) -> RoundState:
  """PartitionSpecs of the state: client leaves split over 'clients', the rest replicated."""
  client = P(None, CLIENTS) if seeds else P(CLIENTS)
  server = client if _server_is_per_client(cfg) else P()
  clients = client if _clients_are_per_client(cfg) else P()
  return RoundState(step=P(), key=P(),
                    clients=jax.tree.map(lambda _: clients, state.clients),
                    server=jax.tree.map(lambda _: server, state.server),
                    frozen=jax.tree.map(lambda _: P(), state.frozen))


def data_specs(seconds: bool = False) -> RoundData:
  """`seconds`: the data carries each client's simulated seconds and FedAvg transfer
  seconds (a deadline)."""
  per_client = P(CLIENTS) if seconds else None
  return RoundData(train_x=P(), train_y=P(), idx_CxM=P(CLIENTS), sizes_C=P(CLIENTS),
                   weights_C=P(CLIENTS), seconds_C=per_client, sync_seconds_C=per_client)


def shardings(mesh: Mesh, specs):
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, P))


def _pad_rows(a, rows: int):
  """a with rows copies of a[0] appended on axis 0 (host numpy or device arrays)."""
  if rows == 0:
    return a
  xp = np if isinstance(a, np.ndarray) else jnp
  return xp.concatenate([a, xp.repeat(a[:1], rows, axis=0)], axis=0)


def _map_client_leaves(cfg: RoundConfig, fn, state: RoundState, *others: RoundState
                       ) -> RoundState:
  """`state` with fn(leaf, *the others' leaves) applied to every client-stacked leaf (the
  clients' segments, and SFL-V1's per-client server copies); the rest is `state`'s."""
  def over(name):
    return jax.tree.map(fn, getattr(state, name), *(getattr(o, name) for o in others))
  return state.replace(clients=over("clients") if _clients_are_per_client(cfg)
                       else state.clients,
                       server=over("server") if _server_is_per_client(cfg) else state.server)


# RoundData's client-stacked fields (`ids_C` is the round's own, never placed).
CLIENT_DATA = ("idx_CxM", "sizes_C", "weights_C", "seconds_C", "sync_seconds_C")


def _map_client_data(fn, data: RoundData) -> RoundData:
  return data.replace(**{f: fn(getattr(data, f)) for f in CLIENT_DATA
                         if getattr(data, f) is not None})


def pad_state(cfg: RoundConfig, state: RoundState, num_padded: int) -> RoundState:
  """The state with num_padded - C copies of client 0 appended to every client leaf."""
  rows = num_padded - cfg.num_clients
  return _map_client_leaves(cfg, lambda a: _pad_rows(a, rows), state)


def pad_data(data: RoundData, num_padded: int) -> RoundData:
  """Padded clients read client 0's rows and weigh 0."""
  rows = num_padded - data.weights_C.shape[0]
  xp = np if isinstance(data.weights_C, np.ndarray) else jnp
  padded = _map_client_data(lambda a: _pad_rows(a, rows), data)
  return padded.replace(weights_C=xp.concatenate(
      [data.weights_C, xp.zeros((rows,), data.weights_C.dtype)]))


def real_clients(cfg: RoundConfig, state: RoundState) -> RoundState:
  """The state of the C real clients (a static slice; a no-op without padding)."""
  return _map_client_leaves(cfg, lambda a: a[:cfg.num_clients], state)


def real_data(cfg: RoundConfig, data: RoundData) -> RoundData:
  return _map_client_data(lambda a: a[:cfg.num_clients], data)


def padded_round(cfg: RoundConfig, round_step, mesh: Mesh | None = None):
  """round_step on the real clients of a padded state; padded rows come back unchanged.

  With `mesh`, the real clients' slices are kept split over its 'clients' axis (unevenly:
  the compiler pads inside the program); without the constraint the partitioner may
  replicate them and every device would compute every client.
  """
  c = cfg.num_clients

  def keep_split(a):
    if mesh is None:
      return a
    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(CLIENTS)))

  def step(state: RoundState, data: RoundData):
    if data.weights_C.shape[0] == c:
      return round_step(state, data)
    real = _map_client_leaves(cfg, keep_split, real_clients(cfg, state))
    new, metrics = round_step(real, _map_client_data(keep_split, real_data(cfg, data)))
    return _map_client_leaves(cfg, lambda new, old: old.at[:c].set(new), new, state), metrics

  return step


def put_global(tree, shardings_tree):
  """Host arrays (the same on every process) -> global jax.Arrays with these shardings.

  Each process transfers only the shards on its own devices (`make_array_from_callback`),
  so on a multi-host run a process feeds its own clients' rows.
  """
  def put(a, sharding):
    if jax.dtypes.issubdtype(getattr(a, "dtype", None), jax.dtypes.prng_key):
      impl = jax.random.key_impl(a)  # typed keys travel as their uint32 data
      return jax.random.wrap_key_data(put(jax.random.key_data(a), sharding), impl=impl)
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
  return jax.tree.map(put, tree, shardings_tree)


def to_host(tree):
  """Global arrays -> host numpy on every process (gathers shards across hosts)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a run's arrays live: the mesh, the padded client count, the shardings."""
  mesh: Mesh
  num_padded: int
  state: object  # RoundState of NamedSharding
  data: RoundData
  replicated: NamedSharding


def make_placement(cfg: RoundConfig, state: RoundState, mesh: Mesh | None = None,
                   seeds: bool = False, seconds: bool = False) -> Placement:
  """`state` is the padded (and seed-stacked) state whose structure the shardings take;
  `seconds`: the data carries `seconds_C` and `sync_seconds_C`."""
  mesh = make_mesh() if mesh is None else mesh
  return Placement(mesh=mesh,
                   num_padded=padded_num_clients(cfg.num_clients, mesh.size),
                   state=shardings(mesh, state_specs(cfg, state, seeds)),
                   data=shardings(mesh, data_specs(seconds)),
                   replicated=NamedSharding(mesh, P()))


def jit_sharded(fn, placement: Placement, *, donate: bool = True):
  """jax.jit of fn(state, data) -> (state, metrics) with the placement's in/out shardings."""
  return jax.jit(fn, in_shardings=(placement.state, placement.data),
                 out_shardings=(placement.state, placement.replicated),
                 donate_argnums=0 if donate else (),
                 compiler_options=compiler_options())


def initialize_distributed(config) -> None:
  """jax.distributed.initialize from config.distributed (fields left unset are read from
  the environment: SLURM, Open MPI, TPU pods, JAX_COORDINATOR_ADDRESS ...)."""
  dist = config.distributed
  if not dist.enabled:
    return
  kwargs = {k: dist[k] for k in ("coordinator_address", "num_processes", "process_id")
            if dist[k] is not None}
  if dist.local_device_count is not None:  # CPU simulations of a pod
    jax.config.update("jax_num_cpu_devices", int(dist.local_device_count))
  jax.distributed.initialize(**kwargs)
