"""Config checks before anything is loaded or compiled: one line naming the field and
the fix for every value that cannot work (the CLI exits 2 on a ConfigError)."""
from __future__ import annotations

import math
import os

import jax

from lfmjax import algorithms, config_round, devices
from lfmjax.data import PARTITIONS
from lfmjax.data.datasets import canonical_name, dataset_kind
from lfmjax.models import LORA_MODELS, MODEL_NAMES, LoRASpec, get_model
from lfmjax.models.lora import LORA_TARGETS
from lfmjax.optim import OPTIMIZERS, SCHEDULES


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the fix."""


def validate(config) -> None:
  """Checks the config before anything is loaded or compiled: the fields only the run
  reads here, then everything the round reads by building its RoundConfig (`spec`)."""
  def need(ok: bool, field: str, fix: str):
    if not ok:
      raise ConfigError(f"config.{field}={field_value(config, field)!r}: {fix}")
  need(config.algorithm in algorithms.ALGORITHMS, "algorithm",
       f"use one of {', '.join(sorted(algorithms.ALGORITHMS))}")
  need(config.model in MODEL_NAMES, "model", f"use one of {', '.join(MODEL_NAMES)}")
  need(config.partition in PARTITIONS, "partition", f"use one of {', '.join(PARTITIONS)}")
  need(known_dataset(config.dataset), "dataset",
       "use fashion_mnist, cifar10, kjv or kjv_public")
  check_optimisation(need, config)
  need(positive(config.dirichlet_alpha), "dirichlet_alpha", "Dirichlet needs alpha > 0")
  need(config.classes_per_client >= 1, "classes_per_client", "must be at least 1")
  need(config.samples_per_client >= 1, "samples_per_client", "must be at least 1")
  need(config.validation_size >= 0, "validation_size",
       "must be >= 0 train images held out (0: no validation split)")
  need(1 <= config.num_seeds <= MAX_SEEDS, "num_seeds", f"must be in [1, {MAX_SEEDS}]")
  need(0 <= config.seed <= MAX_SEED + 1 - config.num_seeds, "seed",
       f"seeds seed..seed+num_seeds-1 must lie in [0, {MAX_SEED}]")
  need(config.partition_seed is None or 0 <= config.partition_seed <= MAX_SEED,
       "partition_seed", f"must lie in [0, {MAX_SEED}] (or leave it unset: seed)")
  need(config.data_dir is None or os.path.isdir(os.path.expanduser(config.data_dir)),
       "data_dir", "no such directory; name the directory that holds the dataset, or "
       "leave it unset to search the usual places")
  check_sizes(need, config)
  check_distributed(need, config)
  need(0 <= config.num_devices <= jax.device_count(), "num_devices",
       f"this run has {jax.device_count()} device(s); use 0 (all) or fewer")
  for field in ("client_flops_per_s", "server_flops_per_s", "uplink_bytes_per_s",
                "downlink_bytes_per_s"):
    need(positive(config.get(field)), field, "rates must be positive numbers")
  check_devices(need, config)
  check_finetune(need, config)
  spec(config)
  check_model(config)


LORA_SEGMENTS = {"client": ("lower",), "server": ("upper",), "both": ("lower", "upper")}
MAX_RANK = 4096


def lora_options(config) -> dict:
  """`get_model`'s LoRA arguments from the config (none when rank is 0)."""
  lora = config.lora
  if not lora.rank:
    return {}
  return {"lora": LoRASpec(lora.rank, float(lora.alpha), tuple(lora.targets)),
          "lora_segments": LORA_SEGMENTS[lora.segments]}


def check_finetune(need, config) -> None:
  """The LoRA fields and the pretrained run's workdir (read when the run starts)."""
  lora = config.lora
  need(isinstance(lora.rank, int) and 0 <= lora.rank <= MAX_RANK, "lora.rank",
       f"the adapters' rank: 0 (off) to {MAX_RANK}")
  need(positive(lora.alpha), "lora.alpha", "the scale alpha / r needs alpha > 0")
  need(lora.segments in LORA_SEGMENTS, "lora.segments", f"use one of {', '.join(LORA_SEGMENTS)}")
  need(bool(lora.targets) and set(lora.targets) <= set(LORA_TARGETS), "lora.targets",
       f"name dense layers among {', '.join(LORA_TARGETS)}")
  need(not lora.rank or config.model in LORA_MODELS, "lora.rank",
       f"adapters need a transformer model ({', '.join(LORA_MODELS)}); set it to 0")
  need(config.pretrained is None
       or os.path.isdir(os.path.join(os.path.expanduser(config.pretrained), "checkpoints")),
       "pretrained", "no run with checkpoints there; pretrain first, or name that run's "
       "--workdir")


