"""The run state of a split-learning simulation as pytrees, and its constructor.

Per-client arrays carry a leading client axis C (the lower segment, the decoder, the
auxiliary head and their optimiser states), of length 1 where the round's averaged
phase holds one copy for all (`RoundConfig.client_copies`); the server's upper segment
has none. The
state is a pure value: `round_step` maps it to the next one (LocFedMix-SL, Oh et al.,
WWW 2022).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lfmjax import finetune
from lfmjax.algorithms import RoundConfig
from lfmjax.data import client_weights
from lfmjax.models import SplitModel, has_stem, init_split
from lfmjax.models.util import check_stem, smashed_shape
from lfmjax.optim import make_optimizer

CLIENT_MODULES = ("lower", "decoder", "aux_head", "head")


@flax.struct.dataclass
class ClientState:
  """Every client's segments, stacked: leaves are C x ... (1 x ... in the averaged phase)."""
  params: dict  # {'lower', 'decoder', 'aux_head'} -> flax params
  stats: dict   # the same keys -> non-trainable collections (BatchNorm's batch_stats)
  opt_state: Any


@flax.struct.dataclass
class ServerState:
  """The upper segment; SFL-V1 keeps one copy per client (leading axis C)."""
  params: Any
  stats: dict
  opt_state: Any


@flax.struct.dataclass
class RoundState:
  step: jax.Array     # int32 scalar: iterations done
  key: jax.Array      # the run's PRNG key; every draw is fold_in(key, tag, step)
  clients: ClientState
  server: ServerState
  # A frozen backbone held once for all clients (LoRA fine-tuning, `lfmjax.finetune`):
  # {'lower'|'upper': the segment's params that no one trains}; empty otherwise. The
  # round binds it to the model's segments (`finetune.bind_frozen`), so it is a constant
  # of the program, with no client axis, no gradient and no optimiser state.
  frozen: dict = flax.struct.field(default_factory=dict)


@flax.struct.dataclass
class RoundData:
  """What a round reads: the whole train split on the device and the partition."""
  train_x: jax.Array   # uint8 N x H x W x C
  train_y: jax.Array   # int32 N
  idx_CxM: jax.Array   # int32 per-client index table (padded)
  sizes_C: jax.Array   # int32 |D_k|
  weights_C: jax.Array  # float32 delta_k = |D_k| / sum_j |D_j|
  # The clients' global ids (None: 0..C-1); a round on drawn participants reads their
  # ids here, so each client's batches and noise are its own whichever row it is in.
  ids_C: jax.Array | None = None
  # Seconds an iteration takes each client as a participant (`accounting`), which a
  # deadline (`RoundConfig.deadline_s`) compares; None: no deadline can apply.
  seconds_C: jax.Array | None = None
  # Seconds of each client's FedAvg transfer (up and down), which the deadline adds at
  # the iterations that end with FedAvg: the server waits for models as for smashed data.
  sync_seconds_C: jax.Array | None = None

  def client_ids(self) -> jax.Array:
    """int32 C: the global id of each row."""
    if self.ids_C is not None:
      return self.ids_C
    return jnp.arange(self.weights_C.shape[0], dtype=jnp.int32)


def client_optimizer(cfg: RoundConfig) -> optax.GradientTransformation:
  """The clients' transformation: the user's, else the one `cfg.client_opt` names."""
  return cfg.client_tx if cfg.client_tx is not None else make_optimizer(cfg.client_opt)


def server_optimizer(cfg: RoundConfig) -> optax.GradientTransformation:
  return cfg.server_tx if cfg.server_tx is not None else make_optimizer(cfg.server_spec)


def with_optimizers(cfg: RoundConfig, client_tx=None, server_tx=None) -> RoundConfig:
  """cfg with the given optax transformations in place of its specs' (None: kept)."""
  changes = {k: v for k, v in (("client_tx", client_tx), ("server_tx", server_tx))
             if v is not None}
  return dataclasses.replace(cfg, **changes) if changes else cfg


def split_variables(variables: dict) -> tuple[Any, dict]:
  """Flax variables -> (params, the other collections)."""
  variables = dict(variables)
  return variables.pop("params", {}), variables


