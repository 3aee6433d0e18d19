"""Labels: what each algorithm leaks of them, U-shaped or not, and what a defence costs
(issue 36), beside what it leaks of the inputs (issue 17).

    python experiments/labels.py --setting sglr_resnet16 --clients 10 \
        --iterations 625 --eval_every 125 --eval_clients 2 --devices 1   # hours
    python experiments/labels.py --quick                                # minutes

Every run is trained as the other experiments train it (its workdir named by its config,
so the eight algorithms' runs are issue 16's and 17's), then attacked at its last
checkpoint by `lfmjax.label_attack` (the honest-but-curious server's label attacks on
what it receives) and, for the U-shaped runs, by the inversion attack with issue 17's
settings, so one row holds both leakages. A run whose checkpoints are gone (they are not
committed) is trained again in `<workdir>/retrained_labels`, bit for bit the committed
one on the same kind of CPU; its row says so. Runs:
  * the eight algorithms (the server holds the labels);
  * the seven that take a client head, U-shaped (`client_head=True`);
  * on U-shaped PSL and LocFedMix-SL, each defence of the returned gradient: isotropic
    noise (two sigmas), Li et al.'s max norm, top-k sparsification, 2-bit quantisation;
  * on (labelled) PSL and LocFedMix-SL, randomised response on the server's labels.
Writes `results/labels_<setting>/labels_<setting>.csv` and the plots
`labels_<setting>_accuracy.png` (test accuracy against the server's best label
accuracy) and `labels_<setting>_inputs.png` (label leakage against input leakage).
"""
from __future__ import annotations

import os

import attacked_runs
import common
import privacy
from lfmjax import attack, label_attack
from lfmjax.checkpoint import checkpoint_steps

ALGORITHMS = privacy.ALGORITHMS
U_SHAPED = ("psl", "sfl_v1", "sfl_v2", "sl", "locfedmix", "sglr", "mix2sfl")
# privacy.FIELD: values, on the U-shaped runs (the returned gradient) ...
GRADIENT_DEFENCES = {
    "grad_noise_std": (0.01, 0.1),   # the returned gradient's rms is about 0.01 (B = 8)
    "grad_max_norm": (True,),
    "grad_keep_fraction": (0.1,),
    "grad_quantize_bits": (2,),
}
# ... and on the labelled ones (the labels the server receives).
LABEL_DEFENCES = {"label_rr_epsilon": (3.0, 1.0)}
DEFENDED = ("psl", "locfedmix")


def make_runs(args) -> list[common.Run]:
  iterations = args.iterations or (4 if args.quick else 625)
  clients = args.clients or (2 if args.quick else 10)
  runs = []

  def add(name, labels, algorithm, client_head=False, **fields):
    config = common.make_config(args, algorithm, clients, iterations)
    config.client_head = client_head
    for field, value in fields.items():
      config.privacy[field] = value
    runs.append(common.Run(name, {"variant": name, "algorithm": algorithm,
                                  "client_head": client_head, "clients": clients, **labels},
                           config))

  for algorithm in ALGORITHMS:  # labelled and U-shaped side by side, PSL and LocFedMix first
    add(algorithm, {}, algorithm)
    if algorithm in U_SHAPED:
      add(f"{algorithm}_u", {}, algorithm, client_head=True)
  for algorithm in DEFENDED:
    for field, values in GRADIENT_DEFENCES.items():
      for value in values:
        suffix = "" if value is True else f"_{value:g}"
        add(f"{algorithm}_u_{field}{suffix}", {"defence": field, "strength": value},
            algorithm, client_head=True, **{field: value})
    for field, values in LABEL_DEFENCES.items():
      for value in values:
        add(f"{algorithm}_{field}_{value:g}", {"defence": field, "strength": value},
            algorithm, **{field: value})
  if args.variants:
    keep = set(args.variants.split(","))
    runs = [r for r in runs if r.name in keep]
  return order(runs)


def order(runs):
  """PSL and LocFedMix-SL (labelled, U-shaped) first, then the other algorithms, then
  the defences: the table fills in the order that answers most, if the budget ends."""
  first = ("psl", "psl_u", "locfedmix", "locfedmix_u")
  rank = lambda r: (r.name not in first, "defence" in r.labels,
                    first.index(r.name) if r.name in first else 0)
  return sorted(runs, key=rank)


def label_settings(args):
  s = attack.attack_config()
  s.update(kind="labels", label_samples=32 if args.quick else 256,
           known_per_class=2 if args.quick else 5, num_test=50 if args.quick else 1000)
  return s


LABEL_KEYS = ("label_samples", "known_per_class", "num_test", "seed", "clients")


def attacked_run(config, workdir: str, label_s, inversion_s, log) -> tuple[dict, dict | None,
                                                                           dict]:
  """(the label report, the inversion report or None, how the attacked run was had),
  each made now unless kept, so the script resumes where it stopped."""
  how = {"committed_accuracy": "", "retrained": False, "bit_equal": "",
         "retrain_max_diff": ""}
  wants_inversion = config.client_head

  def reports(workdir):
    labels = attacked_runs.kept_report(workdir, "label_attack.json", label_s,
                                       config.num_iterations, LABEL_KEYS)
    inversion = (attacked_runs.kept_report(workdir, "attack.json", inversion_s,
                                           config.num_iterations)
                 if wants_inversion else None)
    return labels, inversion

  labels, inversion = reports(workdir)
  if (labels is None or (wants_inversion and inversion is None)) and not checkpoint_steps(
      workdir):
    # issue 17's `retrained` subdirectory kept that experiment's attack; this one its own
    workdir, how = attacked_runs.retrained(config, workdir, log, subdir="retrained_labels")
    labels, inversion = reports(workdir)
  if labels is None:
    labels = label_attack.run_label_attack(workdir, label_s, log=log)
  if wants_inversion and inversion is None:
    inversion = attack.run_attack(workdir, inversion_s, log=log)
  return labels, inversion, how


