"""LoRA fine-tuning over a frozen backbone held once (lfmjax.finetune, models.lora):
the backbone stays bit-identical, the adapted model is W + (alpha/r) A B, FedAvg
averages adapters, state memory grows with C x adapters, not C x backbone, and every
algorithm runs a round of the split language model."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lfmjax
from lfmjax import finetune
from lfmjax.accounting import tree_bytes
from lfmjax.models import LoRASpec, lora
from lfmjax.optim import OptimizerSpec

T, V, B = 8, 256, 4
SPEC = LoRASpec(rank=2, alpha=4.0, targets=("query", "value", "mlp1"))


def lm(lora_spec=SPEC, segments=("lower", "upper")):
  return lfmjax.get_model("lm", num_classes=V, input_shape=(T,), width=8, depth=2, heads=2,
                          mlp_dim=8, cut=1, lora=lora_spec, lora_segments=segments)


def token_data(sizes=(12, 8, 16), seed=0):
  rng = np.random.default_rng(seed)
  n = sum(sizes)
  x = rng.integers(0, V, (n, T), dtype=np.uint8)
  y = rng.integers(0, V, (n, T)).astype(np.int32)
  parts = np.split(rng.permutation(n), np.cumsum(sizes)[:-1])
  idx, sizes_c = lfmjax.data.client_table(parts)
  return lfmjax.make_data(x, y, idx, sizes_c)


def lora_cfg(name, num_clients=3, **kw):
  adam = OptimizerSpec("adam", 1e-2)
  return lfmjax.preset(name, **{**dict(num_clients=num_clients, batch_size=B, num_classes=V,
                                       inputs="tokens", client_opt=adam, server_opt=adam,
                                       frozen_segments=("lower", "upper")), **kw})


def start(cfg, model, seed=0):
  return lfmjax.init_state(cfg, model, jax.random.PRNGKey(seed),
                           jnp.zeros((B, T), jnp.int32))


def test_adapters_hold_no_backbone_and_the_backbone_no_client_axis():
  cfg, model = lora_cfg("psl"), lm()
  state = start(cfg, model)
  lower = state.clients.params["lower"]
  assert jax.tree.leaves(lower)
  assert all(lora.is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(lower)[0])
  assert not any(lora.is_adapter(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(state.frozen)[0])
  plain = lfmjax.models.init_split(lm(None), jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32))
  chex.assert_trees_all_equal_shapes(state.frozen["lower"], plain["lower"]["params"])
  chex.assert_trees_all_equal_shapes(state.frozen["upper"], plain["upper"]["params"])


@pytest.mark.parametrize("name", list(lfmjax.ALGORITHMS))
def test_every_algorithm_fine_tunes_the_language_model(name):
  """Two rounds of each algorithm: the backbone bit-identical, the adapters moved."""
  cfg, model = lora_cfg(name, local_loss=name == "locfedmix"), lm()
  state = start(cfg, model)
  backbone = jax.tree.map(np.array, state.frozen)
  before = jax.tree.map(np.array, state.clients.params["lower"])
  round_step = lfmjax.make_round_step(cfg, model)
  data = token_data()
  for _ in range(2):
    state, metrics = round_step(state, data)
    assert np.isfinite(metrics["loss_real"])
  chex.assert_trees_all_equal(jax.tree.map(np.array, state.frozen), backbone)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before,
                       jax.tree.map(np.array, state.clients.params["lower"]))
  assert all(jax.tree.leaves(moved))


def test_adapted_model_equals_merged_weights():
  """The bound lower with adapters equals the plain model whose kernels are
  W + (alpha / r) A B (`lora.merged_weight`)."""
  cfg, model = lora_cfg("psl"), lm()
  state = start(cfg, model)
  rng = np.random.default_rng(1)
  adapters = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape[1:]), a.dtype),
                          state.clients.params["lower"])
  bound = finetune.bind_frozen(model, state.frozen)
  x = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  got = bound.lower.apply({"params": adapters}, x)

  merged = jax.tree.map(np.asarray, state.frozen["lower"])
  for block, layers in adapters.items():
    for mod, dense in layers.items():
      for name, ab in dense.items():
        w = merged[block][mod][name]["kernel"]
        merged[block][mod][name]["kernel"] = lora.merged_weight(w, ab["lora_a"],
                                                                 ab["lora_b"], SPEC)
  want = lm(None).lower.apply({"params": merged}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fedavg_averages_the_adapters():
  """One step with FedAvg: every client's adapters are the delta-weighted mean of the
  clients' adapters after the same step without it."""
  model, data = lm(), token_data()
  with_fed, without = lora_cfg("psl", fedavg=True), lora_cfg("psl")
  a, _ = lfmjax.make_round_step(with_fed, model)(start(with_fed, model), data)
  b, _ = lfmjax.make_round_step(without, model)(start(without, model), data)
  delta = np.asarray(data.weights_C)
  mean = jax.tree.map(lambda x: np.tensordot(delta, np.asarray(x), 1), b.clients.params)
  for k in range(3):
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[k], a.clients.params), mean,
                                rtol=1e-6, atol=1e-7)


