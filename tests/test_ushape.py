"""The U-shaped split (`lfmjax.ushape`): the compiled round against a plain per-client
loop, and against today's round with the head moved back to the server.

The reference loops over clients in Python and differentiates each client's composed
loss CE(head_k(body(lower_k(x)))) with jax.grad; SmashMix's mixed batches are scored
as BUILD.md defines them on a U-shaped split (the owner's head against its label,
weighted lam, the partner's head against its own, weighted 1 - lam). It shares with the
engine only the documented random streams.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lfmjax
from lfmjax.algorithms import SpecError
from lfmjax.data import batch_indices
from lfmjax.models import get_model, init_split, apply_module
from lfmjax.state import HeadMismatchError

from test_round import (B, C, H, N_CLS, algorithm_cfg, ce, client_grads, expanded,
                        make_data, mean_of, plain_download, sgd, sgd_spec, stack)

SMALL = dict(widths=(4, 8), hidden=16, cut=1)
U_MODEL = get_model("vgg", num_classes=N_CLS, input_shape=(H, H, 1), client_head=True,
                    **SMALL)
PLAIN = get_model("vgg", num_classes=N_CLS, input_shape=(H, H, 1), **SMALL)


def apply(module, params, x):
  return module.apply({"params": params}, x) if params else module.apply({}, x)


def init_u(cfg, seed=0):
  return lfmjax.init_state(cfg, U_MODEL, jax.random.PRNGKey(seed), jnp.zeros((B, H, H, 1)))


def mix_draws(cfg, key, step):
  """SmashMix's draws from the documented stream: (k, n, j, perm, lam) per batch."""
  key_mix = jax.random.fold_in(jax.random.fold_in(key, 1), step)
  key_partner, key_draws = jax.random.split(key_mix)
  offsets = np.asarray(jax.random.randint(key_partner, (C, cfg.num_mixed), 1, C))
  draw_keys = jax.random.split(key_draws, (C, cfg.num_mixed))
  draws = []
  for k in range(C):
    for n in range(cfg.num_mixed):
      key_perm, key_lam = jax.random.split(draw_keys[k, n])
      perm = np.asarray(jax.random.permutation(key_perm, B))
      lam = jnp.asarray(jax.random.beta(key_lam, cfg.mixup_alpha, cfg.mixup_alpha, (B,)))
      draws.append((k, (k + int(offsets[k, n])) % C, perm, lam))
  return draws


def sample_ce(logits, y):
  return -jax.nn.log_softmax(logits)[jnp.arange(len(y)), y]