def inputs_of_issue17(base: str, setting: str) -> dict[str, dict]:
  """Issue 17's input leakage of the labelled algorithms, by variant."""
  path = os.path.join(base, f"privacy_{setting}", f"privacy_{setting}.csv")
  if not os.path.exists(path):
    return {}
  return {row["variant"]: row for row in common.read_csv(path)}


LABEL_SCORES = ("labels_received_accuracy", "download_norm_auc", "download_direction_auc",
                "download_cosine_cluster_accuracy", "returned_norm_auc",
                "returned_direction_auc", "returned_cosine_cluster_accuracy",
                "smashed_cluster_accuracy", "inference_smashed_knn_accuracy",
                "inference_features_knn_accuracy", "inference_server_prediction_accuracy",
                "majority_share")


def server_label_accuracy(report: dict) -> float:
  """The server's best label accuracy on training samples: the labels it receives, or the
  best of the clustering attacks on what it receives."""
  candidates = [report.get(k) for k in ("labels_received_accuracy",
                                        "returned_cosine_cluster_accuracy",
                                        "download_cosine_cluster_accuracy",
                                        "smashed_cluster_accuracy")]
  return max(v for v in candidates if v is not None)


def row_of(row: dict, labels: dict, inversion: dict | None, issue17: dict, how: dict) -> dict:
  out = {**row, **{k: round(labels[k], 4) if labels.get(k) is not None else ""
                   for k in LABEL_SCORES},
         "server_label_accuracy": round(server_label_accuracy(labels), 4),
         "label_attack_s": labels["total_s"], **how}
  source = inversion or (issue17.get(row["variant"]) if not row["client_head"] else None)
  for k in ("psnr", "dcor"):
    out[k] = round(float(source[k]), 4) if source else ""
    out[f"{k}_std"] = round(float(source[f"{k}_std"]), 4) if source else ""
  out["inputs_from"] = ("this run" if inversion else "issue 17" if source else "")
  return out


def main(argv=None):
  args = attacked_runs.attack_flags(__doc__.splitlines()[0]).parse_args(argv)
  name = f"labels_{args.setting}" + ("_quick" if args.quick else "")
  base = args.out or common.RESULTS
  if args.replot:
    rows = common.read_csv(os.path.join(base, name, f"{name}.csv"))
    plot(base, name, rows, args.setting)
    return rows
  runs = make_runs(args)
  label_s, inversion_s = label_settings(args), privacy.attack_settings(args)
  issue17 = inputs_of_issue17(base, args.setting)
  trained, rows = [], []
  log = lambda *a: print(*a, flush=True)
  for run in runs:  # attacked as soon as trained: checkpoints are not committed
    (row,) = common.run_all(name, [run], args.out, csv_name=f"{name}_runs",
                            extend_from=args.extend_from, keep=trained)
    trained.append(row)
    workdir = os.path.normpath(os.path.join(base, name, row["workdir"]))
    labels, inversion, how = attacked_run(run.config, workdir, label_s, inversion_s, log)
    rows.append(row_of(row, labels, inversion, issue17, how))
    common.write_csv(os.path.join(base, name, f"{name}.csv"), rows)
  plot(base, name, rows, args.setting)
  return rows


def plot(base, name, rows, setting):
  """Accuracy against the server's label accuracy; label against input leakage."""
  title = f"{setting}, C = {rows[0]['clients']}"
  marker = lambda r: ("s" if str(r["client_head"]) == "True" else "o")
  with common.figure(os.path.join(base, name, f"{name}_accuracy.png"), figsize=(8, 5)) as (
      fig, ax):
    for r in rows:
      x, y = float(r["server_label_accuracy"]), float(r["test_accuracy"])
      ax.errorbar(x, y, yerr=float(r["test_accuracy_std"]), fmt=marker(r), markersize=4,
                  color="tab:red" if r.get("defence") else "black", capsize=2,
                  elinewidth=0.6)
      ax.annotate(r["variant"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("the server's label accuracy on training samples (received, or its best "
                  "attack)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title}: accuracy against label leakage (squares: U-shaped; red: "
                 f"defended)", fontsize=9)
    ax.grid(alpha=0.3)
  with common.figure(os.path.join(base, name, f"{name}_inputs.png"), figsize=(8, 5)) as (
      fig, ax):
    for r in rows:
      if r.get("psnr") in ("", None):
        continue
      x, y = float(r["server_label_accuracy"]), float(r["psnr"])
      ax.plot(x, y, marker(r), color="black", markersize=4)
      ax.annotate(r["variant"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("the server's label accuracy (labels)")
    ax.set_ylabel("inversion attack PSNR, dB (inputs)")
    ax.set_title(f"{title}: what the server learns of labels and of inputs", fontsize=9)
    ax.grid(alpha=0.3)


if __name__ == "__main__":
  main()
