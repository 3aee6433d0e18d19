"""The command line and whole runs: a few iterations end to end, errors, and learning.

Real-data tests read Fashion-MNIST from the shared data beside the checkout
(`LFMJAX_TEST_SHARED_DATA`, default `../shared/data`) or Debian's system copy, and skip
with a reason when neither is there.
"""
from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LFMJAX_TEST_SHARED_DATA", ROOT.parent / "shared" / "data"))


def fmnist_dir() -> Path | None:
  for place in (SHARED / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")):
    if (place / "train-images-idx3-ubyte.gz").exists():
      return place
  return None


needs_fmnist = pytest.mark.skipif(fmnist_dir() is None,
                                  reason="Fashion-MNIST not found in shared data or "
                                         "/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray) -> None:
  dims = array.shape
  header = struct.pack(">BBBB", 0, 0, 0x08, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def synthetic_fmnist(tmp_path) -> Path:
  """A small idx-format dataset whose class is visible in the image (learnable)."""
  return write_synthetic_fmnist(tmp_path)


def write_synthetic_fmnist(tmp_path: Path) -> Path:
  rng = np.random.default_rng(0)
  for split, n in (("train", 600), ("t10k", 200)):
    y = rng.integers(0, 10, n).astype(np.uint8)
    x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(y):
      x[i, 2 * label:2 * label + 3, :] = 250
    write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", x)
    write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", y)
  return tmp_path


def run_cli(*args: str, env_extra: dict | None = None, timeout: int = 300):
  env = dict(os.environ)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "lfmjax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


TINY = ["--config.model=tiny_cnn", "--config.num_clients=3", "--config.batch_size=8",
        "--config.num_iterations=6", "--config.eval_every=3", "--config.steps_per_dispatch=2",
        "--config.data_verify=False", "--config.num_devices=1",
        "--config.validation_size=0"]  # the demo's 5,000 are more than the synthetic 600


def test_cli_runs_a_few_iterations_and_writes_results(synthetic_fmnist, tmp_path):
  workdir = tmp_path / "run"
  result = run_cli("--config=configs/fmnist.py", f"--config.data_dir={synthetic_fmnist}",
                   *TINY, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in records if r["type"] == "eval"]
  assert [r["iteration"] for r in evals] == [3, 6]
  assert all(0.0 <= r["test_accuracy"] <= 1.0 and np.isfinite(r["loss_real"]) for r in evals)
  assert records[-1]["type"] == "summary" and records[-1]["iterations"] == 6
  # What the numbers were computed on: bit-for-bit reproduction needs the same software
  # and the same kind of CPU (XLA compiles for the host's instruction sets).
  env = records[-1]["environment"]
  assert env["jax"] == jax.__version__ and env["platform"] == "cpu" and env["cpu"]
  assert env["xla_flags"] == os.environ.get("XLA_FLAGS", "")
  config = json.loads((workdir / "config.json").read_text())
  assert config["num_clients"] == 3 and config["model"] == "tiny_cnn"
  assert (workdir / "eval.csv").read_text().startswith("iteration,epoch,test_accuracy")
  assert (workdir / "accuracy.png").stat().st_size > 0
  # tqdm writes a rate below 1 it/s as s/it (a loaded machine)
  assert ("it/s" in result.stderr or "s/it" in result.stderr) and "ETA" in result.stderr
  assert "test acc" in result.stdout and "done: 6 iterations" in result.stdout


def test_cli_psl_config_runs(synthetic_fmnist, tmp_path):
  result = run_cli("--config=configs/fmnist.py:psl", f"--config.data_dir={synthetic_fmnist}", *TINY)
  assert result.returncode == 0, result.stderr
  assert "psl (local_loss=False, fedavg=False, smashmix=False)" in result.stdout


def test_cli_lists_algorithms_and_switches():
  result = run_cli("--list")
  assert result.returncode == 0
  for word in ("sl ", "psl", "sfl_v1", "sfl_v2", "locsplitfed", "locfedmix", "sglr", "mix2sfl",
               "local_loss ", "fedavg ", "smashmix ", "gradmix "):
    assert word in result.stdout


@pytest.mark.parametrize("override,field", [
    ("--config.algorithm=nope", "config.algorithm"),
    ("--config.client_optimizer=rmsprop", "config.client_optimizer"),
    ("--config.batch_size=1000", "config.batch_size"),
    ("--config.model=resnet99", "model"),
])
def test_cli_bad_config_is_one_line_exit_2(synthetic_fmnist, override, field):
  result = run_cli("--config=configs/fmnist.py", f"--config.data_dir={synthetic_fmnist}",
                   *TINY, override)
  assert result.returncode == 2, result.stderr
  error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error) == 1 and field in error[0], result.stderr
  assert "Traceback" not in result.stderr


def test_cli_missing_dataset_says_where_and_how(tmp_path):
  """CIFAR-10 has no system-wide copy, so an empty data_dir and cache leave it missing."""
  empty = tmp_path / "empty"
  empty.mkdir()
  result = run_cli("--config=configs/cifar.py", f"--config.data_dir={empty}",
                   "--config.data_download=False",
                   env_extra={"LFMJAX_CACHE_DIR": str(tmp_path / "cache"),
                              "LFMJAX_DATA_DIR": str(empty)})
  assert result.returncode == 2, result.stderr
  error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error) == 1 and str(empty) in error[0], result.stderr
  assert "data_dir" in error[0] or "LFMJAX_DATA_DIR" in error[0]
  assert "Traceback" not in result.stderr


def test_missing_fashion_mnist_is_a_dataset_error(tmp_path, monkeypatch):
  from lfmjax.config import base_config
  from lfmjax.data import DatasetError, datasets
  from lfmjax.train import train_and_evaluate
  monkeypatch.setattr(datasets, "SYSTEM_DATA_DIRS", ())
  monkeypatch.setenv("LFMJAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.delenv("LFMJAX_DATA_DIR", raising=False)
  config = base_config()
  config.data_dir = str(tmp_path)
  config.data_download = False
  with pytest.raises(DatasetError) as err:
    train_and_evaluate(config, None, quiet=True)
  assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def real_run(workdir, **fields):
  """A short Adam run on real Fashion-MNIST; returns train_and_evaluate's summary."""
  from lfmjax.config import base_config
  from lfmjax.train import train_and_evaluate
  config = base_config()
  config.data_dir = str(fmnist_dir())
  config.client_optimizer = "adam"
  config.client_lr = 1e-3
  config.num_devices = 1
  config.update(fields)
  config.eval_every = config.num_iterations
  return train_and_evaluate(config, str(workdir), quiet=True)


@needs_fmnist
def test_short_real_run_learns_fashion_mnist(tmp_path):
  """LocFedMix-SL on real Fashion-MNIST, 5 clients, 150 iterations: well above chance."""
  # 2,000 of the 10,000 test images (a fixed subset): the bound holds by a wide margin
  # either way, and scoring them all took a third of the test's time.
  summary = real_run(tmp_path, model="bench_cnn", num_clients=5, batch_size=16,
                     num_iterations=150, eval_samples=2000)
  assert summary["iterations"] == 150
  assert summary["final_test_accuracy"] > 0.70  # chance is 0.10


def test_eval_samples_scores_a_fixed_subset_of_each_split(synthetic_fmnist, monkeypatch):
  """`eval_samples=N` scores the same N samples (drawn once, in their order) at every
  evaluation: the run's records equal a run whose dataset holds only those."""
  import dataclasses
  from lfmjax.evaluate import eval_subset
  from lfmjax.run import loop
  from lfmjax.train import train
  x, y = np.arange(200 * 3).reshape(200, 3), np.arange(200)
  sub_x, sub_y = eval_subset(x, y, 50)
  assert len(set(sub_y.tolist())) == 50 and np.all(np.diff(sub_y) > 0)
  np.testing.assert_array_equal(sub_x, x[sub_y])
  np.testing.assert_array_equal(eval_subset(x, y, 50)[1], sub_y)
  assert eval_subset(x, y, 0)[1] is y and eval_subset(x, y, 200)[1] is y
  scores = lambda run: [(r["test_accuracy"], r["test_loss"], r["val_accuracy"])
                        for r in run.history]
  config = lambda n: tiny_config(synthetic_fmnist, eval_samples=n, validation_size=100,
                                 num_iterations=2, eval_every=2)
  subset = train(config(50), quiet=True)
  load, split = loop.load_config_dataset, loop.split_validation

  def test_subset(config):
    ds = load(config)
    return dataclasses.replace(ds, **dict(zip(("test_x", "test_y"),
                                              eval_subset(ds.test_x, ds.test_y, 50))))

  def validation_subset(config, ds):
    train_ds, val = split(config, ds)
    return train_ds, eval_subset(*val, 50)
  monkeypatch.setattr(loop, "load_config_dataset", test_subset)
  monkeypatch.setattr(loop, "split_validation", validation_subset)
  assert scores(train(config(0), quiet=True)) == scores(subset)


@needs_fmnist
@pytest.mark.parametrize("algorithm", ["sl", "sfl_v2", "locsplitfed", "sglr"])
def test_other_algorithms_learn_fashion_mnist(algorithm, tmp_path):
  """The same short run (split MLP, 4 clients, 60 iterations) beats chance widely, for
  the algorithms whose structure differs most from LocFedMix-SL's (learned above) and
  no other test trains on real data (each algorithm equals a plain loop in
  test_round.py)."""
  # SL's iteration is a turn per client: 4 turns of 15 batches are the others' 60 batches.
  steps = dict(num_iterations=4, sl_turn_steps=15, steps_per_dispatch=1) if algorithm == "sl" \
      else dict(num_iterations=60, steps_per_dispatch=20)
  summary = real_run(tmp_path, algorithm=algorithm, model="mlp", num_clients=4,
                     batch_size=16, **steps)
  assert summary["final_test_accuracy"] > 0.55  # chance is 0.10


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT))
                                        for p in (ROOT / "configs").glob("*.py")))
