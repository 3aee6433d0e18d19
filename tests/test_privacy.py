"""The privacy pieces (lfmjax.privacy): dCor against NumPy, the defences one by one, the
ledger's bytes under quantisation, the gradient cosine GradMix lowers, and the leakage
columns a run writes. The defences inside the round equal the plain per-client loop in
test_round.py (`*_defended`)."""
from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lfmjax
from lfmjax import privacy
from lfmjax.algorithms import RoundConfig, SpecError
from test_cli import synthetic_fmnist, tiny_config  # noqa: F401 (a fixture)
from test_round import MODEL, algorithm_cfg, init, make_data


def numpy_dcor(x, s):
  """Szekely et al. (2007): dCor from the doubly centred distance matrices, in float64."""
  def centred(a):
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    d = np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1))
    return d - d.mean(0) - d.mean(1)[:, None] + d.mean()
  a, b = centred(x), centred(s)
  dcov2 = (a * b).mean()
  return np.sqrt(dcov2 / np.sqrt((a * a).mean() * (b * b).mean()))


@pytest.mark.parametrize("relation", ["independent", "linear", "nonlinear"])
def test_distance_correlation_equals_numpy(relation):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 4, 4, 2)).astype(np.float32)
  s = {"independent": rng.normal(size=(32, 7)),
       "linear": x.reshape(32, -1) @ rng.normal(size=(32, 5)),
       "nonlinear": np.tanh(x.reshape(32, -1)[:, :6] ** 2)}[relation].astype(np.float32)
  got = float(privacy.distance_correlation(jnp.asarray(x), jnp.asarray(s)))
  np.testing.assert_allclose(got, numpy_dcor(x, s), rtol=2e-4)
  if relation == "linear":  # a linear map of x keeps much of its distances
    assert got > 0.5


def test_distance_correlation_is_one_for_a_copy_and_has_finite_gradients():
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 10))
  np.testing.assert_allclose(privacy.distance_correlation(x, 3.0 * x + 1.0), 1.0, rtol=1e-5)
  s = jnp.concatenate([x[:8], x[:8]])  # repeated samples: zero distances
  grad = jax.grad(lambda s: privacy.distance_correlation(x, s))(s)
  assert np.isfinite(np.asarray(grad)).all()
  constant = jnp.ones((16, 3))
  assert float(privacy.distance_correlation(x, constant)) == 0.0
  assert np.isfinite(np.asarray(jax.grad(
      lambda s: privacy.distance_correlation(x, s))(constant))).all()


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_quantize_keeps_k_bit_levels_within_half_a_step(bits):
  s = jax.random.normal(jax.random.PRNGKey(1), (6, 5, 5, 3)) * 3.0
  q = np.asarray(privacy.quantize(s, bits))
  for sample, quantised in zip(np.asarray(s), q):
    lo, hi = sample.min(), sample.max()
    step = (hi - lo) / (2 ** bits - 1)
    assert len(np.unique(quantised)) <= 2 ** bits
    assert np.abs(quantised - sample).max() <= step / 2 + 1e-5
    np.testing.assert_allclose([quantised.min(), quantised.max()], [lo, hi], atol=1e-5)


def test_noise_has_the_configured_sigma_or_snr():
  s = jax.random.normal(jax.random.PRNGKey(2), (64, 256)) * 2.0
  key = jax.random.PRNGKey(3)
  noise = np.asarray(privacy.add_noise(key, s, 0.5, None) - s)
  np.testing.assert_allclose(noise.std(), 0.5, rtol=0.02)
  noise = np.asarray(privacy.add_noise(key, s, 0.0, 10.0) - s)
  snr_db = 10 * np.log10(np.mean(np.asarray(s) ** 2) / np.mean(noise ** 2))
  np.testing.assert_allclose(snr_db, 10.0, atol=0.25)  # 16,384 draws: 0.05 dB a sigma
  np.testing.assert_allclose(privacy.noise_sigma(s, 0.0, 10.0) ** 2,
                             np.mean(np.asarray(s) ** 2) / 10.0, rtol=1e-5)


def test_defences_switched_off_change_nothing():
  s = jax.random.normal(jax.random.PRNGKey(4), (4, 3, 3, 2))
  cfg = algorithm_cfg("locfedmix")
  assert not cfg.defends_upload and cfg.defend(jax.random.PRNGKey(0), s) is s
  explicit = algorithm_cfg("locfedmix", noise_std=0.0, noise_snr_db=None, quantize_bits=0,
                           nopeek_weight=0.0)
  data = make_data()
  a, metrics_a = lfmjax.make_round_step(cfg, MODEL)(init(cfg), data)
  b, metrics_b = lfmjax.make_round_step(explicit, MODEL)(init(explicit), data)
  chex.assert_trees_all_equal(a, b)
  chex.assert_trees_all_equal(metrics_a, metrics_b)


