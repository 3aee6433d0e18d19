"""Markdown tables from the experiments' CSVs, for experiments/README.md.

    python experiments/tables.py scalability_fmnist_mlp convergence_fmnist_mlp ...

Scalability: algorithm x C, "mean ± std" over seeds; `bestval_<name>` the same for the
test accuracy at each seed's best validation evaluation. Convergence: algorithm x
iteration (mean accuracy; past 12 evaluations, the first 5 and every 5th after).
Latency: algorithm x C (simulated seconds to the target, "-" when not reached).
Ablation and knobs: one row per run. `plateau_<name>` (e.g. plateau_scalability_fmnist_mlp):
per C, how much the runs' test accuracy still rose over their last fifth.
`runs_<name>`: every run of a scalability experiment, C from largest to smallest, with
its seeds, simulated latency and wall time. `lead_<name>`: per C and algorithm,
LocFedMix-SL's accuracy minus that algorithm's, averaged over all evaluations, and at
how many evaluations it was ahead.
`participation_<setting>` (issue 18): per algorithm and K, the final accuracy, the
simulated seconds and the seconds to a target accuracy; then, at the devices group's K,
homogeneous against lognormal devices with and without the deadline.
`privacy_<setting>` (issue 17): per run, the attacked model's accuracy (and, for a run
trained again, the committed one and the largest seed difference) beside the attack's
scores, mean ± std over the attacked lowers.
`transformers_vit` (issue 35): per algorithm, the split ViT's accuracy on the IID and the
Dirichlet(0.3) split beside the VGG's in the same setting, and the attack on its IID
tokens beside issue 17's attack on the CNN (each CNN column where its CSV is present).
"""
from __future__ import annotations

import os
import sys

import common


def read(name: str, base: str = common.RESULTS) -> list[dict]:
  return common.read_csv(os.path.join(base, name, f"{name}.csv"))


def pivot(rows, row_key, col_key, cell, most: int | None = None) -> str:
  cols = sorted({r[col_key] for r in rows}, key=float)
  if most and len(cols) > most:
    cols = cols[:5] + cols[9::5] + ([] if cols[-1] in cols[9::5] else cols[-1:])
  names = list(dict.fromkeys(r[row_key] for r in rows))
  lines = [f"| {row_key} | " + " | ".join(f"{col_key} {c}" for c in cols) + " |",
           "|---|" + "---|" * len(cols)]
  for n in names:
    cells = {r[col_key]: cell(r) for r in rows if r[row_key] == n}
    lines.append(f"| {n} | " + " | ".join(cells.get(c, "") for c in cols) + " |")
  return "\n".join(lines)


def accuracy(r, key: str = "test_accuracy") -> str:
  std = float(r.get(f"{key}_std") or 0)
  return f"{float(r[key]):.2f} ± {std:.2f}" if std else f"{float(r[key]):.2f}"


def at_best_val(r) -> str:
  return accuracy(r, "test_at_best_val") if r.get("test_at_best_val") else ""


def curves(name: str, base: str) -> list[tuple[dict, list[dict]]]:
  """Each run of an experiment with its evaluations."""
  return [(r, common.evaluations(workdir)) for r, workdir in common.listed_runs(base, name)]


def plateau(name: str, base: str) -> str:
  """Per C: the mean, smallest and largest rise of the runs' (seed-mean) test accuracy
  from 80 % of the run to its end, in points."""
  rises = {}
  for r, evals in curves(name, base):
    end = evals[-1]["iteration"]
    at = min(evals, key=lambda e: abs(e["iteration"] - 0.8 * end))
    rises.setdefault(r["clients"], []).append(
        100 * (evals[-1]["test_accuracy"] - at["test_accuracy"]))
  lines = ["| clients | runs | mean rise | smallest | largest |", "|---|---|---|---|---|"]
  for c, v in rises.items():
    lines.append(f"| {c} | {len(v)} | {sum(v) / len(v):+.2f} | {min(v):+.2f} | {max(v):+.2f} |")
  return "\n".join(lines)