def test_state_grows_with_clients_times_adapters_not_backbone():
  """C x (adapters and their two Adam moments); the backbone once, whatever C."""
  model = lm()
  states = {c: start(lora_cfg("psl", num_clients=c), model) for c in (2, 6)}
  adapters = tree_bytes([a[0] for a in jax.tree.leaves(states[2].clients.params["lower"])])
  backbone = tree_bytes(states[2].frozen)
  one_client = tree_bytes(jax.tree.map(lambda a: a[0], states[2].clients))
  assert one_client == 3 * adapters + 4  # + Adam's int32 step count
  assert tree_bytes(states[6]) - tree_bytes(states[2]) == 4 * one_client
  assert tree_bytes(states[6].frozen) == backbone
  assert adapters < backbone / 5


def test_masked_optimizer_moves_adapters_only():
  """`finetune.masked`: the same rule as an optax transformation over a whole tree."""
  params = lfmjax.models.init_split(lm(), jax.random.PRNGKey(0),
                                    jnp.zeros((1, T), jnp.int32))["lower"]["params"]
  tx = finetune.masked(optax.sgd(0.1), params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    assert bool(jnp.all(u == (-0.1 if lora.is_adapter(path) else 0.0))), path


def test_segments_choose_where_adapters_train():
  client_only = start(lora_cfg("psl"), lm(segments=("lower",)))
  assert jax.tree.leaves(client_only.clients.params["lower"])
  assert not jax.tree.leaves(client_only.server.params)
  server_only = start(lora_cfg("psl"), lm(segments=("upper",)))
  assert not jax.tree.leaves(server_only.clients.params["lower"])
  assert jax.tree.leaves(server_only.server.params)


def test_a_backbone_of_another_shape_is_one_line():
  small = lfmjax.models.init_split(lm(None), jax.random.PRNGKey(0),
                                   jnp.zeros((1, T), jnp.int32))
  other = lfmjax.get_model("lm", num_classes=V, input_shape=(T,), width=16, depth=2,
                           heads=2, mlp_dim=8, cut=1, lora=SPEC)
  backbone = {"lower": small["lower"]["params"], "upper": small["upper"]["params"]}
  with pytest.raises(finetune.PretrainedError, match="model_overrides") as err:
    lfmjax.init_state(lora_cfg("psl"), other, jax.random.PRNGKey(0), jnp.zeros((B, T), jnp.int32),
        backbone=backbone)
  assert "\n" not in str(err.value)


def test_local_only_evaluates_each_clients_own_model():
  """SFL-V1 without FedAvg is local-only training: each client's lower with its own
  upper copy (never their average), the score the mean over the clients' models."""
  from lfmjax.evaluate import make_evaluate, pad_to_chunks
  from lfmjax.models.util import apply_module
  cfg, model = lora_cfg("sfl_v1", fedavg=False), lm()
  state, _ = lfmjax.make_round_step(cfg, model)(start(cfg, model), token_data())
  rng = np.random.default_rng(1)
  x, y = rng.integers(0, V, (6, T), dtype=np.uint8), rng.integers(0, V, (6, T)).astype(np.int32)
  ids = np.array([0, 2], np.int32)
  got = make_evaluate(cfg, model)(state, jnp.ones(3) / 3, ids, pad_to_chunks(x, y, 4))
  bound = finetune.bind_frozen(model, state.frozen)
  losses = []
  for k in ids:
    pick = lambda tree: jax.tree.map(lambda a: a[k], tree)
    s, _ = apply_module(bound.lower, {"params": pick(state.clients.params["lower"])},
                        jnp.asarray(x, jnp.int32), train=False)
    logits, _ = apply_module(bound.upper, {"params": pick(state.server.params)}, s,
                             train=False)
    losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
  np.testing.assert_allclose(got["loss"], np.mean(losses), rtol=1e-5)
  np.testing.assert_allclose(got["perplexity"], np.exp(np.mean(losses)), rtol=1e-5)
