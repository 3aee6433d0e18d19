"""Optimisers and learning-rate schedules as optax transformations, named by a config.

A round's clients and server each step with an `optax.GradientTransformation`. An API
user passes any transformation (`make_round_step(..., client_tx=optax.adamw(...))`);
a config names one with an `OptimizerSpec`: the rule (sgd, momentum, adam, adamw),
weight decay, gradient clipping by global norm, and a schedule of the learning rate
over the run (constant, cosine, warmup + cosine, step decay at given fractions).
SGLR's SplitLr (Pal et al., 2021) is the server's peak rate, eta_c * C ** alpha_lr: a
scale on the same schedule. The schedule's value at each step is logged by the round
(`learning_rates`).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "step")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """One side's optimiser, by name (hashable: part of the static RoundConfig)."""
  name: str = "sgd"                      # sgd | momentum | adam | adamw
  learning_rate: float = 0.01            # the peak rate
  momentum: float = 0.0                  # sgd (optional) and momentum (default 0.9)
  weight_decay: float = 0.0              # decoupled for adamw, added to the gradient else
  grad_clip_norm: float | None = None    # clip by global norm first
  schedule: str = "constant"             # constant | cosine | warmup_cosine | step
  total_steps: int = 1                   # the run's iterations (cosine's horizon)
  warmup_fraction: float = 0.05          # warmup_cosine: share of the run warming up
  decay_fractions: tuple[float, ...] = (0.8,)  # step: where the rate drops
  decay_factor: float = 0.1              # step: the factor at each drop

  def __post_init__(self):
    problems = []
    if self.name not in OPTIMIZERS:
      problems.append(f"optimizer {self.name!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
    if self.schedule not in SCHEDULES:
      problems.append(f"schedule {self.schedule!r} is unknown; use one of "
                      f"{', '.join(SCHEDULES)}")
    if not self.learning_rate > 0:
      problems.append(f"learning rate {self.learning_rate!r} must be positive")
    if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
      problems.append(f"grad_clip_norm {self.grad_clip_norm!r} must be positive (or None)")
    if not 0.0 <= self.warmup_fraction < 1.0:
      problems.append(f"warmup_fraction {self.warmup_fraction!r} must be in [0, 1)")
    if any(not 0.0 < f < 1.0 for f in self.decay_fractions):
      problems.append(f"decay_fractions {self.decay_fractions!r} must lie in (0, 1)")
    if self.total_steps < 1:
      problems.append(f"total_steps {self.total_steps!r} must be at least 1")
    if problems:
      raise ValueError("; ".join(problems))

  @property
  def linear(self) -> bool:
    """Whether one step is linear in the gradient with a state that needs no averaging:
    plain SGD (any schedule, weight decay), no clipping, no momentum."""
    return (self.name == "sgd" and self.momentum == 0.0 and self.grad_clip_norm is None)


def make_schedule(spec: OptimizerSpec) -> optax.Schedule:
  """The learning rate at each step (a function of the int step)."""
  peak, total = spec.learning_rate, spec.total_steps
  if spec.schedule == "constant":
    return optax.constant_schedule(peak)
  if spec.schedule == "cosine":
    return optax.cosine_decay_schedule(peak, decay_steps=total)
  if spec.schedule == "warmup_cosine":
    warmup = max(1, int(round(spec.warmup_fraction * total)))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps=warmup,
                                              decay_steps=max(total, warmup + 1))
  boundaries = {int(round(f * total)): spec.decay_factor for f in spec.decay_fractions}
  return optax.piecewise_constant_schedule(peak, boundaries)


def make_optimizer(spec: OptimizerSpec) -> optax.GradientTransformation:
  """The optax transformation a spec names. A constant rate is passed as a number, so
  the state is the plain rule's (no schedule counter): runs and checkpoints made before
  schedules existed load unchanged."""
  lr = spec.learning_rate if spec.schedule == "constant" else make_schedule(spec)
  if spec.name == "adamw":
    rule = optax.adamw(lr, weight_decay=spec.weight_decay)
  else:
    if spec.name == "adam":
      rule = optax.adam(lr)
    elif spec.name == "momentum":
      rule = optax.sgd(lr, momentum=spec.momentum or 0.9)
    else:
      rule = optax.sgd(lr, momentum=spec.momentum or None)
    if spec.weight_decay:
      rule = optax.chain(optax.add_decayed_weights(spec.weight_decay), rule)
  if spec.grad_clip_norm is not None:
    rule = optax.chain(optax.clip_by_global_norm(spec.grad_clip_norm), rule)
  return rule


def learning_rate_at(spec: OptimizerSpec, step) -> jnp.ndarray:
  """The scheduled rate at `step` (what `make_optimizer(spec)` applies there)."""
  return jnp.asarray(make_schedule(spec)(step), jnp.float32)
