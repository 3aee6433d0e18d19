"""Optimisers and schedules (lfmjax.optim) against optax's own, and through the round."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lfmjax
from lfmjax.config import base_config
from lfmjax.optim import OptimizerSpec, learning_rate_at, make_optimizer

STEPS = [0, 1, 5, 49, 50, 79, 80, 81, 99, 100]


@pytest.mark.parametrize("spec,expected", [
    (OptimizerSpec(learning_rate=0.1), optax.constant_schedule(0.1)),
    (OptimizerSpec(learning_rate=0.1, schedule="cosine", total_steps=100),
     optax.cosine_decay_schedule(0.1, 100)),
    (OptimizerSpec(learning_rate=0.1, schedule="warmup_cosine", total_steps=100,
                   warmup_fraction=0.1),
     optax.warmup_cosine_decay_schedule(0.0, 0.1, 10, 100)),
    (OptimizerSpec(learning_rate=0.1, schedule="step", total_steps=100,
                   decay_fractions=(0.5, 0.8), decay_factor=0.1),
     optax.piecewise_constant_schedule(0.1, {50: 0.1, 80: 0.1})),
])
def test_schedules_equal_optax(spec, expected):
  np.testing.assert_allclose([float(learning_rate_at(spec, s)) for s in STEPS],
                             [float(expected(s)) for s in STEPS], rtol=1e-6)


@pytest.mark.parametrize("spec,expected", [
    (OptimizerSpec("adamw", 1e-2, weight_decay=0.1), optax.adamw(1e-2, weight_decay=0.1)),
    (OptimizerSpec("momentum", 1e-2), optax.sgd(1e-2, momentum=0.9)),
    (OptimizerSpec("sgd", 1e-2, weight_decay=0.1, grad_clip_norm=0.5),
     optax.chain(optax.clip_by_global_norm(0.5), optax.add_decayed_weights(0.1),
                 optax.sgd(1e-2))),
])
def test_named_optimizers_equal_optax(spec, expected):
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  grads = jax.tree.map(lambda p: jnp.sin(p) + 1.0, params)

  def three_steps(tx):
    p, state = params, tx.init(params)
    for _ in range(3):
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    return p

  chex.assert_trees_all_close(three_steps(make_optimizer(spec)), three_steps(expected),
                              atol=1e-6)


def test_bad_spec_is_refused_with_the_reason():
  with pytest.raises(ValueError, match="optimizer 'rmsprop' is unknown"):
    OptimizerSpec("rmsprop")
  with pytest.raises(ValueError, match="schedule 'linear' is unknown"):
    OptimizerSpec(schedule="linear")


def test_config_schedule_reaches_the_spec_with_the_run_length():
  config = base_config()
  config.algorithm, config.num_clients, config.num_iterations = "sglr", 4, 200
  config.client_optimizer, config.client_schedule = "adam", "cosine"
  cfg = lfmjax.round_config_from(config, 10)
  assert cfg.client_opt == OptimizerSpec("adam", 0.01, schedule="cosine", total_steps=200,
                                         decay_fractions=(0.8,))
  # SplitLr, the sglr preset's alpha_lr = 0.5: the server's peak is eta_c * C ** 0.5 on
  # the same schedule.
  assert cfg.server_lr_exponent == 0.5 and cfg.gradmix_fraction == 0.5
  assert cfg.server_spec.learning_rate == pytest.approx(0.01 * 4 ** 0.5)
  assert cfg.server_spec.schedule == "cosine" and cfg.server_spec.name == "adam"
  config.algorithm = "psl"  # no SplitLr elsewhere
  assert lfmjax.round_config_from(config, 10).server_spec.learning_rate == 0.01
  config.algorithm, config.server_lr_exponent = "psl", 1.0  # a config may set it anywhere
  assert lfmjax.round_config_from(config, 10).server_spec.learning_rate == pytest.approx(0.04)


@pytest.mark.parametrize("num_clients", [1, 20])
def test_sglr_server_steps_at_eta_c_sqrt_c(num_clients):
  """The sglr preset's server applies eta_c * C ** 0.5: one SGD server step from the
  same state moves the upper sqrt(C) times as far as PSL's with the same eta_c."""
  spec = OptimizerSpec("sgd", 0.05)
  sglr = lfmjax.preset("sglr", num_clients=num_clients, batch_size=2, num_classes=3,
                       client_opt=spec, server_opt=spec)
  assert sglr.server_spec.learning_rate == pytest.approx(0.05 * num_clients ** 0.5)
  tx = lfmjax.state.server_optimizer(sglr)
  params = {"w": jnp.ones(3)}
  updates, _ = tx.update({"w": jnp.full(3, 2.0)}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.05 * num_clients ** 0.5 * 2.0, rtol=1e-6)
  psl = lfmjax.preset("psl", num_clients=num_clients, batch_size=2, num_classes=3,
                      client_opt=spec, server_opt=spec)
  assert psl.server_spec is psl.server_opt


def round_setup(cfg):
  from test_round import B, H, BENCH, make_data
  data = make_data()
  state = lfmjax.init_state(cfg, BENCH, jax.random.PRNGKey(0), jnp.zeros((B, H, H, 1)))
  return BENCH, data, state


def test_round_logs_the_scheduled_rates():
  from test_round import algorithm_cfg
  spec = OptimizerSpec("sgd", 0.1, schedule="cosine", total_steps=4)
  cfg = algorithm_cfg("psl", client_opt=spec, server_opt=spec)
  model, data, state = round_setup(cfg)
  step = lfmjax.make_round_step(cfg, model)
  for s in range(3):
    state, metrics = step(state, data)
    assert float(metrics["lr_client"]) == pytest.approx(float(optax.cosine_decay_schedule(0.1, 4)(s)))
    assert float(metrics["lr_server"]) == float(metrics["lr_client"])


def test_user_optax_transformation_equals_the_named_one():
  """make_round_step/init_state take any optax transformation; adamw by name and by
  transformation give the same run, and a transformation logs no rate of its own."""
  from test_round import algorithm_cfg
  spec = OptimizerSpec("adamw", 1e-2, weight_decay=0.05)
  named = algorithm_cfg("locfedmix", client_opt=spec, server_opt=spec)
  model, data, state_named = round_setup(named)
  plain = algorithm_cfg("locfedmix")
  txs = dict(client_tx=optax.adamw(1e-2, weight_decay=0.05),
             server_tx=optax.adamw(1e-2, weight_decay=0.05))
  state_tx = lfmjax.init_state(plain, model, jax.random.PRNGKey(0),
                               jnp.zeros((1,) + data.train_x.shape[1:3] + (1,)), **txs)
  step_named = lfmjax.make_round_step(named, model)
  step_tx = lfmjax.make_round_step(plain, model, **txs)
  for _ in range(2):
    state_named, m_named = step_named(state_named, data)
    state_tx, m_tx = step_tx(state_tx, data)
  chex.assert_trees_all_close(state_named, state_tx, atol=1e-6)
  assert "lr_client" in m_named and "lr_client" not in m_tx
