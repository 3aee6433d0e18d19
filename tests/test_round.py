"""The compiled round against a per-client loop written plainly from SPEC.md.

The reference below does not use lfmjax's round, components or state: it loops over
clients in Python, computes each client's own loss and gradients with jax.grad on
per-client functions, and updates with plain SGD (or optax Adam). It shares with the
engine only the documented random streams (batch indices, and SmashMix's draws derived
from fold_in(fold_in(key, 1), step)).
"""
from __future__ import annotations

import dataclasses
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lfmjax
import lfmjax.client_phase
import lfmjax.round
from lfmjax import components
from lfmjax.algorithms import RoundConfig
from lfmjax.optim import OptimizerSpec
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


def sgd_spec(lr, **kw):
  return OptimizerSpec("sgd", lr, **kw)


def make_cfg(**kw):
  base = dict(num_clients=C, batch_size=B, num_classes=N_CLS, client_opt=sgd_spec(0.05),
              server_opt=sgd_spec(0.1), mixup_alpha=2.0, num_mixed=2)
  base.update(kw)
  return RoundConfig(**base)


def init(cfg, seed=0):
  x = jnp.zeros((B, H, H, 1))
  return lfmjax.init_state(cfg, MODEL, jax.random.PRNGKey(seed), x)


# ---------------------------------------------------------------- the plain reference
def apply(module, params, x):
  return module.apply({"params": params}, x)


def ce(logits, y):
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])


def soft_ce(logits, t):
  return -jnp.mean(jnp.sum(t * jax.nn.log_softmax(logits), -1))


def sgd(w, g, lr):
  return jax.tree.map(lambda a, b: a - lr * b, w, g)


def mean_of(trees, weights):
  return jax.tree.map(lambda *leaves: sum(d * l for d, l in zip(weights, leaves)), *trees)


def stack(trees):
  return jax.tree.map(lambda *l: jnp.stack(l), *trees)


def plain_dcor(x, s):
  """dCor(x, s) written out: distance matrices, double centring, the V-statistics."""
  def centred(a):
    a = a.reshape(a.shape[0], -1)
    d = jnp.sqrt(jnp.sum((a[:, None, :] - a[None, :, :]) ** 2, -1) + 1e-30)
    d = d * (1 - jnp.eye(a.shape[0]))
    return d - d.mean(0)[None, :] - d.mean(1)[:, None] + d.mean()
  a, b = centred(x), centred(s)
  return jnp.sqrt(jnp.mean(a * b) / jnp.sqrt(jnp.mean(a * a) * jnp.mean(b * b)))


def plain_upload(cfg, key, stream_step, k, s):
  """What client k uploads at its stream step: s + noise (sigma fixed or from the SNR),
  then k-bit per-sample quantisation; the noise from the documented stream
  fold_in(fold_in(fold_in(key, 4), stream step), client)."""
  if cfg.noise_std or cfg.noise_snr_db is not None:
    sigma = (cfg.noise_std if cfg.noise_snr_db is None
             else jnp.sqrt(jnp.mean(s ** 2) / 10 ** (cfg.noise_snr_db / 10)))
    k_noise = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 4), stream_step), k)
    s = s + sigma * jax.random.normal(k_noise, s.shape)
  if cfg.quantize_bits:
    rows = []
    for sample in s:
      lo, hi = sample.min(), sample.max()
      step = (hi - lo) / (2 ** cfg.quantize_bits - 1)
      rows.append(lo + jnp.round((sample - lo) / step) * step)
    s = jnp.stack(rows)
  return s


def plain_rr(cfg, key, i, y):
  """Sample i's randomised response, from the documented stream fold_in(fold_in(key, 7),
  i): the true label with e^eps / (e^eps + K - 1), else y + U{1..K-1} mod K."""
  if cfg.label_rr_epsilon is None:
    return y
  key_keep, key_other = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, 7), i))
  e = np.exp(cfg.label_rr_epsilon)
  keep = jax.random.uniform(key_keep, ()) < e / (e + N_CLS - 1)
  return jnp.where(keep, y, (y + jax.random.randint(key_other, (), 1, N_CLS)) % N_CLS)


def plain_download(cfg, key, stream_step, k, g):
  """The gradient client k receives: + N(0, grad_noise_std^2) from the documented stream,
  the second half of split(fold_in(fold_in(fold_in(key, 6), stream step), client))."""
  if not cfg.grad_noise_std:
    return g
  k_grad = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 6), stream_step), k)
  return g + cfg.grad_noise_std * jax.random.normal(jax.random.split(k_grad)[1], g.shape)


