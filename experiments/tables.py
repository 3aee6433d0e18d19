"""Markdown tables from the experiments' CSVs, for experiments/README.md.

    python experiments/tables.py scalability_fmnist_mlp convergence_fmnist_mlp ...

Scalability: algorithm x C, "mean ± std" over seeds. Convergence: algorithm x
iteration (mean accuracy). Latency: algorithm x C (simulated seconds to the target, "-"
when not reached). Ablation and knobs: one row per run.
"""
from __future__ import annotations

import os
import sys

import common


def read(name: str) -> list[dict]:
  return common.read_csv(os.path.join(common.RESULTS, name, f"{name}.csv"))


def pivot(rows, row_key, col_key, cell) -> str:
  cols = sorted({r[col_key] for r in rows}, key=float)
  names = list(dict.fromkeys(r[row_key] for r in rows))
  lines = [f"| {row_key} | " + " | ".join(f"{col_key} {c}" for c in cols) + " |",
           "|---|" + "---|" * len(cols)]
  for n in names:
    cells = {r[col_key]: cell(r) for r in rows if r[row_key] == n}
    lines.append(f"| {n} | " + " | ".join(cells.get(c, "") for c in cols) + " |")
  return "\n".join(lines)


def accuracy(r) -> str:
  std = float(r.get("test_accuracy_std") or 0)
  return f"{float(r['test_accuracy']):.2f} ± {std:.2f}" if std else f"{float(r['test_accuracy']):.2f}"


def table(name: str) -> str:
  kind = name.split("_")[0]
  if kind == "scalability":
    return pivot(read(name), "algorithm", "clients", accuracy)
  if kind == "convergence":
    return pivot(read(name), "algorithm", "iteration", lambda r: r["test_accuracy"])
  if kind == "latency":
    return pivot(read(name), "algorithm", "clients", lambda r: r["latency_s"] or "-")
  rows = read(name)
  keys = [k for k in rows[0] if k not in ("test_accuracy_seeds", "workdir", "test_accuracy",
                                          "test_accuracy_std")]
  lines = ["| " + " | ".join(keys) + " | test accuracy (%) |", "|---" * (len(keys) + 1) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(str(r[k]) for k in keys) + f" | {accuracy(r)} |")
  return "\n".join(lines)


if __name__ == "__main__":
  for name in sys.argv[1:]:
    print(f"### {name}\n\n{table(name)}\n")