def lead(name: str, base: str, of: str = "locfedmix") -> str:
  """Per C and algorithm: `of`'s test accuracy minus the algorithm's, in points, as the
  mean over evaluations and the number of evaluations where `of` was ahead."""
  acc = {(r["algorithm"], r["clients"]): {e["iteration"]: 100 * e["test_accuracy"]
                                          for e in evals}
         for r, evals in curves(name, base)}
  others = [a for a in dict.fromkeys(a for a, _ in acc) if a != of]
  lines = [f"| clients | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
  for c in dict.fromkeys(c for a, c in acc if a == of):
    cells = []
    for a in others:
      d = [acc[of, c][i] - acc[a, c][i] for i in acc[of, c] if i in acc.get((a, c), {})]
      cells.append(f"{sum(d) / len(d):+.2f} ({sum(x > 0 for x in d)}/{len(d)})" if d else "")
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# SGLR (Pal et al., FL-AAAI-22), Fashion-MNIST / resnet16, 1,000 IID samples per client:
# top-1 (%) as published. At C = 20 SplitAvg (phi = 0.5) alone gave 86.59; SplitAvg +
# SplitLr (our `sglr` preset) was their best of the three, a number not copied here.
PUBLISHED = {("psl", 1): "82.45", ("psl", 20): "84.88",
             ("sglr", 20): "> 86.59 (SplitAvg alone: 86.59)"}


def published(name: str, base: str) -> str:
  """PSL and SGLR at C = 1 and 20 from a scalability CSV, beside SGLR's numbers."""
  lines = ["| algorithm | clients | final (%) | at best validation (%) | SGLR published (%) |",
           "|---|---|---|---|---|"]
  for r in read(name, base):
    if r["algorithm"] in ("psl", "sglr") and int(r["clients"]) in (1, 20):
      key = (r["algorithm"], int(r["clients"]))
      lines.append(f"| {key[0]} | {key[1]} | {accuracy(r)} | {at_best_val(r)} | "
                   f"{PUBLISHED.get(key, '-')} |")
  return "\n".join(lines)


def seconds_to(evals: list[dict], target: float) -> str:
  """Simulated seconds of the first evaluation at or above `target` % ("-": never)."""
  hit = [float(e["latency_s"]) for e in evals if float(e["test_accuracy"]) >= target]
  return f"{min(hit):,.0f}" if hit else "-"


def participation(name: str, base: str, target: float = 83.0) -> str:
  """Issue 18's two tables from participation.py's CSVs (see the module docstring)."""
  rows = read(name, base)
  curves_of = {}
  for c in common.read_csv(os.path.join(base, name, f"{name}_curves.csv")):
    key = (c["algorithm"], c["clients_per_round"], c["devices"], c["deadline_s"])
    curves_of.setdefault(key, []).append(c)

  def to_target(r):
    return seconds_to(curves_of.get((r["algorithm"], r["clients_per_round"], r["devices"],
                                     r["deadline_s"]), []), target)

  def k_cell(r):
    return f"{accuracy(r)} % in {float(r['latency_s']):,.0f} s ({to_target(r)} s)"

  out = [f"Final test accuracy in the simulated seconds of the whole run (the seconds to "
         f"{target:g} %):\n", pivot([dict(r, K=r["clients_per_round"]) for r in rows
                                     if r["group"] == "K"], "algorithm", "K", k_cell)]
  devices = [r for r in rows if r["group"] == "devices"]
  if devices:
    k = devices[0]["clients_per_round"]
    mine = [r for r in rows if r["clients_per_round"] == k and r["group"] != "K"
            or r["group"] == "K" and r["clients_per_round"] == k]
    out.append(f"\nK = {k}: devices and the deadline (late: participants an iteration that "
               f"missed it; saved: simulated seconds the deadline cut from the run):\n")
    out.append("| algorithm | devices | deadline (s) | test accuracy (%) | simulated s | "
               f"s to {target:g} % | present | late | saved (s) |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(mine, key=lambda r: list(dict.fromkeys(x["algorithm"] for x in rows))
                    .index(r["algorithm"])):
      out.append(f"| {r['algorithm']} | {r['devices']} | {r['deadline_s'] or '-'} | "
                 f"{accuracy(r)} | {float(r['latency_s']):,.0f} | {to_target(r)} | "
                 f"{r.get('participants', k)} | {r.get('late') or '0'} | "
                 f"{float(r.get('time_saved_s') or 0):,.0f} |")
  return "\n".join(out)


def runs(name: str, base: str) -> str:
  """One row per run: the numbers behind a scalability pivot."""
  rows = read(name, base)
  order = list(dict.fromkeys(r["algorithm"] for r in rows))
  out = ["| C | algorithm | test accuracy (%) | seeds | at best validation (%) "
         "| simulated latency (s) | wall (s) |", "|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (-int(r["clients"]), order.index(r["algorithm"]))):
    seeds = ", ".join(f"{float(x):.2f}" for x in str(r["test_accuracy_seeds"]).split())
    out.append(f"| {r['clients']} | {r['algorithm']} | {accuracy(r)} | {seeds} | "
               f"{at_best_val(r)} | {float(r['latency_s']):,.1f} | {float(r['wall_s']):,.1f} |")
  return "\n".join(out)


def spread(r, key: str, digits: int) -> str:
  std = float(r.get(f"{key}_std") or 0)
  return f"{float(r[key]):.{digits}f} ± {std:.{digits}f}"


def privacy(name: str, base: str) -> str:
  """One row per attacked run: accuracy against what the server can reconstruct."""
  out = ["| run | test accuracy (%) | committed run (%) | largest seed difference (points) "
         "| PSNR (dB) | SSIM | MSE | reconstruction CE | dCor(x, u) | lowers | attack (s) |",
         "|---" * 11 + "|"]
  for r in read(name, base):
    again = ([f"{float(r['committed_accuracy']):.2f}", f"{float(r['retrain_max_diff']):.2f}"]
             if str(r.get("retrained")) == "True" else ["", ""])
    cells = [r["variant"], accuracy(r), *again, spread(r, "psnr", 2), spread(r, "ssim", 3),
             f"{float(r['mse']):.4f}", f"{float(r['cross_entropy']):.3f}",
             spread(r, "dcor", 3), str(r["attacked_lowers"]), f"{float(r['attack_s']):.1f}"]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def labels(name: str, base: str) -> str:
  """One row per run: accuracy, what the server learns of the labels (received, or by
  its attacks on what it receives) and of the inputs (the inversion attack: this run's
  for the U-shaped ones, issue 17's for the labelled ones)."""
  def score(r, key, digits=3):
    return f"{float(r[key]):.{digits}f}" if r.get(key) not in (None, "") else ""
  out = ["| run | U-shaped | test accuracy (%) | labels received | download: norm AUC "
         "| direction AUC | clustering | returned: norm AUC | direction AUC | clustering "
         "| smashed clustering | inference k-NN on s | server's best label acc. "
         "| majority share | PSNR (dB) | dCor(x, u) | inputs from | retrained (bit-equal) |",
         "|---" * 18 + "|"]
  for r in read(name, base):
    retrained = (f"yes ({r['bit_equal']})" if str(r.get("retrained")) == "True" else "no")
    cells = [r["variant"], "yes" if str(r["client_head"]) == "True" else "no", accuracy(r),
             score(r, "labels_received_accuracy"), score(r, "download_norm_auc"),
             score(r, "download_direction_auc"), score(r, "download_cosine_cluster_accuracy"),
             score(r, "returned_norm_auc"), score(r, "returned_direction_auc"),
             score(r, "returned_cosine_cluster_accuracy"), score(r, "smashed_cluster_accuracy"),
             score(r, "inference_smashed_knn_accuracy"), score(r, "server_label_accuracy"),
             score(r, "majority_share"),
             spread(r, "psnr", 2) if r.get("psnr") not in (None, "") else "",
             spread(r, "dcor", 3) if r.get("dcor") not in (None, "") else "",
             r.get("inputs_from", ""), retrained]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def transformers_vit(name: str, base: str) -> str:
  """Algorithm x split beside the VGG's accuracy in the same setting (issue 16's
  `scalability_cifar_vgg_*` at C = 10), and the inversion attack on the tokens beside
  issue 17's attack on the CNN; a CNN column is empty where its CSV is absent."""
  def by_algorithm(stem, key="algorithm", clients=None):
    rows = read(stem, base) if os.path.exists(os.path.join(base, stem)) else []
    return {r[key]: r for r in rows if clients is None or str(r["clients"]) == clients}
  vit = {(r["setting"], r["algorithm"]): r for r in read(name, base)}
  vgg = {s: by_algorithm(f"scalability_cifar_vgg_{s}", clients="10") for s in ("iid", "dir03")}
  cnn_attack = by_algorithm("privacy_sglr_resnet16", key="variant")
  out = ["| algorithm | ViT IID (%) | VGG IID (%) | ViT Dir(0.3) (%) | VGG Dir(0.3) (%) "
         "| ViT wall s (IID, Dir) | PSNR on tokens (dB) | SSIM | dCor(x, u) "
         "| CNN's PSNR, issue 17 (dB) |", "|---" * 10 + "|"]
  cell = lambda r, f: f(r) if r else ""
  for algorithm in dict.fromkeys(a for _, a in vit):
    iid, dirichlet = vit.get(("cifar_vit_iid", algorithm)), vit.get(("cifar_vit_dir03", algorithm))
    attacked = iid if iid and iid.get("psnr") not in (None, "") else None
    cells = [algorithm, cell(iid, accuracy), cell(vgg["iid"].get(algorithm), accuracy),
             cell(dirichlet, accuracy), cell(vgg["dir03"].get(algorithm), accuracy),
             ", ".join(f"{float(r['wall_s']):.0f}" for r in (iid, dirichlet) if r),
             cell(attacked, lambda r: spread(r, "psnr", 2)),
             cell(attacked, lambda r: spread(r, "ssim", 3)),
             cell(attacked, lambda r: spread(r, "dcor", 3)),
             cell(attacked and cnn_attack.get(algorithm), lambda r: spread(r, "psnr", 2))]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def table(name: str, base: str = common.RESULTS) -> str:
  kind = name.split("_")[0]
  if name.startswith("transformers_vit"):
    return transformers_vit(name, base)
  if kind == "privacy":
    return privacy(name, base)
  if kind == "labels":
    return labels(name, base)
  if kind == "runs":  # e.g. runs_scalability_sglr_resnet16
    return runs(name[len("runs_"):], base)
  if kind == "participation":
    return participation(name, base)
  if kind == "published":  # e.g. published_scalability_sglr_resnet16
    return published(name[len("published_"):], base)
  if kind == "plateau":
    return plateau(name[len("plateau_"):], base)
  if kind == "lead":
    return lead(name[len("lead_"):], base)
  if kind == "bestval":  # e.g. bestval_scalability_sglr_resnet16
    return pivot(read(name[len("bestval_"):], base), "algorithm", "clients", at_best_val)
  if kind == "scalability":
    return pivot(read(name, base), "algorithm", "clients", accuracy)
  if kind == "convergence":
    return pivot(read(name, base), "algorithm", "iteration", lambda r: r["test_accuracy"],
                 most=12)
  if kind == "latency":
    return pivot(read(name, base), "algorithm", "clients", lambda r: r["latency_s"] or "-")
  rows = read(name, base)
  keys = [k for k in rows[0] if k not in ("test_accuracy_seeds", "workdir", "test_accuracy",
                                          "test_accuracy_std") and not k.startswith(
                                              "test_at_best_val")]
  best = "test_at_best_val" in rows[0]
  lines = ["| " + " | ".join(keys) + " | test accuracy (%) |"
           + (" at best validation (%) |" if best else ""),
           "|---" * (len(keys) + 1 + best) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(str(r[k]) for k in keys) + f" | {accuracy(r)} |"
                 + (f" {at_best_val(r)} |" if best else ""))
  return "\n".join(lines)


if __name__ == "__main__":
  for name in sys.argv[1:]:
    print(f"### {name}\n\n{table(name)}\n")