def client_grads(cfg, lower, dec, aux, x, y, g_s, MODEL=MODEL):
  """A client's gradients: VJP of the download + mu * MI loss + w_ce * aux-head CE
  + NoPeek's weight * dCor(x, s)."""
  _, lower_vjp = jax.vjp(lambda w: apply(MODEL.lower, w, x), lower)
  (g_lower,) = lower_vjp(g_s)
  if cfg.nopeek_weight:
    g_np = jax.grad(lambda w: plain_dcor(x, apply(MODEL.lower, w, x)))(lower)
    g_lower = jax.tree.map(lambda a, b: a + cfg.nopeek_weight * b, g_lower, g_np)
  g_dec = jax.tree.map(jnp.zeros_like, dec)
  g_aux = jax.tree.map(jnp.zeros_like, aux)
  if cfg.local_loss:
    def mi_loss(w, h):
      logits = apply(MODEL.decoder, h, apply(MODEL.lower, w, x))
      return -jnp.mean(x * jax.nn.log_sigmoid(logits) + (1 - x) * jax.nn.log_sigmoid(-logits))
    g_mi, g_dec = jax.grad(mi_loss, argnums=(0, 1))(lower, dec)
    g_lower = jax.tree.map(lambda a, b: a + cfg.local_loss_weight * b, g_lower, g_mi)
  if cfg.local_ce_weight:
    def aux_loss(w, a):
      return ce(apply(MODEL.aux_head, a, apply(MODEL.lower, w, x)), y)
    g_ce, g_aux = jax.grad(aux_loss, argnums=(0, 1))(lower, aux)
    g_lower = jax.tree.map(lambda a, b: a + cfg.local_ce_weight * b, g_lower, g_ce)
  return g_lower, g_dec, g_aux


def mixed_batches(cfg, key, step, smashed, ys):
  """SmashMix's batches from the documented random stream, mixed sample by sample."""
  mixes = []
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
  return mixes


def expanded(state, num_clients=C):
  """The state with a row per client (the averaged phase holds one copy for all)."""
  return state.replace(clients=lfmjax.state.per_client(state.clients, num_clients))


