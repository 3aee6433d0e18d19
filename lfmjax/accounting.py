"""Communication ledger and simulated latency of an SL run (SPEC.md, "Communication and
latency"), as compared in LocFedMix-SL (Oh et al., WWW 2022).

Both are closed forms in the iteration count, fixed when the round is built:

* **Bytes**, from the shapes and dtypes of what crosses the network. Per client and
  iteration: up B*S(L) (smashed data; with k-bit quantisation k/8 bytes an element and
  8 a sample) + B label bytes; down B*S(L) (none when clients
  receive nothing, LocSplitFed); every T_c iterations up and down |w_c| (the averaged
  client segments: lower with its BatchNorm statistics, decoder where Loc is on, aux head
  where it is trained). Vanilla SL's iteration is a turn per client of `sl_turn_steps`
  mini-batches (one local epoch by default), each with its smashed data and gradient,
  and the lower handed on through the server once per turn: up and down |w_lower| per
  client and iteration (with more than one client).
* **Simulated time**, from the FLOPs XLA's cost analysis counts in the compiled client
  and server functions, over configured client and server FLOP/s, plus transfers over
  configured up- and downlink rates. Parallel algorithms wait for the slowest client
  (all clients here do equal work), so an iteration is client + up + server + down;
  vanilla SL adds up every mini-batch of every client's turn and every hand-on;
  LocSplitFed's clients do not wait for the server, so an iteration is the longer of
  (client + up) and the server.
* **A U-shaped split** (`lfmjax.ushape`) sends no labels; it adds a second round trip
  at the second cut: the server's features h down (B*F) and the gradient the client
  returns up (B*F), and for SmashMix each mixed batch's features to both clients it
  mixes and both returned gradients (2*n_s*B*F each way, per client on average). The
  four transfers happen one after another, so the iteration's time counts both round
  trips. The heads' FLOPs (one dense layer) are counted with the server's phase they
  run inside; the head is averaged and handed on with the lower.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lfmjax import finetune, models, privacy
from lfmjax import round as round_lib
from lfmjax.algorithms import RoundConfig
from lfmjax.models import SplitModel
from lfmjax.state import RoundData, RoundState

LABEL_BYTES = 4  # labels travel as int32


@dataclasses.dataclass(frozen=True)
class Rates:
  client_flops_per_s: float = 1e10
  server_flops_per_s: float = 1e13
  uplink_bytes_per_s: float = 1.25e6
  downlink_bytes_per_s: float = 6.25e6


@dataclasses.dataclass(frozen=True)
class CommLedger:
  """Bytes per client: every iteration, and at every FedAvg (each direction).

  An iteration is `batches` mini-batches per client on average (1, but vanilla SL's
  turns: one local epoch by default), each `batch_up` bytes up and `batch_down` down,
  plus `handoff` bytes each way where vanilla SL hands the lower on (once per turn)."""
  num_clients: int
  batch_up: int
  batch_down: int
  sync_bytes: int          # |w_c|, up and again down, at each FedAvg
  sync_every: int          # T_c; 0 when nothing is averaged
  batches: float = 1.0     # mini-batches per client and iteration (the mean over clients)
  handoff: int = 0         # vanilla SL: the lower, each way, once per turn

  @property
  def up_per_iteration(self) -> float:
    return _exact(self.batches * self.batch_up + self.handoff)

  @property
  def down_per_iteration(self) -> float:
    return _exact(self.batches * self.batch_down + self.handoff)

  def syncs(self, steps: int) -> int:
    return steps // self.sync_every if self.sync_every else 0

  def totals(self, steps: int) -> dict[str, int]:
    """Cumulative bytes after `steps` iterations, per client and over all clients."""
    up = steps * self.up_per_iteration + self.syncs(steps) * self.sync_bytes
    down = steps * self.down_per_iteration + self.syncs(steps) * self.sync_bytes
    return {"bytes_up": int(round(self.num_clients * up)),
            "bytes_down": int(round(self.num_clients * down)),
            "bytes_up_per_client": int(round(up)), "bytes_down_per_client": int(round(down))}


def _exact(value: float) -> float | int:
  """An int where the value is whole (every client the same number of batches)."""
  return int(value) if float(value).is_integer() else value


@dataclasses.dataclass(frozen=True)
class LatencyModel:
  """Seconds of simulated wall-clock: per iteration, and per FedAvg."""
  iteration_s: float
  sync_s: float
  sync_every: int
  client_flops: float      # one client's compute per iteration
  server_flops: float      # the server's compute per iteration (all clients)

  def total(self, steps: int) -> float:
    syncs = steps // self.sync_every if self.sync_every else 0
    return steps * self.iteration_s + syncs * self.sync_s


def tree_bytes(tree) -> int:
  return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree)))


def one_client(tree):
  """The abstract per-client slice of a client-stacked tree."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tree)


