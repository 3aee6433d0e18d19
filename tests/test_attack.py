"""The model-inversion attack (lfmjax.attack): it measures something (an identity lower
is inverted almost perfectly, a lossy random one clearly worse), it runs against a
finished run's checkpoint and writes its files, and bad input is one line, exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfmjax import attack
from test_cli import ROOT, tiny_config, write_synthetic_fmnist


def smooth_images(n: int, side: int = 12, seed: int = 0) -> np.ndarray:
  """uint8 images of a few random low-frequency waves: structured, unlike pixel noise."""
  rng = np.random.default_rng(seed)
  grid = np.linspace(0, 1, side)
  yy, xx = np.meshgrid(grid, grid, indexing="ij")
  freq = rng.uniform(0.5, 2.5, (n, 3, 2))
  phase = rng.uniform(0, 2 * np.pi, (n, 3))
  waves = sum(np.sin(2 * np.pi * (freq[:, i, 0, None, None] * yy + freq[:, i, 1, None, None]
                                  * xx) + phase[:, i, None, None]) for i in range(3))
  images = (waves - waves.min()) / (waves.max() - waves.min())
  return (255 * images[..., None]).astype(np.uint8)


def test_attack_inverts_an_identity_lower_and_not_a_lossy_random_one():
  settings = attack.attack_config()
  settings.update(num_steps=300, batch_size=32, hidden=16, layers=2, num_test=200, grid=4)
  aux, test = jnp.asarray(smooth_images(1000)), jnp.asarray(smooth_images(200, seed=1))
  preprocess = lambda x: (x.astype(jnp.float32) / 255.0,) * 2
  inverse = attack.InverseNet((12, 12), 1, settings.hidden, settings.layers)
  lossy = nn.Dense(4)  # 144 pixels -> 4 random features
  lower_vars = lossy.init(jax.random.PRNGKey(0), jnp.zeros((1, 144)))
  uploads = {"identity": lambda lv, x, key: x,
             "random": lambda lv, x, key: lossy.apply(lv, x.reshape(x.shape[0], -1))}
  psnr = {}
  for name, upload in uploads.items():
    run = attack.make_attack(upload, inverse, settings, preprocess)
    scores, recon = run(jax.tree.map(lambda a: a[None], lower_vars),
                        jax.random.PRNGKey(0)[None], aux, test)
    assert recon.shape == (1, 4, 12, 12, 1)
    psnr[name] = float(scores["psnr"][0])
    # PSNR and MSE are one measure: 10 log10(1 / MSE) per image, averaged.
    assert float(scores["mse"][0]) > 0
  assert psnr["identity"] > 30.0
  assert psnr["random"] < psnr["identity"] - 10.0


def test_attack_inverts_patch_tokens_with_or_without_a_cls_token():
  """The ViT's smashed data: tokens B x T x D. Patches as tokens (a lossless upload) are
  inverted almost perfectly, a leading cls token is dropped, and tokens that tile no
  image are one line."""
  from lfmjax.models.vit import patchify
  settings = attack.attack_config()
  settings.update(num_steps=300, batch_size=32, hidden=8, layers=1, num_test=100, grid=0)
  aux, test = jnp.asarray(smooth_images(500)), jnp.asarray(smooth_images(100, seed=1))
  preprocess = lambda x: (x.astype(jnp.float32) / 255.0,) * 2
  inverse = attack.InverseNet((12, 12), 1, settings.hidden, settings.layers)
  tokens = lambda lv, x, key: patchify(x, 3)  # 16 tokens of 9 pixels
  with_cls = lambda lv, x, key: jnp.concatenate(
      [jnp.ones_like(tokens(lv, x, key)[:, :1]), tokens(lv, x, key)], axis=1)
  for upload in (tokens, with_cls):
    run = attack.make_attack(upload, inverse, settings, preprocess)
    scores, recon = run({"params": {}}, jax.random.PRNGKey(0)[None], aux, test)
    assert float(scores["psnr"][0]) > 25.0
  with pytest.raises(attack.AttackError, match="tile no 12x12 image"):
    inverse.init(jax.random.PRNGKey(0), jnp.zeros((1, 7, 4)))


def test_reconstruction_scores_of_a_perfect_and_a_grey_guess():
  x = jnp.asarray(smooth_images(4, side=16)).astype(jnp.float32) / 255.0
  logit = lambda p: jnp.log(p) - jnp.log1p(-p)
  perfect = attack.reconstruction_scores(logit(jnp.clip(x, 1e-6, 1 - 1e-6)), x)
  grey = attack.reconstruction_scores(jnp.zeros_like(x), x)
  np.testing.assert_allclose(perfect["ssim"], 1.0, atol=1e-3)
  assert (perfect["psnr"] > 60).all() and (grey["psnr"] < 15).all()
  np.testing.assert_allclose(grey["mse"], jnp.mean((0.5 - x) ** 2, axis=(1, 2, 3)), rtol=1e-5)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A tiny run (3 clients, PSL: each its own lower) with 100 train images held out,
  trained once for the tests below."""
  from lfmjax.train import train
  data = write_synthetic_fmnist(tmp_path_factory.mktemp("data"))
  config = tiny_config(data, algorithm="psl", num_iterations=4, validation_size=100,
                       eval_clients=2)
  workdir = str(tmp_path_factory.mktemp("runs") / "run")
  train(config, workdir, quiet=True)
  return workdir


def small_settings(**fields):
  settings = attack.attack_config()
  settings.update(num_steps=20, batch_size=16, hidden=8, num_test=50, aux_size=100, grid=3)
  settings.update(fields)
  return settings


def test_attack_on_a_finished_run_writes_scores_per_client_and_a_grid(finished_run):
  report = attack.run_attack(finished_run, small_settings(), log=lambda *a: None)
  with open(os.path.join(finished_run, "attack.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(report))
  from lfmjax.evaluate import eval_client_ids
  assert [t["target"] for t in saved["targets"]] == [  # the evaluated clients' lowers
      f"seed 0, client {k}" for k in eval_client_ids(3, 2, 0)]
  for name in ("mse", "psnr", "ssim", "cross_entropy"):
    values = [t[name] for t in saved["targets"]]
    assert np.isfinite(values).all()
    np.testing.assert_allclose(saved[name], np.mean(values), rtol=1e-6)
  assert saved["iteration"] == 4 and saved["attack_s"] > 0
  assert os.path.getsize(os.path.join(finished_run, "attack.png")) > 0


def test_attack_refuses_more_auxiliary_images_than_no_client_holds(finished_run):
  with pytest.raises(attack.AttackError, match=r"aux_size=101 is more than the 100"):
    attack.run_attack(finished_run, small_settings(aux_size=101), log=lambda *a: None)


def test_attack_refuses_a_run_without_a_checkpoint(finished_run, tmp_path):
  empty = tmp_path / "no_checkpoint"
  empty.mkdir()
  (empty / "config.json").write_text(open(os.path.join(finished_run, "config.json")).read())
  with pytest.raises(attack.AttackError, match="has no checkpoint to attack"):
    attack.run_attack(str(empty), small_settings(), log=lambda *a: None)


def test_attack_cli_without_a_run_is_one_line_and_exit_2(tmp_path):
  result = subprocess.run([sys.executable, "-m", "lfmjax.attack", f"--workdir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: --workdir={tmp_path} has no config.json: name the workdir of a run "
      f"(python -m lfmjax.main --config=... --workdir=DIR)"]
  result = subprocess.run([sys.executable, "-m", "lfmjax.attack", f"--workdir={tmp_path}",
                           "--attack.num_step=5"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
  assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
