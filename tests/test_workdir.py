"""The workdir and the command line under careless or unlucky use (issue 19): one run per
workdir (a lock), workdirs that cannot hold the run, unknown config fields, interrupts
and a full disk. Every outcome is one `error:` line with exit 2 (130 for SIGINT), no
traceback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_checkpoint import tiny_config
from test_cli import ROOT, TINY, run_cli, synthetic_fmnist  # noqa: F401  (fixture)
from test_validation import set_field

from lfmjax.main import run_config
from lfmjax.run.lock import WorkdirError, WorkdirLock


def one_error_line(stderr: str) -> str:
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, stderr
  assert "Traceback" not in stderr and "Event loop" not in stderr, stderr
  return errors[0]


def popen_cli(*args):
  return subprocess.Popen([sys.executable, "-m", "lfmjax.main", *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_on_one_workdir_exactly_one_runs(synthetic_fmnist, tmp_path):
  workdir = tmp_path / "run"
  args = ["--config=configs/fmnist.py", f"--config.data_dir={synthetic_fmnist}", *TINY,
          f"--workdir={workdir}"]
  first = popen_cli(*args)
  deadline = time.time() + 60
  while not (workdir / ".lock").exists() and time.time() < deadline:
    time.sleep(0.05)
  second = run_cli(*args)
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err
  assert second.returncode == 2
  line = one_error_line(second.stderr)
  assert "in use by another run" in line and f"pid {first.pid}" in line
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["type"] for r in records] == ["eval", "eval", "summary"]  # one run's records
  assert [r["iteration"] for r in records[:2]] == [3, 6]


def test_a_killed_runs_lock_does_not_block_the_next(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c",
                             "import sys, time; from lfmjax.run.lock import WorkdirLock; "
                             "WorkdirLock(sys.argv[1]); print('held', flush=True); "
                             "time.sleep(60)", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(WorkdirError, match=f"pid {holder.pid}"):
    WorkdirLock(str(tmp_path))
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=30)
  WorkdirLock(str(tmp_path)).release()  # the file is still there; the lock is not


def workdir_states(tmp_path, synthetic_fmnist):
  """name -> (workdir path, what the error line must say)."""
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  read_only.chmod(0o500)
  orphans = tmp_path / "orphans"
  (orphans / "checkpoints" / "2").mkdir(parents=True)
  (orphans / "metrics.jsonl").write_text("")
  shapes = {}
  for name, text in (("null", "null"), ("list", "[1, 2]"), ("torn", '{"algo')):
    shapes[name] = tmp_path / f"config_{name}"
    shapes[name].mkdir()
    (shapes[name] / "config.json").write_text(text)
  return {
      "a file": (a_file, "is a file, not a directory"),
      "read-only": (read_only, "cannot be written"),
      "checkpoints without config": (orphans, "but no config.json"),
      **{f"config.json {n}": (p, "unreadable config.json") for n, p in shapes.items()},
  }


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_workdir_is_found_before_loading(synthetic_fmnist, tmp_path, capsys,
                                                    monkeypatch):
  monkeypatch.setattr("lfmjax.run.loop.prepare", lambda *a: pytest.fail("data loaded"))
  workdir, expected = workdir_states(tmp_path, synthetic_fmnist)["read-only"]
  assert run_config(tiny_config(synthetic_fmnist), str(workdir)) == 2
  assert expected in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("state", ["a file", "checkpoints without config", "config.json null",
                                   "config.json list", "config.json torn"])
def test_workdirs_that_cannot_hold_the_run_are_one_line(synthetic_fmnist, tmp_path, capsys,
                                                        monkeypatch, state):
  monkeypatch.setattr("lfmjax.run.loop.prepare", lambda *a: pytest.fail("data loaded"))
  workdir, expected = workdir_states(tmp_path, synthetic_fmnist)[state]
  before = sorted(p.name for p in workdir.iterdir()) if workdir.is_dir() else None
  assert run_config(tiny_config(synthetic_fmnist), str(workdir)) == 2
  assert expected in one_error_line(capsys.readouterr().err)
  if before is not None:  # nothing written there but the lock
    assert sorted(p.name for p in workdir.iterdir() if p.name != ".lock") == before


def test_resuming_below_the_checkpoint_is_refused(synthetic_fmnist, tmp_path, capsys):
  assert run_config(tiny_config(synthetic_fmnist, num_iterations=4), str(tmp_path)) == 0
  config_json = (tmp_path / "config.json").read_text()
  capsys.readouterr()
  assert run_config(tiny_config(synthetic_fmnist, num_iterations=2), str(tmp_path)) == 2
  line = one_error_line(capsys.readouterr().err)
  assert "at iteration 4, past num_iterations=2" in line
  assert (tmp_path / "config.json").read_text() == config_json


@pytest.mark.parametrize("args,expected", [
    (["--config.nope=1"], "--config.nope: the config has no field 'nope'; valid here:"),
    (["--config.model_overrides.cut_stag=2"], "no field 'cut_stag'; valid here: batch_norm"),
    (["--config.input.side=2"], "valid here: channels, mean, normalize, resize_to, seq_len, std"),
    (["--config.num_clients=abc"], "--config.num_clients=abc"),
    (["unexpected"], "unexpected arguments: unexpected"),
])
def test_bad_command_lines_are_one_line_exit_2(synthetic_fmnist, args, expected):
  result = run_cli("--config=configs/fmnist.py", f"--config.data_dir={synthetic_fmnist}",
                   *TINY, *args)
  assert result.returncode == 2, result.stderr
  assert expected in one_error_line(result.stderr)


@pytest.mark.parametrize("fields,expected", [
    ({"model": "bench_cnn", "model_overrides.cut_stage": 2},
     "unknown override(s) cut_stage; valid: decoder_hidden"),
    ({"model": "resnet16", "model_overrides.cut_stage": 9}, "cut_stage"),
    ({"model": "tiny_cnn", "model_overrides.width": 10**6}, "an int in [1, 4096]"),
    ({"input.resize_to": 1}, "config.input.resize_to=1: a square side in [2, 512]"),
    ({"input.channels": 0}, "config.input.channels=0: 1 to 16"),
    ({"input.normalize": "standard"}, "'standard' needs mean and std"),
    ({"input.normalize": "standard", "input.mean": (0.5, 0.5), "input.std": (0.5, 0.5)},
     "config.input.mean=(0.5, 0.5): give one value per channel (1)"),
    ({"seed": -1}, "config.seed=-1: seeds seed..seed+num_seeds-1"),
    ({"seed": 2**40}, "must lie in [0, 2147483647]"),
    ({"num_seeds": 5000}, "config.num_seeds=5000: must be in [1, 1024]"),
    ({"data_dir": "/nonexistent/lfmjax"}, "config.data_dir='/nonexistent/lfmjax': no such"),
    ({"eval_chunk": 10**7}, "config.eval_chunk=10000000"),
    ({"distributed.coordinator_address": "nohost"}, "use host:port"),
])
def test_bad_fields_are_one_line_before_loading(synthetic_fmnist, capsys, monkeypatch,
                                                fields, expected):
  monkeypatch.setattr("lfmjax.run.loop.prepare", lambda *a: pytest.fail("data loaded"))
  config = tiny_config(synthetic_fmnist)
  for dotted, value in fields.items():
    set_field(config, dotted, value)
  assert run_config(config, None) == 2
  assert expected in one_error_line(capsys.readouterr().err)



def test_config_argument_errors_are_one_line():
  bad_arg = run_cli("--config=configs/fmnist.py:pls")
  assert bad_arg.returncode == 2 and "'pls' is not an algorithm" in one_error_line(
      bad_arg.stderr)
  missing = run_cli("--config=configs/nowhere.py")
  assert missing.returncode == 2 and "configs/nowhere.py" in one_error_line(missing.stderr)


PARSE_ONLY = """
import sys
from absl import flags
from lfmjax import main
from lfmjax.run.validate import model_overrides, validate
main.parse_flags(sys.argv)
validate(main._CONFIG.value)
print(sorted(model_overrides(main._CONFIG.value).items()))
"""


def test_nested_model_override_in_dotted_form_is_taken():
  result = subprocess.run([sys.executable, "-c", PARSE_ONLY, "--config=configs/fmnist.py",
                           "--config.model=vgg", "--config.model_overrides.cut=1",
                           "--config.model_overrides.widths=(4,8)",
                           "--config.model_overrides.hidden=8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[('cut', 1), ('hidden', 8), ('widths', (4, 8))]"


@pytest.mark.parametrize("delay", [0.3, 2.0])
def test_sigint_before_the_loop_is_one_line_exit_130(synthetic_fmnist, tmp_path, delay):
  """While Python imports JAX (0.3 s) and while the data loads or the round compiles."""
  proc = popen_cli("--config=configs/fmnist.py", f"--config.data_dir={synthetic_fmnist}",
                   *TINY, f"--workdir={tmp_path / 'run'}")
  time.sleep(delay)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert "interrupted (SIGINT)" in one_error_line(err)


def test_a_full_disk_during_a_save_is_one_line(synthetic_fmnist, tmp_path):
  """A file-size limit makes the checkpoint's writes fail as a full disk would."""
  args = ["--config=configs/fmnist.py", f"--config.data_dir={synthetic_fmnist}", *TINY,
          "--config.checkpoint_every=2", f"--workdir={tmp_path / 'run'}"]
  env = {k: v for k, v in os.environ.items()  # no compilation cache writes to fail first
         if k != "JAX_COMPILATION_CACHE_DIR"}
  # bash sets the limit (6 KiB a file): a preexec_fn would fork this threaded process.
  result = subprocess.run(["bash", "-c", 'ulimit -f 6 && exec "$0" "$@"', sys.executable,
                           "-m", "lfmjax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  line = one_error_line(result.stderr)
  assert "could not be written" in line and "run the same command to resume" in line