def test_every_config_file_is_valid(path):
  import importlib.util
  from lfmjax import config_round
  from lfmjax.train import validate
  spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  validate(config)
  cfg = config_round.round_config_from(config, num_classes=10)
  assert cfg.num_clients == config.num_clients
  assert module.__doc__ and "python -m lfmjax.main --config=" in module.__doc__


def test_config_argument_names_algorithm_and_components():
  """`configs/fmnist.py:ALGORITHM[,COMPONENT...]`: every algorithm, ablations, and a
  one-line reason for a bad argument."""
  import importlib.util
  from lfmjax import algorithms
  from lfmjax.train import validate
  spec = importlib.util.spec_from_file_location("fmnist_config", ROOT / "configs/fmnist.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for name in algorithms.ALGORITHMS:
    config = module.get_config(name)
    validate(config)
    assert config.algorithm == name and config.local_loss is None
  # SL's iteration is a local epoch of every client: its run is the others' 3 epochs.
  assert module.get_config("sl").num_iterations * 6000 == pytest.approx(
      module.get_config("psl").num_iterations * 32, rel=0.1)
  config = module.get_config("psl,local_loss,fedavg")
  assert (config.local_loss, config.fedavg, config.smashmix, config.gradmix) == (
      True, True, False, False)
  with pytest.raises(ValueError, match="'pls' is not an algorithm"):
    module.get_config("pls")
  with pytest.raises(ValueError, match="unknown component.*mixx"):
    module.get_config("psl,mixx")


def test_ablation_config_switches_components(synthetic_fmnist):
  result = run_cli("--config=configs/fmnist.py:psl,local_loss,smashmix", f"--config.data_dir={synthetic_fmnist}",
                   *TINY)
  assert result.returncode == 0, result.stderr
  assert "psl (local_loss=True, fedavg=False, smashmix=True)" in result.stdout


@pytest.mark.parametrize("args,field", [
    (["--config.algorithm=sl", "--config.fedavg=True"], "config.fedavg"),
    (["--config.algorithm=sfl_v2", "--config.smashmix=True"], "config.smashmix"),
    (["--config.algorithm=locsplitfed", "--config.local_ce_weight=0.0"], "config.local_ce_weight"),
    (["--config.gradmix_fraction=1.5"], "config.gradmix_fraction"),
])
def test_impossible_compositions_are_config_errors(synthetic_fmnist, args, field):
  result = run_cli("--config=configs/fmnist.py", f"--config.data_dir={synthetic_fmnist}",
                   *TINY, *args)
  assert result.returncode == 2, result.stderr
  error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error) == 1 and field in error[0], result.stderr


