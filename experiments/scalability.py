"""Claim 1, scalability: final test accuracy against the number of clients C.

    python experiments/scalability.py --setting fmnist_sglr          # full (hours)
    python experiments/scalability.py --setting cifar_iid --quick    # minutes

For every algorithm and C, one run of `--iterations` iterations with `--seeds` seeds in
one program. Writes `results/scalability_<setting>/scalability_<setting>.csv` (mean,
std and each seed's accuracy) and `.png` (accuracy against C, one line per algorithm).
Settings: `fmnist_sglr` (SGLR's: resnet16, 1,000 IID samples per client, Adam 1e-3,
batch 8), `cifar_iid` and `cifar_dir03` (VGG-style, IID or Dirichlet(0.3), batch 32).
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


def main(argv=None):
  p = common.common_flags(__doc__.splitlines()[0])
  p.add_argument("--clients", default=None, help="comma-separated C values")
  p.add_argument("--algorithms", default=None, help="comma-separated (default: all eight)")
  args = p.parse_args(argv)
  name = f"scalability_{args.setting}" + ("_quick" if args.quick else "")
  rows = common.run_all(name, make_runs(args), args.out,
                         extend_from=args.extend_from)
  series = {}
  for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
    mine = [r for r in rows if r["algorithm"] == algorithm]
    series[algorithm] = ([r["clients"] for r in mine], [r["test_accuracy"] for r in mine],
                         [r["test_accuracy_std"] for r in mine])
  root = os.path.join(args.out or common.RESULTS, name)
  common.plot(os.path.join(root, f"{name}.png"), series, "clients C", "test accuracy (%)",
              f"{args.setting}: final test accuracy (mean +- std over {args.seeds} seeds)",
              logx=True)
  return rows


if __name__ == "__main__":
  main()
