"""Test accuracy of the composed split model, jitted over the whole test split (SPEC.md).

With FedAvg the composed model is the delta-weighted average lower + the server's upper
(SFL-V1: + the average of the server's copies). Vanilla SL evaluates the last client's
lower. Otherwise (`psl`, `sglr`) each client's own lower + the upper is evaluated and the
mean over clients reported; with many clients a seeded subset of `eval_clients` of them.
In a U-shaped split the client's part is its lower and its head, which go together:
averaged, the last client's, or each client's own.
Evaluation uses BatchNorm running statistics.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lfmjax import components, finetune, label_privacy, privacy
from lfmjax.algorithms import RoundConfig
from lfmjax.models import SplitModel, apply_module
from lfmjax.models.patch_conv import compiler_options
from lfmjax.state import RoundState, per_client


def eval_client_ids(num_clients: int, eval_clients: int, seed: int) -> np.ndarray:
  """The seeded subset of clients evaluated when their lowers differ (all if few)."""
  if eval_clients <= 0 or eval_clients >= num_clients:
    return np.arange(num_clients, dtype=np.int32)
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_clients, eval_clients, replace=False)).astype(np.int32)


def eval_subset(x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  """`n` samples of a split, drawn once with a fixed seed and kept in their order, so
  every run and every evaluation scores the same ones (n = 0 or n >= the split: all)."""
  if n <= 0 or n >= len(y):
    return x, y
  idx = np.sort(np.random.default_rng(0).choice(len(y), n, replace=False))
  return x[idx], y[idx]


def pad_to_chunks(x: np.ndarray, y: np.ndarray, chunk: int):
  """Pads the test split to whole chunks; returns (x_TxChunk..., y_TxChunk, mask)."""
  n = len(y)
  chunks = -(-n // chunk)
  pad = chunks * chunk - n
  x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
  y = np.concatenate([y, np.zeros((pad,) + y.shape[1:], y.dtype)])
  mask = np.arange(chunks * chunk) < n
  return (x.reshape((chunks, chunk) + x.shape[1:]), y.reshape((chunks, chunk) + y.shape[1:]),
          mask.reshape(chunks, chunk))


def make_evaluate(cfg: RoundConfig, model: SplitModel, *, jit: bool = True):
  """Returns `evaluate(state, weights_C, client_ids, test) -> {'accuracy', 'loss'}`
  (and 'perplexity' on tokens)
  (jitted unless `jit=False`): the mean over targets, a sample's label or, for a
  language model, each next token (accuracy is then top-1 next-token accuracy and
  exp(loss) the perplexity).

  `test` is `(x_TxChunk uint8, y_TxChunk, mask_TxChunk)` from `pad_to_chunks`.
  """

  def logits_of(model, client_vars, upper_vars, x_uint8, key):
    x_model, _ = cfg.preprocess(x_uint8)
    s, _ = apply_module(model.lower, client_vars["lower"], x_model, train=False)
    # The model as deployed: the server sees the defended upload (`privacy.defend`).
    out, _ = apply_module(model.upper, upper_vars, cfg.defend(key, s), train=False)
    if model.head is not None:  # a U-shaped split: the client's head scores the features
      out, _ = apply_module(model.head, client_vars["head"], out, train=False)
    return out

  def score_with(model, lower_vars, upper_vars, test, key):
    """Summed correct and summed loss over the (masked) test split: per sample, or per
    target token where a sample has several (a language model's next tokens)."""
    def chunk_score(args):
      x, y, mask, i = args
      logits = logits_of(model, lower_vars, upper_vars, x, jax.random.fold_in(key, i))
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      mask = mask.reshape(mask.shape + (1,) * (y.ndim - 1))
      return (jnp.sum(mask * (jnp.argmax(logits, -1) == y)), jnp.sum(mask * loss))
    chunk_ids = jnp.arange(test[1].shape[0], dtype=jnp.int32)
    correct, loss = jax.lax.map(chunk_score, (*test, chunk_ids))
    return correct.sum(), loss.sum()

  def evaluate(state: RoundState, weights_C, client_ids, test):
    clients, server = state.clients, state.server
    score = functools.partial(score_with, finetune.bind_frozen(model, state.frozen))
    key = jax.random.fold_in(state.key, privacy.TAG_EVAL_NOISE)
    upper_vars = {"params": server.params, **server.stats}
    # A client's part of the model: its lower, and a U-shaped split's head.
    client_C = {name: {"params": clients.params[name], **clients.stats[name]}
              for name in ("lower", "head") if name in clients.params}
    n = jnp.sum(test[2]) * int(np.prod(test[1].shape[2:]))  # targets scored
    if cfg.server_mode == "per_client" and not cfg.fedavg:
      # SFL-V1 without FedAvg is local-only training: client k's model is its lower with
      # its own upper copy, and the score is the mean over the evaluated clients' models.
      pair_E = jax.tree.map(lambda a: a[client_ids], (client_C, upper_vars))
      correct_E, loss_E = jax.lax.map(lambda p: score(p[0], p[1], test, key), pair_E)
      correct, loss = correct_E.mean(), loss_E.mean()
      return scores_of(correct, loss, n)
    if cfg.server_mode == "per_client":  # SFL-V1's copies, averaged as FedAvg would
      upper_vars = components.weighted_mean(upper_vars, weights_C)
    if cfg.server_mode == "relay":  # vanilla SL: the last client's lower is the model
      correct, loss = score(jax.tree.map(lambda a: a[-1], client_C), upper_vars, test, key)
    elif cfg.client_phase == "averaged":  # one copy for all clients
      correct, loss = score(jax.tree.map(lambda a: a[0], client_C), upper_vars, test, key)
    elif cfg.fedavg:
      lower = components.weighted_mean(client_C, weights_C)
      correct, loss = score(lower, upper_vars, test, key)
    else:
      client_E = jax.tree.map(lambda a: a[client_ids], client_C)
      correct_E, loss_E = jax.lax.map(lambda lv: score(lv, upper_vars, test, key), client_E)
      correct, loss = correct_E.mean(), loss_E.mean()
    return scores_of(correct, loss, n)

  def scores_of(correct, loss, n):
    scores = {"accuracy": correct / n, "loss": loss / n}
    if cfg.inputs == "tokens":  # a language model's figure of merit
      scores["perplexity"] = jnp.exp(loss / n)
    return scores

  return jax.jit(evaluate, compiler_options=compiler_options()) if jit else evaluate


def probe_size(requested: int, sizes_C) -> int:
  """dCor's probe: `requested` samples per client, at most the smallest client's data."""
  return int(min(requested, int(np.min(sizes_C)))) if requested else 0


def make_leakage_probe(cfg: RoundConfig, model: SplitModel, size: int):
  """Returns `dcor(state, data) -> dcor_C`: each client's dCor(x, u) on a fixed probe,
  its first `size` samples (`probe_size`), x the input in [0, 1] and u what the server
  receives from the client's current lower (evaluation mode, defences applied)
  (NoPeek's leakage measure, Vepakomma et al. 2020; `privacy.distance_correlation`)."""

  def dcor(state: RoundState, data):
    bound = finetune.bind_frozen(model, state.frozen)
    idx_CxP = data.idx_CxM[:, :size]
    x_model, x01 = cfg.preprocess(data.train_x[idx_CxP])
    lower_C = {"params": state.clients.params["lower"], **state.clients.stats["lower"]}
    shared = jax.tree.leaves(lower_C)[0].shape[0] != idx_CxP.shape[0]  # one copy for all
    key = jax.random.fold_in(state.key, privacy.TAG_EVAL_NOISE)

    def one(lower, x_model, x01, k):
      s, _ = apply_module(bound.lower, lower, x_model, train=False)
      u = cfg.defend(jax.random.fold_in(key, k), s)
      return privacy.distance_correlation(x01, u)

    if shared:
      lower_C = jax.tree.map(lambda a: a[0], lower_C)
    ids_C = jnp.arange(idx_CxP.shape[0], dtype=jnp.int32)
    return jax.lax.map(lambda a: one(lower_C if shared else a[0], *a[1:]),
                       (None if shared else lower_C, x_model, x01, ids_C))

  return dcor


def make_label_probe(cfg: RoundConfig, model: SplitModel, size: int):
  """Returns `label_auc(state, data) -> auc_C`: per client, the norm attack's AUC (Li et
  al., ICLR 2022; `label_privacy.label_leak_auc`: 0.5 none, 1 complete) against its true
  labels, on the gradient that carries them across the cut, computed on the client's
  fixed probe (`probe_size`) at the current weights in evaluation mode: the server's
  download dL/ds (from the labels the server holds, randomised response included), or
  in a U-shaped split the gradient dL/dh the client returns; with the round's upload
  and gradient defences applied (fixed evaluation keys). Images only: a language
  model's labels are its own next input tokens."""
  per_copy = cfg.server_mode == "per_client"

  def auc(state: RoundState, data):
    bound = finetune.bind_frozen(model, state.frozen)
    idx_CxP = data.idx_CxM[:, :size]
    num_clients = idx_CxP.shape[0]
    x_model, _ = cfg.preprocess(data.train_x[idx_CxP])
    y_CxP = data.train_y[idx_CxP]
    y_server_CxP = (y_CxP if cfg.label_rr_epsilon is None else label_privacy.sample_labels_rr(
        state.key, idx_CxP, y_CxP, cfg.num_classes, cfg.label_rr_epsilon))
    clients = per_client(state.clients, num_clients)
    part = lambda name: {"params": clients.params[name], **clients.stats[name]}
    client_C = {name: part(name) for name in ("lower", "head") if name in clients.params}
    upper = {"params": state.server.params, **state.server.stats}
    key = jax.random.fold_in(state.key, privacy.TAG_EVAL_NOISE)

    def one(args):
      client, upper_vars, x, y, y_server, k = args
      s, _ = apply_module(bound.lower, client["lower"], x, train=False)
      u = cfg.defend(jax.random.fold_in(key, k), s)
      if model.head is None:  # the server's labels give the download
        leak = jax.grad(lambda u: components.cross_entropy(
            apply_module(bound.upper, upper_vars, u, train=False)[0], y_server))(u)
      else:  # the client's labels give the returned gradient
        h, _ = apply_module(bound.upper, upper_vars, u, train=False)
        leak = jax.grad(lambda h: components.cross_entropy(
            apply_module(bound.head, client["head"], h, train=False)[0], y))(h)
      leak = cfg.defend_gradient(jax.random.fold_in(key, num_clients + k), leak)
      return label_privacy.label_leak_auc(leak, y, cfg.num_classes)

    uppers = upper if per_copy else jax.tree.map(
        lambda a: jnp.broadcast_to(a, (num_clients,) + a.shape), upper)
    ids_C = jnp.arange(num_clients, dtype=jnp.int32)
    return jax.lax.map(one, (client_C, uppers, x_model, y_CxP, y_server_CxP, ids_C))

  return auc
