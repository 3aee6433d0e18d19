"""Algorithms as compositions of switches, and the frozen settings a round is built from.

Every parallel split-learning algorithm in lfmjax is LocFedMix-SL's round (Oh et al.,
WWW 2022) with some of its components switched off: `psl` is LocFedMix-SL without
Loc, Fed and Mix. An algorithm name only fills in the switches the config leaves as
`None`, so an ablation is a config (`--config.algorithm=psl --config.fed=True`), not code.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import optax

from lfmjax.data import preprocess
from lfmjax.optim import OptimizerSpec

# Each algorithm: its component switches (`None` in a config means "the algorithm's")
# and its structure, which no switch changes:
#   server:   shared     one server, one step on sum_k delta_k (L_k + L~_k)
#             per_client one server copy per client, averaged with the lowers (SFL-V1)
#             sequential one server, a step per client in a random order (SFL-V2)
#             relay      clients one after another, the lower handed on (vanilla SL)
#   download: own        client k receives dL_k/ds_k
#             none       clients receive nothing and learn from a local head (LocSplitFed)
SWITCHES = ("loc", "fed", "mix", "gradmix")
ALGORITHMS: dict[str, dict] = {
    "sl": dict(loc=False, fed=False, mix=False, gradmix=False, server="relay",
               download="own", local_ce_weight=0.0),
    "psl": dict(loc=False, fed=False, mix=False, gradmix=False, server="shared",
                download="own", local_ce_weight=0.0),
    "sfl_v1": dict(loc=False, fed=True, mix=False, gradmix=False, server="per_client",
                   download="own", local_ce_weight=0.0),
    "sfl_v2": dict(loc=False, fed=True, mix=False, gradmix=False, server="sequential",
                   download="own", local_ce_weight=0.0),
    "locsplitfed": dict(loc=False, fed=True, mix=False, gradmix=False, server="shared",
                        download="none", local_ce_weight=1.0),
    "locfedmix": dict(loc=True, fed=True, mix=True, gradmix=False, server="shared",
                      download="own", local_ce_weight=0.0),
    "sglr": dict(loc=False, fed=False, mix=False, gradmix=True, server="shared",
                 download="own", local_ce_weight=0.0),
    "mix2sfl": dict(loc=False, fed=True, mix=True, gradmix=True, server="shared",
                    download="own", local_ce_weight=0.0),
}

ALGORITHM_HELP: dict[str, str] = {
    "sl": "sequential (vanilla) SL: clients one after another, the lower model handed on",
    "psl": "parallel SL: one server step on sum_k delta_k L_k, each client gets its own gradient",
    "sfl_v1": "SplitFed V1: one server copy per client, averaged; FedAvg of lowers",
    "sfl_v2": "SplitFed V2: one server stepping client after client in a random order; FedAvg",
    "locsplitfed": "LocSplitFed: clients learn from a local aux head, no gradient download; FedAvg",
    "locfedmix": "LocFedMix-SL: PSL + local MI loss (Loc) + FedAvg (Fed) + SmashMix (Mix)",
    "sglr": "SGLR: PSL + SplitLr (eta_s = eta_c C^server_lr_exponent) + GradMix (fraction phi)",
    "mix2sfl": "Mix2SFL: PSL + SmashMix + GradMix + FedAvg",
}

SWITCH_HELP: dict[str, str] = {
    "loc": "local MI loss: a decoder per client reconstructs x from s (weight mu)",
    "fed": "FedAvg of the client segments every fedavg_every (T_c) iterations",
    "mix": "SmashMix: num_mixed manifold-mixup batches across clients, Beta(mixup_alpha)",
    "gradmix": "GradMix: a random fraction gradmix_fraction (phi) of clients gets their mean gradient",
}

NORMALIZATIONS = ("none", "pm1", "standard")
SERVER_MODES = ("shared", "per_client", "sequential", "relay")
DOWNLOADS = ("own", "none")


@dataclasses.dataclass(frozen=True)
class RoundConfig:
  """Everything `make_round_step` needs, resolved and hashable (static under jit)."""
  num_clients: int
  batch_size: int
  num_classes: int
  # Loc: the local mutual-information regulariser (InfoPro's decoder loss).
  local_loss: bool = True
  local_loss_weight: float = 1.0          # mu
  local_loss_kind: str = "bce"            # R: 'bce' (InfoPro) or 'mse'
  local_ce_weight: float = 0.0            # InfoPro's I(s; y) term via the aux head
  # Mix: SmashMix.
  smashmix: bool = True
  num_mixed: int = 1                      # n_s
  mixup_alpha: float = 2.0                # lambda ~ Beta(alpha, alpha)
  mix_grad_to_clients: bool = False
  # Fed: FedAvg of the client segments.
  fedavg: bool = True
  fedavg_every: int = 1                   # T_c
  fedavg_opt_state: bool = False
  # Compute the clients as one shared model where that is exact (`clients_averaged`).
  averaged_clients: bool = True
  # GradMix (SGLR's SplitAvg): fraction phi of clients receiving their mean gradient.
  gradmix: bool = False
  gradmix_fraction: float = 0.5
  # Structure (see ALGORITHMS).
  server_mode: str = "shared"
  download: str = "own"
  # Optimisers: named by specs (`lfmjax.optim`), or any optax transformation, which
  # replaces the spec of its side (`make_round_step(..., client_tx=...)`).
  client_opt: OptimizerSpec = OptimizerSpec()
  server_opt: OptimizerSpec = OptimizerSpec()
  client_tx: optax.GradientTransformation | None = None
  server_tx: optax.GradientTransformation | None = None
  # Input pipeline, applied on the device to the uint8 batch.
  resize_to: int | None = None
  channels: int | None = None
  normalize: str = "none"
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  def __post_init__(self):
    """Refuses settings that cannot work or that the round would silently ignore."""
    problems = [text for bad, text in (
        (self.num_clients < 1, f"num_clients={self.num_clients} must be at least 1"),
        (self.batch_size < 1, f"batch_size={self.batch_size} must be at least 1"),
        (self.num_classes < 2, f"num_classes={self.num_classes} must be at least 2"),
        (self.server_mode not in SERVER_MODES,
         f"server_mode={self.server_mode!r} is unknown; use one of {', '.join(SERVER_MODES)}"),
        (self.download not in DOWNLOADS,
         f"download={self.download!r} is unknown; use one of {', '.join(DOWNLOADS)}"),
        (self.local_loss_kind not in ("bce", "mse"),
         f"local_loss_kind={self.local_loss_kind!r}: use 'bce' or 'mse'"),
        (self.normalize not in NORMALIZATIONS,
         f"normalize={self.normalize!r}: use one of {', '.join(NORMALIZATIONS)}"),
        (self.fedavg_every < 1, f"fedavg_every={self.fedavg_every} (T_c) must be at least 1"),
        (self.num_mixed < 1, f"num_mixed={self.num_mixed} (n_s) must be at least 1"),
        (not self.mixup_alpha > 0, f"mixup_alpha={self.mixup_alpha} must be positive"),
        (not 0.0 < self.gradmix_fraction <= 1.0,
         f"gradmix_fraction={self.gradmix_fraction} (phi) must be in (0, 1]"),
        (self.server_mode == "relay" and (self.fedavg or self.smashmix or self.gradmix),
         "vanilla SL (server_mode='relay') hands one lower from client to client: no "
         "fedavg, smashmix or gradmix"),
        (self.smashmix and self.server_mode != "shared",
         f"smashmix needs one shared server (server_mode='shared'), not "
         f"{self.server_mode!r}"),
        (self.download == "none" and self.local_ce_weight == 0.0,
         "download='none' leaves the clients only the aux head: set local_ce_weight > 0"),
        *((tx is not None and not (callable(getattr(tx, "init", None))
                                   and callable(getattr(tx, "update", None))),
           f"{side}_tx must be an optax.GradientTransformation")
          for side, tx in (("client", self.client_tx), ("server", self.server_tx))),
    ) if bad]
    if problems:
      raise ValueError(f"RoundConfig: {'; '.join(problems)}")

  def preprocess(self, x_uint8):
    """uint8 images -> (x_model, x01) with this run's resize, channels, normalisation."""
    return preprocess(x_uint8, resize_to=self.resize_to, channels=self.channels,
                      normalize=self.normalize, mean=self.mean, std=self.std)

  @property
  def uses_decoder(self) -> bool:
    return self.local_loss

  @property
  def uses_aux_head(self) -> bool:
    return self.local_ce_weight != 0.0

  @property
  def clients_averaged(self) -> bool:
    """Whether the round may compute all clients with one shared copy of their segments.

    With FedAvg after every iteration, every client starts each iteration from the same
    segments (they all start from one initialisation), and with plain SGD (momentum
    only if the optimiser states are averaged too) the average of the clients' steps
    is one step on the delta-weighted sum of their gradients: sum_k d_k (w - eta g_k)
    = w - eta sum_k d_k g_k. The round then runs every client's forward and backward
    with one set of weights, unchanged results (to float rounding), and no per-client
    weight copies in the arithmetic. Adam is not linear in the gradient, nor is
    clipping: no shortcut; nor for a user's optax transformation, which declares nothing.
    """
    opt = self.client_opt
    momentum_averaged = (opt.name in ("sgd", "momentum") and opt.grad_clip_norm is None
                         and self.fedavg_opt_state)
    return (self.averaged_clients and self.fedavg and self.fedavg_every == 1
            and self.server_mode != "relay" and self.client_tx is None
            and (opt.linear or momentum_averaged))

  @property
  def server_updates_per_iteration(self) -> int:
    return server_updates_per_iteration(self.server_mode, self.num_clients)

  @property
  def num_gradmix(self) -> int:
    """Clients receiving the mixed gradient each iteration: round(phi C), at least 2."""
    if not self.gradmix:
      return 0
    m = int(round(self.gradmix_fraction * self.num_clients))
    return m if m >= 2 else 0


