"""Label inference by an honest-but-curious server, from what it receives in a run.

    python -m lfmjax.attack --workdir=W --attack.kind=labels

At the run's latest checkpoint, for every attacked client (each seed replica's evaluated
clients) and `label_samples` of its training samples, the server holds what that
algorithm gives it: the (defended) smashed data s; the labels it receives (none in a
U-shaped split; randomised response's where configured); the cut gradient dL/ds it
computes and sends (defended as sent); and in a U-shaped split the gradient dL/dh the
client returns (defended), the one message that carries the labels to it. On each
gradient it runs the norm and the direction attacks of Li et al. (ICLR 2022), scored as
the AUC of each class against the rest, and the cosine-similarity clustering attack of
Liu et al. (arXiv 2203.05222), scored as label accuracy after the best matching of
clusters to classes; on the smashed data the same clustering (Euclidean); and in the
inference phase, a nearest-neighbour attack on test uploads with `known_per_class`
labelled ones (Liu et al.'s Euclidean similarity of smashed data). Every score comes
with its baseline (0.5 for an AUC, the majority class's share for an accuracy).

Writes `label_attack.json` beside the inversion attack's `attack.json`.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment

from lfmjax import label_privacy
from lfmjax.models.util import apply_module


def kmeans(points_NxD: np.ndarray, k: int, seed: int, restarts: int = 4,
           iterations: int = 50) -> np.ndarray:
  """Lloyd's k-means with k-means++ seeding, the best of `restarts` by inertia: the
  cluster of every point (N)."""
  rng = np.random.default_rng(seed)
  best, best_inertia = None, np.inf
  for _ in range(restarts):
    centres = [points_NxD[rng.integers(len(points_NxD))]]
    for _ in range(1, k):
      d2 = np.min([np.sum((points_NxD - c) ** 2, axis=1) for c in centres], axis=0)
      total = d2.sum()
      pick = rng.integers(len(points_NxD)) if total <= 0 else rng.choice(
          len(points_NxD), p=d2 / total)
      centres.append(points_NxD[pick])
    centres = np.stack(centres)
    for _ in range(iterations):
      d2 = ((points_NxD[:, None, :] - centres[None]) ** 2).sum(-1)
      assign = d2.argmin(1)
      moved = np.stack([points_NxD[assign == j].mean(0) if np.any(assign == j)
                        else centres[j] for j in range(k)])
      if np.allclose(moved, centres):
        break
      centres = moved
    inertia = float(((points_NxD - centres[assign]) ** 2).sum())
    if inertia < best_inertia:
      best, best_inertia = assign, inertia
  return best


def matched_accuracy(clusters_N: np.ndarray, y_N: np.ndarray, num_classes: int) -> float:
  """Label accuracy of clusters read as classes through the best one-to-one matching
  (Hungarian), the clustering attacks' score."""
  counts = np.zeros((num_classes, num_classes))
  np.add.at(counts, (clusters_N, y_N), 1)
  rows, cols = linear_sum_assignment(-counts)
  return float(counts[rows, cols].sum() / len(y_N))


