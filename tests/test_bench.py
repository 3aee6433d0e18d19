"""The benchmark: its one-point measurement, its commands, its target checks."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"
sys.path.insert(0, str(BENCH.parent))
import bench  # noqa: E402  (benchmarks/ is outside the installed package)


def test_one_point_prints_one_json_line():
  out = subprocess.run([sys.executable, str(BENCH), "--path", "psl_sgd",
                        "--clients", "2", "--batch", "2", "--iters", "1", "--json"],
                       capture_output=True, text=True, check=True, cwd=ROOT
                       ).stdout.strip().splitlines()
  assert len(out) == 1
  result = json.loads(out[0])
  assert result["clients"] == 2 and result["batch"] == 2 and result["seeds"] == 1
  assert result["samples_per_s"] > 0 and result["compile_s"] > 0
  assert result["peak_rss_mib"] > 100


def test_the_peer_lives_outside_the_package_and_gets_the_paths_settings():
  assert bench.TORCH_PEER.is_file() and bench.TORCH_PEER.parent == BENCH.parent
  path = bench.PATHS["resnet16_psl_adam"]
  (jax_side, jax_cmd), (torch_side, torch_cmd) = bench.commands(
      "resnet16_psl_adam", path, 10, 8, 3, bench.TORCH_PEER)
  assert jax_side == "jax" and torch_side == "torch"
  assert jax_cmd[jax_cmd.index("--path") + 1] == "resnet16_psl_adam"
  flags = dict(zip(torch_cmd[2::2], torch_cmd[3::2]))
  assert flags == {"--clients": "10", "--batch": "8", "--iters": "3", "--algo": "psl",
                   "--model": "resnet16", "--optimizer": "adam", "--lr": "0.001"}
  seeds = bench.commands("seeds", bench.PATHS["seeds"], 10, 32, 3, bench.TORCH_PEER)
  assert [side for side, _ in seeds] == ["jax x1", "jax x4"]  # lfmjax alone


def row(path, clients, batch, jax_sps, ref_sps, compile_s=3.0, rss=1000.0):
  return {"path": path, "clients": clients, "batch": batch, "jax_samples_per_s": jax_sps,
          "ref_samples_per_s": ref_sps, "ratio": round(jax_sps / ref_sps, 2),
          "jax_compile_s": compile_s, "jax_peak_rss_mib": rss}


def test_targets_are_checked_as_issue_14_states():
  rows = [row("locfedmix_adam", 1, 256, 600, 500), row("locfedmix_adam", 10, 32, 1300, 900),
          row("locfedmix_adam", 1000, 8, 1000, 1100, compile_s=7.0, rss=5000),
          row("psl_sgd", 10, 32, 900, 1000), row("shortcut_sgd", 10, 32, 1300, 1000),
          row("seeds", 10, 32, 950, 1000)]
  checks = {text.split(":")[0]: ok for text, ok in bench.check_targets(rows)}
  assert checks["locfedmix_adam 1 x 256"] and checks["locfedmix_adam 10 x 32"]
  assert checks["locfedmix_adam 1000 x 8"] is False  # 0.91x
  assert checks["psl_sgd 10 x 32"] is False
  assert checks["shortcut_sgd 10 x 32"] is False  # 1.3x < 1.4x
  assert checks["4 seeds in one program at 10 x 32"] is True  # 0.95x
  by_start = {t.split(" (")[0]: ok for t, ok in bench.check_targets(rows)}
  assert by_start["locfedmix_adam: samples/s at 1000 clients"] is False  # 1000 < 0.8 * 1300
  assert by_start["locfedmix_adam: peak memory at 1000 x 8"] is False  # 4.9 GiB
  assert by_start["locfedmix_adam: compile at 1000 clients"] is False  # 7 s > 2 x 3 s


def test_bad_arguments_are_one_line_errors():
  for args, start in [(["--clients", "2"], "error: give both"),
                      (["--paths", "nope"], "error: --paths 'nope'")]:
    proc = subprocess.run([sys.executable, str(BENCH), *args],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(start)
