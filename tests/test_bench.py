"""The benchmark: its one-point measurement, its target checks and its torch peer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lfmjax import bench

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCH = Path(os.environ.get("LFMJAX_TEST_SHARED_DATA", ROOT.parent / "shared" / "data")
                    ).parent / "bench" / "torch_reference.py"


def test_torch_reference_is_a_verbatim_copy_of_the_peer():
  if not SHARED_BENCH.is_file():
    pytest.skip(f"no shared peer at {SHARED_BENCH}")
  ours = bench.TORCH_REFERENCE.read_text().split("\n", 3)[3]  # after the 3-line header
  assert ours == SHARED_BENCH.read_text()


def test_one_point_prints_one_json_line():
  out = subprocess.run([sys.executable, "-m", "lfmjax.bench", "--clients", "2", "--batch",
                        "2", "--iters", "1", "--json"], capture_output=True, text=True,
                       check=True, cwd=ROOT).stdout.strip().splitlines()
  assert len(out) == 1
  result = json.loads(out[0])
  assert result["clients"] == 2 and result["batch"] == 2
  assert result["samples_per_s"] > 0 and result["compile_s"] > 0
  assert result["peak_rss_mib"] > 100


def row(clients, batch, jax_sps, torch_sps, compile_s=3.0, rss=1000.0):
  return {"clients": clients, "batch": batch, "jax_samples_per_s": jax_sps,
          "torch_samples_per_s": torch_sps, "ratio": round(jax_sps / torch_sps, 2),
          "jax_compile_s": compile_s, "jax_peak_rss_mib": rss}


def test_targets_are_checked_as_issue_4_states():
  rows = [row(1, 256, 600, 500), row(10, 32, 1300, 900), row(100, 8, 1200, 640),
          row(1000, 8, 1100, 500, compile_s=7.0, rss=9000)]
  checks = dict(bench.check_targets(rows))
  met = {text.split(":")[0]: ok for text, ok in checks.items()}
  assert met["1 x 256"] and met["10 x 32"]
  assert met["100 x 8"] is False  # 1.88x < 2x
  assert met["1000 x 8"] is True  # 2.2x
  by_start = {t.split(" (")[0]: ok for t, ok in checks.items()}
  assert by_start["compile at 1000 clients"] is False  # 7 s > 2 x 3 s
  assert by_start["samples/s at 1000 clients"] is True  # 1100 >= 0.8 * 1300
  assert by_start["peak memory at 1000 clients"] is False  # 8.8 GiB


def test_bad_arguments_are_one_line_errors():
  proc = subprocess.run([sys.executable, "-m", "lfmjax.bench", "--clients", "2"],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith("error: give both")
