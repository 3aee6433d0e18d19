"""The compiled round against a per-client loop written plainly from SPEC.md.

The reference below does not use lfmjax's round, components or state: it loops over
clients in Python, computes each client's own loss and gradients with jax.grad on
per-client functions, and updates with plain SGD (or optax Adam). It shares with the
engine only the documented random streams (batch indices, and SmashMix's draws derived
from fold_in(fold_in(key, 1), step)).
"""
from __future__ import annotations

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lfmjax
from lfmjax import components
from lfmjax.algorithms import RoundConfig
from lfmjax.data import batch_indices
from lfmjax.models import AuxHead, SplitModel

TRACES = {"lower": 0}


class Lower(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    TRACES["lower"] += 1  # counts traces: jit runs Python only when it traces
    x = nn.Conv(3, (3, 3))(x)
    return nn.relu(x)[:, ::2, ::2, :]


class Upper(nn.Module):
  num_classes: int = 5

  @nn.compact
  def __call__(self, s, train: bool = False):
    s = s.reshape(s.shape[0], -1)
    return nn.Dense(self.num_classes)(nn.tanh(nn.Dense(16)(s)))


class Decoder(nn.Module):
  @nn.compact
  def __call__(self, s, train: bool = False):
    b, h, w, c = s.shape
    s = jax.image.resize(s, (b, 2 * h, 2 * w, c), "bilinear")
    return nn.Conv(1, (3, 3))(nn.relu(nn.Conv(4, (3, 3))(s)))


MODEL = SplitModel(lower=Lower(), upper=Upper(), decoder=Decoder(),
                   aux_head=AuxHead(5), name="test_tiny")
C, B, H, N_CLS = 3, 4, 8, 5


def make_data(sizes=(12, 8, 16), seed=0):
  rng = np.random.default_rng(seed)
  n = 40
  train_x = rng.integers(0, 256, (n, H, H, 1), dtype=np.uint8)
  train_y = rng.integers(0, N_CLS, n).astype(np.int32)
  perm = rng.permutation(n)
  parts, start = [], 0
  for size in sizes:
    parts.append(perm[start:start + size])
    start += size
  idx, sizes_c = lfmjax.data.client_table(parts)
  return lfmjax.make_data(train_x, train_y, idx, sizes_c)


def make_cfg(**kw):
  base = dict(num_clients=C, batch_size=B, num_classes=N_CLS, client_lr=0.05,
              server_lr=0.1, mixup_alpha=2.0, num_mixed=2)
  base.update(kw)
  return RoundConfig(**base)


def init(cfg, seed=0):
  x = jnp.zeros((B, H, H, 1))
  return lfmjax.init_state(cfg, MODEL, jax.random.PRNGKey(seed), x)


# ---------------------------------------------------------------- the plain reference
def apply(module, params, x):
  return module.apply({"params": params}, x)


def reference_step(cfg: RoundConfig, state, data):
  """One iteration, client by client, from SPEC.md. Returns (new params dict, metrics)."""
  step = int(state.step)
  key = state.key
  delta = np.asarray(data.weights_C)
  idx = np.asarray(batch_indices(jax.random.fold_in(key, 0), state.step, data.idx_CxM,
                                 data.sizes_C, cfg.batch_size))
  lowers = [jax.tree.map(lambda a: a[k], state.clients.params["lower"]) for k in range(C)]
  decs = [jax.tree.map(lambda a: a[k], state.clients.params["decoder"]) for k in range(C)]
  upper = state.server.params
  xs = [jnp.asarray(data.train_x)[idx[k]].astype(jnp.float32) / 255.0 for k in range(C)]
  ys = [jnp.asarray(data.train_y)[idx[k]] for k in range(C)]
  smashed = [apply(MODEL.lower, lowers[k], xs[k]) for k in range(C)]

  # SmashMix draws, from the documented stream.
  mixes = []
  if cfg.smashmix:
    key_mix = jax.random.fold_in(jax.random.fold_in(key, 1), step)
    key_partner, key_draws = jax.random.split(key_mix)
    offsets = np.asarray(jax.random.randint(key_partner, (C, cfg.num_mixed), 1, C))
    draw_keys = jax.random.split(key_draws, (C, cfg.num_mixed))
    for k in range(C):
      for n in range(cfg.num_mixed):
        j = (k + int(offsets[k, n])) % C
        key_perm, key_lam = jax.random.split(draw_keys[k, n])
        perm = np.asarray(jax.random.permutation(key_perm, B))
        lam = np.asarray(jax.random.beta(key_lam, cfg.mixup_alpha, cfg.mixup_alpha, (B,)))
        s_mix = np.zeros_like(np.asarray(smashed[k]))
        y_mix = np.zeros((B, N_CLS), np.float32)
        for b in range(B):
          s_mix[b] = lam[b] * np.asarray(smashed[k][b]) + (1 - lam[b]) * np.asarray(
              smashed[j][perm[b]])
          y_mix[b, int(ys[k][b])] += lam[b]
          y_mix[b, int(ys[j][perm[b]])] += 1 - lam[b]
        mixes.append((k, jnp.asarray(s_mix), jnp.asarray(y_mix)))

  def ce(logits, y):
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

  def soft_ce(logits, t):
    return -jnp.mean(jnp.sum(t * jax.nn.log_softmax(logits), -1))

  def server_objective(w_s):
    total = 0.0
    for k in range(C):
      total += delta[k] * ce(apply(MODEL.upper, w_s, smashed[k]), ys[k])
    for k, s_mix, y_mix in mixes:
      total += delta[k] * soft_ce(apply(MODEL.upper, w_s, s_mix), y_mix) / cfg.num_mixed
    return total

  server_grad = jax.grad(server_objective)(upper)
  new_upper = jax.tree.map(lambda w, g: w - cfg.server_lr * g, upper, server_grad)

  new_lowers, new_decs = [], []
  for k in range(C):
    own_grad = jax.grad(lambda s: ce(apply(MODEL.upper, upper, s), ys[k]))(smashed[k])
    _, lower_vjp = jax.vjp(lambda w: apply(MODEL.lower, w, xs[k]), lowers[k])
    (g_lower,) = lower_vjp(own_grad)
    g_dec = jax.tree.map(jnp.zeros_like, decs[k])
    if cfg.local_loss:
      def mi_loss(w, h):
        logits = apply(MODEL.decoder, h, apply(MODEL.lower, w, xs[k]))
        return -jnp.mean(xs[k] * jax.nn.log_sigmoid(logits)
                         + (1 - xs[k]) * jax.nn.log_sigmoid(-logits))
      g_mi_lower, g_dec = jax.grad(mi_loss, argnums=(0, 1))(lowers[k], decs[k])
      g_lower = jax.tree.map(lambda a, b: a + cfg.local_loss_weight * b, g_lower, g_mi_lower)
    new_lowers.append(jax.tree.map(lambda w, g: w - cfg.client_lr * g, lowers[k], g_lower))
    new_decs.append(jax.tree.map(lambda w, g: w - cfg.client_lr * g, decs[k], g_dec))

  if cfg.fedavg and (step + 1) % cfg.fedavg_every == 0:
    def avg(trees):
      return jax.tree.map(lambda *leaves: sum(d * l for d, l in zip(delta, leaves)), *trees)
    mean_lower, mean_dec = avg(new_lowers), avg(new_decs)
    new_lowers, new_decs = [mean_lower] * C, [mean_dec] * C
  stack = lambda trees: jax.tree.map(lambda *l: jnp.stack(l), *trees)
  loss_real = sum(delta[k] * ce(apply(MODEL.upper, upper, smashed[k]), ys[k]) for k in range(C))
  return {"upper": new_upper, "lower": stack(new_lowers), "decoder": stack(new_decs)}, {
      "loss_real": loss_real}


def engine_params(state):
  return {"upper": state.server.params, "lower": state.clients.params["lower"],
          "decoder": state.clients.params["decoder"]}


ALGOS = {
    "locfedmix": dict(local_loss=True, fedavg=True, smashmix=True),
    "psl": dict(local_loss=False, fedavg=False, smashmix=False),
    "loc_only": dict(local_loss=True, fedavg=False, smashmix=False),
    "mix_only": dict(local_loss=False, fedavg=False, smashmix=True),
    "fed_every_2": dict(local_loss=True, fedavg=True, smashmix=True, fedavg_every=2),
}


@pytest.mark.parametrize("name", list(ALGOS))
def test_round_equals_plain_per_client_loop(name):
  cfg = make_cfg(**ALGOS[name], local_loss_weight=0.7)
  data = make_data()
  round_step = lfmjax.make_round_step(cfg, MODEL)
  state = init(cfg)
  # Two iterations: the second starts from clients that differ (without FedAvg).
  for _ in range(2):
    expected, ref_metrics = reference_step(cfg, jax.tree.map(jnp.array, state), data)
    state, metrics = round_step(state, data)
    chex.assert_trees_all_close(engine_params(state), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_real"], ref_metrics["loss_real"], rtol=1e-5)


def test_adam_round_equals_reference_with_optax():
  cfg = make_cfg(**ALGOS["psl"], client_optimizer="adam", server_optimizer="adam",
                 client_lr=1e-2, server_lr=1e-2)
  data = make_data()
  state = init(cfg)
  sgd_cfg = dataclasses.replace(cfg, client_optimizer="sgd", server_optimizer="sgd",
                                client_lr=1.0, server_lr=1.0)
  # With lr=1 SGD, (old - new) is the gradient: recover the reference gradients.
  ref, _ = reference_step(sgd_cfg, jax.tree.map(jnp.array, state), data)
  old = jax.tree.map(jnp.array, engine_params(state))  # state is donated below
  grads = jax.tree.map(lambda a, b: a - b, old, ref)
  adam = optax.adam(1e-2)
  expected_upper = optax.apply_updates(
      old["upper"], adam.update(grads["upper"], adam.init(old["upper"]))[0])
  new_state, _ = lfmjax.make_round_step(cfg, MODEL)(state, data)
  chex.assert_trees_all_close(new_state.server.params, expected_upper, atol=1e-6)
  lower0 = jax.tree.map(lambda a: a[1], old["lower"])
  g0 = jax.tree.map(lambda a: a[1], grads["lower"])
  expected_lower = optax.apply_updates(lower0, adam.update(g0, adam.init(lower0))[0])
  chex.assert_trees_all_close(jax.tree.map(lambda a: a[1], new_state.clients.params["lower"]),
                              expected_lower, atol=1e-6)


def test_round_step_is_traced_once():
  cfg = make_cfg(**ALGOS["locfedmix"])
  data = make_data()
  round_step = lfmjax.make_round_step(cfg, MODEL)
  state = init(cfg)
  state, _ = round_step(state, data)
  after_first = TRACES["lower"]
  for _ in range(3):
    state, _ = round_step(state, data)
  assert TRACES["lower"] == after_first
  assert int(state.step) == 4


def test_multi_step_equals_repeated_round_steps():
  cfg = make_cfg(**ALGOS["locfedmix"])
  data = make_data()
  one = lfmjax.make_round_step(cfg, MODEL)
  state = init(cfg)
  for _ in range(3):
    state, _ = one(state, data)
  fused = lfmjax.make_multi_step(lfmjax.make_round_step(cfg, MODEL, jit=False), 3)
  fused_state, metrics = fused(init(cfg), data)
  chex.assert_trees_all_close(engine_params(fused_state), engine_params(state), atol=1e-6)
  chex.assert_shape(metrics["loss_real"], (3,))


def test_downloaded_gradient_is_own_loss_gradient_unscaled():
  """g_k = dL_k/ds_k, not delta_k dL_k/ds_k, with unequal client weights."""
  cfg = make_cfg(**ALGOS["psl"])
  server_loss = lfmjax.round.make_server_loss(cfg, MODEL)
  state = init(cfg)
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.normal(size=(C, B, 4, 4, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, N_CLS, (C, B)), jnp.int32)
  w = jnp.asarray([0.5, 0.3, 0.2])
  ds = jax.grad(lambda s: server_loss(state.server.params, {}, s, y, w,
                                      jax.random.PRNGKey(0))[0])(s)
  g = ds / w[:, None, None, None, None]
  for k in range(C):
    own = jax.grad(lambda sk: components.cross_entropy(
        MODEL.upper.apply({"params": state.server.params}, sk), y[k]))(s[k])
    np.testing.assert_allclose(g[k], own, rtol=1e-5, atol=1e-7)