def reference_step(cfg: RoundConfig, state, data, MODEL=MODEL):
  """One iteration, client by client, from SPEC.md. Returns (new params dict, metrics)."""
  state = expanded(state, C)
  step = int(state.step)
  key = state.key
  delta = np.asarray(data.weights_C)
  ids = np.asarray(data.client_ids())  # client k's streams are its id's (participants)
  idx = np.asarray(batch_indices(jax.random.fold_in(key, 0), state.step, data.idx_CxM,
                                 data.sizes_C, cfg.batch_size, ids_C=data.ids_C))
  per_client = lambda tree: [jax.tree.map(lambda a: a[k], tree) for k in range(C)]
  lowers = per_client(state.clients.params["lower"])
  decs = per_client(state.clients.params["decoder"])
  auxs = per_client(state.clients.params["aux_head"])
  xs = [jnp.asarray(data.train_x)[idx[k]].astype(jnp.float32) / 255.0 for k in range(C)]
  ys = [jnp.asarray(data.train_y)[idx[k]] for k in range(C)]
  # The labels the server receives (randomised response, fixed per sample).
  ys_server = [jnp.stack([plain_rr(cfg, key, int(i), y) for i, y in zip(idx[k], ys[k])])
               for k in range(C)]
  lr_c, lr_s = cfg.client_opt.learning_rate, cfg.server_spec.learning_rate
  losses = [0.0] * C

  if cfg.server_mode == "relay":  # vanilla SL: one client after another, by turns
    upper, lower = state.server.params, lowers[-1]
    sizes = np.asarray(data.sizes_C)
    turns = [(int(sizes[k]) + B - 1) // B if cfg.sl_turn_steps is None else cfg.sl_turn_steps
             for k in range(C)]
    new_lowers, new_decs, new_auxs = [], [], []
    for k in range(C):
      dec, aux, turn_losses = decs[k], auxs[k], []
      for t in range(turns[k]):  # client k's stream goes on from its last turn
        idx_k = np.asarray(batch_indices(jax.random.fold_in(key, 0), step * turns[k] + t,
                                         data.idx_CxM, data.sizes_C, cfg.batch_size,
                                         ids_C=data.ids_C))[k]
        x_k = jnp.asarray(data.train_x)[idx_k].astype(jnp.float32) / 255.0
        y_k = jnp.asarray(data.train_y)[idx_k]
        y_server = jnp.stack([plain_rr(cfg, key, int(i), y) for i, y in zip(idx_k, y_k)])
        s_k = plain_upload(cfg, key, step * turns[k] + t, ids[k],
                           apply(MODEL.lower, lower, x_k))
        loss, (g_upper, g_s) = jax.value_and_grad(
            lambda w, s: ce(apply(MODEL.upper, w, s), y_server), argnums=(0, 1))(upper, s_k)
        g_s = plain_download(cfg, key, step * turns[k] + t, ids[k], g_s)
        turn_losses.append(float(loss))
        upper = sgd(upper, g_upper, lr_s)
        g_lower, g_dec, g_aux = client_grads(cfg, lower, dec, aux, x_k, y_k, g_s, MODEL)
        lower, dec, aux = sgd(lower, g_lower, lr_c), sgd(dec, g_dec, lr_c), sgd(aux, g_aux, lr_c)
      losses[k] = np.mean(turn_losses)
      new_lowers.append(lower)
      new_decs.append(dec)
      new_auxs.append(aux)
    return ({"upper": upper, "lower": stack(new_lowers), "decoder": stack(new_decs),
             "aux_head": stack(new_auxs)}, {"loss_real": sum(delta * np.asarray(losses))})

  smashed = [plain_upload(cfg, key, step, ids[k], apply(MODEL.lower, lowers[k], xs[k]))
             for k in range(C)]
  own_loss = lambda w, k: (lambda s: ce(apply(MODEL.upper, w, s), ys_server[k]))
  g = [None] * C
  if cfg.server_mode == "single":
    upper = state.server.params
    mixes = mixed_batches(cfg, key, step, smashed, ys_server) if cfg.smashmix else []

    def server_objective(w_s):
      total = sum(delta[k] * own_loss(w_s, k)(smashed[k]) for k in range(C))
      for k, s_mix, y_mix in mixes:
        total += delta[k] * soft_ce(apply(MODEL.upper, w_s, s_mix), y_mix) / cfg.num_mixed
      return total

    for k in range(C):
      losses[k], g[k] = jax.value_and_grad(own_loss(upper, k))(smashed[k])
    new_upper = sgd(upper, jax.grad(server_objective)(upper), lr_s)
  elif cfg.server_mode == "per_client":  # SFL-V1: a server copy per client
    uppers = per_client(state.server.params)
    new_uppers = []
    for k in range(C):
      losses[k], (g_w, g[k]) = jax.value_and_grad(
          lambda w, s: own_loss(w, k)(s), argnums=(0, 1))(uppers[k], smashed[k])
      new_uppers.append(sgd(uppers[k], g_w, lr_s))
    if cfg.fedavg and (step + 1) % cfg.fedavg_every == 0:
      new_uppers = [mean_of(new_uppers, delta)] * C
    new_upper = stack(new_uppers)
  elif cfg.server_mode == "sequential":  # SFL-V2: one server, clients in random order
    order = np.asarray(jax.random.permutation(
        jax.random.fold_in(jax.random.fold_in(key, 2), step), C))
    upper = state.server.params
    for k in order:
      losses[k], (g_w, g[k]) = jax.value_and_grad(
          lambda w, s: own_loss(w, k)(s), argnums=(0, 1))(upper, smashed[k])
      upper = sgd(upper, g_w, lr_s)
    new_upper = upper

  if cfg.client_gradient == "none":
    g = [jnp.zeros_like(gk) for gk in g]
  elif cfg.gradmix and cfg.num_gradmix:
    chosen = np.asarray(jax.random.permutation(
        jax.random.fold_in(jax.random.fold_in(key, 3), step), C))[:cfg.num_gradmix]
    mean = sum(g[k] for k in chosen) / len(chosen)
    for k in chosen:
      g[k] = mean
  g = [plain_download(cfg, key, step, ids[k], g[k]) for k in range(C)]

  new_lowers, new_decs, new_auxs = [], [], []
  for k in range(C):
    g_lower, g_dec, g_aux = client_grads(cfg, lowers[k], decs[k], auxs[k], xs[k], ys[k], g[k],
                                         MODEL)
    new_lowers.append(sgd(lowers[k], g_lower, lr_c))
    new_decs.append(sgd(decs[k], g_dec, lr_c))
    new_auxs.append(sgd(auxs[k], g_aux, lr_c))
  if cfg.fedavg and (step + 1) % cfg.fedavg_every == 0:
    new_lowers = [mean_of(new_lowers, delta)] * C
    new_decs = [mean_of(new_decs, delta)] * C
    new_auxs = [mean_of(new_auxs, delta)] * C
  return ({"upper": new_upper, "lower": stack(new_lowers), "decoder": stack(new_decs),
           "aux_head": stack(new_auxs)}, {"loss_real": sum(delta * np.asarray(losses))})


def engine_params(state):
  state = expanded(state)
  return {"upper": state.server.params, "lower": state.clients.params["lower"],
          "decoder": state.clients.params["decoder"],
          "aux_head": state.clients.params["aux_head"]}


def algorithm_cfg(name, **kw):
  """The RoundConfig of a named algorithm: its preset with the test's sizes."""
  return make_cfg(**{**lfmjax.ALGORITHMS[name], **kw})