def averaged_client_bytes(cfg: RoundConfig, state: RoundState) -> int:
  """|w_c|: what a client sends (and receives) at FedAvg."""
  clients = state.clients
  parts = [clients.params["lower"], clients.stats["lower"]]
  if cfg.client_head:
    parts += [clients.params["head"], clients.stats["head"]]
  if cfg.uses_decoder:
    parts += [clients.params["decoder"], clients.stats["decoder"]]
  if cfg.uses_aux_head:
    parts += [clients.params["aux_head"], clients.stats["aux_head"]]
  return tree_bytes(one_client(parts))


def input_shapes(cfg: RoundConfig, data: RoundData):
  """Abstract (x_model, x01) of one client batch."""
  x = jax.ShapeDtypeStruct((cfg.batch_size,) + tuple(data.train_x.shape[1:]), jnp.uint8)
  return jax.eval_shape(cfg.preprocess, x)


def smashed_shape(cfg: RoundConfig, model: SplitModel, data: RoundData):
  """Abstract smashed data of one client batch (B x S)."""
  x_model, _ = input_shapes(cfg, data)
  one = models.smashed_struct(model, x_model.shape[1:], x_model.dtype)
  return jax.ShapeDtypeStruct((cfg.batch_size,) + one.shape, one.dtype)


def make_ledger(cfg: RoundConfig, model: SplitModel, state: RoundState,
                data: RoundData) -> CommLedger:
  s = smashed_shape(cfg, model, data)
  # B * S(L) * itemsize; with quantisation the k-bit codes and each sample's scale.
  elements = int(np.prod(s.shape[1:]))
  labels = 0 if cfg.client_head else cfg.batch_size * labels_per_sample(data) * LABEL_BYTES
  up = (privacy.smashed_bytes(elements, cfg.batch_size, s.dtype.itemsize, cfg.quantize_bits)
        + labels)
  # The gradient comes back in full precision.
  down = (0 if cfg.client_gradient == "none"
          else privacy.smashed_bytes(elements, cfg.batch_size, s.dtype.itemsize))
  if cfg.client_head:  # the second cut: features down, their gradient back up
    h = features_shape(model, s)
    second = h.dtype.itemsize * int(np.prod(h.shape)) * (
        1 + (2 * cfg.num_mixed if cfg.smashmix else 0))
    up, down = up + second, down + second
  batches, handoff = 1.0, 0
  if cfg.server_mode == "relay":
    batches = float(np.mean(turn_steps(cfg, data)))
    if cfg.num_clients > 1:
      relayed = ("lower", "head") if cfg.client_head else ("lower",)
      handoff = tree_bytes(one_client([getattr(state.clients, part)[name]
                                       for name in relayed for part in ("params", "stats")]))
  sync_every = cfg.fedavg_every if cfg.fedavg else 0
  return CommLedger(cfg.num_clients, up, down, averaged_client_bytes(cfg, state) if
                    sync_every else 0, sync_every, batches, handoff)