def u_reference_step(cfg, state, data):
  """One U-shaped iteration client by client: (params dict, loss_real)."""
  state = expanded(state, C)
  step, key = int(state.step), state.key
  delta = np.asarray(data.weights_C)
  body_of = lambda w, s: apply(U_MODEL.upper, w, s)
  head_of = lambda hd, h: apply(U_MODEL.head, hd, h)
  def own_loss_grads(w, hd, s, y, stream_step, k):
    """(L, (d body, d head, d s)) of client k's loss, its returned gradient dL/dh as
    the client sends it (`plain_download`'s noise, the label holder's defence)."""
    h, body_vjp = jax.vjp(body_of, w, s)
    loss, (g_head, dh) = jax.value_and_grad(lambda hd, h: ce(head_of(hd, h), y),
                                            argnums=(0, 1))(hd, h)
    g_w, g_s = body_vjp(plain_download(cfg, key, stream_step, k, dh))
    return loss, (g_w, g_head, g_s)

  own_loss = lambda w, hd, s, y: ce(head_of(hd, body_of(w, s)), y)
  rows = lambda tree: [jax.tree.map(lambda a: a[k], tree) for k in range(C)]
  p = state.clients.params
  lowers, decs, auxs, heads = (rows(p["lower"]), rows(p["decoder"]), rows(p["aux_head"]),
                               rows(p["head"]))
  lr_c, lr_s = cfg.client_opt.learning_rate, cfg.server_spec.learning_rate
  idx = np.asarray(batch_indices(jax.random.fold_in(key, 0), state.step, data.idx_CxM,
                                 data.sizes_C, cfg.batch_size))
  xs = [jnp.asarray(data.train_x)[idx[k]].astype(jnp.float32) / 255.0 for k in range(C)]
  ys = [jnp.asarray(data.train_y)[idx[k]] for k in range(C)]
  losses, g, g_heads = [0.0] * C, [None] * C, [None] * C

  if cfg.server_mode == "relay":  # the lower and the head handed on together
    body, lower, head = state.server.params, lowers[-1], heads[-1]
    new_lowers, new_heads, new_decs, new_auxs = [], [], [], []
    for k in range(C):
      turn_losses, dec, aux = [], decs[k], auxs[k]
      for t in range(cfg.sl_turn_steps):
        idx_k = np.asarray(batch_indices(jax.random.fold_in(key, 0),
                                         step * cfg.sl_turn_steps + t, data.idx_CxM,
                                         data.sizes_C, cfg.batch_size))[k]
        x_k = jnp.asarray(data.train_x)[idx_k].astype(jnp.float32) / 255.0
        y_k = jnp.asarray(data.train_y)[idx_k]
        s_k = apply(U_MODEL.lower, lower, x_k)
        loss, (g_body, g_head, g_s) = own_loss_grads(body, head, s_k, y_k,
                                                     step * cfg.sl_turn_steps + t, k)
        turn_losses.append(float(loss))
        body = sgd(body, g_body, lr_s)
        g_lower, g_dec, g_aux = client_grads(cfg, lower, dec, aux, x_k, y_k, g_s, U_MODEL)
        lower, head = sgd(lower, g_lower, lr_c), sgd(head, g_head, lr_c)
        dec, aux = sgd(dec, g_dec, lr_c), sgd(aux, g_aux, lr_c)
      losses[k] = np.mean(turn_losses)
      new_lowers.append(lower)
      new_heads.append(head)
      new_decs.append(dec)
      new_auxs.append(aux)
    return ({"upper": body, "lower": stack(new_lowers), "head": stack(new_heads),
             "decoder": stack(new_decs), "aux_head": stack(new_auxs)},
            sum(delta * np.asarray(losses)))

  smashed = [apply(U_MODEL.lower, lowers[k], xs[k]) for k in range(C)]
  if cfg.server_mode == "single":
    body = state.server.params
    draws = mix_draws(cfg, key, step) if cfg.smashmix else []

    def objective(w, hds):
      total = sum(delta[k] * own_loss(w, hds[k], smashed[k], ys[k]) for k in range(C))
      for k, j, perm, lam in draws:
        s_mix = (lam[:, None, None, None] * smashed[k]
                 + (1 - lam[:, None, None, None]) * smashed[j][perm])
        h_mix = body_of(w, jax.lax.stop_gradient(s_mix))
        shares = (lam * sample_ce(head_of(hds[k], h_mix), ys[k])
                  + (1 - lam) * sample_ce(head_of(hds[j], h_mix), ys[j][perm]))
        total += delta[k] * jnp.mean(shares) / cfg.num_mixed
      return total

    for k in range(C):
      losses[k], (_, _, g[k]) = own_loss_grads(body, heads[k], smashed[k], ys[k], step, k)
    d_body, d_heads = jax.grad(objective, argnums=(0, 1))(body, heads)
    if cfg.grad_noise_std:  # the body learns from the returned, noised gradients
      assert not draws, "the reference defends returned gradients without SmashMix only"
      d_body = mean_of([own_loss_grads(body, heads[k], smashed[k], ys[k], step, k)[1][0]
                        for k in range(C)], delta)
    g_heads = [jax.tree.map(lambda a: a / delta[k], d_heads[k]) for k in range(C)]
    new_body = sgd(body, d_body, lr_s)
  elif cfg.server_mode == "per_client":  # SFL-V1: a body copy per client
    bodies, new_bodies = rows(state.server.params), []
    for k in range(C):
      losses[k], (g_w, g_heads[k], g[k]) = own_loss_grads(bodies[k], heads[k], smashed[k],
                                                          ys[k], step, k)
      new_bodies.append(sgd(bodies[k], g_w, lr_s))
    if (step + 1) % cfg.fedavg_every == 0:
      new_bodies = [mean_of(new_bodies, delta)] * C
    new_body = stack(new_bodies)
  else:  # SFL-V2: one body, clients in random order, each head at its start
    order = np.asarray(jax.random.permutation(
        jax.random.fold_in(jax.random.fold_in(key, 2), step), C))
    new_body = state.server.params
    for k in order:
      losses[k], (g_w, g_heads[k], g[k]) = own_loss_grads(new_body, heads[k], smashed[k],
                                                          ys[k], step, k)
      new_body = sgd(new_body, g_w, lr_s)

  if cfg.gradmix and cfg.num_gradmix:
    chosen = np.asarray(jax.random.permutation(
        jax.random.fold_in(jax.random.fold_in(key, 3), step), C))[:cfg.num_gradmix]
    mean = sum(g[k] for k in chosen) / len(chosen)
    for k in chosen:
      g[k] = mean
  new = {"lower": [], "head": [], "decoder": [], "aux_head": []}
  for k in range(C):
    g_lower, g_dec, g_aux = client_grads(cfg, lowers[k], decs[k], auxs[k], xs[k], ys[k],
                                         g[k], U_MODEL)
    new["lower"].append(sgd(lowers[k], g_lower, lr_c))
    new["head"].append(sgd(heads[k], g_heads[k], lr_c))
    new["decoder"].append(sgd(decs[k], g_dec, lr_c))
    new["aux_head"].append(sgd(auxs[k], g_aux, lr_c))
  if cfg.fedavg and (step + 1) % cfg.fedavg_every == 0:
    new = {name: [mean_of(trees, delta)] * C for name, trees in new.items()}
  return ({"upper": new_body, **{name: stack(trees) for name, trees in new.items()}},
          sum(delta * np.asarray(losses)))