ALGOS = {name: {} for name in lfmjax.ALGORITHMS}
ALGOS.update({
    "loc_psl": dict(base="psl", local_loss=True),
    "mix_psl": dict(base="psl", smashmix=True),
    "locfedmix_every_2": dict(base="locfedmix", fedavg_every=2),
    "sfl_v1_every_2": dict(base="sfl_v1", fedavg_every=2),
    "sl_with_loc": dict(base="sl", local_loss=True, sl_turn_steps=2),
    "sl_turn_1": dict(base="sl", sl_turn_steps=1),     # a hand-on after every mini-batch
    "sl_turn_3": dict(base="sl", sl_turn_steps=3),     # fixed turns, past client 1's epoch
    "sglr_phi_1": dict(base="sglr", gradmix_fraction=1.0),
})
# The privacy defences (noise by SNR or sigma, quantisation, NoPeek) on every algorithm.
DEFENCES = dict(noise_snr_db=10.0, quantize_bits=4, nopeek_weight=0.5)
ALGOS.update({f"{name}_defended": dict(base=name, **DEFENCES) for name in lfmjax.ALGORITHMS})
ALGOS["psl_noise_std"] = dict(base="psl", noise_std=0.3)
# The label defences: noise on the download and randomised response on the server's labels.
LABEL_DEFENCES = dict(grad_noise_std=0.05, label_rr_epsilon=1.0)
ALGOS.update({f"{name}_label_defended": dict(base=name, **LABEL_DEFENCES)
              for name in ("psl", "sfl_v1", "sfl_v2", "sl", "locfedmix", "sglr")})


