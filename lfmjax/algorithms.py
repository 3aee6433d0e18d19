"""Algorithms as compositions of switches, and the frozen settings a round is built from.

Every parallel split-learning algorithm in lfmjax is LocFedMix-SL's round (Oh et al.,
WWW 2022) with some of its components switched off: `psl` is LocFedMix-SL without
Loc, Fed and Mix. An algorithm is a preset of `RoundConfig`'s fields (`preset`); a config's
switches left as `None` are the algorithm's, so an ablation is a config
(`--config.algorithm=psl --config.fedavg=True`), not code. The config, the CLI and the
API name every field alike, and `RoundConfig` checks the composition rules itself, so
all three get the same one-line errors.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

from lfmjax import label_privacy, privacy
from lfmjax.data import preprocess
from lfmjax.optim import OptimizerSpec

# Each algorithm is a preset of RoundConfig's fields: its component switches (`None` in a
# config means "the algorithm's") and its structure, which no switch changes:
#   server_mode:     single     one server, one step on sum_k delta_k (L_k + L~_k)
#                    per_client one server copy per client, averaged with the lowers (SFL-V1)
#                    sequential one server, a step per client in a random order (SFL-V2)
#                    relay      clients one after another, the lower handed on (vanilla SL)
#   client_gradient: own        client k receives dL_k/ds_k
#                    none       clients receive nothing and learn from a local head (LocSplitFed)
SWITCHES = ("local_loss", "fedavg", "smashmix", "gradmix")
#   server_lr_exponent: SGLR's SplitLr alpha_lr, the server's rate eta_c * C ** alpha_lr
STRUCTURE = ("server_mode", "client_gradient", "local_ce_weight", "server_lr_exponent")


def _preset(local_loss=False, fedavg=False, smashmix=False, gradmix=False,
            server_mode="single", client_gradient="own", local_ce_weight=0.0,
            server_lr_exponent=0.0) -> dict:
  return dict(local_loss=local_loss, fedavg=fedavg, smashmix=smashmix, gradmix=gradmix,
              server_mode=server_mode, client_gradient=client_gradient,
              local_ce_weight=local_ce_weight, server_lr_exponent=server_lr_exponent)


ALGORITHMS: dict[str, dict] = {
    "sl": _preset(server_mode="relay"),
    "psl": _preset(),
    "sfl_v1": _preset(fedavg=True, server_mode="per_client"),
    "sfl_v2": _preset(fedavg=True, server_mode="sequential"),
    "locsplitfed": _preset(fedavg=True, client_gradient="none", local_ce_weight=1.0),
    "locfedmix": _preset(local_loss=True, fedavg=True, smashmix=True),
    # SGLR (Pal et al. 2021) as its authors ran it: SplitLr alpha_lr = 0.5, SplitAvg phi = 0.5
    # (gradmix_fraction's default).
    "sglr": _preset(gradmix=True, server_lr_exponent=0.5),
    "mix2sfl": _preset(fedavg=True, smashmix=True, gradmix=True),
}

ALGORITHM_HELP: dict[str, str] = {
    "sl": "sequential (vanilla) SL: clients one after another, the lower model handed on",
    "psl": "parallel SL: one server step on sum_k delta_k L_k, each client gets its own gradient",
    "sfl_v1": "SplitFed V1: one server copy per client, averaged; FedAvg of lowers",
    "sfl_v2": "SplitFed V2: one server stepping client after client in a random order; FedAvg",
    "locsplitfed": "LocSplitFed: clients learn from a local aux head, no gradient from the server; FedAvg",
    "locfedmix": "LocFedMix-SL: PSL + local MI loss (Loc) + FedAvg (Fed) + SmashMix (Mix)",
    "sglr": "SGLR: PSL + SplitLr (eta_s = eta_c C^0.5) + GradMix/SplitAvg (fraction phi = 0.5)",
    "mix2sfl": "Mix2SFL: PSL + SmashMix + GradMix + FedAvg",
}

SWITCH_HELP: dict[str, str] = {
    "local_loss": "Loc: a decoder per client reconstructs x from s (weight local_loss_weight, mu)",
    "fedavg": "Fed: FedAvg of the client segments every fedavg_every (T_c) iterations",
    "smashmix": "Mix: num_mixed manifold-mixup batches across clients, Beta(mixup_alpha)",
    "gradmix": "GradMix: a random fraction gradmix_fraction (phi) of clients gets their mean gradient",
}

NORMALIZATIONS = ("none", "pm1", "standard")
INPUTS = ("images", "tokens")
PARTICIPANT_SAMPLINGS = ("uniform", "by_size")
SERVER_MODES = ("single", "per_client", "sequential", "relay")
CLIENT_GRADIENTS = ("own", "none")
LOCAL_LOSS_KINDS = ("bce", "mse")
MAX_SIDE = 512      # resize_to: a bound, since the side sizes every buffer of the run
MAX_CHANNELS = 16   # channels: grey repeated up to this
MAX_TURN_STEPS = 100_000  # sl_turn_steps: a bound, since it is the length of a scan
MAX_QUANTIZE_BITS = privacy.MAX_QUANTIZE_BITS


class SpecError(ValueError):
  """A RoundConfig that cannot work. `problems` holds (field, value, fix) triples, so a
  caller can name the fields in its own terms (the CLI: `config.FIELD`)."""

  def __init__(self, problems: list[tuple[str, Any, str]]):
    self.problems = problems
    super().__init__("RoundConfig: " + "; ".join(f"{field}={value!r}: {fix}"
                                                 for field, value, fix in problems))


@dataclasses.dataclass(frozen=True)
class RoundConfig:
  """Everything `make_round_step` needs, resolved and hashable (static under jit).

  It checks its own composition rules when built (`SpecError`); the presets in
  ALGORITHMS are partial instances of it (`preset`).
  """
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
  # The averaged client phase where it is exact (`clients_averaged`); False: never.
  averaged_clients: bool = True
  # GradMix (SGLR's SplitAvg): fraction phi of clients receiving their mean gradient.
  gradmix: bool = False
  gradmix_fraction: float = 0.5
  # Structure (see ALGORITHMS).
  server_mode: str = "single"
  client_gradient: str = "own"
  # A U-shaped split (`lfmjax.ushape`): the clients hold the model's last layer and the
  # loss, so no label reaches the server; the model needs a head (`SplitModel.head`).
  client_head: bool = False
  # Vanilla SL: mini-batches a client processes in its turn before handing the lower
  # on; None: one local epoch, ceil(|D_k| / B) for client k (`turn_steps`).
  sl_turn_steps: int | None = None
  # Optimisers: named by specs (`lfmjax.optim`), or any optax transformation, which
  # replaces the spec of its side (`make_round_step(..., client_tx=...)`).
  client_opt: OptimizerSpec = OptimizerSpec()
  server_opt: OptimizerSpec = OptimizerSpec()
  # SGLR's SplitLr: the server's peak rate is server_opt's times C ** alpha_lr (`server_spec`).
  server_lr_exponent: float = 0.0
  client_tx: optax.GradientTransformation | None = None
  server_tx: optax.GradientTransformation | None = None
  # Fine-tuning (`lfmjax.finetune`): segments ('lower', 'upper') whose params, their LoRA
  # adapters aside, are a frozen backbone held once (RoundState.frozen).
  frozen_segments: tuple[str, ...] = ()
  # Privacy (`lfmjax.privacy`): defences on every upload of smashed data, and NoPeek.
  noise_std: float = 0.0                  # Gaussian noise sigma on s (0: off)
  noise_snr_db: float | None = None       # or the sigma giving this SNR on each batch
  quantize_bits: int = 0                  # k-bit quantisation of s (0: off)
  nopeek_weight: float = 0.0              # NoPeek: weight of dCor(x, s) in the client loss
  # Label privacy (`lfmjax.label_privacy`): defences on the gradient the label holder
  # sends (the server's download; a U-shaped client's returned gradient), and
  # randomised response on the labels the server receives.
  grad_noise_std: float = 0.0             # isotropic Gaussian noise sigma (0: off)
  grad_max_norm: bool = False             # Li et al.'s max-norm perturbation
  grad_keep_fraction: float = 1.0         # top-k sparsification: the share kept (1: off)
  grad_quantize_bits: int = 0             # k-bit quantisation per sample (0: off)
  label_rr_epsilon: float | None = None   # eps of K-ary randomised response (None: off)
  # Participation (`lfmjax.participation`): K of the C clients take part in an iteration.
  clients_per_round: int | None = None    # K; None: all C
  participant_sampling: str = "uniform"   # 'uniform' or 'by_size' (in proportion to |D_k|)
  dropout_prob: float = 0.0               # a participant drops out of an iteration with p
  deadline_s: float | None = None         # participants slower than this are dropped
  # Input pipeline, applied on the device to the uint8 batch.
  inputs: str = "images"                  # 'images', or 'tokens' (a text corpus's bytes)
  resize_to: int | None = None
  channels: int | None = None
  normalize: str = "none"
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  def __post_init__(self):
    """Refuses settings that cannot work or that the round would silently ignore."""
    problems = [(field, getattr(self, field), fix) for bad, field, fix in self._rules()
                if bad]
    if problems:
      raise SpecError(problems)

  def _rules(self):
    """(broken, field, fix) for every rule: ranges, names, then the composition."""
    yield from (
        (self.num_clients < 1, "num_clients", "must be at least 1"),
        (self.batch_size < 1, "batch_size", "must be at least 1"),
        (self.num_classes < 2, "num_classes", "must be at least 2"),
        (self.server_mode not in SERVER_MODES, "server_mode",
         f"use one of {', '.join(SERVER_MODES)}"),
        (self.client_gradient not in CLIENT_GRADIENTS, "client_gradient",
         f"use one of {', '.join(CLIENT_GRADIENTS)}"),
        (self.local_loss_kind not in LOCAL_LOSS_KINDS, "local_loss_kind",
         f"use one of {', '.join(LOCAL_LOSS_KINDS)}"),
        (not 0.0 <= self.local_loss_weight < math.inf, "local_loss_weight",
         "the local-loss weight (mu) must be >= 0"),
        (not 0.0 <= self.local_ce_weight < math.inf, "local_ce_weight", "must be >= 0"),
        (self.fedavg_every < 1, "fedavg_every", "T_c must be at least 1"),
        (self.num_mixed < 1, "num_mixed", "n_s must be at least 1"),
        (not 0.0 < self.mixup_alpha < math.inf, "mixup_alpha",
         "Beta(alpha, alpha) needs alpha > 0"),
        (not 0.0 < self.gradmix_fraction <= 1.0, "gradmix_fraction", "phi must be in (0, 1]"),
        (not -4.0 <= self.server_lr_exponent <= 4.0, "server_lr_exponent",
         "SplitLr's alpha_lr must lie in [-4, 4] (SGLR uses 0.5)"),
        (self.sl_turn_steps is not None and not 1 <= self.sl_turn_steps <= MAX_TURN_STEPS,
         "sl_turn_steps", f"1 to {MAX_TURN_STEPS} mini-batches a turn (or None: one local "
         f"epoch)"),
        (self.sl_turn_steps is not None and self.server_mode != "relay", "sl_turn_steps",
         "turns belong to vanilla SL (server_mode='relay'); leave it unset"),
        (not set(self.frozen_segments) <= {"lower", "upper"}, "frozen_segments",
         "a subset of ('lower', 'upper')"),
        *self._privacy_rules(),
        *self._participation_rules(),
        *self._input_rules(),
        *self._composition_rules(),
        *((tx is not None and not (callable(getattr(tx, "init", None))
                                   and callable(getattr(tx, "update", None))),
           f"{side}_tx", "must be an optax.GradientTransformation")
          for side, tx in (("client", self.client_tx), ("server", self.server_tx))),
    )

  def _privacy_rules(self):
    yield from (
        (not 0.0 <= self.noise_std < math.inf, "noise_std", "the noise's sigma must be >= 0"),
        (self.noise_snr_db is not None and not -100.0 <= self.noise_snr_db <= 100.0,
         "noise_snr_db", "a target SNR in [-100, 100] dB (or None: noise_std)"),
        (self.noise_snr_db is not None and self.noise_std > 0, "noise_snr_db",
         "set the noise by noise_std or by noise_snr_db, not both"),
        (not 0 <= self.quantize_bits <= MAX_QUANTIZE_BITS, "quantize_bits",
         f"0 (off) or 1 to {MAX_QUANTIZE_BITS} bits an element"),
        (not 0.0 <= self.nopeek_weight < math.inf, "nopeek_weight",
         "NoPeek's weight on dCor(x, s) must be >= 0"),
        (not 0.0 <= self.grad_noise_std < math.inf, "grad_noise_std",
         "the gradient noise's sigma must be >= 0"),
        (not 0.0 < self.grad_keep_fraction <= 1.0, "grad_keep_fraction",
         "the share of each gradient kept must lie in (0, 1] (1: off)"),
        (not 0 <= self.grad_quantize_bits <= MAX_QUANTIZE_BITS, "grad_quantize_bits",
         f"0 (off) or 1 to {MAX_QUANTIZE_BITS} bits an element"),
        (self.label_rr_epsilon is not None and not 0.0 < self.label_rr_epsilon <= 50.0,
         "label_rr_epsilon", "randomised response's eps must lie in (0, 50] (or None: off)"),
        (self.label_rr_epsilon is not None and self.client_head, "label_rr_epsilon",
         "a U-shaped split (client_head) sends no label to the server: randomised "
         "response has nothing to protect; leave it unset"),
        (self.defends_gradient and self.client_gradient == "none" and not self.client_head,
         "client_gradient", "the gradient defences act on the gradient the server sends, "
         "and with client_gradient='none' (LocSplitFed) it sends none: turn them off"),
    )

  def _participation_rules(self):
    k = self.clients_per_round
    yield from (
        (k is not None and not 1 <= k <= self.num_clients, "clients_per_round",
         f"K participants an iteration must lie in [1, num_clients={self.num_clients}] "
         f"(or None: all)"),
        (self.participant_sampling not in PARTICIPANT_SAMPLINGS, "participant_sampling",
         f"use one of {', '.join(PARTICIPANT_SAMPLINGS)}"),
        (not 0.0 <= self.dropout_prob < 1.0, "dropout_prob",
         "a participant's dropout probability must lie in [0, 1)"),
        (self.deadline_s is not None and not 0.0 < self.deadline_s < math.inf, "deadline_s",
         "a deadline must be positive seconds (or None: no deadline)"),
    )

  def _input_rules(self):
    channels = self.channels
    tokens = self.inputs == "tokens"
    for bad, field, fix in (
        (self.inputs not in INPUTS, "inputs", f"use one of {', '.join(INPUTS)}"),
        *((tokens and getattr(self, name) not in (None, "none"), name,
           "token inputs (a text corpus) take no image preprocessing; leave it unset")
          for name in ("resize_to", "channels", "normalize", "mean", "std")),
        (self.normalize not in NORMALIZATIONS, "normalize",
         f"use one of {', '.join(NORMALIZATIONS)}"),
        (self.resize_to is not None and not 2 <= self.resize_to <= MAX_SIDE, "resize_to",
         f"a square side in [2, {MAX_SIDE}] pixels (or None: as stored)"),
        (channels is not None and not 1 <= channels <= MAX_CHANNELS, "channels",
         f"1 to {MAX_CHANNELS} (grey repeated), or None: as stored"),
        (self.normalize == "standard" and not (self.mean and self.std), "normalize",
         "'standard' needs mean and std, one value per channel"),
        (self.mean is not None and channels is not None and len(self.mean) not in (1, channels),
         "mean", f"one value per channel ({channels}) or one for all"),
        (self.std is not None and channels is not None and len(self.std) not in (1, channels),
         "std", f"one value per channel ({channels}) or one for all"),
        (self.std is not None and any(not 0 < v < math.inf for v in self.std), "std",
         "every value must be positive"),
    ):
      yield bad, field, fix

  def _composition_rules(self):
    """What an algorithm's structure cannot take (SPEC.md's table)."""
    relay = self.server_mode == "relay"
    for name in ("fedavg", "smashmix", "gradmix"):
      yield (relay and getattr(self, name), name,
             "vanilla SL (server_mode='relay') hands one lower from client to client; "
             f"turn {name} off or pick a parallel algorithm")
    yield (self.smashmix and not relay and self.server_mode != "single", "smashmix",
           f"SmashMix needs a single server (server_mode='single'), not "
           f"{self.server_mode!r}: use psl, sglr or locfedmix")
    yield (self.client_gradient == "none" and self.local_ce_weight == 0.0, "local_ce_weight",
           "with client_gradient='none' the clients learn only from the aux head: set it "
           "above 0")
    yield (self.client_head and self.client_gradient == "none", "client_head",
           "LocSplitFed's clients never wait for the server, and a U-shaped split makes "
           "them wait for its features: set client_head=False or pick another algorithm")
    yield (self.client_head and bool(self.frozen_segments), "client_head",
           "a U-shaped split is not built for LoRA fine-tuning (a frozen backbone): set "
           "client_head=False")

  def preprocess(self, x_uint8):
    """uint8 images -> (x_model, x01) with this run's resize, channels, normalisation;
    uint8 tokens -> (tokens, tokens) as int32 (the model reads them, the Loc decoder
    predicts them back)."""
    if self.inputs == "tokens":
      tokens = jnp.asarray(x_uint8).astype(jnp.int32)
      return tokens, tokens
    return preprocess(x_uint8, resize_to=self.resize_to, channels=self.channels,
                      normalize=self.normalize, mean=self.mean, std=self.std)

  @property
  def reconstruction_kind(self) -> str:
    """The Loc decoder's loss R: `local_loss_kind` on images; on tokens the
    cross-entropy of the input tokens (a sigmoid of bytes would mean nothing)."""
    return "ce" if self.inputs == "tokens" else self.local_loss_kind

  @property
  def defends_upload(self) -> bool:
    """Whether uploads are noised or quantised (`privacy.defend`)."""
    return self.noise_std > 0 or self.noise_snr_db is not None or self.quantize_bits > 0

  def defend(self, key, s_BxS):
    """One client's upload in place of s (`privacy.defend`; s itself when off)."""
    if not self.defends_upload:
      return s_BxS
    return privacy.defend(key, s_BxS, self.noise_std, self.noise_snr_db, self.quantize_bits)

  @property
  def defends_gradient(self) -> bool:
    """Whether the label holder's outgoing gradient is perturbed (`label_privacy`)."""
    return (self.grad_noise_std > 0 or self.grad_max_norm or self.grad_keep_fraction < 1.0
            or self.grad_quantize_bits > 0)

  def defend_gradient(self, key, g_BxS):
    """One client's gradient as the label holder sends it (g itself when off)."""
    if not self.defends_gradient:
      return g_BxS
    return label_privacy.defend_gradient(
        key, g_BxS, noise_std=self.grad_noise_std, max_norm=self.grad_max_norm,
        keep_fraction=self.grad_keep_fraction, quantize_bits=self.grad_quantize_bits)

  @property
  def uses_decoder(self) -> bool:
    return self.local_loss

  @property
  def uses_aux_head(self) -> bool:
    return self.local_ce_weight != 0.0

  @property
  def clients_averaged(self) -> bool:
    """Whether the round may compute all clients with one copy of their segments.

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
  def client_phase(self) -> str:
    """How the round computes the clients, chosen here alone: 'relay' (vanilla SL, one
    lower handed from client to client), 'averaged' (one copy of the client segments
    for all, where `clients_averaged` makes that exact) or 'per_client'."""
    if self.server_mode == "relay":
      return "relay"
    return "averaged" if self.clients_averaged else "per_client"

  @property
  def client_copies(self) -> int:
    """Copies of the client segments the state holds: one in the averaged phase."""
    return 1 if self.client_phase == "averaged" else self.num_clients

  @property
  def server_spec(self) -> OptimizerSpec:
    """The server's optimiser spec as applied: SplitLr scales its peak rate by
    C ** alpha_lr on the same schedule (SGLR: eta_s = eta_c sqrt(C))."""
    if self.server_lr_exponent == 0.0:
      return self.server_opt
    return dataclasses.replace(self.server_opt, learning_rate=(
        self.server_opt.learning_rate * self.num_clients ** self.server_lr_exponent))

  @property
  def server_updates_per_iteration(self) -> int:
    """Server steps per iteration; vanilla SL's depend on the data (`turn_steps`)."""
    return server_updates_per_iteration(self.server_mode, self.num_clients)

  def turn_steps(self, sizes_C, weights_C=None):
    """Vanilla SL: mini-batches each client processes in its turn (`turn_steps`)."""
    return turn_steps(sizes_C, self.batch_size, self.sl_turn_steps, weights_C)

  def turn_length(self, width: int) -> int:
    """Static scan length of a turn: the longest client's, from the index table's width
    (the largest |D_k|)."""
    return self.sl_turn_steps or -(-width // self.batch_size)

  @property
  def num_participants(self) -> int:
    """K: the clients an iteration draws (all C unless `clients_per_round`)."""
    return self.num_clients if self.clients_per_round is None else self.clients_per_round

  @property
  def samples_clients(self) -> bool:
    """Whether an iteration runs on a drawn subset of the clients, or drops some."""
    return (self.num_participants < self.num_clients or self.dropout_prob > 0
            or self.deadline_s is not None)

  def participants_config(self) -> "RoundConfig":
    """The round of the K participants alone: C = K, everything else this config's
    (GradMix's count, SplitLr's scale and SFL-V2's steps follow K)."""
    return dataclasses.replace(self, num_clients=self.num_participants,
                               clients_per_round=None)

  @property
  def may_drop(self) -> bool:
    """Whether a participant may miss an iteration (dropout or deadline): it then weighs
    0, and SmashMix draws partners among the others."""
    return self.dropout_prob > 0 or self.deadline_s is not None

  @property
  def num_gradmix(self) -> int:
    """Clients receiving the mixed gradient each iteration: round(phi C), at least 2."""
    if not self.gradmix:
      return 0
    m = int(round(self.gradmix_fraction * self.num_clients))
    return m if m >= 2 else 0


def turn_steps(sizes_C, batch_size: int, sl_turn_steps: int | None = None, weights_C=None):
  """Vanilla SL: mini-batches each client processes in its turn (int32 C), one local
  epoch ceil(|D_k| / B) unless `sl_turn_steps` fixes it; 0 for a client without data
  (or of weight 0). NumPy in, NumPy out (the ledger); traced in, traced out (the round)."""
  xp = np if isinstance(sizes_C, np.ndarray) else jnp
  sizes = xp.asarray(sizes_C).astype(xp.int32)
  n = ((sizes + batch_size - 1) // batch_size if sl_turn_steps is None
       else xp.full_like(sizes, sl_turn_steps))
  present = sizes > 0 if weights_C is None else xp.asarray(weights_C) > 0
  return xp.where(present, n, 0).astype(xp.int32)


def server_updates_per_iteration(server_mode: str, num_clients: int) -> int:
  """Server optimiser steps an iteration: one per client where it steps client by
  client (SFL-V2, SL), else one."""
  return num_clients if server_mode in ("sequential", "relay") else 1


def preset(algorithm: str, **fields) -> RoundConfig:
  """The RoundConfig of a named algorithm, with `fields` (num_clients, batch_size,
  num_classes, and any others) set over its preset: `preset("psl", num_clients=10,
  batch_size=32, num_classes=10, fedavg=True)`."""
  if algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm {algorithm!r} is unknown; use one of "
                     f"{', '.join(sorted(ALGORITHMS))}")
  return RoundConfig(**{**ALGORITHMS[algorithm], **fields})