def unit_rows(a_NxD: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(a_NxD, axis=1, keepdims=True)
  return a_NxD / np.where(norms > 0, norms, 1.0)


def gradient_attacks(g_NxD: np.ndarray, y_N: np.ndarray, num_classes: int, seed: int
                     ) -> dict[str, float]:
  """Li et al.'s norm and direction AUCs (mean over the classes present) and Liu et
  al.'s cosine clustering accuracy on one channel's per-sample gradients."""
  g = jnp.asarray(g_NxD)
  y = jnp.asarray(y_N)
  norm_auc = float(label_privacy.label_leak_auc(g, y, num_classes))
  # Direction: the attacker knows one sample of each class (its first), scores the rest.
  direction = []
  for c in range(num_classes):
    known = np.flatnonzero(y_N == c)
    if len(known) == 0 or len(known) == len(y_N):
      continue
    rest = np.setdiff1d(np.arange(len(y_N)), known[:1])
    scores = label_privacy.direction_scores(g[rest], g[known[0]])
    auc = float(label_privacy.class_auc(scores, y[rest] == c))
    if not np.isnan(auc):
      direction.append(auc)
  clusters = kmeans(unit_rows(g_NxD), num_classes, seed)
  return {"norm_auc": norm_auc,
          "direction_auc": float(np.mean(direction)) if direction else float("nan"),
          "cosine_cluster_accuracy": matched_accuracy(clusters, y_N, num_classes)}


def majority_share(y_N: np.ndarray, num_classes: int) -> float:
  return float(np.bincount(y_N, minlength=num_classes).max() / len(y_N))


def nearest_known(queries_NxD: np.ndarray, known_MxD: np.ndarray, known_y_M: np.ndarray
                  ) -> np.ndarray:
  """The label of each query's nearest known sample (Euclidean)."""
  d2 = (np.sum(queries_NxD ** 2, 1)[:, None] + np.sum(known_MxD ** 2, 1)[None]
        - 2 * queries_NxD @ known_MxD.T)
  return known_y_M[d2.argmin(1)]


def make_channels(cfg, model):
  """`channels(client, upper, x, y, y_server, key) -> {name: per-sample arrays}`: what
  the server receives from one client's batch (see the module), jitted."""

  def per_sample_ce(logits_BxK, y_B):  # summed: each sample's gradient is its own
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxK, y_B).sum()

  def channels(client, upper, x_model, y, y_server, key):
    key_up, key_grad = jax.random.split(key)
    s, _ = apply_module(model.lower, client["lower"], x_model, train=False)
    u = cfg.defend(key_up, s)
    out = {"smashed": u}
    if model.head is None:
      g = jax.grad(lambda u: per_sample_ce(
          apply_module(model.upper, upper, u, train=False)[0], y_server))(u)
      out["download"] = cfg.defend_gradient(key_grad, g)
    else:
      h, body_vjp = jax.vjp(lambda u: apply_module(model.upper, upper, u, train=False)[0], u)
      dh = jax.grad(lambda h: per_sample_ce(
          apply_module(model.head, client["head"], h, train=False)[0], y))(h)
      out["returned"] = cfg.defend_gradient(key_grad, dh)
      (out["download"],) = body_vjp(out["returned"])
    return out

  return jax.jit(channels)


def client_rows(state, cfg, k: int):
  """Client k's part of the model and the upper it meets, as variables."""
  clients, server = state.clients, state.server
  row = 0 if cfg.client_copies == 1 else k
  client = {name: jax.tree.map(lambda a: a[row], {"params": clients.params[name],
                                                  **clients.stats[name]})
            for name in ("lower", "head") if name in clients.params}
  upper = {"params": server.params, **server.stats}
  if cfg.server_mode == "per_client":
    upper = jax.tree.map(lambda a: a[k], upper)
  return client, upper


def run_label_attack(workdir: str, settings, log=print) -> dict:
  """The label attacks on the run in `workdir` at its latest checkpoint (see the module);
  writes label_attack.json there and returns the report."""
  from lfmjax.attack import AttackError, restore_run
  from lfmjax.evaluate import eval_client_ids
  from lfmjax.mesh import real_clients
  from lfmjax.run.loop import build_model, client_partition, split_validation
  t0 = time.perf_counter()
  config, cfg, dataset, state, step = restore_run(workdir)
  if getattr(dataset, "tokens", False):
    raise AttackError(f"--workdir={workdir} trained on tokens: a language model's labels "
                      f"are its next input tokens; attack an image run")
  model = build_model(config, dataset)
  train, _ = split_validation(config, dataset)
  idx_CxM, sizes_C = client_partition(config, train)
  state = jax.device_get(state)
  replicas = ([state] if config.num_seeds == 1 else
              [jax.tree.map(lambda a, i=i: a[i], state) for i in range(config.num_seeds)])
  ids = eval_client_ids(config.num_clients, settings.clients or config.eval_clients,
                        config.seed)
  channels = make_channels(cfg, model)
  K = cfg.num_classes
  targets, y_all, view = [], [], {}
  for r, replica in enumerate(replicas):
    replica = real_clients(cfg, replica)
    key = jax.random.fold_in(jax.random.PRNGKey(settings.seed), r)
    for k in ids:
      n = min(settings.label_samples, int(sizes_C[k]))
      idx = idx_CxM[k, :n]
      x_model, _ = cfg.preprocess(jnp.asarray(train.train_x[idx]))
      y = np.asarray(train.train_y[idx])
      y_server = (y if cfg.label_rr_epsilon is None else np.asarray(
          label_privacy.sample_labels_rr(replica.key, jnp.asarray(idx), jnp.asarray(y), K,
                                         cfg.label_rr_epsilon)))
      client, upper = client_rows(replica, cfg, k)
      got = jax.device_get(channels(client, upper, x_model, jnp.asarray(y),
                                    jnp.asarray(y_server), jax.random.fold_in(key, k)))
      flat = {name: np.asarray(v).reshape(len(y), -1) for name, v in got.items()}
      scores = {"target": f"seed {config.seed + r}, client {k}", "samples": int(n),
                "majority_share": majority_share(y, K),
                "labels_received_accuracy": (None if cfg.client_head
                                             else float(np.mean(y_server == y)))}
      for name in ("download", "returned"):
        if name in flat:
          for attack, value in gradient_attacks(flat[name], y, K, settings.seed).items():
            scores[f"{name}_{attack}"] = value
      scores["smashed_cluster_accuracy"] = matched_accuracy(
          kmeans(flat["smashed"], K, settings.seed), y, K)
      scores.update(inference_attack(cfg, model, client, upper, dataset, settings,
                                     jax.random.fold_in(key, 10_000 + k)))
      targets.append(scores)
  report = summarise(workdir, step, config, cfg, settings, targets, t0)
  from lfmjax.run.workdir import write_atomically
  write_atomically(os.path.join(workdir, "label_attack.json"), json.dumps(report, indent=2))
  log(describe(report))
  return report


