"""Model inversion by an honest-but-curious server: how much of x its smashed data give away.

    python -m lfmjax.attack --workdir=runs/fmnist [--attack.num_steps=2000 ...]
    python -m lfmjax.attack --workdir=runs/fmnist --attack.kind=labels   (lfmjax.label_attack)

The server holds an auxiliary set, train images that no client holds (the validation
holdout and whatever the partition left over), and queries each attacked client's frozen
lower model with it (a white-box attacker, as in He, Zhang and Lee, "Model inversion
attacks against collaborative inference", ACSAC 2019). It trains an inverse network, a
decoder of the Loc decoder's family (InfoPro's, Wang et al., ICLR 2021) but wider and
deeper, from what it receives (the defended upload `privacy.defend`: noise and
quantisation included) back to the input in [0, 1]; then it reconstructs test images it
never saw and scores them against the originals: MSE, PSNR, SSIM (dm-pix) and the
reconstruction cross-entropy SGLR's authors report as leakage (Pal et al. 2021), with
dCor(x, u) of the same uploads (NoPeek's measure) beside them. One
inverse network is trained per attacked lower (each seed replica's evaluated clients, or
the one shared lower where FedAvg makes them equal), all in one vmapped program.

Writes `attack.json` (settings, per-target and aggregate scores, wall time) and
`attack.png` (originals above their reconstructions) into the run's workdir.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

from lfmjax import interrupt

if __name__ == "__main__":
  interrupt.install()

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from lfmjax import finetune
from lfmjax.models.layers import UpsampleConv, torch_conv, torch_dense
from lfmjax.privacy import distance_correlation


def attack_config() -> ml_collections.ConfigDict:
  """The attack's settings (`--attack.FIELD=VALUE`)."""
  c = ml_collections.ConfigDict()
  c.aux_size = 5000        # auxiliary images (train images no client holds)
  c.num_steps = 1000       # Adam steps of each inverse network
  c.batch_size = 64        # auxiliary images a step
  c.learning_rate = 1e-3   # Adam's rate
  c.hidden = 32            # channels (units: 16x, for flat smashed data) of the inverse network
  c.layers = 2             # hidden layers (the Loc decoder has 1 of 12 channels)
  c.num_test = 1000        # test images reconstructed and scored
  c.grid = 8               # test images shown in attack.png
  c.dcor_size = 256        # test images for dCor(x, u) of each attacked lower
  c.seed = 0               # the inverse networks' init, batches and the defence's noise
  c.clients = 0            # lowers attacked per seed where they differ (0: eval_clients)
  c.kind = "inversion"     # inversion (of inputs) | labels (`lfmjax.label_attack`)
  c.label_samples = 256    # labels: training samples attacked per client
  c.known_per_class = 5    # labels: test uploads with known labels, per class (inference)
  return c