def stack_clients(tree, num_clients: int):
  """Copies one client's tree to all C clients (all start from the same model)."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients,) + a.shape), tree)


def per_client(clients: ClientState, num_clients: int) -> ClientState:
  """The clients' segments with one row per client: the averaged phase's one copy
  repeated C times, anything else as it is."""
  copies = jax.tree.leaves(clients.params)[0].shape[0]
  if copies == num_clients:
    return clients
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients,) + a.shape[1:]), clients)


def make_data(train_x: np.ndarray, train_y: np.ndarray, idx_CxM: np.ndarray,
              sizes_C: np.ndarray, seconds_C: np.ndarray | None = None,
              sync_seconds_C: np.ndarray | None = None) -> RoundData:
  """Puts the train split and the partition on the device (`seconds_C`: each client's
  simulated seconds an iteration, `sync_seconds_C`: its FedAvg transfer, for a
  deadline; zeros when only `seconds_C` is given)."""
  if seconds_C is not None and sync_seconds_C is None:
    sync_seconds_C = np.zeros_like(seconds_C)
  return RoundData(
      train_x=jnp.asarray(train_x, jnp.uint8),
      train_y=jnp.asarray(train_y, jnp.int32),
      idx_CxM=jnp.asarray(idx_CxM, jnp.int32),
      sizes_C=jnp.asarray(sizes_C, jnp.int32),
      weights_C=jnp.asarray(client_weights(sizes_C)),
      seconds_C=None if seconds_C is None else jnp.asarray(seconds_C, jnp.float32),
      sync_seconds_C=(None if sync_seconds_C is None
                      else jnp.asarray(sync_seconds_C, jnp.float32)))


def used_segment(cfg: RoundConfig, name: str) -> bool:
  """Whether the round trains the client segment `name` (the decoder only with Loc, the
  aux head only with its CE term); an unused one is left out of the state."""
  return {"decoder": cfg.uses_decoder, "aux_head": cfg.uses_aux_head,
          "head": cfg.client_head}.get(name, True)


class HeadMismatchError(ValueError):
  """A U-shaped RoundConfig with a model without a client head, or the other way round."""


def check_head(cfg: RoundConfig, model: SplitModel) -> None:
  """The config's `client_head` and the model's head agree (a U-shaped split needs both)."""
  if cfg.client_head != (model.head is not None):
    raise HeadMismatchError(
        f"RoundConfig.client_head={cfg.client_head} but the model "
        f"{'has no' if model.head is None else 'has a'} client head: build it with "
        f"get_model(..., client_head={cfg.client_head})")


def init_state(cfg: RoundConfig, model: SplitModel, key: jax.Array,
               x_example: jax.Array, *, client_tx: optax.GradientTransformation | None = None,
               server_tx: optax.GradientTransformation | None = None,
               backbone: dict | None = None) -> RoundState:
  """The initial state: every client holds the same freshly initialised segments.

  `x_example` is one model-input batch (B x H x W x C, float; B x T int32 tokens) used
  only for shapes. `client_tx`/`server_tx`: optax transformations in place of the
  config's (pass the same to `make_round_step`). `backbone`: pretrained params
  {'lower', 'upper'} (`finetune.load_backbone`) in place of the initialised ones, the
  adapters aside. The segments in `cfg.frozen_segments` keep only their adapters as
  parameters; the rest of them goes to `RoundState.frozen`, once.
  """
  cfg = with_optimizers(cfg, client_tx, server_tx)
  check_head(cfg, model)
  key_model, key_run = jax.random.split(key)
  variables = init_split(model, key_model, x_example)
  if backbone is not None:
    variables = finetune.with_backbone(variables, backbone)
  if cfg.smashmix and has_stem(model.upper):
    s_shape = smashed_shape(model, x_example.shape[1:])
    check_stem(model.upper, variables["upper"], jnp.zeros((1,) + tuple(s_shape)))
  variables, frozen = finetune.freeze(variables, cfg.frozen_segments)
  client_params, client_stats = {}, {}
  for name in CLIENT_MODULES:  # one copy in the averaged phase (`cfg.client_copies`)
    if name == "head" and not cfg.client_head:
      continue  # no key at all: the state of a run without a head is as it always was
    params, stats = split_variables(variables[name])
    if not used_segment(cfg, name):  # held by every client: memory at 10,000 clients
      params, stats = {}, {}
    client_params[name] = stack_clients(params, cfg.client_copies)
    client_stats[name] = stack_clients(stats, cfg.client_copies)
  opt_c = client_optimizer(cfg)
  if jax.tree.leaves(client_params):
    client_opt = jax.vmap(opt_c.init)(client_params)
  else:  # nothing trained on the clients (a frozen client segment): vmap sees no axis
    client_opt = stack_clients(opt_c.init(client_params), cfg.client_copies)
  server_params, server_stats = split_variables(variables["upper"])
  if cfg.server_mode == "per_client":  # SFL-V1: one upper copy per client
    server_params = stack_clients(server_params, cfg.num_clients)
    server_stats = stack_clients(server_stats, cfg.num_clients)
    server_opt = (jax.vmap(server_optimizer(cfg).init)(server_params)
                  if jax.tree.leaves(server_params) else  # a frozen upper without adapters
                  stack_clients(server_optimizer(cfg).init(server_params), cfg.num_clients))
  else:
    server_opt = server_optimizer(cfg).init(server_params)
  return RoundState(
      step=jnp.zeros((), jnp.int32),
      key=key_run,
      clients=ClientState(client_params, client_stats, client_opt),
      server=ServerState(server_params, server_stats, server_opt),
      frozen=frozen)
