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
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lfmjax import models, privacy
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
  shape = models.smashed_shape(model, x_model.shape[1:])
  return jax.ShapeDtypeStruct((cfg.batch_size,) + shape, x_model.dtype)


def make_ledger(cfg: RoundConfig, model: SplitModel, state: RoundState,
                data: RoundData) -> CommLedger:
  s = smashed_shape(cfg, model, data)
  # B * S(L) * itemsize; with quantisation the k-bit codes and each sample's scale.
  elements = int(np.prod(s.shape[1:]))
  up = (privacy.smashed_bytes(elements, cfg.batch_size, s.dtype.itemsize, cfg.quantize_bits)
        + cfg.batch_size * LABEL_BYTES)
  # The gradient comes back in full precision.
  down = (0 if cfg.client_gradient == "none"
          else privacy.smashed_bytes(elements, cfg.batch_size, s.dtype.itemsize))
  batches, handoff = 1.0, 0
  if cfg.server_mode == "relay":
    batches = float(np.mean(turn_steps(cfg, data)))
    if cfg.num_clients > 1:
      handoff = tree_bytes(one_client([state.clients.params["lower"],
                                       state.clients.stats["lower"]]))
  sync_every = cfg.fedavg_every if cfg.fedavg else 0
  return CommLedger(cfg.num_clients, up, down, averaged_client_bytes(cfg, state) if
                    sync_every else 0, sync_every, batches, handoff)


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
  """(one client's FLOPs, the server's FLOPs) per iteration, from XLA's cost analysis."""
  client_forward = round_lib.make_client_forward(cfg, model)
  client_update = round_lib.make_client_update(cfg)
  x_model, x01 = input_shapes(cfg, data)
  s = smashed_shape(cfg, model, data)
  y = jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32)
  clients = one_client(state.clients)

  def client_work(params, stats, opt_state, x, x01, y, g):
    s, vjp, ds_local, head_grads, new_stats, _, _ = client_forward(params, stats, x, x01, y)
    return client_update(params, opt_state, vjp, g, ds_local, head_grads), s

  client = compiled_flops(client_work, clients.params, clients.stats, clients.opt_state,
                          x_model, x01, y, s)
  if cfg.server_mode == "single":
    phase = round_lib.make_server_phase(cfg, model)
    c = cfg.num_clients
    server = compiled_flops(
        lambda sv, s, y, w, k: phase(sv, s, y, w, k, jnp.zeros((), jnp.int32)),
        state.server, jax.ShapeDtypeStruct((c,) + s.shape, s.dtype),
        jax.ShapeDtypeStruct((c, cfg.batch_size), jnp.int32), data.weights_C, state.key)
  else:  # a step per client (vanilla SL: per mini-batch of a turn), one after another
    step_one = round_lib.make_server_step_one(cfg, model)
    server_one = (one_client(state.server) if cfg.server_mode == "per_client"
                  else state.server)
    steps = (int(turn_steps(cfg, data).sum()) if cfg.server_mode == "relay"
             else cfg.num_clients)
    server = steps * compiled_flops(step_one, server_one, s, y)
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
