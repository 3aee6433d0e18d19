"""Bad input stops the run before anything is compiled: one line naming the field, the
value and the fix, and exit status 2 (`lfmjax.main.run_config`, what the CLI returns).
A hypothesis fuzz test over random configs: an iteration runs or a validation error
stops it, never a traceback."""
from __future__ import annotations

import gzip
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from test_checkpoint import tiny_config
from test_cli import synthetic_fmnist  # noqa: F401  (fixture)

from lfmjax.main import run_config


def error_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith("error: ")
  return err[0]


@pytest.fixture
def no_compile(monkeypatch):
  """Fails the test if the round is ever built: validation must come first."""
  def refuse(*args, **kwargs):
    raise AssertionError("the round was built before the error was found")
  monkeypatch.setattr("lfmjax.run.loop.make_round_step", refuse)


CASES = [
    # (overrides, what the line must name)
    (dict(algorithm="nope"), ["config.algorithm='nope'", "use one of"]),
    (dict(model="resnet99"), ["config.model='resnet99'", "use one of"]),
    (dict(dataset="mnist3"), ["config.dataset='mnist3'", "use fashion_mnist, cifar10"]),
    (dict(client_optimizer="rmsprop"), ["config.client_optimizer='rmsprop'", "sgd"]),
    (dict(server_optimizer="lamb"), ["config.server_optimizer='lamb'", "adam"]),
    (dict(num_clients=601), ["num_clients=601", "600 train samples", "lower num_clients"]),
    (dict(batch_size=1000), ["config.batch_size=1000", "smallest client", "lower batch_size"]),
    (dict(partition="dirichlet", num_clients=70, batch_size=2),
     ["config.partition='dirichlet'", "num_clients=70", "min_size"]),
    (dict(model="vgg", model_overrides={"cut": 9}), ["vgg", "cut=9", "must be in"]),
    (dict(client_lr=-0.1), ["config.client_lr=-0.1", "positive"]),
    (dict(client_lr=math.inf), ["config.client_lr=inf", "positive"]),
    (dict(server_lr=0.0), ["config.server_lr=0.0", "positive"]),
    (dict(momentum=1.0), ["config.momentum=1.0", "[0, 1)"]),
    (dict(gradmix_fraction=1.5), ["config.gradmix_fraction=1.5", "phi", "(0, 1]"]),
    (dict(mixup_alpha=0.0), ["config.mixup_alpha=0.0", "alpha > 0"]),
    (dict(dirichlet_alpha=-1.0), ["config.dirichlet_alpha=-1.0", "alpha > 0"]),
    (dict(fedavg_every=0), ["config.fedavg_every=0", "T_c"]),
    (dict(local_loss_weight=-1.0), ["config.local_loss_weight=-1.0", ">= 0"]),
    (dict(num_mixed=0), ["config.num_mixed=0", "n_s"]),
    (dict(keep_checkpoints=0), ["config.keep_checkpoints=0", "[1, 1000]"]),
    (dict(num_seeds=0), ["config.num_seeds=0", "[1, 1024]"]),
    (dict(num_devices=99), ["config.num_devices=99", "device(s)", "0 (all)"]),
]


@pytest.mark.parametrize("overrides,expected", CASES,
                         ids=[next(iter(o)) + "=" + str(next(iter(o.values())))
                              for o, _ in CASES])
def test_bad_config_is_one_line_exit_2(synthetic_fmnist, tmp_path, capsys, no_compile,
                                       overrides, expected):
  config = tiny_config(synthetic_fmnist)
  for field, value in overrides.items():
    if field == "model_overrides":
      config.model_overrides.update(value)
    else:
      config[field] = value
  assert run_config(config, str(tmp_path / "run")) == 2
  line = error_line(capsys)
  for part in expected:
    assert part in line, line


