"""Claim 3, latency: simulated time to reach a target test accuracy, per algorithm and C.

    python experiments/latency.py --target 80                       # from finished runs
    python experiments/latency.py --quick --target 10

Reads the evaluation histories of the scalability and convergence runs already made
(the runs their CSVs list, and those runs' `metrics.jsonl`, with lfmjax's simulated
latency at each evaluation; SPEC.md's communication and latency model) and reports,
for every run, the first evaluation at or above `--target` % mean accuracy: its
iteration and simulated seconds, or "not reached". Writes `results/latency_<setting>_<target>/latency_<setting>_<target>.csv`
and `.png`, so several targets' tables sit side by side.
Runs nothing itself, so it takes seconds.
"""
from __future__ import annotations

import os

import common


def time_to_target(workdir: str, target: float
                   ) -> tuple[int | None, float | None, float | None]:
  """(iteration, simulated seconds, epoch) of the first evaluation at the target."""
  for e in common.evaluations(workdir):
    if 100 * e["test_accuracy"] >= target:
      return e["iteration"], e["latency_s"], e.get("epoch")
  return None, None, None


def main(argv=None):
  p = common.common_flags(__doc__.splitlines()[0])
  p.add_argument("--target", type=float, required=True, help="test accuracy, %")
  args = p.parse_args(argv)
  suffix = "_quick" if args.quick else ""
  base = args.out or common.RESULTS
  rows = {}
  for experiment in (f"scalability_{args.setting}{suffix}",
                     f"convergence_{args.setting}{suffix}"):
    for run, workdir in common.listed_runs(base, experiment):
      algorithm, clients = run["algorithm"], run["clients"]
      iteration, latency, epoch = time_to_target(workdir, args.target)
      key = (algorithm, int(clients))
      if key not in rows or (latency is not None and (rows[key]["latency_s"] in ("", None)
                                                      or latency < rows[key]["latency_s"])):
        rows[key] = {"algorithm": algorithm, "clients": int(clients),
                     "target_accuracy": args.target,
                     "iteration": "" if iteration is None else iteration,
                     "epoch": "" if epoch is None else epoch,
                     "latency_s": "" if latency is None else round(latency, 2)}
  table = sorted(rows.values(), key=lambda r: (r["algorithm"], r["clients"]))
  if not table:
    raise SystemExit(f"no finished runs under {base} for setting {args.setting}{suffix}: "
                     f"run scalability.py / convergence.py first")
  name = f"latency_{args.setting}_{args.target:g}{suffix}"
  root = os.path.join(base, name)
  common.write_csv(os.path.join(root, f"{name}.csv"), table)
  series = {}
  for algorithm in dict.fromkeys(r["algorithm"] for r in table):
    mine = [r for r in table if r["algorithm"] == algorithm and r["latency_s"] != ""]
    if mine:
      series[algorithm] = ([r["clients"] for r in mine], [r["latency_s"] for r in mine], None)
  common.plot(os.path.join(root, f"{name}.png"), series, "clients C",
              f"simulated seconds to {args.target:g} %", f"{args.setting}: time to target",
              logx=True)
  for r in table:
    print(r)
  return table


if __name__ == "__main__":
  main()