@pytest.mark.parametrize("name", list(ALGOS))
def test_round_equals_plain_per_client_loop(name):
  overrides = dict(ALGOS[name])
  base = overrides.pop("base", name)
  cfg = algorithm_cfg(base, local_loss_weight=0.7, **overrides)
  data = make_data()
  round_step = lfmjax.make_round_step(cfg, MODEL)
  state = init(cfg)
  # Two iterations: the second starts from clients that differ (without FedAvg).
  for _ in range(2):
    expected, ref_metrics = reference_step(cfg, jax.tree.map(jnp.array, state), data)
    state, metrics = round_step(state, data)
    chex.assert_trees_all_close(engine_params(state), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_real"], ref_metrics["loss_real"], rtol=1e-5)


# bench_cnn exercises every fast path of the round: one shared model for the clients
# (FedAvg + SGD), XLA convolutions with canonical-layout weight gradients, the fused
# first conv + pool, the factored decoder, pooling before bias and ReLU, and SmashMix formed
# after the upper's affine stem.
BENCH = lfmjax.get_model("bench_cnn", num_classes=N_CLS, input_shape=(H, H, 1))
# One per way the clients or the server compute (the other algorithms' rounds equal the
# plain loop on the small model above): the averaged phase with SmashMix after the stem,
# the per-client phase, per-client server copies, and the relay.
BENCH_ALGOS = ["locfedmix", "psl", "sfl_v1", "sl"]


def assert_bench_round_matches_reference(cfg):
  """Two bench_cnn iterations of lfmjax's round against the plain per-client loop."""
  data = make_data()
  round_step = lfmjax.make_round_step(cfg, BENCH)
  state = lfmjax.init_state(cfg, BENCH, jax.random.PRNGKey(1), jnp.zeros((B, H, H, 1)))
  for _ in range(2):
    expected, ref_metrics = reference_step(cfg, jax.tree.map(jnp.array, state), data, BENCH)
    state, metrics = round_step(state, data)
    chex.assert_trees_all_close(engine_params(state), expected, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(metrics["loss_real"], ref_metrics["loss_real"], rtol=1e-5)


@pytest.mark.parametrize("name", BENCH_ALGOS)
def test_bench_cnn_round_equals_plain_per_client_loop(name):
  overrides = dict(ALGOS[name])
  base = overrides.pop("base", name)
  cfg = algorithm_cfg(base, local_loss_weight=0.7, **overrides)
  assert cfg.clients_averaged == (cfg.fedavg and base != "sl")
  assert_bench_round_matches_reference(cfg)


@pytest.mark.parametrize("name", ["locfedmix", "psl", "sfl_v1"])
def test_grouped_backward_equals_plain_per_client_loop(name, monkeypatch):
  """Many clients: the backward in groups of clients, each recomputing its forward
  (the shared phase for locfedmix, per-client segments for psl and sfl_v1)."""
  monkeypatch.setattr(lfmjax.client_phase, "GROUP_SAMPLES", B)
  assert lfmjax.round.client_group_size(C, B) == 1
  overrides = dict(ALGOS.get(name, {}))
  cfg = algorithm_cfg(overrides.pop("base", name), local_loss_weight=0.7, **overrides)
  assert_bench_round_matches_reference(cfg)


def test_client_group_size():
  assert lfmjax.round.client_group_size(10, 32) == 10  # 320 samples: one group
  assert lfmjax.round.client_group_size(1000, 8) == 50  # 512 // 8 = 64 -> divisor 50
  assert lfmjax.round.client_group_size(97, 16) == 1  # prime: groups of one client


def test_averaged_clients_equals_per_client_path():
  """The FedAvg shortcut against lfmjax's own per-client path, momentum included."""
  cfg = algorithm_cfg("locfedmix", client_opt=sgd_spec(0.05, momentum=0.9),
                      server_opt=sgd_spec(0.1, momentum=0.9), fedavg_opt_state=True)
  assert cfg.clients_averaged
  plain = dataclasses.replace(cfg, averaged_clients=False)
  assert not plain.clients_averaged
  assert not dataclasses.replace(cfg, client_opt=OptimizerSpec("adam", 1e-3)).clients_averaged
  assert not dataclasses.replace(
      cfg, client_opt=sgd_spec(0.05, grad_clip_norm=1.0)).clients_averaged
  assert not dataclasses.replace(cfg, client_tx=optax.sgd(0.05)).clients_averaged
  assert not dataclasses.replace(cfg, fedavg_every=2).clients_averaged
  assert not dataclasses.replace(cfg, fedavg_opt_state=False).clients_averaged
  data = make_data()
  x = jnp.zeros((B, H, H, 1))
  fast = lfmjax.init_state(cfg, BENCH, jax.random.PRNGKey(2), x)
  plain_state = lfmjax.init_state(plain, BENCH, jax.random.PRNGKey(2), x)
  chex.assert_tree_shape_prefix(fast.clients, (1,))  # one copy, not C
  chex.assert_tree_shape_prefix(plain_state.clients, (C,))
  fast_step = lfmjax.make_round_step(cfg, BENCH)
  plain_step = lfmjax.make_round_step(plain, BENCH)
  for _ in range(3):
    fast, m_fast = fast_step(fast, data)
    plain_state, m_plain = plain_step(plain_state, data)
    chex.assert_trees_all_close(expanded(fast), plain_state, atol=2e-5, rtol=2e-5)
    chex.assert_trees_all_close(m_fast, m_plain, atol=1e-5, rtol=1e-5)


def test_averaged_phase_refuses_clients_that_differ():
  """A state with a copy per client (here differing after a per-client step) is refused
  by the averaged phase, not collapsed into one of its copies."""
  cfg = algorithm_cfg("locfedmix")
  plain = dataclasses.replace(cfg, averaged_clients=False, fedavg=False, smashmix=False)
  state, _ = lfmjax.make_round_step(plain, MODEL)(init(plain), make_data())
  lowers = state.clients.params["lower"]
  assert not np.allclose(*(jax.tree.leaves(lowers)[0][:2]))  # the clients differ
  with pytest.raises(lfmjax.round.ClientCopiesError, match="has 3: build the state"):
    lfmjax.make_round_step(cfg, MODEL)(state, make_data())


def test_adam_round_equals_reference_with_optax():
  cfg = algorithm_cfg("psl", client_opt=OptimizerSpec("adam", 1e-2),
                      server_opt=OptimizerSpec("adam", 1e-2))
  data = make_data()
  state = init(cfg)
  sgd_cfg = dataclasses.replace(cfg, client_opt=sgd_spec(1.0), server_opt=sgd_spec(1.0))
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
  cfg = algorithm_cfg("locfedmix")
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
  cfg = algorithm_cfg("locfedmix")
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
  cfg = algorithm_cfg("psl")
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


@pytest.mark.parametrize("name", ["psl"])
def test_round_vmapped_over_seeds_equals_each_seed_alone(name):
  """A user's jax.vmap over seeds of per-client weights (psl: the convolutions' batching
  rules nest) gets the same numbers as each seed's own round. test_mesh.py checks
  locfedmix and psl seeds through a whole run."""
  cfg = algorithm_cfg(name, local_loss_weight=0.7)
  data = make_data()
  x = jnp.zeros((B, H, H, 1))
  states = [lfmjax.init_state(cfg, BENCH, jax.random.PRNGKey(s), x) for s in range(3)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
  seeds_step = jax.jit(jax.vmap(lfmjax.make_round_step(cfg, BENCH, jit=False),
                                in_axes=(0, None)))
  one_step = lfmjax.make_round_step(cfg, BENCH)
  for _ in range(2):
    stacked, metrics = seeds_step(stacked, data)
  for s, state in enumerate(states):
    for _ in range(2):
      state, one_metrics = one_step(state, data)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[s], stacked), state,
                                atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(metrics["loss_real"][s], one_metrics["loss_real"], rtol=1e-5)


# ------------------------------------------------------- clients without data (weight 0)
@pytest.mark.parametrize("name", ["psl", "locfedmix", "sfl_v1", "sfl_v2", "sl", "sglr",
                                  "locsplitfed"])
def test_weight_zero_client_contributes_nothing(name):
  """A client with no data (weight 0 through make_data) and NaN planted in its segments
  changes nothing for the others: the run equals one where it holds normal values, and
  nothing becomes NaN."""
  cfg = algorithm_cfg(name, client_opt=OptimizerSpec("adam", 1e-2))
  table = make_data(sizes=(12, 8, 4))  # client_table refuses empty clients: zero the size
  data = lfmjax.make_data(table.train_x, table.train_y, table.idx_CxM, np.array([12, 8, 0]))
  assert float(data.weights_C[2]) == 0.0
  step = lfmjax.make_round_step(cfg, MODEL)

  def run(poison):
    state = init(cfg)
    if poison:
      nan = lambda tree: jax.tree.map(
          lambda a: a.at[2].set(jnp.nan) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
      clients = nan(state.clients)
      if name == "sl":  # the last slot's lower is the model handed on, not client 2's own
        clients = clients.replace(
            params={**clients.params, "lower": state.clients.params["lower"]},
            stats={**clients.stats, "lower": state.clients.stats["lower"]})
      state = state.replace(clients=clients)
    for _ in range(3):
      state, metrics = step(state, data)
    return state, metrics

  (poisoned, m_poisoned), (clean, m_clean) = run(True), run(False)
  others = lambda s: (jax.tree.map(lambda a: a[:2], s.clients), s.server)
  if name == "sl":  # the lower passes through client 2's slot unchanged
    others = lambda s: (jax.tree.map(lambda a: a[:2], s.clients.params["decoder"]),
                        s.server, jax.tree.map(lambda a: a[2], s.clients.params["lower"]))
  chex.assert_tree_all_finite(others(poisoned))
  chex.assert_tree_all_finite(m_poisoned)
  chex.assert_trees_all_close(others(poisoned), others(clean))
  chex.assert_trees_all_close(m_poisoned, m_clean)


@pytest.mark.parametrize("fields,message", [
    (dict(smashmix=True, server_mode="per_client"), "smashmix=True: SmashMix needs a single"),
    (dict(server_mode="shard"), "server_mode='shard': use one of single"),
    (dict(server_mode="relay", smashmix=False), "fedavg=True: vanilla SL"),
    (dict(client_gradient="none", local_ce_weight=0.0), "local_ce_weight=0.0: with client_"),
    (dict(client_tx="adam"), "client_tx='adam': must be an optax.GradientTransformation"),
    (dict(batch_size=0), "batch_size=0: must be at least 1"),
    (dict(normalize="standard"), "normalize='standard': 'standard' needs mean and std"),
    (dict(resize_to=1), "resize_to=1: a square side in [2, 512]"),
])
def test_round_config_refuses_what_cannot_work(fields, message):
  with pytest.raises(lfmjax.SpecError, match=re.escape(message)) as error:
    make_cfg(**fields)
  assert "\n" not in str(error.value)


def test_presets_are_round_configs_and_the_cli_shares_their_errors():
  """Every preset builds; the CLI's error for an impossible composition is RoundConfig's
  rule, in the config's names."""
  from lfmjax.config import base_config
  from lfmjax.run.validate import ConfigError, validate
  for name in lfmjax.ALGORITHMS:
    cfg = lfmjax.preset(name, num_clients=C, batch_size=B, num_classes=N_CLS)
    assert (cfg.server_mode, cfg.fedavg) == (lfmjax.ALGORITHMS[name]["server_mode"],
                                             lfmjax.ALGORITHMS[name]["fedavg"])
  with pytest.raises(lfmjax.SpecError) as api:
    lfmjax.preset("sfl_v2", num_clients=C, batch_size=B, num_classes=N_CLS, smashmix=True)
  config = base_config()
  config.algorithm, config.smashmix = "sfl_v2", True
  with pytest.raises(ConfigError) as cli:
    validate(config)
  fix = api.value.problems[0][2]
  assert str(cli.value).startswith("config.smashmix=True: ") and fix in str(cli.value)


# ----------------------------------------------- BatchNorm models against a plain loop
class BNLower(nn.Module):
  """conv-BN-relu, pooled: the lower of resnet16 in miniature (lfmjax's BatchNorm)."""
  @nn.compact
  def __call__(self, x, train: bool = False):
    from lfmjax.models.batch_norm import BatchNorm
    x = nn.Conv(3, (3, 3), use_bias=False)(x)
    x = BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.relu(x)[:, ::2, ::2, :]


class BNUpper(nn.Module):
  @nn.compact
  def __call__(self, s, train: bool = False):
    from lfmjax.models.batch_norm import BatchNorm
    h = nn.Dense(8)(s.reshape(s.shape[0], -1))
    h = BatchNorm(use_running_average=not train, momentum=0.9)(h)
    return nn.Dense(N_CLS)(nn.relu(h))


BN_MODEL = SplitModel(lower=BNLower(), upper=BNUpper(), decoder=Decoder(),
                      aux_head=AuxHead(N_CLS), name="test_bn")


def bn_reference_step(cfg, state, data):
  """One PSL or SFL-V1 iteration of a BatchNorm model, client by client: each lower
  normalises its own batch; PSL's server normalises the concatenated batch, SFL-V1's
  copies each client's; FedAvg averages parameters and running statistics. LocFedMix
  adds the decoder's loss on each client (weight mu) and SmashMix's batches, which the
  server normalises by their own statistics and which leave its running ones alone."""
  state = expanded(state)
  delta = np.asarray(data.weights_C)
  idx = np.asarray(batch_indices(jax.random.fold_in(state.key, 0), state.step,
                                 data.idx_CxM, data.sizes_C, cfg.batch_size))
  xs = [jnp.asarray(data.train_x)[idx[k]].astype(jnp.float32) / 255.0 for k in range(C)]
  ys = [jnp.asarray(data.train_y)[idx[k]] for k in range(C)]
  lr_c, lr_s = cfg.client_opt.learning_rate, cfg.server_spec.learning_rate
  row = lambda tree, k: jax.tree.map(lambda a: a[k], tree)

  def run(module, params, stats, x):
    out, new = module.apply({"params": params, "batch_stats": stats}, x, train=True,
                            mutable=["batch_stats"])
    return out, new["batch_stats"]

  smashed, vjps, lower_stats = [], [], []
  for k in range(C):
    stats_k = row(state.clients.stats["lower"], k)["batch_stats"]
    s, vjp, new_stats = jax.vjp(lambda p: run(BN_MODEL.lower, p, stats_k, xs[k]),
                                row(state.clients.params["lower"], k), has_aux=True)
    smashed.append(s), vjps.append(vjp), lower_stats.append(new_stats)

  if cfg.server_mode == "single":
    upper_stats = state.server.stats["batch_stats"]
    mixes = (mixed_batches(cfg, state.key, int(state.step), smashed, ys) if cfg.smashmix
             else [])

    def objective(params, s_all):
      logits, new_stats = run(BN_MODEL.upper, params, upper_stats, s_all)
      logits = logits.reshape(C, B, -1)
      total = sum(delta[k] * ce(logits[k], ys[k]) for k in range(C))
      if mixes:  # every mixed batch in one batch of the upper
        mix_logits, _ = run(BN_MODEL.upper, params, upper_stats,
                            jnp.concatenate([s_mix for _, s_mix, _ in mixes]))
        mix_logits = mix_logits.reshape(len(mixes), B, -1)
        total += sum(delta[k] * soft_ce(mix_logits[i], y_mix)
                     for i, (k, _, y_mix) in enumerate(mixes)) / cfg.num_mixed
      return total, new_stats

    (_, new_upper_stats), (g_upper, g_s) = jax.value_and_grad(objective, (0, 1), has_aux=True)(
        state.server.params, jnp.concatenate(smashed))
    new_upper = sgd(state.server.params, g_upper, lr_s)
    g = [g_s.reshape(C, B, *smashed[0].shape[1:])[k] / delta[k] for k in range(C)]
    new_server = (new_upper, {"batch_stats": new_upper_stats})
  else:  # SFL-V1: a server copy per client, averaged with the lowers
    uppers, upper_stats, g = [], [], []
    for k in range(C):
      def own(params, s):
        logits, new_stats = run(BN_MODEL.upper, params, row(state.server.stats, k)["batch_stats"], s)
        return ce(logits, ys[k]), new_stats
      (_, new_stats), (g_upper, g_k) = jax.value_and_grad(own, (0, 1), has_aux=True)(
          row(state.server.params, k), smashed[k])
      uppers.append(sgd(row(state.server.params, k), g_upper, lr_s))
      upper_stats.append({"batch_stats": new_stats})
      g.append(g_k)
    new_server = (stack([mean_of(uppers, delta)] * C), stack([mean_of(upper_stats, delta)] * C))

  lowers, decoders = [], []
  for k in range(C):
    lower_k, dec_k = row(state.clients.params["lower"], k), row(state.clients.params["decoder"], k)
    g_lower = vjps[k](g[k])[0]
    if cfg.local_loss:
      def mi_loss(w, h, k=k):
        s, _ = run(BN_MODEL.lower, w, row(state.clients.stats["lower"], k)["batch_stats"], xs[k])
        logits = apply(BN_MODEL.decoder, h, s)
        return -jnp.mean(xs[k] * jax.nn.log_sigmoid(logits)
                         + (1 - xs[k]) * jax.nn.log_sigmoid(-logits))
      g_mi, g_dec = jax.grad(mi_loss, argnums=(0, 1))(lower_k, dec_k)
      g_lower = jax.tree.map(lambda a, b: a + cfg.local_loss_weight * b, g_lower, g_mi)
      dec_k = sgd(dec_k, g_dec, lr_c)
    lowers.append(sgd(lower_k, g_lower, lr_c))
    decoders.append(dec_k)
  stats = [{"batch_stats": s} for s in lower_stats]
  if cfg.fedavg:
    lowers, stats = [mean_of(lowers, delta)] * C, [mean_of(stats, delta)] * C
    decoders = [mean_of(decoders, delta)] * C
  return new_server, (stack(lowers), stack(stats), stack(decoders))


@pytest.mark.parametrize("name,averaged", [("psl", False), ("sfl_v1", False),
                                           ("sfl_v1", True), ("locfedmix", False),
                                           ("locfedmix", True)])
def test_batchnorm_round_equals_plain_loop(name, averaged):
  """Parameters and running statistics of both segments (and LocFedMix's decoders) after
  two iterations, on the per-client path and (SGD, FedAvg every iteration) the averaged
  one."""
  cfg = algorithm_cfg(name, averaged_clients=averaged, local_loss_weight=0.7)
  assert cfg.clients_averaged == averaged
  data = make_data()
  state = lfmjax.init_state(cfg, BN_MODEL, jax.random.PRNGKey(3), jnp.zeros((B, H, H, 1)))
  step = lfmjax.make_round_step(cfg, BN_MODEL)
  for _ in range(2):
    (upper, upper_stats), (lowers, lower_stats, decoders) = bn_reference_step(
        cfg, jax.tree.map(jnp.array, state), data)
    state, _ = step(state, data)
    single = cfg.server_mode == "single"
    chex.assert_trees_all_close((state.server.params, state.server.stats["batch_stats"]
                                 if single else state.server.stats),
                                (upper, upper_stats["batch_stats"] if single
                                 else upper_stats), atol=2e-5, rtol=2e-5)
    clients = expanded(state).clients
    chex.assert_trees_all_close((clients.params["lower"], clients.stats["lower"],
                                 clients.params["decoder"]),
                                (lowers, lower_stats, decoders), atol=2e-5, rtol=2e-5)


class ReluStemUpper(nn.Module):
  """Declares stem/head, but its stem is not affine."""
  def setup(self):
    self.dense = nn.Dense(6)
    self.out = nn.Dense(N_CLS)

  def stem(self, s, train: bool = False):
    return nn.relu(self.dense(s.reshape(s.shape[0], -1)))

  def head(self, z, train: bool = False):
    return self.out(z)

  def __call__(self, s, train: bool = False):
    return self.head(self.stem(s, train), train)


class BNStemUpper(ReluStemUpper):
  """Declares stem/head, but its stem normalises by the batch."""
  def setup(self):
    from lfmjax.models.batch_norm import BatchNorm
    self.dense = nn.Dense(6)
    self.norm = BatchNorm(use_running_average=False)
    self.out = nn.Dense(N_CLS)

  def stem(self, s, train: bool = False):
    return self.norm(self.dense(s.reshape(s.shape[0], -1)))


@pytest.mark.parametrize("upper,message", [(ReluStemUpper(), "is not affine"),
                                           (BNStemUpper(), "updates batch statistics")])
def test_a_stem_that_is_not_affine_is_refused(upper, message):
  model = SplitModel(lower=Lower(), upper=upper, decoder=Decoder(), aux_head=AuxHead(N_CLS),
                     name="bad_stem")
  cfg = algorithm_cfg("locfedmix")
  with pytest.raises(ValueError, match=message):
    lfmjax.init_state(cfg, model, jax.random.PRNGKey(0), jnp.zeros((B, H, H, 1)))
  # Without SmashMix the declaration is unused, and nothing is refused.
  lfmjax.init_state(algorithm_cfg("psl"), model, jax.random.PRNGKey(0), jnp.zeros((B, H, H, 1)))


# The split ViT: token sequences as smashed data, SmashMix mixing them, the token
# decoder and aux head; every algorithm against the same plain loop.
VIT = lfmjax.get_model("vit", num_classes=N_CLS, input_shape=(H, H, 1), patch=4, width=8,
                       depth=2, heads=2, mlp_dim=8, cut=1, decoder_hidden=4)


@pytest.mark.parametrize("name", list(lfmjax.ALGORITHMS))
def test_vit_round_equals_plain_per_client_loop(name):
  cfg = algorithm_cfg(name, local_loss_weight=0.7)
  data = make_data()
  round_step = lfmjax.make_round_step(cfg, VIT)
  state = lfmjax.init_state(cfg, VIT, jax.random.PRNGKey(2), jnp.zeros((B, H, H, 1)))
  for _ in range(2):
    expected, ref_metrics = reference_step(cfg, jax.tree.map(jnp.array, state), data, VIT)
    state, metrics = round_step(state, data)
    chex.assert_trees_all_close(engine_params(state), expected, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(metrics["loss_real"], ref_metrics["loss_real"], rtol=1e-5)