def tiny_config(data_dir, **overrides):
  """A few seconds' run on the synthetic data (tiny_cnn, 3 clients, Adam)."""
  from lfmjax.config import base_config
  c = base_config()
  c.data_dir = str(data_dir)
  c.data_verify = False
  c.model = "tiny_cnn"
  c.num_clients = 3
  c.batch_size = 8
  c.num_iterations = 8
  c.eval_every = 4
  c.steps_per_dispatch = 2
  c.checkpoint_every = 2
  c.client_optimizer = "adam"
  c.client_lr = 1e-3
  c.num_devices = 1  # test_mesh.py covers the multi-device runs
  for k, v in overrides.items():
    c[k] = v
  return c


def test_sl_by_turns_counts_epochs_and_schedules_per_batch(synthetic_fmnist):
  """Vanilla SL's iteration is one local epoch per client: the records' epoch axis
  counts it, and a step decay at 50 % of the run falls at half its mini-batches."""
  from lfmjax.train import train
  config = tiny_config(synthetic_fmnist, algorithm="sl", num_iterations=4, eval_every=2,
                       client_schedule="step", decay_fractions=(0.5,))
  result = train(config, quiet=True)
  sizes = np.array([200, 200, 200])  # 600 IID train images over 3 clients
  batches = -(-sizes // 8)           # 25 a turn
  assert [r["epoch"] for r in result.history] == pytest.approx(
      [2 * np.mean(batches * 8 / sizes), 4 * np.mean(batches * 8 / sizes)])
  # The schedules run over every update: a client's 4 x 25, the server's 4 x 75, so the
  # drop falls at update 50 and 150, within iteration 3 (optax drops after the boundary).
  # The records give the rate at the first update of each window's last iteration.
  from lfmjax import config_round
  cfg = config_round.round_config_from(config, 10, sizes)
  assert (cfg.client_opt.total_steps, cfg.server_opt.total_steps) == (100, 300)
  assert [r["lr_client"] for r in result.history] == pytest.approx([1e-3, 1e-4])
  assert [r["lr_server"] for r in result.history] == pytest.approx([1e-3, 1e-4])


def test_validation_split_reports_test_accuracy_at_best_validation(synthetic_fmnist, tmp_path):
  """`validation_size` images are held out of the clients' data and evaluated beside
  the test split; the summary gives each seed's test accuracy at its best validation
  evaluation, and it survives a resume."""
  from lfmjax.train import train
  config = tiny_config(synthetic_fmnist, algorithm="psl", num_iterations=6, eval_every=2,
                       num_seeds=2, validation_size=100)
  result = train(config, str(tmp_path / "run"), quiet=True)
  evals = result.history
  assert all(0 <= e["val_accuracy"] <= 1 and len(e["val_accuracy_seeds"]) == 2 for e in evals)
  expected = []
  for s in range(2):
    val = [e["val_accuracy_seeds"][s] for e in evals]
    best = val.index(max(val))
    expected.append(evals[best]["test_accuracy_seeds"][s])
  summary = result.summary
  assert summary["test_accuracy_at_best_val_seeds"] == pytest.approx(expected)
  assert summary["test_accuracy_at_best_val"] == pytest.approx(np.mean(expected))
  header = (tmp_path / "run" / "eval.csv").read_text().splitlines()[0]
  assert "val_accuracy" in header.split(",")
  # A longer run resumed from this one reports over all its evaluations.
  config.num_iterations = 8
  resumed = train(config, str(tmp_path / "run"), quiet=True)
  assert [e["iteration"] for e in resumed.history] == [2, 4, 6, 8]
  assert resumed.history[:3] == evals


def test_validation_size_larger_than_the_data_is_one_line(synthetic_fmnist):
  result = run_cli("--config=configs/fmnist.py", f"--config.data_dir={synthetic_fmnist}",
                   *TINY, "--config.validation_size=599")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: config.validation_size=599")

