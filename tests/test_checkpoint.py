"""Checkpoints and faults: resume equals the uninterrupted run bit for bit, also after a
SIGKILL in the middle of a save; SIGINT/SIGTERM save and exit; a non-finite loss stops
the run naming the iteration and the term; the same config gives the same metrics."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from test_cli import ROOT, synthetic_fmnist, tiny_config  # noqa: F401  (fixture)

from lfmjax.checkpoint import (CheckpointError, Checkpoints, check_workdir,
                               config_differences)
from lfmjax.config import base_config
from lfmjax.main import run_config
from lfmjax.mesh import pad_state, padded_num_clients
from lfmjax.train import TrainingError, train_and_evaluate

TIMINGS = ("wall_s", "train_s", "first_dispatch_s", "iterations_per_s", "total_s")


def records(workdir: Path) -> list[dict]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(l).items() if k not in TIMINGS} for l in lines]


def final_state(workdir: Path, config):
  """The state of the newest checkpoint, restored into the run's own structure."""
  from lfmjax.config_round import round_config_from
  from lfmjax.models import get_model
  from lfmjax.state import init_state
  cfg = round_config_from(config, 10)
  model = get_model(config.model, num_classes=10, input_shape=(28, 28, 1),
                    client_head=bool(config.get("client_head")))
  like = init_state(cfg, model, jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.float32))
  like = pad_state(cfg, like, padded_num_clients(config.num_clients, config.num_devices))
  checkpoints = Checkpoints(str(workdir), 3)
  try:
    return checkpoints.restore(checkpoints.latest_step(), like)[0]
  finally:
    checkpoints.close()


def assert_trees_equal(a, b):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("algorithm,devices,extra", [
    ("locfedmix", 1, {}), ("psl", 8, {}),
    # 2 of 3 clients an iteration, dropouts, lognormal devices: the ledger's replay too
    ("sfl_v1", 1, {"clients_per_round": 2, "dropout_prob": 0.3, "lognormal": 1.0}),
    # a U-shaped split, its heads sharded with the clients
    ("sfl_v2", 8, {"client_head": True})])
def test_resumed_run_equals_uninterrupted_bit_for_bit(synthetic_fmnist, tmp_path, algorithm,
                                                      devices, extra):
  """psl runs its 3 clients padded to 8 on 8 devices: the sharded state round-trips."""
  extra = dict(extra)
  spread = extra.pop("lognormal", None)

  def config_of(**fields):
    config = tiny_config(synthetic_fmnist, algorithm=algorithm, num_devices=devices,
                         **extra, **fields)
    if spread is not None:
      config.devices.distribution, config.devices.spread = "lognormal", spread
    return config

  whole = tmp_path / "whole"
  config = config_of()
  train_and_evaluate(config, str(whole), quiet=True)
  split = tmp_path / "split"
  # Stopped at 6: between evaluations, so the train window crosses the checkpoint.
  train_and_evaluate(config_of(num_iterations=6), str(split), quiet=True)
  metrics = split / "metrics.jsonl"
  kept = [json.loads(line) for line in metrics.read_text().splitlines()]
  kept[0]["wall_s"] = 1000.0  # as if the first process took 1000 s to iteration 4
  metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
  train_and_evaluate(config, str(split), quiet=True)
  assert records(split) == records(whole)
  walls = [r["wall_s"] for r in map(json.loads, metrics.read_text().splitlines())
           if r["type"] == "eval"]
  assert walls[0] == 1000.0 and walls[1] > 1000.0
  assert [r["iteration"] for r in records(whole) if r["type"] == "eval"] == [4, 8]
  assert_trees_equal(final_state(split, config), final_state(whole, config))
  # The TensorBoard events hold the uninterrupted run's points, once each.
  assert tensorboard_scalars(split) == tensorboard_scalars(whole)
  tag = f"{algorithm}/test/accuracy"
  assert [step for step, _ in tensorboard_scalars(whole)[tag]] == [4, 8]


