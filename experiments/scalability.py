"""Claim 1, scalability: final test accuracy against the number of clients C.

    python experiments/scalability.py --setting fmnist_sglr          # full (hours)
    python experiments/scalability.py --setting cifar_iid --quick    # minutes

For every algorithm and C, one run of `--iterations` iterations with `--seeds` seeds in
one program. Writes `results/scalability_<setting>/scalability_<setting>.csv` (mean,
std and each seed's accuracy) and `.png` (accuracy against C, one line per algorithm).
Settings: `fmnist_sglr` (SGLR's: resnet16, 1,000 IID samples per client, Adam 1e-3,
batch 8), `fmnist_mlp` (the same data and optimiser with the `mlp` split model),
`cifar_iid` and `cifar_dir03` (VGG-style, IID or Dirichlet(0.3), batch 32), and
`cifar_small_iid` and `cifar_small_dir03` (the VGG-style at half width, batch 8).
A killed script resumes where it stopped (every run has its own checkpointed workdir).
"""
from __future__ import annotations

import os

import common

FULL_CLIENTS = (1, 2, 5, 10, 20, 50, 100)
QUICK_CLIENTS = (1, 2)


def make_runs(args) -> list[common.Run]:
  clients = [int(c) for c in args.clients.split(",")] if args.clients else (
      QUICK_CLIENTS if args.quick else FULL_CLIENTS)
  algorithms = args.algorithms.split(",") if args.algorithms else common.ALGORITHMS
  iterations = args.iterations or (4 if args.quick else 1000)
  runs = []
  for algorithm in algorithms:
    for c in clients:
      config = common.make_config(args, algorithm, c, iterations)
      runs.append(common.Run(f"{algorithm}_C{c}", {"algorithm": algorithm, "clients": c},
                             config))
  return runs


def plot(rows: list[dict], path: str, setting: str, seeds: int) -> None:
  """Accuracy against C, one line per algorithm (`rows` as in the CSV)."""
  series = {}
  for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
    mine = [r for r in rows if r["algorithm"] == algorithm]
    series[algorithm] = tuple([float(r[k]) for r in mine]
                              for k in ("clients", "test_accuracy", "test_accuracy_std"))
  common.plot(path, series, "clients C", "test accuracy (%)",
              f"{setting}: final test accuracy ("
              + (f"mean +- std over {seeds} seeds)" if seeds > 1 else "one seed)"),
              logx=True)


def main(argv=None):
  p = common.common_flags(__doc__.splitlines()[0])
  p.add_argument("--clients", default=None, help="comma-separated C values")
  p.add_argument("--algorithms", default=None, help="comma-separated (default: all eight)")
  args = p.parse_args(argv)
  name = f"scalability_{args.setting}" + ("_quick" if args.quick else "")
  runs = make_runs(args)
  # An invocation for some C values (say, each with its own --eval_every) keeps the
  # CSV's rows of the others.
  kept = common.rows_not_run(os.path.join(args.out or common.RESULTS, name, f"{name}.csv"),
                             runs)
  rows = common.run_all(name, runs, args.out, extend_from=args.extend_from, keep=kept)
  order = {a: i for i, a in enumerate(common.ALGORITHMS)}
  rows = sorted(kept + rows, key=lambda r: (order.get(r["algorithm"], 99), int(r["clients"])))
  common.write_csv(os.path.join(args.out or common.RESULTS, name, f"{name}.csv"), rows)
  plot(rows, os.path.join(args.out or common.RESULTS, name, f"{name}.png"), args.setting,
       args.seeds)
  return rows


if __name__ == "__main__":
  main()