class InverseNet(nn.Module):
  """Smashed data -> reconstruction logits of the model input's shape.

  For a feature map: bilinear upsampling to the input's H x W with a conv3x3 to
  `hidden` channels (the Loc decoder's first layer, `UpsampleConv`), `layers - 1` more
  conv3x3 + ReLU of `hidden` channels, and a conv3x3 to the input's channels. For flat
  smashed data (the MLP): `layers` dense layers of 16 * `hidden` units, then a dense
  layer to H * W * C. For tokens (the ViT's B x T x D, a cls token first when T is one
  more than the patches): per token, `layers` dense layers of 16 * `hidden` units and a
  dense layer to a p x p x `hidden` patch, laid back in place (`vit.unpatchify`), then
  ReLU and a conv3x3 to the input's channels, so neighbouring patches meet."""
  out_hw: tuple[int, int]
  out_channels: int
  hidden: int = 64
  layers: int = 2

  @nn.compact
  def __call__(self, s: jax.Array) -> jax.Array:
    h, w = self.out_hw
    if s.ndim == 3:
      return self.from_tokens(s)
    if s.ndim == 2:
      x = s
      for i in range(self.layers):
        x = nn.relu(torch_dense(16 * self.hidden, x, name=f"fc{i}")(x))
      logits = torch_dense(h * w * self.out_channels, x, name="out")(x)
      return logits.reshape((s.shape[0], h, w, self.out_channels))
    x = nn.relu(UpsampleConv(self.hidden, self.out_hw, name="up")(s))
    for i in range(1, self.layers):
      x = nn.relu(torch_conv(self.hidden, x, name=f"conv{i}")(x))
    return torch_conv(self.out_channels, x, name="out")(x)


  def from_tokens(self, s_BxTxD: jax.Array) -> jax.Array:
    from lfmjax.models.vit import unpatchify
    h, w = self.out_hw
    t = s_BxTxD.shape[1]
    p = math.isqrt(h * w // t) if t else 0
    if p * p * t != h * w:  # a cls token leads the patches
      s_BxTxD, t = s_BxTxD[:, 1:], t - 1
      p = math.isqrt(h * w // t) if t else 0
    if not t or p * p * t != h * w:
      raise AttackError(f"smashed tokens B x {s_BxTxD.shape[1]} x D tile no {h}x{w} image "
                        f"into square patches: the attack inverts image patches only")
    x = s_BxTxD
    for i in range(self.layers):
      x = nn.relu(torch_dense(16 * self.hidden, x, name=f"fc{i}")(x))
    x = torch_dense(p * p * self.hidden, x, name="patch")(x)
    x = nn.relu(unpatchify(x, (h, w), p, self.hidden))
    return torch_conv(self.out_channels, x, name="out")(x)


ATTACKS = ("inversion", "labels")


class AttackError(ValueError):
  """An attack that cannot run (no checkpoint, too little auxiliary data, bad settings);
  the message names the problem and the fix."""


def check_settings(settings) -> None:
  for field, ok, fix in (
      ("aux_size", settings.aux_size >= 1, "at least 1 auxiliary image"),
      ("num_steps", 1 <= settings.num_steps <= 1_000_000, "1 to 1,000,000 steps"),
      ("batch_size", 1 <= settings.batch_size <= 4096, "1 to 4,096 images a step"),
      ("learning_rate", 0 < settings.learning_rate < math.inf, "a positive rate"),
      ("hidden", 1 <= settings.hidden <= 1024, "1 to 1,024 channels"),
      ("layers", 1 <= settings.layers <= 8, "1 to 8 hidden layers"),
      ("num_test", settings.num_test >= 1, "at least 1 test image"),
      ("grid", 0 <= settings.grid <= 64, "0 to 64 images in attack.png"),
      ("dcor_size", 2 <= settings.dcor_size <= 4096, "2 to 4,096 test images for dCor"),
      ("seed", 0 <= settings.seed < 2**31, "a seed in [0, 2**31)"),
      ("clients", settings.clients >= 0, "0 (the run's eval_clients) or more"),
      ("kind", settings.kind in ATTACKS, f"one of {', '.join(ATTACKS)}"),
      ("label_samples", 2 <= settings.label_samples <= 8192, "2 to 8,192 samples a client"),
      ("known_per_class", 1 <= settings.known_per_class <= 1000,
       "1 to 1,000 known test labels a class"),
  ):
    if not ok:
      raise AttackError(f"attack.{field}={settings[field]!r}: {fix}")


def reconstruction_scores(logits_BxHxWxC: jax.Array, x01_BxHxWxC: jax.Array) -> dict:
  """Per image: MSE, PSNR (dB, peak 1) and SSIM of sigmoid(logits) against x in [0, 1],
  and the reconstruction cross-entropy (binary, per pixel, SGLR's leakage measure)."""
  import dm_pix
  recon = jax.nn.sigmoid(logits_BxHxWxC)
  mse = jnp.mean((recon - x01_BxHxWxC) ** 2, axis=(1, 2, 3))
  side = min(x01_BxHxWxC.shape[1:3])
  return {"mse": mse,
          "psnr": dm_pix.psnr(recon, x01_BxHxWxC),
          "ssim": dm_pix.ssim(recon, x01_BxHxWxC, filter_size=min(11, side)),
          "cross_entropy": jnp.mean(optax.sigmoid_binary_cross_entropy(
              logits_BxHxWxC, x01_BxHxWxC), axis=(1, 2, 3))}


def make_attack(upload, inverse: InverseNet, settings, preprocess):
  """Returns `attack(lower_vars_E, keys_E, aux_x, test_x) -> (scores_E, grid_E)`, jitted.

  `upload(lower_vars, x_model, key) -> u` is what the server receives for a batch from
  one target's lower; `preprocess(x_uint8) -> (x_model, x01)`. For each target (vmapped)
  an inverse network is trained for `settings.num_steps` Adam steps on random batches
  of the auxiliary images (uint8), then scored on the test images (uint8, the first
  `settings.grid` reconstructed for the picture). Scores are means over test images.
  """
  tx = optax.adam(settings.learning_rate)
  num_steps, batch, grid = settings.num_steps, settings.batch_size, settings.grid

  def loss(params, u, x01):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(inverse.apply(params, u), x01))

  def train_one(lower_vars, key, aux_x):
    key_init, key_steps = jax.random.split(key)
    x_model, _ = preprocess(aux_x[:1])
    params = inverse.init(key_init, upload(lower_vars, x_model, key_init))

    def step(carry, i):
      params, opt_state = carry
      key_i = jax.random.fold_in(key_steps, i)
      idx = jax.random.randint(key_i, (batch,), 0, aux_x.shape[0])
      x_model, x01 = preprocess(aux_x[idx])
      u = jax.lax.stop_gradient(upload(lower_vars, x_model, key_i))
      value, grads = jax.value_and_grad(loss)(params, u, x01)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), value

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)),
                                       jnp.arange(num_steps, dtype=jnp.int32))
    return params, losses

  def score_one(lower_vars, params, key, test_x):
    chunk = min(test_x.shape[0], 250)
    chunks = -(-test_x.shape[0] // chunk)
    padded = jnp.concatenate([test_x, jnp.zeros((chunks * chunk - test_x.shape[0],)
                                                 + test_x.shape[1:], test_x.dtype)])

    def chunk_scores(i):
      x_model, x01 = preprocess(jax.lax.dynamic_slice_in_dim(padded, i * chunk, chunk))
      logits = inverse.apply(params, upload(lower_vars, x_model, jax.random.fold_in(key, i)))
      return reconstruction_scores(logits, x01)

    per_image = jax.lax.map(chunk_scores, jnp.arange(chunks))
    valid = jnp.arange(chunks * chunk) < test_x.shape[0]
    scores = {k: jnp.sum(jnp.where(valid, v.reshape(-1), 0.0)) / test_x.shape[0]
              for k, v in per_image.items()}
    # NoPeek's leakage measure on the same lower and uploads, for comparison.
    x_model, x01 = preprocess(test_x[:settings.dcor_size])
    scores["dcor"] = distance_correlation(x01, upload(lower_vars, x_model, key))
    x_model, _ = preprocess(test_x[:grid])
    recon = jax.nn.sigmoid(inverse.apply(params, upload(lower_vars, x_model, key)))
    return scores, recon

  def attack(lower_vars_E, keys_E, aux_x, test_x):
    def one(lower_vars, key):
      params, losses = train_one(lower_vars, key, aux_x)
      scores, recon = score_one(lower_vars, params, jax.random.fold_in(key, 1), test_x)
      return {**scores, "final_train_loss": losses[-1]}, recon
    return jax.vmap(one)(lower_vars_E, keys_E)

  return jax.jit(attack)


# ------------------------------------------------------------------- against a run


def config_from_json(path: str) -> ml_collections.ConfigDict:
  """A run's config.json as the ConfigDict it was written from (the base config with the
  saved values over it; fields an earlier lfmjax did not write keep their defaults)."""
  from lfmjax.config import base_config
  with open(path) as f:
    saved = json.load(f)
  config = base_config()

  def put(node, values, prefix):
    for name, value in values.items():
      if name not in node:
        raise AttackError(f"{path}: field {prefix}{name} is unknown to this lfmjax; attack "
                          f"the run with the lfmjax version that trained it")
      if isinstance(value, dict):
        put(node[name], value, f"{prefix}{name}.")
      else:
        node[name] = tuple(value) if isinstance(value, list) else value

  put(config, saved, "")
  return config


def auxiliary_images(config, dataset) -> np.ndarray:
  """The train images no client holds (uint8): the validation holdout and the partition's
  leftovers, in the run's order."""
  from lfmjax.run.loop import client_partition, split_validation
  train, val = split_validation(config, dataset)
  idx_CxM, sizes_C = client_partition(config, train)
  held = np.zeros(len(train.train_y), bool)
  for row, size in zip(idx_CxM, sizes_C):
    held[row[:size]] = True
  parts = [train.train_x[~held]] + ([val[0]] if val is not None else [])
  return np.concatenate(parts)


@dataclasses.dataclass
class Targets:
  """The lowers attacked, stacked on axis 0, and who each is."""
  lower_vars: Any
  names: list[str]


def attack_targets(config, cfg, state, clients: int = 0) -> Targets:
  """Every seed replica's evaluated clients' lowers (a seeded `clients` of them, if
  given); one per replica where the clients share their lower (the averaged phase, or
  FedAvg after every iteration)."""
  from lfmjax.evaluate import eval_client_ids
  from lfmjax.mesh import real_clients
  seeds = config.num_seeds
  per_seed = [state] if seeds == 1 else [jax.tree.map(lambda a, i=i: a[i], state)
                                         for i in range(seeds)]
  shared = cfg.client_copies == 1 or (cfg.fedavg and cfg.fedavg_every == 1)
  ids = [0] if shared else list(eval_client_ids(
      config.num_clients, clients or config.eval_clients, config.seed))
  lowers, names = [], []
  for i, replica in enumerate(per_seed):
    clients = real_clients(cfg, replica).clients
    for k in ids:
      lowers.append(jax.tree.map(lambda a, k=k: np.asarray(a[k]),
                                 {"params": clients.params["lower"], **clients.stats["lower"]}))
      names.append(f"seed {config.seed + i}, " + ("all clients (one lower)" if shared
                                                  else f"client {k}"))
  return Targets(jax.tree.map(lambda *a: np.stack(a), *lowers), names)


def restore_run(workdir: str):
  """(config, RoundConfig, the dataset, the latest checkpoint's state, its step)."""
  from lfmjax.checkpoint import Checkpoints, checkpoint_steps
  from lfmjax.run.loop import load_config_dataset, prepare
  from lfmjax.run.validate import validate
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise AttackError(f"--workdir={workdir} has no config.json: name the workdir of a run "
                      f"(python -m lfmjax.main --config=... --workdir=DIR)")
  steps = checkpoint_steps(workdir)
  if not steps:
    raise AttackError(f"--workdir={workdir} has no checkpoint to attack: run it with "
                      f"checkpoint_every > 0 until it saves one")
  config = config_from_json(path)
  validate(config)
  dataset = load_config_dataset(config)
  prep = prepare(config, lambda *a: None, dataset)
  checkpoints = Checkpoints(workdir, config.keep_checkpoints)
  try:
    state, _ = checkpoints.restore(steps[-1], prep.run.state)
  finally:
    checkpoints.close()
  return config, prep.cfg, dataset, state, steps[-1]


def run_attack(workdir: str, settings, log=print) -> dict:
  """Attacks the run in `workdir` at its latest checkpoint; writes attack.json and
  attack.png there and returns the report."""
  from lfmjax.models.util import apply_module
  from lfmjax.run.loop import build_model
  check_settings(settings)
  t0 = time.perf_counter()
  config, cfg, dataset, state, step = restore_run(workdir)
  aux = auxiliary_images(config, dataset)
  if settings.aux_size > len(aux):
    raise AttackError(
        f"attack.aux_size={settings.aux_size} is more than the {len(aux)} train images no "
        f"client holds; lower it, or train the run with a validation_size (or "
        f"partition='fixed') that leaves more")
  rng = np.random.default_rng(settings.seed)
  aux = aux[rng.permutation(len(aux))[:settings.aux_size]]
  test_x = dataset.test_x[:settings.num_test]
  if getattr(dataset, "tokens", False):
    raise AttackError(f"--workdir={workdir} trained on tokens ({config.dataset}): the "
                      f"inversion attack reconstructs images; attack an image run")
  model = finetune.bind_frozen(build_model(config, dataset), jax.device_get(state.frozen))
  targets = attack_targets(config, cfg, jax.device_get(state), settings.clients)
  h, w, c = cfg.preprocess(jnp.asarray(test_x[:1]))[1].shape[1:]
  inverse = InverseNet((h, w), c, settings.hidden, settings.layers)

  def upload(lower_vars, x_model, key):
    s, _ = apply_module(model.lower, lower_vars, x_model, train=False)
    return cfg.defend(key, s)

  attack = make_attack(upload, inverse, settings, cfg.preprocess)
  num = len(targets.names)
  keys = jax.random.split(jax.random.PRNGKey(settings.seed), num)
  log(f"attacking {num} lower(s) of {workdir} at iteration {step}: {settings.num_steps} "
      f"steps on {len(aux)} auxiliary images, scored on {len(test_x)} test images")
  t_attack = time.perf_counter()
  scores, recon = jax.device_get(attack(targets.lower_vars, keys, jnp.asarray(aux),
                                        jnp.asarray(test_x)))
  attack_s = time.perf_counter() - t_attack
  report = {
      "workdir": workdir, "iteration": step, "algorithm": config.algorithm,
      "num_clients": config.num_clients, "settings": settings.to_dict(),
      "defences": {name: getattr(cfg, name) for name in
                   ("noise_std", "noise_snr_db", "quantize_bits", "nopeek_weight")},
      "targets": [{"target": name, **{k: float(v[i]) for k, v in scores.items()}}
                  for i, name in enumerate(targets.names)],
      **{k: float(np.mean(v)) for k, v in scores.items()},
      **{f"{k}_std": float(np.std(v)) for k, v in scores.items()},
      "attack_s": round(attack_s, 2), "total_s": round(time.perf_counter() - t0, 2),
  }
  from lfmjax.run.workdir import write_atomically
  write_atomically(os.path.join(workdir, "attack.json"), json.dumps(report, indent=2))
  if settings.grid:
    _, x01 = cfg.preprocess(jnp.asarray(test_x[:settings.grid]))
    save_grid(os.path.join(workdir, "attack.png"), np.asarray(x01), recon, targets.names)
  log(f"reconstruction of the test images: PSNR {report['psnr']:.2f} +- "
      f"{report['psnr_std']:.2f} dB, SSIM {report['ssim']:.3f}, MSE {report['mse']:.4f}, "
      f"cross-entropy {report['cross_entropy']:.4f} over {num} lower(s), in "
      f"{attack_s:.1f}s | {workdir}/attack.json, attack.png")
  return report


def save_grid(path: str, originals_G, recon_ExG, names: list[str], rows: int = 4) -> None:
  """Originals in the top row, each target's reconstructions below (up to `rows`)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  shown = min(rows, len(names))
  grid = len(originals_G)
  fig, axes = plt.subplots(1 + shown, grid, figsize=(1.2 * grid, 1.3 * (1 + shown)),
                           squeeze=False)
  images = [originals_G] + [recon_ExG[e] for e in range(shown)]
  labels = ["original"] + names[:shown]
  for r, (row, label) in enumerate(zip(images, labels)):
    for j in range(grid):
      ax = axes[r, j]
      img = np.clip(row[j], 0, 1)
      ax.imshow(img[..., 0] if img.shape[-1] == 1 else img[..., :3],
                cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
    axes[r, 0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ------------------------------------------------------------------------------ CLI

FLAGS: dict[str, Any] = {}


def define_flags() -> None:
  """--workdir and --attack (ml_collections reads `--attack.FIELD` overrides as it
  defines the flag, so an unknown field fails here)."""
  FLAGS["workdir"] = flags.DEFINE_string("workdir", None,
                                         "The workdir of a run with a checkpoint.")
  FLAGS["attack"] = config_flags.DEFINE_config_dict(
      "attack", attack_config(), "The attack's settings (--attack.FIELD=VALUE).",
      lock_config=True)


def main(argv) -> int:
  logging.set_verbosity(logging.FATAL)
  from lfmjax.checkpoint import CheckpointError
  from lfmjax.data import DatasetError
  from lfmjax.run.validate import ConfigError
  workdir = FLAGS["workdir"].value
  if len(argv) > 1 or not workdir:
    print("error: usage: python -m lfmjax.attack --workdir=DIR [--attack.FIELD=VALUE]",
          file=sys.stderr)
    return 2
  settings = FLAGS["attack"].value
  try:
    if settings.kind == "labels":
      from lfmjax.label_attack import run_label_attack
      check_settings(settings)
      run_label_attack(workdir, settings)
    else:
      run_attack(workdir, settings)
  except (AttackError, ConfigError, DatasetError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing; an unknown or mistyped flag is one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    parse_error(e)


def parse_error(e: BaseException) -> None:
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = str(e.args[0]) if e.args else str(e)
  first = text.splitlines()[0].strip("\"' ") if text.strip() else type(e).__name__
  if isinstance(e, (KeyError, AttributeError)):
    first = f"--attack.{first}: the attack has no such field"
  print(f"error: {first}; its fields: {', '.join(sorted(attack_config().keys()))}",
        file=sys.stderr)
  sys.exit(2)


def exit_with(status: int) -> None:
  """Exits at once after an error, so no library thread prints after the error line."""
  sys.stdout.flush()
  sys.stderr.flush()
  if status:
    os._exit(status)
  sys.exit(0)


def run():
  interrupt.install()
  try:
    define_flags()
  except (AttributeError, KeyError, ValueError, TypeError, flags.Error) as e:
    parse_error(e)
  app.run(lambda argv: exit_with(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
  run()
