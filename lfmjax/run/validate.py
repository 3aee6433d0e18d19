"""Config checks before anything is loaded or compiled: one line naming the field and
the fix for every value that cannot work (the CLI exits 2 on a ConfigError)."""
from __future__ import annotations

import math

import jax

from lfmjax import algorithms
from lfmjax.data import PARTITIONS
from lfmjax.data.datasets import canonical_name
from lfmjax.models import MODEL_NAMES
from lfmjax.optim import OPTIMIZERS, SCHEDULES


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the fix."""


def validate(config) -> None:
  """Checks the config before anything is loaded or compiled: the fields only the run
  reads here, then everything the round reads by building its RoundConfig (`spec`)."""
  def need(ok: bool, field: str, fix: str):
    if not ok:
      raise ConfigError(f"config.{field}={config.get(field)!r}: {fix}")
  need(config.algorithm in algorithms.ALGORITHMS, "algorithm",
       f"use one of {', '.join(sorted(algorithms.ALGORITHMS))}")
  need(config.model in MODEL_NAMES, "model", f"use one of {', '.join(MODEL_NAMES)}")
  need(config.partition in PARTITIONS, "partition", f"use one of {', '.join(PARTITIONS)}")
  need(known_dataset(config.dataset), "dataset", "use fashion_mnist or cifar10")
  check_optimisation(need, config)
  need(positive(config.dirichlet_alpha), "dirichlet_alpha", "Dirichlet needs alpha > 0")
  need(config.classes_per_client >= 1, "classes_per_client", "must be at least 1")
  need(config.samples_per_client >= 1, "samples_per_client", "must be at least 1")
  need(config.num_iterations >= 0, "num_iterations", "must be non-negative")
  need(config.steps_per_dispatch >= 1, "steps_per_dispatch", "must be at least 1")
  need(config.eval_every >= 1, "eval_every", "must be at least 1")
  need(config.eval_clients >= 0, "eval_clients", "must be >= 0 (0: all clients)")
  need(config.eval_chunk >= 1, "eval_chunk", "must be at least 1")
  need(config.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: no checkpoints)")
  need(config.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1")
  need(config.num_seeds >= 1, "num_seeds", "must be at least 1")
  need(0 <= config.num_devices <= jax.device_count(), "num_devices",
       f"this run has {jax.device_count()} device(s); use 0 (all) or fewer")
  for field in ("client_flops_per_s", "server_flops_per_s", "uplink_bytes_per_s",
                "downlink_bytes_per_s"):
    need(positive(config.get(field)), field, "rates must be positive numbers")
  spec(config)


def check_optimisation(need, config) -> None:
  need(config.client_optimizer in OPTIMIZERS, "client_optimizer",
       f"use one of {', '.join(OPTIMIZERS)}")
  need(config.server_optimizer in (None, *OPTIMIZERS), "server_optimizer",
       f"use one of {', '.join(OPTIMIZERS)} (or leave unset)")
  need(config.client_schedule in SCHEDULES, "client_schedule",
       f"use one of {', '.join(SCHEDULES)}")
  need(config.server_schedule in (None, *SCHEDULES), "server_schedule",
       f"use one of {', '.join(SCHEDULES)} (or leave unset)")
  need(0.0 <= config.weight_decay < math.inf, "weight_decay", "must be >= 0")
  need(config.grad_clip_norm is None or positive(config.grad_clip_norm), "grad_clip_norm",
       "the clipping norm must be a positive number (or leave it unset)")
  need(0.0 <= config.warmup_fraction < 1.0, "warmup_fraction", "must be in [0, 1)")
  need(all(0.0 < f < 1.0 for f in config.decay_fractions), "decay_fractions",
       "each drop must lie in (0, 1), a fraction of the run")
  need(0.0 < config.decay_factor < math.inf, "decay_factor", "must be positive")
  need(positive(config.client_lr), "client_lr", "the learning rate must be a positive number")
  need(config.server_lr is None or positive(config.server_lr), "server_lr",
       "the learning rate must be a positive number (or leave it unset)")
  need(math.isfinite(config.server_lr_exponent), "server_lr_exponent", "must be a number")
  need(0.0 <= config.momentum < 1.0, "momentum", "must be in [0, 1)")


# RoundConfig fields the config names otherwise: the structure is the algorithm's, the
# input pipeline sits under `input`.
_CONFIG_FIELD = {"server_mode": "algorithm", "client_gradient": "algorithm",
                 **{f: f"input.{f}" for f in ("resize_to", "channels", "normalize", "mean",
                                               "std")}}


def spec(config) -> algorithms.RoundConfig:
  """The config's RoundConfig; its composition errors as one line in the config's names."""
  try:
    # Both datasets have 10 classes; no rule depends on more than "at least 2".
    return algorithms.round_config_from(config, num_classes=10)
  except algorithms.SpecError as e:
    field, value, fix = e.problems[0]
    name = _CONFIG_FIELD.get(field, field)
    if name == "algorithm":
      fix = f"{config.algorithm} has {field}={value!r}; {fix}"
    shown = config.algorithm if name == "algorithm" else value
    raise ConfigError(f"config.{name}={shown!r}: {fix}") from None


def known_dataset(name) -> bool:
  try:
    canonical_name(name)
  except ValueError:
    return False
  return True


def positive(value) -> bool:
  return 0.0 < value < math.inf


def model_input_shape(config, image_shape) -> tuple[int, int, int]:
  h, w, c = image_shape
  side = config.input.resize_to
  return (side or h, side or w, config.input.channels or c)

