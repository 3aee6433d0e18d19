"""lfmjax: parallel split learning in JAX, centred on LocFedMix-SL (Oh et al., WWW 2022).

The public API for composing the round into your own JAX code:

    cfg = lfmjax.preset("locfedmix", num_clients=10, batch_size=32, num_classes=10)
    model = lfmjax.SplitModel(lower=..., upper=..., decoder=..., aux_head=..., name="mine")
    state = lfmjax.init_state(cfg, model, jax.random.PRNGKey(0), x_example)
    data = lfmjax.make_data(train_x_uint8, train_y, idx_CxM, sizes_C)
    round_step = lfmjax.make_round_step(cfg, model)
    state, metrics = round_step(state, data)

Sharded over every device (`lfmjax.mesh`; clients padded to a multiple of the devices):

    mesh = lfmjax.make_mesh()
    padded = lfmjax.mesh.padded_num_clients(cfg.num_clients, mesh.size)
    state = lfmjax.mesh.pad_state(cfg, jax.device_get(state), padded)
    placement = lfmjax.make_placement(cfg, state, mesh)
    state = lfmjax.put_global(state, placement.state)
    data = lfmjax.put_global(lfmjax.mesh.pad_data(data, padded), placement.data)
    step = lfmjax.jit_sharded(
        lfmjax.padded_round(cfg, lfmjax.make_round_step(cfg, model, jit=False, mesh=mesh),
                            mesh),
        placement)
"""
from lfmjax import interrupt

if interrupt.starting_cli():  # before the imports below, which take seconds
  interrupt.install()

from lfmjax import data, mesh  # noqa: E402
from lfmjax.algorithms import ALGORITHMS, RoundConfig, SpecError, preset
from lfmjax.config_round import round_config_from
from lfmjax.evaluate import make_evaluate, pad_to_chunks
from lfmjax.mesh import jit_sharded, make_mesh, make_placement, padded_round, put_global
from lfmjax.models import SplitModel, get_model
from lfmjax.models.patch_conv import compiler_options
from lfmjax.optim import OptimizerSpec, make_optimizer, make_schedule
from lfmjax.round import make_multi_step, make_round_step
from lfmjax.state import RoundData, RoundState, init_state, make_data

__all__ = [
    "ALGORITHMS", "OptimizerSpec", "RoundConfig", "RoundData", "RoundState", "SpecError",
    "SplitModel", "compiler_options", "data", "get_model", "init_state", "jit_sharded",
    "make_data", "make_evaluate", "make_mesh", "make_multi_step", "make_optimizer",
    "make_placement", "make_round_step", "make_schedule", "mesh", "pad_to_chunks",
    "padded_round", "preset", "put_global", "round_config_from",
]
__version__ = "0.1.0"