def test_missing_dataset_directory(tmp_path, capsys, no_compile, monkeypatch):
  from lfmjax.data import datasets
  monkeypatch.setattr(datasets, "SYSTEM_DATA_DIRS", ())
  monkeypatch.setenv("LFMJAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.delenv("LFMJAX_DATA_DIR", raising=False)
  config = tiny_config(tmp_path / "nowhere", download=False)
  assert run_config(config, None) == 2
  line = error_line(capsys)
  assert str(tmp_path / "nowhere") in line and "data_dir" in line


def test_incomplete_dataset_directory(synthetic_fmnist, tmp_path, capsys, no_compile,
                                      monkeypatch):
  from lfmjax.data import datasets
  monkeypatch.setattr(datasets, "SYSTEM_DATA_DIRS", ())
  monkeypatch.setenv("LFMJAX_CACHE_DIR", str(tmp_path / "cache"))
  partial = tmp_path / "partial"
  partial.mkdir()
  for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz"):
    shutil.copy(synthetic_fmnist / name, partial / name)
  assert run_config(tiny_config(partial, download=False), None) == 2
  line = error_line(capsys)
  assert "t10k-labels-idx1-ubyte" in line and str(partial) in line


def test_dataset_with_a_wrong_checksum(synthetic_fmnist, capsys, no_compile):
  """data_verify=True checks the official SHA-256 of each file: the synthetic set fails."""
  config = tiny_config(synthetic_fmnist, data_verify=True, download=False)
  assert run_config(config, None) == 2
  line = error_line(capsys)
  assert "checksum mismatch" in line and "SHA-256" in line


def test_corrupt_dataset_file(synthetic_fmnist, capsys, no_compile):
  path = synthetic_fmnist / "train-labels-idx1-ubyte.gz"
  path.write_bytes(gzip.compress(b"\x00\x00\x08")[:12])
  assert run_config(tiny_config(synthetic_fmnist), None) == 2
  assert "train-labels-idx1-ubyte.gz" in error_line(capsys)


# --- fuzz ---------------------------------------------------------------------------

FUZZ_FIELDS = {
    "algorithm": st.sampled_from(["sl", "psl", "sfl_v1", "sfl_v2", "locsplitfed",
                                  "locfedmix", "sglr", "mix2sfl", "fedsgd", ""]),
    "model": st.sampled_from(["tiny_cnn", "mlp", "bench_cnn", "resnet99"]),
    "num_clients": st.one_of(st.integers(-2, 12), st.just(601)),
    "batch_size": st.one_of(st.integers(-1, 16), st.just(300)),
    "partition": st.sampled_from(["iid", "dirichlet", "shards", "fixed", "zipf"]),
    "dirichlet_alpha": st.one_of(st.floats(-1.0, 5.0), st.just(math.nan)),
    "samples_per_client": st.integers(-5, 400),
    "classes_per_client": st.integers(-1, 12),
    "client_optimizer": st.sampled_from(["sgd", "adam", "rmsprop"]),
    "client_lr": st.floats(allow_nan=True, allow_infinity=True),
    "momentum": st.floats(-0.5, 1.5),
    "local_loss_weight": st.floats(-1.0, 3.0),
    "num_mixed": st.integers(-1, 3),
    "mixup_alpha": st.one_of(st.floats(-1.0, 4.0), st.just(math.nan)),
    "fedavg_every": st.integers(-1, 4),
    "gradmix_fraction": st.floats(-0.5, 1.5),
    "local_loss": st.sampled_from([None, True, False]),
    "fedavg": st.sampled_from([None, True, False]),
    "smashmix": st.sampled_from([None, True, False]),
    "local_loss_kind": st.sampled_from(["bce", "mse", "l1"]),
    "gradmix": st.sampled_from([None, True, False]),
    "local_ce_weight": st.one_of(st.none(), st.floats(-1.0, 2.0)),
    "seed": st.one_of(st.integers(-3, 5), st.just(2**31), st.just(2**40)),
    "partition_seed": st.one_of(st.none(), st.integers(-2, 3)),
    "num_seeds": st.integers(-1, 2),
    "steps_per_dispatch": st.integers(-1, 3),
    "eval_chunk": st.one_of(st.integers(-1, 300), st.just(10**7)),
    "eval_clients": st.integers(-1, 4),
    "eval_samples": st.integers(-1, 300),
    "client_schedule": st.sampled_from(["constant", "cosine", "warmup_cosine", "step", "exp"]),
    "weight_decay": st.floats(-0.1, 0.1),
    "grad_clip_norm": st.one_of(st.none(), st.floats(-1.0, 2.0)),
    "data_dir": st.sampled_from(["<synthetic>", "/nonexistent/lfmjax"]),
    "input.resize_to": st.one_of(st.none(), st.integers(-1, 40), st.just(10**5)),
    "input.channels": st.one_of(st.none(), st.integers(-1, 4), st.just(99)),
    "input.normalize": st.sampled_from(["none", "pm1", "standard", "zscore"]),
    "input.mean": st.one_of(st.none(), st.lists(st.floats(0, 1), min_size=0, max_size=4)
                            .map(tuple)),
    "input.std": st.one_of(st.none(), st.lists(st.floats(-0.5, 1), min_size=0, max_size=4)
                           .map(tuple)),
    "model_overrides.width": st.one_of(st.none(), st.integers(-1, 6), st.just(10**6)),
    "model_overrides.hidden": st.one_of(st.none(), st.integers(-1, 6)),
    "model_overrides.decoder_hidden": st.one_of(st.none(), st.integers(-1, 6)),
    "model_overrides.cut_stage": st.one_of(st.none(), st.integers(0, 4)),
    "workdir": st.sampled_from([None, "fresh", "a file", "checkpoints without config",
                                "config.json null", "config.json list"]),
}


def make_workdir(state: str | None, root) -> str | None:
  """A workdir in one of the states a careless user leaves one in."""
  if state is None:
    return None
  path = root / state.replace(" ", "_")
  if state == "a file":
    path.write_text("x")
  elif state == "checkpoints without config":
    (path / "checkpoints" / "2").mkdir(parents=True)
  elif state.startswith("config.json"):
    path.mkdir()
    (path / "config.json").write_text(state.split()[-1].replace("list", "[1]"))
  return str(path)


def set_field(config, dotted: str, value) -> None:
  *parents, name = dotted.split(".")
  for part in parents:
    config = config[part]
  config[name] = value


# LFMJAX_FUZZ_EXAMPLES=500 for a longer hunt than the suite's.
@settings(max_examples=int(os.environ.get("LFMJAX_FUZZ_EXAMPLES", 25)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({}, optional=FUZZ_FIELDS))
def test_fuzzed_configs_run_or_stop_with_a_validation_error(synthetic_fmnist, capsys,
                                                             overrides):
  """Every field of base_config() (input.*, model overrides, seeds and sizes included) and
  the workdir's states: exit 0, one `error:` line with status 2, or status 1 for a
  non-finite loss, never a traceback."""
  config = tiny_config(synthetic_fmnist, num_iterations=1, eval_every=1,
                       steps_per_dispatch=1, checkpoint_every=0, eval_chunk=100)
  overrides = dict(overrides)
  workdir = make_workdir(overrides.pop("workdir", None),
                         Path(tempfile.mkdtemp(prefix="lfmjax-fuzz-")))
  if overrides.get("data_dir") == "<synthetic>":
    overrides["data_dir"] = str(synthetic_fmnist)
  for field, value in overrides.items():
    set_field(config, field, value)
  status = run_config(config, workdir)  # any other exception fails the test: a traceback
  err = capsys.readouterr().err.strip().splitlines()
  event(f"exit status {status}")
  if status == 0:
    return
  if status == 1:  # a learning rate so large that the loss is not finite
    assert len(err) == 1 and err[0].startswith("error: iteration 1: loss_"), err
    return
  assert status == 2 and len(err) == 1, err
  assert err[0].startswith(("error: config.", "error: --workdir=")), err