def tensorboard_scalars(workdir: Path) -> dict[str, list[tuple[int, float]]]:
  """The scalars of the workdir's event files, read back through tensorboardX's Event
  proto and the TFRecord framing TensorBoard reads (length, crc, data, crc)."""
  import struct
  from tensorboardX.proto import event_pb2
  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (length,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
      i += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_tensorboard_events_carry_the_evaluations(synthetic_fmnist, tmp_path):
  config = tiny_config(synthetic_fmnist, num_iterations=4, checkpoint_every=0,
                       client_schedule="cosine")
  train_and_evaluate(config, str(tmp_path), quiet=True)
  evals = [r for r in records(tmp_path) if r["type"] == "eval"]
  scalars = tensorboard_scalars(tmp_path)
  assert scalars["locfedmix/test/accuracy"] == [
      (r["iteration"], pytest.approx(r["test_accuracy"])) for r in evals]
  assert scalars["locfedmix/optim/lr_client"] == [
      (r["iteration"], pytest.approx(r["lr_client"])) for r in evals]
  assert evals[-1]["lr_client"] < 1e-3  # cosine-decayed from the peak


def test_train_returns_the_trained_state_and_history(synthetic_fmnist, tmp_path):
  """A Python caller gets the state back: the one the final checkpoint holds."""
  from lfmjax.train import train
  config = tiny_config(synthetic_fmnist, num_iterations=4)
  result = train(config, str(tmp_path), quiet=True)
  assert int(result.state.step) == 4
  assert [r["iteration"] for r in result.history] == [4]
  assert result.summary["final_test_accuracy"] == result.history[-1]["test_accuracy"]
  assert_trees_equal(jax.device_get(result.state), final_state(tmp_path, config))


def test_same_config_same_metrics(synthetic_fmnist, tmp_path):
  config = tiny_config(synthetic_fmnist, num_iterations=4, checkpoint_every=0)
  train_and_evaluate(config, str(tmp_path / "a"), quiet=True)
  train_and_evaluate(config, str(tmp_path / "b"), quiet=True)
  assert records(tmp_path / "a") == records(tmp_path / "b")


def test_checkpoints_keep_the_newest(synthetic_fmnist, tmp_path):
  train_and_evaluate(tiny_config(synthetic_fmnist, keep_checkpoints=2), str(tmp_path),
                     quiet=True)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [6, 8]


def test_workdir_of_another_run_is_refused_naming_the_fields(synthetic_fmnist, tmp_path,
                                                             capsys):
  train_and_evaluate(tiny_config(synthetic_fmnist, num_iterations=2), str(tmp_path),
                     quiet=True)
  status = run_config(tiny_config(synthetic_fmnist, num_iterations=2, seed=7,
                                  batch_size=4), str(tmp_path))
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1
  assert "holds another run" in err[0] and "seed: 0" in err[0] and "batch_size: 8" in err[0]
  # Changing only how long it runs is a resume, not another run.
  assert check_workdir(str(tmp_path), tiny_config(synthetic_fmnist, num_iterations=9).to_json())


def test_config_differences_name_nested_fields():
  saved = {"a": 1, "input": {"normalize": "none"}, "num_iterations": 5}
  now = {"a": 1, "input": {"normalize": "pm1"}, "num_iterations": 9}
  assert config_differences(saved, now) == ["input.normalize: 'none' in the workdir, 'pm1' now"]


def test_non_finite_loss_stops_naming_iteration_and_term(synthetic_fmnist, tmp_path):
  config = tiny_config(synthetic_fmnist, client_optimizer="sgd", client_lr=1e30,
                       num_iterations=8, checkpoint_every=1, steps_per_dispatch=1)
  with pytest.raises(TrainingError) as err:
    train_and_evaluate(config, str(tmp_path), quiet=True)
  message = str(err.value)
  first = int(message.split(":")[0].split()[-1])
  assert message.startswith(f"iteration {first}: loss_") and " is " in message
  assert f"last good checkpoint (iteration {first - 1})" in message
  # Every checkpoint kept is from before the bad iteration.
  assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == first - 1


def test_damaged_checkpoint_is_a_one_line_error(synthetic_fmnist, tmp_path, capsys):
  config = tiny_config(synthetic_fmnist, num_iterations=2)
  train_and_evaluate(config, str(tmp_path), quiet=True)
  for path in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 64:
      path.write_bytes(b"\0" * 16)
  status = run_config(tiny_config(synthetic_fmnist, num_iterations=4), str(tmp_path))
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1 and "cannot be restored" in err[0], err


CLI_ARGS = ["--config=configs/fmnist.py", "--config.model=tiny_cnn",
            "--config.num_clients=3", "--config.batch_size=8", "--config.eval_every=4",
            "--config.steps_per_dispatch=1", "--config.data_verify=False",
            "--config.client_optimizer=adam", "--config.client_lr=0.001",
            "--config.num_devices=1", "--config.validation_size=0"]

# Runs the CLI in this process, and SIGKILLs it as soon as a checkpoint directory is
# half written (orbax's temporary directory exists) for a step of at least argv[1].
KILL_MID_SAVE = """
import os, signal, sys, threading, time
from pathlib import Path
min_step, ckpt = int(sys.argv[1]), Path(sys.argv[2]) / "checkpoints"
def watch():
  while True:
    if ckpt.exists():
      for p in ckpt.iterdir():
        if ".orbax-checkpoint-tmp" in p.name and int(p.name.split(".")[0]) >= min_step:
          Path(str(ckpt) + ".killed_during").write_text(p.name)
          os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.0005)
threading.Thread(target=watch, daemon=True).start()
sys.argv = ["lfmjax.main"] + sys.argv[3:]
from lfmjax.main import run
run()
"""


def cli(*args, **kwargs):
  return subprocess.run([sys.executable, "-m", "lfmjax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, **kwargs)


def test_sigkill_in_the_middle_of_a_save_resumes_to_the_same_result(synthetic_fmnist,
                                                                     tmp_path):
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  common = CLI_ARGS + [f"--config.data_dir={synthetic_fmnist}", "--config.num_iterations=6",
                       "--config.checkpoint_every=1"]
  assert cli(*common, f"--workdir={whole}").returncode == 0
  result = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, "4", str(killed), *common,
                           f"--workdir={killed}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == -signal.SIGKILL, result.stderr
  half_written = (tmp_path / "killed" / "checkpoints.killed_during").read_text()
  assert int(half_written.split(".")[0]) >= 4
  resumed = cli(*common, f"--workdir={killed}")
  assert resumed.returncode == 0, resumed.stderr
  assert "resuming" in resumed.stdout
  assert records(killed) == records(whole)
  config = tiny_config(synthetic_fmnist)
  assert_trees_equal(final_state(killed, config), final_state(whole, config))
  assert not any(".orbax-checkpoint-tmp" in p.name for p in (killed / "checkpoints").iterdir())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_then_exit(synthetic_fmnist, tmp_path, signum):
  workdir = tmp_path / "run"
  args = CLI_ARGS + [f"--config.data_dir={synthetic_fmnist}", "--config.num_iterations=100000",
                     "--config.checkpoint_every=0", f"--workdir={workdir}"]
  proc = subprocess.Popen([sys.executable, "-m", "lfmjax.main", *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not (workdir / "metrics.jsonl").exists() and time.time() < deadline:
    time.sleep(0.2)  # the first evaluation (iteration 4) has been written
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signum, err
  line = [l for l in err.splitlines() if l.startswith("interrupted")]
  assert len(line) == 1 and signal.Signals(signum).name in line[0] and "resume" in line[0]
  step = int(line[0].split("at iteration ")[1].split(":")[0])
  assert step >= 4 and (workdir / "checkpoints" / str(step)).is_dir()
  assert "Traceback" not in err


def test_fields_added_since_the_workdir_was_written_count_as_defaults():
  saved = {"a": 1, "nested": {"x": 1}}
  now = {"a": 1, "nested": {"x": 1, "y": 2}, "new_field": 5}
  assert config_differences(saved, now, defaults={"new_field": 5, "nested": {"y": 2}}) == []
  assert config_differences(saved, now, defaults={"new_field": 4, "nested": {"y": 2}}) == [
      "new_field: 4 in the workdir, 5 now"]


def test_checkpoint_with_unused_heads_restores_into_the_smaller_state(tmp_path):
  """lfmjax before issue 18 kept the decoder and aux head of every client even where the
  round never trains them; such a checkpoint restores into today's state, the leaves it
  holds bit for bit, the unused heads left behind."""
  from lfmjax.algorithms import preset
  from lfmjax.models import get_model
  from lfmjax.state import init_state
  cfg = preset("psl", num_clients=3, batch_size=4, num_classes=10)
  model = get_model("tiny_cnn", num_classes=10, input_shape=(28, 28, 1))
  state = init_state(cfg, model, jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.float32))
  assert state.clients.params["decoder"] == {} and state.clients.params["aux_head"] == {}
  with_heads = init_state(dataclasses.replace(cfg, local_loss=True, local_ce_weight=1.0),
                          model, jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.float32))
  old = state.replace(clients=state.clients.replace(
      params={**state.clients.params, "decoder": with_heads.clients.params["decoder"],
              "aux_head": with_heads.clients.params["aux_head"]}))
  checkpoints = Checkpoints(str(tmp_path), 3)
  try:
    checkpoints.save(5, old, {"partition": "p", "train_window": {}})
    restored, loop = checkpoints.restore(5, state)
  finally:
    checkpoints.close()
  assert_trees_equal(restored, state)
  assert loop["partition"] == "p"
