"""The model zoo: split models for LocFedMix-SL (Oh et al., WWW 2022) and its baselines.

`get_model(name, num_classes=K, input_shape=(H, W, C), **overrides)` returns a
`SplitModel` of four flax.linen modules (lower, upper, decoder, aux_head), each called
as `module.apply(variables, x, train=...)` on NHWC float32 inputs. Input feature counts
are inferred at init, so every model accepts any reasonable input size.

  bench_cnn  the torch benchmark peer's CNN (bench/torch_reference.py)
  resnet16   SGLR's InfoPro-style CIFAR ResNet (Pal et al. 2021); override cut_stage
  vgg        reduced-width VGG-style CIFAR model; overrides cut, batch_norm, widths
  tiny_cnn   one conv layer; for fast tests
  mlp        dense 128 | dense K; for fast tests
  vit        split ViT (Dosovitskiy et al. 2021): patches + the first `cut` blocks on the
             client, smashed data the tokens at the cut; LoRA-capable (`models.lora`)
  lm         split byte-level causal language model; inputs (T,) tokens, K the vocabulary

Models take no kernel switch: every convolution is a `patch_conv.PatchConv`, whose
kernels `patch_conv` picks from the backend and from what a vmap batches (on the CPU,
per-client weights become a loop of one-client XLA convolutions with their gradients in
the layouts XLA:CPU computes fast, shared weights one large convolution; XLA's own
convolutions on GPU and TPU). Variables are laid out as flax.linen.Conv's.
"""
from __future__ import annotations

from typing import Any, Callable

from lfmjax.models import bench_cnn, lm, resnet, small, vgg, vit
from lfmjax.models.lora import LoRASpec
from lfmjax.models.layers import AuxHead, ClassifierHead, Decoder, bilinear_resize
from lfmjax.models.util import (SEGMENTS, SplitModel, apply_module, has_stem, init_split,
                                param_count, smashed_shape, smashed_struct)

# name -> (builder, default overrides). Builders take (num_classes, input_shape, **opts).
_REGISTRY: dict[str, tuple[Callable[..., SplitModel], dict[str, Any]]] = {
    "bench_cnn": (bench_cnn.build, bench_cnn.DEFAULTS),
    "resnet16": (resnet.build, resnet.DEFAULTS),
    "vgg": (vgg.build, vgg.DEFAULTS),
    "tiny_cnn": (small.build_tiny, small.TINY_DEFAULTS),
    "mlp": (small.build_mlp, small.MLP_DEFAULTS),
    "vit": (vit.build, vit.DEFAULTS),
    "lm": (lm.build, lm.DEFAULTS),
}
# Each model's last dense layer, which a U-shaped split moves to the client: the name
# its upper gives it and its init (`layers.ClassifierHead`).
CLASSIFIERS = {"bench_cnn": ("fc2", "torch"), "resnet16": ("fc", "torch"),
               "vgg": ("fc2", "torch"), "tiny_cnn": ("fc", "torch"), "mlp": ("fc", "torch"),
               "vit": ("head", "xavier"), "lm": ("lm_head", "xavier")}
# Models whose dense layers take LoRA adapters (`models.lora`, `lfmjax.finetune`).
LORA_MODELS = ("vit", "lm")
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)
MAX_WIDTH = 4096  # an int override (channels, units, a cut) at most: they size memory


def _check_value(name: str, field: str, default: Any, value: Any) -> Any:
  """Coerces an override to its default's type, or raises naming the field."""
  def bad(expected: str):
    return ValueError(f"{name}: override {field}={value!r} must be {expected}")
  if isinstance(default, bool):
    if not isinstance(value, bool):
      raise bad("a bool")
    return value
  def size(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and 1 <= v <= MAX_WIDTH
  if isinstance(default, int):
    if not size(value):
      raise bad(f"an int in [1, {MAX_WIDTH}]")
    return value
  if isinstance(default, tuple):
    # ConfigDicts may hand over lists
    if not isinstance(value, (tuple, list)) or not value or not all(map(size, value)):
      raise bad(f"a non-empty tuple of ints in [1, {MAX_WIDTH}]")
    return tuple(value)
  return value


def _resolve(name: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> dict:
  unknown = sorted(set(overrides) - set(defaults))
  if unknown:
    raise ValueError(f"{name}: unknown override(s) {', '.join(unknown)}; "
                     f"valid: {', '.join(sorted(defaults))}")
  opts = dict(defaults)
  for field, value in overrides.items():
    opts[field] = _check_value(name, field, defaults[field], value)
  return opts


def get_model(name: str, *, num_classes: int, input_shape: tuple[int, ...],
              lora: LoRASpec | None = None, lora_segments: tuple[str, ...] = ("lower", "upper"),
              client_head: bool = False, **overrides) -> SplitModel:
  """The split model `name` for K = `num_classes` and model inputs of (H, W, C) (the
  language model: (T,) tokens, K the vocabulary).

  `lora`: adapters in the dense layers it targets, in the segments `lora_segments`
  (the others built without them). `client_head`: a U-shaped split, the upper's last
  dense layer moved to the client (`u_shaped`). Raises ValueError for an unknown name,
  a bad override, or a bad shape.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"{name}: num_classes={num_classes!r} must be a positive int")
  input_shape = tuple(input_shape)
  if len(input_shape) not in (1, 3) or not all(isinstance(d, int) and d > 0
                                               for d in input_shape):
    raise ValueError(f"{name}: input_shape={input_shape!r} must be (H, W, C) positive ints")
  builder, defaults = _REGISTRY[name]
  opts = _resolve(name, defaults, overrides)
  if client_head and lora is not None and lora.rank:
    raise ValueError(f"{name}: a U-shaped split (client_head) is not built for LoRA "
                     f"fine-tuning; set client_head=False or lora.rank=0")
  if lora is None or lora.rank == 0:
    model = builder(num_classes, input_shape, **opts)
    return u_shaped(model, num_classes) if client_head else model
  if name not in LORA_MODELS:
    raise ValueError(f"{name}: LoRA adapters need a transformer ({', '.join(LORA_MODELS)}); "
                     f"set lora.rank=0 or pick one of them")
  adapted = builder(num_classes, input_shape, lora=lora, **opts)
  plain = builder(num_classes, input_shape, **opts)
  return adapted._replace(**{seg: getattr(plain, seg) for seg in ("lower", "upper")
                             if seg not in lora_segments})


def u_shaped(model: SplitModel, num_classes: int) -> SplitModel:
  """The U-shaped split of `model`: its upper without the last dense layer (the
  server's body, returning the features) and that layer as the client's head. With the
  head's parameters put back into the body's, under the same name, it is `model`."""
  layer, kind = CLASSIFIERS[model.name]
  return model._replace(upper=model.upper.clone(features_only=True),
                        head=ClassifierHead(num_classes, layer, kind))


__all__ = ["LORA_MODELS", "LoRASpec", "AuxHead", "Decoder", "MODEL_NAMES", "SEGMENTS", "SplitModel", "apply_module",
           "bilinear_resize", "get_model", "has_stem", "u_shaped", "init_split", "param_count", "smashed_shape",
           "smashed_struct"]
