"""The RoundConfig an ml_collections config names (`configs/*.py`, the CLI): its
algorithm's preset with the config's fields over it, the optimiser specs and the
schedules' horizons. The config, the CLI and the API name every field alike
(`lfmjax.algorithms`), so this is a lookup, not a translation.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from lfmjax.algorithms import (ALGORITHMS, SWITCHES, preset, server_updates_per_iteration,
                               turn_steps)
from lfmjax.optim import OptimizerSpec


def resolve_switches(config: Any) -> dict[str, bool]:
  """The Loc/Fed/Mix/GradMix switches: the config's where set, else the algorithm's."""
  defaults = ALGORITHMS[config.algorithm]
  return {name: (defaults[name] if config.get(name) is None else bool(config.get(name)))
          for name in SWITCHES}


def round_config_from(config: Any, num_classes: int, sizes_C=None,
                      inputs: str = "images") -> RoundConfig:
  """The RoundConfig an ml_collections config names: its algorithm's preset with the
  config's fields over it (the config uses RoundConfig's names). Server steps an
  iteration count the K participants (`clients_per_round`).

  `sizes_C`, the clients' data sizes, fix the schedules' horizon of vanilla SL, whose
  clients and server step once per mini-batch of a turn: without them a turn counts
  as one step (enough to check a config). `inputs`: the dataset's kind ('images' or
  'tokens', `Dataset.kind`)."""
  local_ce_weight = config.local_ce_weight
  if local_ce_weight is None:
    local_ce_weight = ALGORITHMS[config.algorithm]["local_ce_weight"]
  # SGLR's SplitLr: eta_s = eta_c * C ** alpha_lr, unless the server's rate is given.
  server_lr, exponent = config.server_lr, 0.0
  if server_lr is None:
    server_lr, exponent = config.client_lr, config.server_lr_exponent
    if exponent is None:
      exponent = ALGORITHMS[config.algorithm]["server_lr_exponent"]
  client_steps = server_steps = config.num_iterations
  participants = config.get("clients_per_round") or config.num_clients
  server_steps *= server_updates_per_iteration(ALGORITHMS[config.algorithm]["server_mode"],
                                               participants)
  same_names = ("num_clients", "batch_size", "local_loss_weight", "local_loss_kind",
                "num_mixed", "mixup_alpha", "mix_grad_to_clients", "fedavg_every",
                "fedavg_opt_state", "averaged_clients", "gradmix_fraction")
  u_shape = {"client_head": bool(config.client_head)} if "client_head" in config else {}
  image = config.input
  turns = {} if config.sl_turn_steps is None else {"sl_turn_steps": config.sl_turn_steps}
  if ALGORITHMS[config.algorithm]["server_mode"] == "relay" and sizes_C is not None:
    steps_C = turn_steps(np.asarray(sizes_C), config.batch_size, config.sl_turn_steps)
    client_steps = config.num_iterations * int(steps_C.max())
    server_steps = config.num_iterations * (  # K participants' turns, on average
        int(steps_C.sum()) if participants == config.num_clients
        else int(round(float(steps_C.mean()) * participants)))
  participation = {name: config[name] for name in PARTICIPATION_FIELDS if name in config}
  lora = config.get("lora") or {}
  frozen = ("lower", "upper") if lora and lora.get("rank") else ()
  privacy_fields = config.get("privacy") or {}
  defences = {name: privacy_fields[name] for name in PRIVACY_FIELDS if name in privacy_fields}
  return preset(
      config.algorithm, num_classes=num_classes,
      **{name: config[name] for name in same_names}, **resolve_switches(config), **turns,
      **u_shape,
      **defences, **participation,
      local_ce_weight=float(local_ce_weight), server_lr_exponent=float(exponent),
      client_opt=optimizer_spec(config, "client", config.client_lr, client_steps),
      server_opt=optimizer_spec(config, "server", float(server_lr), server_steps),
      frozen_segments=frozen, inputs=inputs, resize_to=image.resize_to, channels=image.channels,
      normalize=image.normalize, mean=tuple(image.mean) if image.mean else None,
      std=tuple(image.std) if image.std else None)


# RoundConfig's fields the config holds at its top level for participation.
PARTICIPATION_FIELDS = ("clients_per_round", "participant_sampling", "dropout_prob",
                        "deadline_s")
# RoundConfig's fields the config holds under `privacy`.
PRIVACY_FIELDS = ("noise_std", "noise_snr_db", "quantize_bits", "nopeek_weight",
                  "grad_noise_std", "grad_max_norm", "grad_keep_fraction",
                  "grad_quantize_bits", "label_rr_epsilon")


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
