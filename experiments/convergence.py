"""Claim 2, convergence: test accuracy against epochs and against simulated time.

    python experiments/convergence.py                 # C = 50, every algorithm (hours)
    python experiments/convergence.py --quick         # minutes

For every algorithm at C clients (default 50) one run with `--seeds` seeds in one
program, evaluated every `--eval_every` iterations. Writes
`results/convergence_<setting>/convergence_<setting>.csv` (one row per algorithm and
evaluation: iteration, epoch, simulated latency, accuracy mean and std) and three
plots: accuracy against iterations, against epochs (samples seen per client, the axis on
which vanilla SL, whose iteration is a local epoch, compares) and against simulated
latency (lfmjax's latency model, SPEC.md). `latency.py` reads these curves for the time to reach a target accuracy.
"""
from __future__ import annotations

import os

import common


def make_runs(args) -> list[common.Run]:
  algorithms = args.algorithms.split(",") if args.algorithms else common.ALGORITHMS
  iterations = args.iterations or (6 if args.quick else 1000)
  clients = args.clients or (2 if args.quick else 50)
  runs = []
  for algorithm in algorithms:
    config = common.make_config(args, algorithm, clients, iterations)
    runs.append(common.Run(f"{algorithm}_C{clients}",
                           {"algorithm": algorithm, "clients": clients}, config))
  return runs


def curves(root: str, rows: list[dict]) -> list[dict]:
  """Every evaluation of every run: the convergence table."""
  out = []
  for row in rows:
    for e in common.evaluations(os.path.join(root, row["workdir"])):
      out.append({"algorithm": row["algorithm"], "clients": row["clients"],
                  "iteration": e["iteration"], "epoch": e["epoch"],
                  "latency_s": round(e["latency_s"], 3),
                  "test_accuracy": round(100 * e["test_accuracy"], 2),
                  "test_accuracy_std": round(100 * e.get("test_accuracy_std", 0.0), 2)})
  return out


def main(argv=None):
  p = common.common_flags(__doc__.splitlines()[0])
  p.add_argument("--clients", type=int, default=None)
  p.add_argument("--algorithms", default=None)
  args = p.parse_args(argv)
  name = f"convergence_{args.setting}" + ("_quick" if args.quick else "")
  root = os.path.join(args.out or common.RESULTS, name)
  rows = common.run_all(name, make_runs(args), args.out, csv_name=name + "_runs",
                         extend_from=args.extend_from)
  table = curves(root, rows)
  common.write_csv(os.path.join(root, f"{name}.csv"), table)
  # SL's iteration is a local epoch of every client: compare by epoch and simulated time.
  for x, label, suffix in (("iteration", "iteration", "iterations"),
                           ("epoch", "epoch (samples seen per client / |D_k|)", "epochs"),
                           ("latency_s", "simulated latency (s)", "latency")):
    series = {}
    for algorithm in dict.fromkeys(r["algorithm"] for r in table):
      mine = [r for r in table if r["algorithm"] == algorithm]
      series[algorithm] = ([r[x] for r in mine], [r["test_accuracy"] for r in mine], None)
    common.plot(os.path.join(root, f"{name}_{suffix}.png"), series, label,
                "test accuracy (%)", f"{args.setting}, C = {rows[0]['clients']}: mean of "
                f"{args.seeds} seeds", logx=(x == "latency_s"))
  return table


if __name__ == "__main__":
  main()