def engine_params(state):
  state = expanded(state)
  return {"upper": state.server.params,
          **{name: state.clients.params[name]
             for name in ("lower", "head", "decoder", "aux_head")}}


U_ALGOS = {
    "psl": {}, "sfl_v1": dict(fedavg_every=2), "sfl_v2": {}, "sl": dict(sl_turn_steps=2),
    "locfedmix": {},  # T_c = 2 with a client head: sfl_v1 above
    "mix2sfl": {},  # GradMix on the body's gradients (SGLR's SplitAvg), SmashMix, FedAvg
    # the returned gradient noised (the U-shaped label holder's defence), once per
    # server mode: single, per-client copies, sequential, relay
    "psl_defended": dict(base="psl", grad_noise_std=0.05),
    "sfl_v1_defended": dict(base="sfl_v1", grad_noise_std=0.05, fedavg_every=2),
    "sfl_v2_defended": dict(base="sfl_v2", grad_noise_std=0.05),
    "sl_defended": dict(base="sl", grad_noise_std=0.05, sl_turn_steps=2),
}


@pytest.mark.parametrize("name", list(U_ALGOS))
def test_u_shaped_round_equals_plain_per_client_loop(name):
  overrides = dict(U_ALGOS[name])
  cfg = algorithm_cfg(overrides.pop("base", name), client_head=True, local_loss_weight=0.7,
                      **overrides)
  data = make_data()
  round_step = lfmjax.make_round_step(cfg, U_MODEL)
  state = init_u(cfg)
  for _ in range(2):  # the second iteration starts from clients that differ (PSL)
    expected, loss_real = u_reference_step(cfg, jax.tree.map(jnp.array, state), data)
    state, metrics = round_step(state, data)
    chex.assert_trees_all_close(engine_params(state), expected, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(metrics["loss_real"], loss_real, rtol=1e-5)


def head_moved_back(state, copies: int | None = None):
  """(server params, client params) of today's round from a U-shaped state: the
  clients' head, which they all hold (averaged, or the last one handed on), put back
  into the server's upper under its own name; `copies`: SFL-V1's C body copies."""
  head = jax.tree.map(lambda a: a[-1], state.clients.params["head"])
  if copies:
    head = jax.tree.map(lambda a: jnp.broadcast_to(a, (copies,) + a.shape), head)
  clients = {k: v for k, v in state.clients.params.items() if k != "head"}
  return {**state.server.params, **head}, clients


# Where the head, moved back, is today's model trained the same way: handed on with the
# lower (SL), or averaged after every iteration with a linear optimiser, so one step of
# the heads' average is one step of a server-held head on the d-weighted sum (the
# averaged phase), SmashMix included (soft CE is linear in the target).
MOVED_BACK = {"sl": dict(sl_turn_steps=2), "sfl_v1": {}, "locfedmix": {}, "mix2sfl": {}}


@pytest.mark.parametrize("name", list(MOVED_BACK))
def test_head_moved_back_to_the_server_equals_todays_round(name):
  same_rate = dict(client_opt=sgd_spec(0.05), server_opt=sgd_spec(0.05),
                   local_loss_weight=0.7, **MOVED_BACK[name])
  u_cfg = algorithm_cfg(name, client_head=True, **same_rate)
  cfg = algorithm_cfg(name, **same_rate)
  copies = C if cfg.server_mode == "per_client" else None
  data = make_data()
  u_state = init_u(u_cfg, seed=3)
  # Copies: both rounds donate their state.
  server, clients = jax.tree.map(jnp.copy, head_moved_back(u_state, copies))
  state = lfmjax.init_state(cfg, PLAIN, jax.random.PRNGKey(3), jnp.zeros((B, H, H, 1)))
  state = state.replace(server=state.server.replace(params=server),
                        clients=state.clients.replace(params=clients))
  u_step, step = lfmjax.make_round_step(u_cfg, U_MODEL), lfmjax.make_round_step(cfg, PLAIN)
  for _ in range(2):
    u_state, u_metrics = u_step(u_state, data)
    state, metrics = step(state, data)
    server, clients = head_moved_back(u_state, copies)
    chex.assert_trees_all_close((server, clients), (state.server.params,
                                                    state.clients.params),
                                atol=2e-5, rtol=2e-5)
    for key in ("loss_real", "loss_mix", "train_accuracy"):
      np.testing.assert_allclose(u_metrics[key], metrics[key], rtol=1e-5, atol=1e-7)


# One model per Upper class (mlp's is tiny_cnn's).
@pytest.mark.parametrize("name", ["bench_cnn", "resnet16", "vgg", "tiny_cnn", "vit", "lm"])
def test_head_on_the_body_is_the_upper(name):
  """Every model's U-shaped split: the head applied to the body's features, with the
  head's parameters put back into the body's, is the model's upper."""
  classes, shape = (256, (16,)) if name == "lm" else (N_CLS, (8, 8, 3))
  options = dict(patch=4) if name == "vit" else {}
  u = get_model(name, num_classes=classes, input_shape=shape, client_head=True, **options)
  plain = get_model(name, num_classes=classes, input_shape=shape, **options)
  x = (jnp.arange(32, dtype=jnp.int32).reshape(2, 16) if name == "lm"
       else jax.random.uniform(jax.random.PRNGKey(1), (2,) + shape))
  v = init_split(u, jax.random.PRNGKey(0), x)
  s, _ = apply_module(u.lower, v["lower"], x, train=False)
  h, _ = apply_module(u.upper, v["upper"], s, train=False)
  logits, _ = apply_module(u.head, v["head"], h, train=False)
  merged = {**v["upper"], "params": {**v["upper"].get("params", {}), **v["head"]["params"]}}
  assert (jax.tree.structure(merged)
          == jax.tree.structure(init_split(plain, jax.random.PRNGKey(0), x)["upper"]))
  expected, _ = apply_module(plain.upper, merged, s, train=False)
  np.testing.assert_array_equal(logits, expected)


def test_u_shaped_evaluation_scores_the_clients_heads():
  """The composed model a U-shaped run evaluates is lower -> body -> head; a head
  zeroed on every client makes every logit equal, so the score changes."""
  cfg = algorithm_cfg("locfedmix", client_head=True)
  state = init_u(cfg)
  test = lfmjax.evaluate.pad_to_chunks(np.asarray(make_data().train_x),
                                       np.asarray(make_data().train_y), 8)
  evaluate = lfmjax.evaluate.make_evaluate(cfg, U_MODEL)
  scores = evaluate(state, make_data().weights_C, jnp.arange(C), test)
  zero = state.replace(clients=state.clients.replace(params={
      **state.clients.params,
      "head": jax.tree.map(jnp.zeros_like, state.clients.params["head"])}))
  zeroed = evaluate(zero, make_data().weights_C, jnp.arange(C), test)
  np.testing.assert_allclose(zeroed["loss"], np.log(N_CLS), rtol=1e-6)
  assert abs(float(scores["loss"]) - np.log(N_CLS)) > 1e-4


def test_u_shaped_compositions_refused_with_the_rule():
  with pytest.raises(SpecError, match="client_head=True: LocSplitFed's clients never wait"):
    algorithm_cfg("locsplitfed", client_head=True)
  with pytest.raises(SpecError, match="client_head=True: a U-shaped split is not built for "
                                      "LoRA"):
    algorithm_cfg("psl", client_head=True, frozen_segments=("lower",))
  with pytest.raises(HeadMismatchError, match="has no client head: build it with "
                                              r"get_model\(..., client_head=True\)"):
    lfmjax.make_round_step(algorithm_cfg("psl", client_head=True), PLAIN)
  with pytest.raises(HeadMismatchError, match="has a client head"):
    lfmjax.init_state(algorithm_cfg("psl"), U_MODEL, jax.random.PRNGKey(0),
                      jnp.zeros((B, H, H, 1)))
  with pytest.raises(ValueError, match="not built for LoRA fine-tuning"):
    get_model("vit", num_classes=N_CLS, input_shape=(8, 8, 3), patch=4, client_head=True,
              lora=lfmjax.models.LoRASpec(rank=2))