def server_updates_per_iteration(server_mode: str, num_clients: int) -> int:
  """Server optimiser steps an iteration: one per client where it steps client by
  client (SFL-V2, SL), else one."""
  return num_clients if server_mode in ("sequential", "relay") else 1


def resolve_switches(config: Any) -> dict[str, bool]:
  """The Loc/Fed/Mix/GradMix switches: the config's where set, else the algorithm's."""
  if config.algorithm not in ALGORITHMS:
    raise ValueError(f"config.algorithm={config.algorithm!r} is unknown; use one of "
                     f"{', '.join(sorted(ALGORITHMS))}")
  defaults = ALGORITHMS[config.algorithm]
  return {name: (defaults[name] if config.get(name) is None else bool(config.get(name)))
          for name in SWITCHES}


def round_config_from(config: Any, num_classes: int) -> RoundConfig:
  """Builds the frozen RoundConfig from an ml_collections config."""
  switches = resolve_switches(config)
  algorithm = ALGORITHMS[config.algorithm]
  local_ce_weight = config.local_ce_weight
  if local_ce_weight is None:
    local_ce_weight = algorithm["local_ce_weight"]
  server_lr = config.server_lr
  if server_lr is None:  # SGLR's SplitLr: eta_s = eta_c * C ** alpha_lr
    server_lr = config.client_lr * config.num_clients ** config.server_lr_exponent
  server_mode = algorithm["server"]
  server_steps = config.num_iterations * server_updates_per_iteration(server_mode,
                                                                      config.num_clients)
  return RoundConfig(
      num_clients=config.num_clients,
      batch_size=config.batch_size,
      num_classes=num_classes,
      local_loss=switches["loc"],
      local_loss_weight=config.mu,
      local_loss_kind=config.local_loss_kind,
      local_ce_weight=float(local_ce_weight),
      smashmix=switches["mix"],
      num_mixed=config.num_mixed,
      mixup_alpha=config.mixup_alpha,
      mix_grad_to_clients=config.mix_grad_to_clients,
      fedavg=switches["fed"],
      fedavg_every=config.fedavg_every,
      fedavg_opt_state=config.fedavg_opt_state,
      averaged_clients=config.averaged_clients,
      gradmix=switches["gradmix"],
      gradmix_fraction=config.gradmix_fraction,
      server_mode=server_mode,
      download=algorithm["download"],
      client_opt=optimizer_spec(config, "client", config.client_lr, config.num_iterations),
      server_opt=optimizer_spec(config, "server", float(server_lr), server_steps),
      resize_to=config.input.resize_to,
      channels=config.input.channels,
      normalize=config.input.normalize,
      mean=tuple(config.input.mean) if config.input.mean else None,
      std=tuple(config.input.std) if config.input.std else None,
  )


def optimizer_spec(config: Any, side: str, learning_rate: float, total_steps: int
                   ) -> OptimizerSpec:
  """One side's OptimizerSpec from the config: the server's fields, where None, are
  the client's."""
  def field(name):
    value = config.get(f"server_{name}") if side == "server" else None
    return config.get(f"client_{name}") if value is None else value
  return OptimizerSpec(
      name=field("optimizer"), learning_rate=learning_rate, momentum=config.momentum,
      weight_decay=config.weight_decay, grad_clip_norm=config.grad_clip_norm,
      schedule=field("schedule"), total_steps=max(1, total_steps),
      warmup_fraction=config.warmup_fraction,
      decay_fractions=tuple(config.decay_fractions), decay_factor=config.decay_factor)
