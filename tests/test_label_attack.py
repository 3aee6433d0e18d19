"""The label attacks (lfmjax.label_attack): their pieces against what they must find, and
the CLI on finished runs: the labelled split and the U-shaped one, whose returned
gradient gives the labels away unless it is defended."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lfmjax import attack, label_attack

from test_cli import ROOT, tiny_config, write_synthetic_fmnist


def test_clusters_read_as_classes_through_the_best_matching():
  rng = np.random.default_rng(0)
  y = np.repeat(np.arange(4), 30)
  centres = rng.normal(size=(4, 6)) * 10
  points = centres[y] + rng.normal(size=(120, 6))
  clusters = label_attack.kmeans(points, 4, seed=0)
  assert label_attack.matched_accuracy(clusters, y, 4) == 1.0
  # a relabelling of the clusters scores the same; a random assignment near the prior
  assert label_attack.matched_accuracy((clusters + 1) % 4, y, 4) == 1.0
  assert label_attack.matched_accuracy(rng.integers(0, 4, 120), y, 4) < 0.45


def test_gradient_attacks_find_labels_that_the_gradients_carry():
  """Gradients dL/dlogits = softmax - onehot(y) through a fixed map: the direction gives
  the class, the clustering too; pure noise gives neither."""
  rng = np.random.default_rng(1)
  y = np.repeat(np.arange(3), 40)
  w = rng.normal(size=(3, 16))
  p = np.full((120, 3), 1 / 3)
  leaky = (p - np.eye(3)[y]) @ w + 0.05 * rng.normal(size=(120, 16))
  scores = label_attack.gradient_attacks(leaky, y, 3, seed=0)
  assert scores["direction_auc"] > 0.99 and scores["cosine_cluster_accuracy"] > 0.95
  noise = label_attack.gradient_attacks(rng.normal(size=(120, 16)), y, 3, seed=0)
  assert abs(noise["direction_auc"] - 0.5) < 0.1 and noise["cosine_cluster_accuracy"] < 0.55


def test_nearest_known_takes_the_closest_label():
  known = np.array([[0.0, 0.0], [10.0, 0.0]])
  got = label_attack.nearest_known(np.array([[1.0, 1.0], [9.0, -1.0]]), known,
                                   np.array([3, 7]))
  np.testing.assert_array_equal(got, [3, 7])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Tiny PSL runs: labelled, U-shaped, and U-shaped with its returned gradient noised."""
  from lfmjax.train import train
  data = write_synthetic_fmnist(tmp_path_factory.mktemp("data"))
  out = {}
  for name, fields in (("psl", {}), ("u", {"client_head": True}),
                       ("u_noised", {"client_head": True})):
    config = tiny_config(data, algorithm="psl", num_iterations=4, eval_clients=2, **fields)
    config.privacy.probe_size = 16
    if name == "u_noised":
      config.privacy.grad_noise_std = 10.0
    out[name] = str(tmp_path_factory.mktemp("runs") / name)
    out[f"{name}_result"] = (config, train(config, out[name], quiet=True))
  return out


def settings(**fields):
  s = attack.attack_config()
  s.update({"kind": "labels", "label_samples": 64, "known_per_class": 2, "num_test": 100,
            **fields})
  return s


def test_label_attack_reports_every_channel_with_its_baseline(runs):
  report = label_attack.run_label_attack(runs["psl"], settings(), log=lambda *a: None)
  with open(os.path.join(runs["psl"], "label_attack.json")) as f:
    assert json.load(f) == json.loads(json.dumps(report))
  assert len(report["targets"]) == 2 and report["baselines"]["auc"] == 0.5
  assert report["labels_received_accuracy"] == 1.0  # the server holds the labels
  assert "returned_direction_auc" not in report  # nothing comes back without a head
  for key in ("download_norm_auc", "download_direction_auc", "download_cosine_cluster_accuracy",
              "smashed_cluster_accuracy", "inference_smashed_knn_accuracy",
              "inference_server_prediction_accuracy"):
    assert 0.0 <= report[key] <= 1.0, key
  np.testing.assert_allclose(report["download_norm_auc"],
                             np.mean([t["download_norm_auc"] for t in report["targets"]]))


def test_u_shaped_returned_gradient_leaks_labels_and_noise_hides_them(runs):
  u = label_attack.run_label_attack(runs["u"], settings(), log=lambda *a: None)
  assert "labels_received_accuracy" not in u  # no label reaches the server
  assert u["returned_direction_auc"] > 0.9
  assert u["returned_cosine_cluster_accuracy"] > u["majority_share"] + 0.3
  noised = label_attack.run_label_attack(runs["u_noised"], settings(), log=lambda *a: None)
  assert abs(noised["returned_direction_auc"] - 0.5) < 0.1
  assert noised["defences"]["grad_noise_std"] == 10.0


def test_label_attack_cli_prints_scores_and_baselines(runs):
  result = subprocess.run([sys.executable, "-m", "lfmjax.attack", f"--workdir={runs['u']}",
                           "--attack.kind=labels", "--attack.label_samples=32",
                           "--attack.num_test=60"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "returned_direction_auc" in result.stdout and "(baseline 0.5)" in result.stdout


def test_an_unknown_attack_kind_is_refused_naming_the_kinds():
  with pytest.raises(attack.AttackError, match="attack.kind='label': one of inversion, labels"):
    attack.check_settings(settings(kind="label"))

@pytest.mark.parametrize("run", ["psl", "u"])
def test_a_run_records_the_label_probe_as_the_norm_attack_on_its_gradient(runs, run):
  """The probe in the run's records is the norm attack's AUC on the gradient computed
  here from the trained state: the download dL/ds from the server's labels, or the
  U-shaped client's returned dL/dh."""
  import jax
  import jax.numpy as jnp
  from lfmjax import label_privacy as lp
  from lfmjax.models import apply_module, get_model
  from lfmjax.run.loop import prepare
  config, result = runs[f"{run}_result"]
  client_head = run == "u"
  record = result.history[-1]
  assert len(record["label_auc_clients"]) == 3 and 0.5 <= record["label_auc"] <= 1.0
  with open(os.path.join(runs[run], "eval.csv")) as f:
    assert {"label_auc", "label_auc_std"} <= set(f.readline().strip().split(","))
  model = get_model("tiny_cnn", num_classes=10, input_shape=(28, 28, 1),
                    client_head=client_head)
  state, data = jax.device_get(result.state), prepare(config, lambda *a: None).run.data
  idx = np.asarray(data.idx_CxM)[1, :16]
  x = jnp.asarray(np.asarray(data.train_x)[idx], jnp.float32) / 255.0
  y = jnp.asarray(np.asarray(data.train_y)[idx])
  part = lambda name: {"params": jax.tree.map(lambda a: a[1], state.clients.params[name]),
                       **jax.tree.map(lambda a: a[1], state.clients.stats[name])}
  upper = {"params": state.server.params, **state.server.stats}
  s, _ = apply_module(model.lower, part("lower"), x, train=False)
  ce = lambda logits: -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), y])
  if client_head:
    h, _ = apply_module(model.upper, upper, s, train=False)
    leak = jax.grad(lambda h: ce(apply_module(model.head, part("head"), h, train=False)[0]))(h)
  else:
    leak = jax.grad(lambda s: ce(apply_module(model.upper, upper, s, train=False)[0]))(s)
  np.testing.assert_allclose(record["label_auc_clients"][1],
                             lp.label_leak_auc(leak, y, 10), atol=1e-6)