def check_devices(need, config) -> None:
  """The device distribution's fields (the trace file is read when the run starts)."""
  dev = config.devices
  need(dev.distribution in devices.DISTRIBUTIONS, "devices.distribution",
       f"use one of {', '.join(devices.DISTRIBUTIONS)}")
  need(0.0 <= dev.spread <= 10.0, "devices.spread",
       "the sigma of log-rate must lie in [0, 10] (1: rates spread over about e^±1)")
  need(dev.distribution != "trace" or bool(dev.trace), "devices.trace",
       "devices.distribution='trace' needs the path of a CSV trace")
  need(dev.trace is None or os.path.isfile(os.path.expanduser(dev.trace)), "devices.trace",
       "no such file; give the path of a CSV with columns "
       f"{', '.join(devices.TRACE_COLUMNS)}")
  need(dev.seed is None or 0 <= dev.seed <= MAX_SEED, "devices.seed",
       f"must lie in [0, {MAX_SEED}] (or leave it unset: seed)")


def field_value(config, dotted: str):
  for part in dotted.split("."):
    config = config.get(part)
  return config


# What the datasets hold as stored (H, W, C), for the checks before any loading.
STORED_SHAPES = {"fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def model_overrides(config) -> dict:
  """The model overrides the config sets (None: the model's default)."""
  return {k: v for k, v in config.model_overrides.to_dict().items() if v is not None}


def check_model(config) -> None:
  """The model with its overrides, and the input fields, against the dataset's stored
  shape (one line naming the field, before anything is loaded)."""
  if dataset_kind(config.dataset) == "tokens":
    need_seq = isinstance(config.input.seq_len, int) and 8 <= config.input.seq_len <= 4096
    if not need_seq:
      raise ConfigError(f"config.input.seq_len={config.input.seq_len!r}: tokens a sample "
                        f"must be an int in [8, 4096]")
    _check_built(config, (config.input.seq_len,), 256)
    return
  shape = model_input_shape(config, STORED_SHAPES[canonical_name(config.dataset)])
  stored_channels = STORED_SHAPES[canonical_name(config.dataset)][2]
  for field in ("mean", "std"):
    values = config.input.get(field)
    if values is not None and len(values) not in (1, shape[2]):
      raise ConfigError(f"config.input.{field}={values!r}: give one value per channel "
                        f"({shape[2]}) or one for all")
  if config.input.channels is not None and stored_channels not in (1, shape[2]):
    raise ConfigError(f"config.input.channels={config.input.channels}: the stored images "
                      f"have {stored_channels} channels; only grey images are repeated")
  _check_built(config, shape, 10)


def _check_built(config, shape, num_classes: int) -> None:
  try:
    get_model(config.model, num_classes=num_classes, input_shape=shape,
              **lora_options(config), client_head=bool(config.get("client_head")),
              **model_overrides(config))
  except ValueError as e:
    raise ConfigError(f"config.model={config.model!r} / config.model_overrides: {e}") from None


MAX_SEED = 2**31 - 1      # what jax.random.PRNGKey takes as an int32
MAX_SEEDS = 1024          # seed replicas: each is a whole state in memory
MAX_STEPS = 2**31 - 1     # the step counter is int32
MAX_CHUNK = 100_000       # steps a dispatch stacks metrics for; test samples a batch
MAX_MIXED = 64            # SmashMix batches per client (n_s C B samples at the server)
MAX_CLASSES_PER_CLIENT = 10
MAX_PROBE = 4096          # dCor's probe: a probe x probe distance matrix per client


def check_sizes(need, config) -> None:
  """The fields that count things or size memory, each bounded."""
  need(0 <= config.num_iterations <= MAX_STEPS, "num_iterations", f"must be in [0, {MAX_STEPS}]")
  need(1 <= config.steps_per_dispatch <= MAX_CHUNK, "steps_per_dispatch",
       f"must be in [1, {MAX_CHUNK}]")
  need(1 <= config.eval_every <= MAX_STEPS, "eval_every", f"must be in [1, {MAX_STEPS}]")
  need(config.eval_clients >= 0, "eval_clients", "must be >= 0 (0: all clients)")
  need(1 <= config.eval_chunk <= MAX_CHUNK, "eval_chunk", f"must be in [1, {MAX_CHUNK}]")
  need(config.eval_samples >= 0, "eval_samples", "must be >= 0 (0: every sample)")
  need(0 <= config.checkpoint_every <= MAX_STEPS, "checkpoint_every",
       "must be >= 0 (0: no checkpoints)")
  need(1 <= config.keep_checkpoints <= 1000, "keep_checkpoints", "must be in [1, 1000]")
  need(config.num_clients >= 1, "num_clients", "must be at least 1")
  need(config.batch_size >= 1, "batch_size", "must be at least 1")
  need(config.num_mixed <= MAX_MIXED, "num_mixed", f"n_s must be at most {MAX_MIXED}")
  need(1 <= config.classes_per_client <= MAX_CLASSES_PER_CLIENT, "classes_per_client",
       f"must be in [1, {MAX_CLASSES_PER_CLIENT}] (the datasets have 10 classes)")
  need(config.samples_per_client >= 1, "samples_per_client", "must be at least 1")
  need(config.validation_size >= 0, "validation_size",
       "must be >= 0 train images held out (0: no validation split)")
  need(0 <= config.privacy.probe_size <= MAX_PROBE, "privacy.probe_size",
       f"samples per client for dCor at evaluations: 0 (off) to {MAX_PROBE}")


def check_distributed(need, config) -> None:
  dist = config.distributed
  address = dist.coordinator_address
  need(address is None or (address.rpartition(":")[0] and address.rpartition(":")[2].isdigit()),
       "distributed.coordinator_address", "use host:port (or leave it unset)")
  need(dist.num_processes is None or dist.num_processes >= 1, "distributed.num_processes",
       "must be at least 1 (or leave it unset)")
  need(dist.process_id is None or 0 <= dist.process_id < (dist.num_processes or 2**31),
       "distributed.process_id", "must be in [0, num_processes)")
  need(dist.local_device_count is None or 1 <= dist.local_device_count <= 1024,
       "distributed.local_device_count", "must be in [1, 1024] (or leave it unset)")


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
  need(config.server_lr_exponent is None or math.isfinite(config.server_lr_exponent),
       "server_lr_exponent", "must be a number (or leave it unset: the algorithm's)")
  need(config.server_lr is None or config.server_lr_exponent is None, "server_lr_exponent",
       f"SplitLr scales the client's rate, but server_lr={config.server_lr} is given: "
       f"unset one of them")
  need(0.0 <= config.momentum < 1.0, "momentum", "must be in [0, 1)")


# RoundConfig fields the config names otherwise: the structure is the algorithm's, the
# input pipeline sits under `input`.
_CONFIG_FIELD = {"server_mode": "algorithm", "client_gradient": "algorithm",
                 **{f: f"input.{f}" for f in ("resize_to", "channels", "normalize", "mean",
                                               "std")},
                 **{f: f"privacy.{f}" for f in config_round.PRIVACY_FIELDS}}


def spec(config) -> algorithms.RoundConfig:
  """The config's RoundConfig; its composition errors as one line in the config's names."""
  try:
    # Both datasets have 10 classes; no rule depends on more than "at least 2".
    return config_round.round_config_from(config, num_classes=10,
                                        inputs=dataset_kind(config.dataset))
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


def model_input_shape(config, image_shape, tokens: bool = False) -> tuple[int, ...]:
  if tokens:  # a text corpus: (T,) tokens as stored
    return tuple(image_shape)
  h, w, c = image_shape
  side = config.input.resize_to
  return (side or h, side or w, config.input.channels or c)