def inference_attack(cfg, model, client, upper, dataset, settings, key) -> dict:
  """Inference phase: the server's uploads of test images and `known_per_class` labelled
  ones (the first of each class); each other test image gets its nearest known one's
  label (Euclidean, on s; in a U-shaped split also on the body's features h). Without a
  client head the server computes the prediction itself: its accuracy is the model's."""
  K = cfg.num_classes
  n = settings.num_test
  x, y = dataset.test_x[:n], np.asarray(dataset.test_y[:n])
  x_model, _ = cfg.preprocess(jnp.asarray(x))
  s, _ = apply_module(model.lower, client["lower"], x_model, train=False)
  u = cfg.defend(key, s)
  h, _ = apply_module(model.upper, upper, u, train=False)
  known = np.concatenate([np.flatnonzero(y == c)[:settings.known_per_class]
                          for c in range(K)])
  rest = np.setdiff1d(np.arange(len(y)), known)
  flat_u = np.asarray(u).reshape(len(y), -1)
  out = {"inference_samples": int(len(rest)),
         "inference_majority_share": majority_share(y[rest], K),
         "inference_smashed_knn_accuracy": float(np.mean(
             nearest_known(flat_u[rest], flat_u[known], y[known]) == y[rest]))}
  flat_h = np.asarray(h).reshape(len(y), -1)
  if model.head is None:  # h is the logits: the server's own prediction
    out["inference_server_prediction_accuracy"] = float(np.mean(
        flat_h[rest].argmax(1) == y[rest]))
  else:
    out["inference_features_knn_accuracy"] = float(np.mean(
        nearest_known(flat_h[rest], flat_h[known], y[known]) == y[rest]))
  return out


def summarise(workdir, step, config, cfg, settings, targets, t0) -> dict:
  numeric = sorted({k for t in targets for k, v in t.items()
                    if isinstance(v, float) and k != "samples"})
  mean = {k: float(np.nanmean([t[k] for t in targets if t.get(k) is not None]))
          for k in numeric}
  return {
      "workdir": workdir, "iteration": step, "algorithm": config.algorithm,
      "client_head": cfg.client_head, "num_clients": config.num_clients,
      "settings": {k: settings[k] for k in ("label_samples", "known_per_class", "num_test",
                                            "seed", "clients")},
      "defences": {name: getattr(cfg, name) for name in
                   ("noise_std", "noise_snr_db", "quantize_bits", "nopeek_weight",
                    "grad_noise_std", "grad_max_norm", "grad_keep_fraction",
                    "grad_quantize_bits", "label_rr_epsilon")},
      "baselines": {"auc": 0.5, "chance": 1.0 / cfg.num_classes,
                    "majority_share": mean["majority_share"]},
      "targets": targets, **mean, "total_s": round(time.perf_counter() - t0, 2)}


def describe(report: dict) -> str:
  """The scores as lines 'channel / attack: score (baseline)'."""
  base_acc = report["baselines"]["majority_share"]
  lines = [f"label attacks on {len(report['targets'])} client(s) of {report['workdir']} at "
           f"iteration {report['iteration']} ({report['algorithm']}"
           f"{', U-shaped' if report['client_head'] else ''}):"]
  for key, value in report.items():
    if not isinstance(value, float) or key in ("total_s", "majority_share"):
      continue
    if key.endswith("_auc"):
      baseline = "0.5"
    elif key.startswith("inference_"):
      baseline = f"{report.get('inference_majority_share', base_acc):.3f}"
    else:
      baseline = f"{base_acc:.3f}"
    if key == "inference_majority_share":
      continue
    lines.append(f"  {key:42s} {value:.3f}   (baseline {baseline})")
  lines.append(f"  {report['total_s']:.1f}s | {report['workdir']}/label_attack.json")
  return "\n".join(lines)
