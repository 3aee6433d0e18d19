"""Fine-tuning a pretrained split model: the backbone frozen and held once, low-rank
adapters trained on the clients, on the server or both.

LoRA (Hu et al., ICLR 2022) in split learning as SplitLoRA (arXiv 2407.00952) studies
it: every client holds its own adapters of the client segment (a client axis), the
server its adapters of the server segment, and FedAvg averages adapters only. The
backbone is the same for every client and never changes, so the state holds it once
(`RoundState.frozen`, no client axis) and the round binds it to the model's segments
(`bind_frozen`): it is a constant of the compiled program, with no gradient, no
optimiser state, no FedAvg and no C copies. Memory grows with C x adapter size, not
C x backbone.

The split into adapters and backbone is by leaf name (`models.lora.adapter_labels`,
the labels `optax.multi_transform` takes): `masked` is the same rule as an optax
transformation over a whole parameter tree, for a caller that keeps the backbone among
its parameters.

`load_backbone(workdir)` reads a pretrained run's newest checkpoint: a run of this
library trained centrally (`num_clients=1`), whose lower and upper are the backbone.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import optax

from lfmjax.models import lora
from lfmjax.models.util import SplitModel

FROZEN_SEGMENTS = ("lower", "upper")  # the segments a backbone can freeze


class PretrainedError(ValueError):
  """A pretrained checkpoint that cannot serve as this model's backbone (one line)."""


def freeze(variables: dict, segments) -> tuple[dict, dict]:
  """(variables whose `segments` keep only their adapters as params, {segment: the
  rest of its params}): the backbone that `RoundState.frozen` holds once."""
  out, frozen = dict(variables), {}
  for seg in segments:
    adapters, fixed = lora.split_adapters(variables[seg].get("params", {}))
    out[seg] = {**variables[seg], "params": adapters}
    frozen[seg] = fixed
  return out, frozen


class FrozenSegment:
  """A segment whose `apply` adds the frozen params to the ones it is given: the round
  passes the trainable params (the adapters) and the backbone comes from here."""

  def __init__(self, module, frozen_params: dict):
    self.module = module
    self.frozen_params = frozen_params

  def apply(self, variables, *args, **kwargs):
    params = lora.merge(self.frozen_params, variables.get("params", {}))
    return self.module.apply({**variables, "params": params}, *args, **kwargs)

  def __getattr__(self, name):  # stem/head, attributes: the module's own
    return getattr(self.module, name)


def bind_frozen(model: SplitModel, frozen: dict) -> SplitModel:
  """The model whose segments in `frozen` apply with their backbone added. Call it with
  the state's `frozen` inside the traced function, so the backbone enters the program
  as an argument, not as a constant folded into it."""
  if not frozen:
    return model
  return model._replace(**{seg: FrozenSegment(getattr(model, seg), params)
                           for seg, params in frozen.items()})


def masked(tx: optax.GradientTransformation, params) -> optax.GradientTransformation:
  """`tx` on the adapters of `params` and nothing on the rest (`optax.set_to_zero`)."""
  return optax.multi_transform({"adapter": tx, "frozen": optax.set_to_zero()},
                               lora.adapter_labels(params))


def with_backbone(variables: dict, backbone: dict) -> dict:
  """`variables` with the lower's and upper's non-adapter params taken from `backbone`;
  every one must be there with the same shape (else PretrainedError naming it)."""
  out = dict(variables)
  for seg in FROZEN_SEGMENTS:
    adapters, own = lora.split_adapters(variables[seg].get("params", {}))
    loaded = _matching(own, backbone.get(seg, {}), seg)
    out[seg] = {**variables[seg], "params": lora.merge(loaded, adapters)}
  return out


def _matching(own: dict, loaded: dict, seg: str) -> dict:
  own_paths = dict(jax.tree_util.tree_flatten_with_path(own)[0])
  got = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  for path, leaf in own_paths.items():
    name = f"{seg}{jax.tree_util.keystr(path)}"
    if path not in got:
      raise PretrainedError(f"the pretrained checkpoint has no {name}: pretrain the same "
                            f"model (model and model_overrides as in this run)")
    if tuple(got[path].shape) != tuple(leaf.shape):
      raise PretrainedError(f"the pretrained {name} is {tuple(got[path].shape)}, this "
                            f"model's {tuple(leaf.shape)}: use the pretraining run's "
                            f"model_overrides")
  extra = sorted(jax.tree_util.keystr(p) for p in got if p not in own_paths)
  if extra:
    raise PretrainedError(f"the pretrained {seg} has params this model lacks ({extra[0]}"
                          f"{', ...' if len(extra) > 1 else ''}): pretrain the same model")
  treedef = jax.tree_util.tree_structure(own)
  return jax.tree_util.tree_unflatten(
      treedef, [np.asarray(got[p], leaf.dtype) for p, leaf in own_paths.items()])


def load_backbone(workdir: str) -> tuple[dict, dict]:
  """({'lower', 'upper'} params, the pretraining run's config) from the newest
  checkpoint in `workdir`: a run with one client model (num_clients=1, or clients kept
  equal by FedAvg) and one server, one seed."""
  path = os.path.expanduser(workdir)
  config_path = os.path.join(path, "config.json")
  steps = _steps(path)
  if not os.path.isfile(config_path) or not steps:
    raise PretrainedError(f"config.pretrained={workdir!r} holds no run with a checkpoint; "
                          f"pretrain first (experiments/README: the pretraining command) "
                          f"or point it at that run's --workdir")
  with open(config_path) as f:
    config = json.load(f)
  if config.get("num_seeds", 1) != 1:
    raise PretrainedError(f"config.pretrained={workdir!r} is a run of "
                          f"{config['num_seeds']} seeds; pretrain with num_seeds=1")
  raw = _restore_raw(path, steps[-1])
  lower = jax.tree.map(np.asarray, raw["clients"]["params"]["lower"])
  upper = jax.tree.map(np.asarray, raw["server"]["params"])
  if config.get("algorithm") == "sfl_v1":
    raise PretrainedError(f"config.pretrained={workdir!r} is an SFL-V1 run (a server copy "
                          f"per client); pretrain with algorithm=psl, num_clients=1")
  rows = {leaf.shape[0] for leaf in jax.tree.leaves(lower)}
  if not all(np.array_equal(leaf[0], leaf[i]) for leaf in jax.tree.leaves(lower)
             for i in range(leaf.shape[0])):
    raise PretrainedError(f"config.pretrained={workdir!r} holds {max(rows)} different "
                          f"client models; pretrain with num_clients=1")
  backbone = {"lower": jax.tree.map(lambda a: a[0], lower),
              "upper": _merged_frozen(upper, raw.get("frozen", {}).get("upper"))}
  backbone["lower"] = _merged_frozen(backbone["lower"], raw.get("frozen", {}).get("lower"))
  return backbone, config


def _merged_frozen(params, frozen):
  """A pretraining run that was itself fine-tuned holds part of its params frozen."""
  if not frozen:
    return params
  return lora.merge(jax.tree.map(np.asarray, frozen), params)


def _steps(path: str) -> list[int]:
  directory = os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _restore_raw(path: str, step: int) -> Any:
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(path, "checkpoints")),
                                  item_names=("state", "loop"))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
  except Exception as e:  # orbax raises many types for a damaged checkpoint
    raise PretrainedError(f"the pretrained checkpoint {path}/checkpoints/{step} cannot be "
                          f"read ({type(e).__name__}); pretrain again") from None
  finally:
    manager.close()
  return restored.state