def features_shape(model: SplitModel, s: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  """Abstract output of the server's body on one client batch (a U-shaped split's h)."""
  def body(s):
    variables = model.upper.init(jax.random.key(0), s, train=False)
    return model.upper.apply(variables, s, train=False)
  return jax.eval_shape(body, s)


def labels_per_sample(data: RoundData) -> int:
  """Labels a sample uploads: one, or a language model's T next tokens."""
  return int(np.prod(data.train_y.shape[1:]))


def turn_steps(cfg: RoundConfig, data: RoundData) -> np.ndarray:
  """Vanilla SL: each client's mini-batches per turn (host)."""
  return cfg.turn_steps(np.asarray(data.sizes_C), np.asarray(data.weights_C))


def compiled_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
    cost = cost[0]
  return float(cost.get("flops", 0.0)) if cost else 0.0


def count_flops(cfg: RoundConfig, model: SplitModel, state: RoundState, data: RoundData
                ) -> tuple[float, float]:
  """(one client's FLOPs, the server's FLOPs) per iteration, from XLA's cost analysis.
  A frozen backbone is an argument of the programs, as in the round."""
  x_model, x01 = input_shapes(cfg, data)
  s = smashed_shape(cfg, model, data)
  y = jax.ShapeDtypeStruct((cfg.batch_size,) + tuple(data.train_y.shape[1:]), jnp.int32)
  clients = one_client(state.clients)
  bound = lambda frozen: finetune.bind_frozen(model, frozen)

  def client_work(frozen, params, stats, opt_state, x, x01, y, g):
    client_forward = round_lib.make_client_forward(cfg, bound(frozen))
    s, vjp, ds_local, head_grads, new_stats, _, _ = client_forward(params, stats, x, x01, y)
    if cfg.client_head:  # the head's step (its gradient comes from the server's phase)
      head_grads = {**head_grads, "head": jax.tree.map(jnp.zeros_like, params["head"])}
    return round_lib.make_client_update(cfg)(params, opt_state, vjp, g, ds_local,
                                             head_grads), s

  client = compiled_flops(client_work, state.frozen, clients.params, clients.stats,
                          clients.opt_state, x_model, x01, y, s)
  if cfg.server_mode == "single":
    c = cfg.num_clients

    def server_work(frozen, sv, s, y, w, k, heads):
      phase = round_lib.make_server_phase(cfg, bound(frozen))
      return phase(sv, s, y, w, k, jnp.zeros((), jnp.int32), heads)

    server = compiled_flops(server_work, state.frozen, state.server,
                            jax.ShapeDtypeStruct((c,) + s.shape, s.dtype),
                            jax.ShapeDtypeStruct((c,) + y.shape, jnp.int32), data.weights_C,
                            state.key, round_lib.client_heads(cfg, state.clients, c))
  else:  # a step per client (vanilla SL: per mini-batch of a turn), one after another
    server_one = (one_client(state.server) if cfg.server_mode == "per_client"
                  else state.server)
    steps = (int(turn_steps(cfg, data).sum()) if cfg.server_mode == "relay"
             else cfg.num_clients)
    head = (jax.tree.map(lambda a: a[0], state.clients.params["head"]) if cfg.client_head
            else None)
    server = steps * compiled_flops(
        lambda frozen, *a: round_lib.make_server_step_one(cfg, bound(frozen))(*a),
        state.frozen, server_one, s, y, head)
  return client, server


def make_latency(cfg: RoundConfig, model: SplitModel, state: RoundState, data: RoundData,
                 ledger: CommLedger, rates: Rates) -> LatencyModel:
  client_flops, server_flops = count_flops(cfg, model, state, data)
  client_s = client_flops / rates.client_flops_per_s
  server_s = server_flops / rates.server_flops_per_s
  up_s = ledger.batch_up / rates.uplink_bytes_per_s
  down_s = ledger.batch_down / rates.downlink_bytes_per_s
  if cfg.server_mode == "relay":  # every batch of every turn, and every hand-on, in turn
    handoff_s = (ledger.handoff / rates.uplink_bytes_per_s
                 + ledger.handoff / rates.downlink_bytes_per_s)
    turns_C = turn_steps(cfg, data)
    iteration_s = (float(turns_C.sum()) * (client_s + up_s + down_s) + server_s
                   + int(np.count_nonzero(turns_C)) * handoff_s)
  elif cfg.client_gradient == "none":
    iteration_s = max(client_s + up_s, server_s)
  else:
    iteration_s = client_s + up_s + server_s + down_s
  sync_s = (ledger.sync_bytes / rates.uplink_bytes_per_s
            + ledger.sync_bytes / rates.downlink_bytes_per_s)
  return LatencyModel(iteration_s, sync_s, ledger.sync_every, client_flops, server_flops)


def describe(ledger: CommLedger, latency: LatencyModel) -> str:
  kib = lambda b: f"{b / 1024:.1f} KiB"
  sync = (f", FedAvg every {ledger.sync_every}: {kib(ledger.sync_bytes)} each way"
          if ledger.sync_every else "")
  return (f"per client and iteration: up {kib(ledger.up_per_iteration)}, down "
          f"{kib(ledger.down_per_iteration)}{sync} | simulated {latency.iteration_s * 1e3:.2f}"
          f" ms/iteration (client {latency.client_flops / 1e6:.1f} MFLOP, server "
          f"{latency.server_flops / 1e6:.1f} MFLOP)")


# ------------------------------------------------- clients that differ, or come and go
@dataclasses.dataclass(frozen=True)
class ClientSeconds:
  """What each client's participation costs in simulated time and bytes (C arrays).

  `seconds_C`: from the start of an iteration until client k is done with it (its
  compute, upload, the server, its download; LocSplitFed's clients do not wait for the
  server; vanilla SL: its whole turn, hand-on included), on its own device.
  `sync_C`: its FedAvg transfer, up and down. `up_C`/`down_C`: its bytes an iteration.
  `server_s`: the server's compute an iteration, which LocSplitFed's clients overlap.
  """
  seconds_C: np.ndarray
  sync_C: np.ndarray
  up_C: np.ndarray
  down_C: np.ndarray
  server_s: float


def client_seconds(cfg: RoundConfig, ledger: CommLedger, latency: LatencyModel,
                   devices, sizes_C, server_step_flops: float, server_flops_per_s: float
                   ) -> ClientSeconds:
  """Per-client costs of the K-client round (`cfg`, `ledger`, `latency` are its) on the
  clients' own `devices` (`lfmjax.devices`); `server_step_flops`: one server step on one
  client's batch (vanilla SL steps once per mini-batch of a turn)."""
  client_s = latency.client_flops / devices.flops_per_s
  up_s = ledger.batch_up / devices.up_bytes_per_s
  down_s = ledger.batch_down / devices.down_bytes_per_s
  server_s = latency.server_flops / server_flops_per_s
  batches = np.ones(len(client_s))
  handoff = np.zeros(len(client_s))
  if cfg.server_mode == "relay":
    batches = cfg.turn_steps(np.asarray(sizes_C)).astype(np.float64)
    handoff = np.full(len(client_s), float(ledger.handoff))
    seconds = (batches * (client_s + up_s + down_s + server_step_flops / server_flops_per_s)
               + handoff / devices.up_bytes_per_s + handoff / devices.down_bytes_per_s)
  elif cfg.client_gradient == "none":
    seconds = client_s + up_s
  else:
    seconds = client_s + up_s + server_s + down_s
  sync = (ledger.sync_bytes / devices.up_bytes_per_s
          + ledger.sync_bytes / devices.down_bytes_per_s)
  return ClientSeconds(seconds, sync, batches * ledger.batch_up + handoff,
                       batches * ledger.batch_down + handoff, server_s)


def make_replay(cfg: RoundConfig, num_steps: int):
  """`replay(keys_S, weights_C, seconds_C, sync_C, start)`: the participation draws of
  iterations [start, start + num_steps) for each seed's run key, as the round makes them
  (`participation`): (ids S x N x K, arrived S x N x K: not dropped out, in_time
  S x N x K: within the deadline, FedAvg's transfer included where the step ends with
  it), on the host."""
  from lfmjax import participation
  no_deadline = dataclasses.replace(cfg, deadline_s=None)
  no_dropout = dataclasses.replace(cfg, dropout_prob=0.0)

  def one(key, step, weights, seconds, sync):
    ids = participation.draw_participants(cfg, key, step, weights)
    arrived = participation.present_participants(no_deadline, key, step, ids)
    in_time = participation.present_participants(
        no_dropout, key, step, ids,
        participation.iteration_seconds(cfg, step, seconds[ids], sync[ids]))
    return ids, arrived, in_time

  @jax.jit
  def draws(keys_S, weights_C, seconds_C, sync_C, start):
    steps = start + jnp.arange(num_steps, dtype=jnp.int32)
    over_steps = jax.vmap(one, in_axes=(None, 0, None, None, None))
    return jax.vmap(over_steps, in_axes=(0, None, None, None, None))(
        keys_S, steps, weights_C, seconds_C, sync_C)

  def replay(keys_S, weights_C, seconds_C, sync_C, start: int):
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return jax.device_get(draws(keys_S, jnp.asarray(weights_C), f32(seconds_C), f32(sync_C),
                                jnp.int32(start)))

  return replay


class ParticipationAccounts:
  """The ledger and latency of a run whose clients differ or come and go: closed forms
  of (config, step, the draws), replayed from the seeds' run keys
  and cached, so a resumed run counts exactly what the uninterrupted one does
  (`make_replay`).

  Per iteration and seed, over the K participants drawn, those present (arrived and in
  time) and those late (arrived, past `deadline_s`; a participant's time includes its
  FedAvg transfer at the iterations that end with FedAvg):
    parallel   max over the present of seconds_k (LocSplitFed: at least the server's
               compute), plus at FedAvg the slowest present participant's transfer
               (every T_c iterations); at least `deadline_s` if any is late (the
               server waited that long before giving up on it);
    sl         the sum of the present participants' turns, plus `deadline_s` for each
               late one (the server waited before moving on);
    bytes      the present participants' uploads, downloads and FedAvg transfers.
  `saved`: the time waiting for the late ones would have cost, less the deadline.
  With several seeds the values are their mean (`seeds` gives each)."""

  CHUNK = 1024  # iterations replayed per call (one compiled shape)

  def __init__(self, cfg: RoundConfig, costs: ClientSeconds, keys_S, weights_C,
               num_clients: int, ledger: CommLedger):
    self.cfg, self.costs, self.ledger = cfg, costs, ledger
    self.keys = jnp.asarray(keys_S).reshape((-1,) + jnp.asarray(keys_S).shape[-1:])
    self.weights_C = np.asarray(weights_C)
    self.num_clients = num_clients
    self.sync_every = ledger.sync_every
    self._replay = make_replay(cfg, self.CHUNK) if cfg.samples_clients else None
    empty = np.zeros((self.keys.shape[0], 0))
    self._per_step = {name: empty for name in ("seconds", "saved", "up", "down", "present",
                                               "late")}

  def _extend(self, steps: int) -> None:
    have = self._per_step["seconds"].shape[1]
    while have < steps:
      start = have
      ids, arrived, in_time = self._draws(start)
      stop = start + ids.shape[1]
      for name, value in self._costs(ids, arrived, in_time, start).items():
        self._per_step[name] = np.concatenate([self._per_step[name], value], axis=1)
      have = stop

  def _draws(self, start: int):
    cfg, c = self.cfg, self.costs
    if not cfg.samples_clients:  # everyone, every time
      shape = (self.keys.shape[0], self.CHUNK, self.num_clients)
      ids = np.broadcast_to(np.arange(self.num_clients), shape)
      return ids, np.ones(shape, bool), np.ones(shape, bool)
    return self._replay(self.keys, self.weights_C, c.seconds_C, c.sync_C, start)

  def _costs(self, ids, arrived, in_time, start: int) -> dict[str, np.ndarray]:
    cfg, c = self.cfg, self.costs
    present, late = arrived & in_time, arrived & ~in_time
    seconds = c.seconds_C[ids]
    masked_max = lambda mask: np.max(np.where(mask, seconds, 0.0), axis=-1)
    if cfg.server_mode == "relay":
      time = np.sum(np.where(present, seconds, 0.0), axis=-1)
      waited = np.sum(np.where(arrived, seconds, 0.0), axis=-1)
      time = time + (cfg.deadline_s or 0.0) * np.sum(late, axis=-1)
    else:
      time, waited = masked_max(present), masked_max(arrived)
      if cfg.client_gradient == "none":
        any_present = np.any(present, axis=-1)
        time = np.where(any_present, np.maximum(time, c.server_s), time)
        waited = np.where(any_present, np.maximum(waited, c.server_s), waited)
    up = np.sum(np.where(present, c.up_C[ids], 0.0), axis=-1)
    down = np.sum(np.where(present, c.down_C[ids], 0.0), axis=-1)
    if self.sync_every:
      steps = start + np.arange(ids.shape[1])
      sync_step = ((steps + 1) % self.sync_every == 0)[None, :]

      def slowest_sync(mask):  # FedAvg waits for the slowest model among `mask`
        return np.where(sync_step & np.any(mask, axis=-1),
                        np.max(np.where(mask, c.sync_C[ids], 0.0), axis=-1), 0.0)
      time, waited = time + slowest_sync(present), waited + slowest_sync(arrived)
      syncs = sync_step & np.any(present, axis=-1)
      sync_bytes = np.where(syncs, np.sum(present, axis=-1) * self.ledger.sync_bytes, 0)
      up, down = up + sync_bytes, down + sync_bytes
    if cfg.server_mode != "relay":
      time = np.where(np.any(late, axis=-1), np.maximum(time, cfg.deadline_s or 0.0), time)
    return {"seconds": time, "saved": np.maximum(waited - time, 0.0), "up": up,
            "down": down, "present": np.sum(present, axis=-1).astype(np.float64),
            "late": np.sum(late, axis=-1).astype(np.float64)}

  def _sum(self, name: str, steps: int) -> np.ndarray:
    self._extend(steps)
    return np.sum(self._per_step[name][:, :steps], axis=1)

  def present_counts(self, steps: int) -> np.ndarray:
    """S x steps: the participants present at each of the first `steps` iterations."""
    self._extend(steps)
    return self._per_step["present"][:, :steps]

  def seeds(self, steps: int) -> list[float]:
    """Each seed's simulated seconds after `steps` iterations."""
    return [round(float(v), 6) for v in self._sum("seconds", steps)]

  def total(self, steps: int) -> float:
    return float(np.mean(self._sum("seconds", steps)))

  def totals(self, steps: int) -> dict[str, int]:
    up, down = (float(np.mean(self._sum(n, steps))) for n in ("up", "down"))
    return {"bytes_up": int(round(up)), "bytes_down": int(round(down)),
            "bytes_up_per_client": int(round(up / self.num_clients)),
            "bytes_down_per_client": int(round(down / self.num_clients))}

  def participation(self, start: int, steps: int) -> dict[str, float]:
    """Iterations (start, steps]: the mean participants present and late (dropped past
    the deadline) an iteration, and the simulated seconds the deadline saved so far."""
    self._extend(steps)
    window = slice(start, steps)
    return {"participants": float(np.mean(self._per_step["present"][:, window])),
            "late": float(np.mean(self._per_step["late"][:, window])),
            "time_saved_s": round(float(np.mean(self._sum("saved", steps))), 6)}

  @property
  def iteration_s(self) -> float:
    """The mean simulated seconds an iteration over the first CHUNK iterations."""
    return self.total(self.CHUNK) / self.CHUNK


def describe_participation(cfg: RoundConfig, accounts: ParticipationAccounts,
                           devices: str) -> str:
  """One line: who takes part, the devices, and what an iteration costs in simulated time."""
  seconds = accounts.costs.seconds_C
  who = (f"{cfg.num_participants} of {cfg.num_clients} clients an iteration "
         f"({cfg.participant_sampling})" if cfg.num_participants < cfg.num_clients
         else f"all {cfg.num_clients} clients")
  drops = (f", dropout {cfg.dropout_prob:g}" if cfg.dropout_prob else "") + (
      f", deadline {cfg.deadline_s:g} s" if cfg.deadline_s is not None else "")
  sync = accounts.costs.sync_C
  fedavg = (f" (FedAvg's transfer: {np.median(sync) * 1e3:.2f} ms median, "
            f"{np.max(sync) * 1e3:.2f} ms slowest)" if cfg.fedavg else "")
  return (f"participation: {who}{drops} | devices {devices}: a participant's iteration "
          f"{np.median(seconds) * 1e3:.2f} ms median, {np.max(seconds) * 1e3:.2f} ms slowest"
          f"{fedavg} | simulated {accounts.iteration_s * 1e3:.2f} ms/iteration (mean of the first "
          f"{accounts.CHUNK})")