@pytest.mark.parametrize("fields,message", [
    (dict(noise_std=-1.0), "noise_std"),
    (dict(noise_std=0.1, noise_snr_db=10.0), "not both"),
    (dict(quantize_bits=17), "quantize_bits"),
    (dict(nopeek_weight=-0.5), "nopeek_weight"),
])
def test_round_config_refuses_bad_defences(fields, message):
  with pytest.raises(SpecError, match=message):
    algorithm_cfg("psl", **fields)


def test_smashed_bytes_count_k_bits_and_each_samples_scale():
  assert privacy.smashed_bytes(100, 8, 4) == 8 * 100 * 4
  assert privacy.smashed_bytes(100, 8, 4, quantize_bits=4) == 8 * (50 + 8)
  assert privacy.smashed_bytes(101, 8, 4, quantize_bits=3) == 8 * (38 + 8)  # 303 bits


def test_ledger_counts_quantised_uploads():
  from lfmjax import accounting
  data = make_data()
  ledgers = {}
  for bits in (0, 2):
    cfg = algorithm_cfg("psl", quantize_bits=bits)
    ledgers[bits] = accounting.make_ledger(cfg, MODEL, init(cfg), data)
  elements = 4 * 4 * 3  # the test lower's 8x8 input to 4x4x3
  assert ledgers[0].batch_up == 4 * elements * 4 + 4 * 4          # B = 4, float32, labels
  assert ledgers[2].batch_up == 4 * (elements * 2 // 8 + 8) + 4 * 4
  assert ledgers[2].batch_down == ledgers[0].batch_down  # gradients travel in full


def test_gradient_cosine_is_one_for_own_gradients_and_lower_under_gradmix():
  data = make_data()
  cosines = {}
  for name in ("psl", "sglr", "locsplitfed"):
    cfg = algorithm_cfg(name)
    _, metrics = lfmjax.make_round_step(cfg, MODEL)(init(cfg), data)
    cosines[name] = np.asarray(metrics["grad_cosine_clients"])
  np.testing.assert_allclose(cosines["psl"], 1.0, rtol=1e-5)
  np.testing.assert_array_equal(cosines["locsplitfed"], 0.0)  # nothing is downloaded
  cfg = algorithm_cfg("sglr")
  chosen = np.asarray(lfmjax.round.gradmix_clients(init(cfg).key, 0, 3, cfg.num_gradmix))
  assert chosen.sum() == 2
  np.testing.assert_allclose(cosines["sglr"][~chosen], 1.0, rtol=1e-5)
  assert (cosines["sglr"][chosen] < 0.999).all()


def test_a_run_records_leakage_per_client_and_over_clients(synthetic_fmnist, tmp_path):
  from lfmjax.train import train
  config = tiny_config(synthetic_fmnist, algorithm="sglr", num_iterations=4)
  config.privacy.probe_size = 16
  result = train(config, str(tmp_path), quiet=True)
  record = result.history[-1]
  assert len(record["dcor_clients"]) == 3 and len(record["grad_cosine_clients"]) == 3
  assert 0.0 < record["dcor"] <= 1.0
  np.testing.assert_allclose(record["dcor"], np.mean(record["dcor_clients"]), rtol=1e-5)
  np.testing.assert_allclose(record["dcor_std"], np.std(record["dcor_clients"]), atol=1e-6)
  assert record["grad_cosine"] < 1.0  # GradMix gives 2 of the 3 clients the mean
  with open(tmp_path / "eval.csv") as f:
    header = f.readline().strip().split(",")
  assert {"dcor", "dcor_std", "grad_cosine", "grad_cosine_std"} <= set(header)
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines[-2]["dcor_clients"] == record["dcor_clients"]


def test_noise_lowers_the_recorded_dcor(synthetic_fmnist):
  from lfmjax.train import train
  records = {}
  for sigma in (0.0, 5.0):
    config = tiny_config(synthetic_fmnist, algorithm="psl", num_iterations=4)
    config.privacy.probe_size = 32
    config.privacy.noise_std = sigma
    records[sigma] = train(config, quiet=True).history[-1]
  assert records[5.0]["dcor"] < records[0.0]["dcor"] - 0.1
