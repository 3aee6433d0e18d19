"""Our PSL baseline in SGLR's setting next to SGLR's published Table 1.

    python experiments/sglr_baseline.py            # C = 1 and 20, 1,000 iterations (~25 min)
    python experiments/sglr_baseline.py --quick    # minutes

SGLR (Pal et al., FL-AAAI-22; SPEC.md) report their PSL baseline's top-1 accuracy on
Fashion-MNIST with resnet16, 1,000 IID samples per client, Adam 1e-3 and batch 8 as
82.45 % at C = 1 and 84.88 % at C = 20. This runs `psl` in that setting (`fmnist_sglr`)
for `--iterations` iterations, one seed. Without FedAvg PSL's test accuracy is the mean
over clients of each client's lower + the server (SPEC.md); at C > 1 that costs one
test-set pass per evaluated client, so those runs evaluate every 250 iterations on 4
seeded clients (`eval_clients`), C = 1 every 100. Writes
`results/sglr_baseline/sglr_baseline.csv` (final and best evaluation, SGLR's number) and
`.png` (test accuracy against iteration).
"""
from __future__ import annotations

import os

import common

SGLR_TABLE1 = {1: 82.45, 20: 84.88}  # PSL top-1 (%), SGLR Table 1


def make_runs(args) -> list[common.Run]:
  clients = [int(c) for c in args.clients.split(",")] if args.clients else (
      [1, 2] if args.quick else sorted(SGLR_TABLE1))
  iterations = args.iterations or (4 if args.quick else 1000)
  runs = []
  grid = args.extend_from or iterations  # an extended run keeps its evaluation grid
  for c in clients:
    config = common.make_config(args, "psl", c, iterations)
    config.eval_every = config.checkpoint_every = max(1, grid // (10 if c == 1 else 4))
    if c > 1:
      config.eval_clients = 4
    runs.append(common.Run(f"psl_C{c}", {"algorithm": "psl", "clients": c}, config))
  return runs


def _other_rows(csv_path: str, runs: list[common.Run]) -> list[dict]:
  """The CSV's rows for the C values not run now, so that `--clients 1` (e.g. to extend
  C = 1 alone) leaves the C = 20 row in the table."""
  if not os.path.exists(csv_path):
    return []
  mine = {run.labels["clients"] for run in runs}
  rows = [{**row, "clients": int(row["clients"])} for row in common.read_csv(csv_path)]
  return [row for row in rows if row["clients"] not in mine]


def main(argv=None):
  p = common.common_flags(__doc__.splitlines()[0])
  p.add_argument("--clients", default=None, help="comma-separated C values")
  p.set_defaults(seeds=1, setting="fmnist_sglr")
  args = p.parse_args(argv)
  name = "sglr_baseline" + ("_quick" if args.quick else "")
  root = os.path.join(args.out or common.RESULTS, name)
  runs = make_runs(args)
  csv_path = os.path.join(root, f"{name}.csv")
  kept = _other_rows(csv_path, runs)  # read before run_all rewrites the CSV
  rows = common.run_all(name, runs, args.out, extend_from=args.extend_from, keep=kept)
  rows = sorted(kept + rows, key=lambda row: row["clients"])
  series = {}
  for row in rows:
    evals = common.evaluations(os.path.join(root, row["workdir"]))
    row["best_test_accuracy"] = round(100 * max(e["test_accuracy"] for e in evals), 2)
    row["best_at_iteration"] = max(evals, key=lambda e: e["test_accuracy"])["iteration"]
    row["sglr_table1"] = SGLR_TABLE1.get(row["clients"], "")
    series[f"psl C={row['clients']}"] = ([e["iteration"] for e in evals],
                                         [100 * e["test_accuracy"] for e in evals], None)
  common.write_csv(csv_path, rows)
  common.plot(os.path.join(root, f"{name}.png"), series, "iteration", "test accuracy (%)",
              "PSL in SGLR's setting (resnet16, Fashion-MNIST, 1,000 samples/client, "
              "batch 8)\nSGLR Table 1: 82.45 % (C=1), 84.88 % (C=20)")
  return rows


if __name__ == "__main__":
  main()
