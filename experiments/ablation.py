"""Ablation: each subset of {Loc, Fed, Mix} on top of parallel SL, at C = 50.

    python experiments/ablation.py            # (hours)
    python experiments/ablation.py --quick    # minutes

The eight subsets are `psl` with the switches `local_loss`, `fedavg`, `smashmix` set
(the empty set is PSL, all three is LocFedMix-SL), with `--seeds` seeds in one program each. Writes
`results/ablation_<setting>/ablation_<setting>.csv` and a plot `.png` (mean ± std over seeds per subset).
"""
from __future__ import annotations

import itertools
import os

import common


def make_runs(args) -> list[common.Run]:
  iterations = args.iterations or (4 if args.quick else 1000)
  clients = args.clients or (2 if args.quick else 50)
  runs = []
  for loc, fed, mix in itertools.product((False, True), repeat=3):
    if (loc, fed, mix) in ((False,) * 3, (True,) * 3):  # PSL and LocFedMix-SL as such,
      algorithm = "locfedmix" if loc else "psl"          # so other experiments' runs count
      config = common.make_config(args, algorithm, clients, iterations)
    else:
      config = common.make_config(args, "psl", clients, iterations)
      config.local_loss, config.fedavg, config.smashmix = loc, fed, mix
    parts = [n for n, on in (("loc", loc), ("fed", fed), ("mix", mix)) if on]
    subset = "+".join(parts) or "none (psl)"
    if args.subsets and ("_".join(parts) or "psl") not in args.subsets.split(","):
      continue
    runs.append(common.Run("_".join(parts) or "psl", {"subset": subset, "clients": clients},
                           config))
  return runs


def main(argv=None):
  p = common.common_flags(__doc__.splitlines()[0])
  p.add_argument("--clients", type=int, default=None)
  p.add_argument("--subsets", default=None,
                 help="comma-separated run names to keep, e.g. psl,loc_fed_mix")
  args = p.parse_args(argv)
  name = f"ablation_{args.setting}" + ("_quick" if args.quick else "")
  rows = common.run_all(name, make_runs(args), args.out,
                         extend_from=args.extend_from)
  path = os.path.join(args.out or common.RESULTS, name, f"{name}.png")
  with common.figure(path, figsize=(7, 3.5)) as (fig, ax):
    # Points, not bars: the subsets differ by tenths of a point, which bars from 0 hide.
    ax.errorbar([r["subset"] for r in rows], [r["test_accuracy"] for r in rows],
                yerr=[r["test_accuracy_std"] for r in rows], fmt="o", capsize=3)
    for r in rows:
      ax.annotate(f"{r['test_accuracy']:.2f}", (r["subset"], r["test_accuracy"]),
                  textcoords="offset points", xytext=(6, 0), fontsize=7, va="center")
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{args.setting}, C = {rows[0]['clients']}: PSL + each subset of "
                 f"{{Loc, Fed, Mix}}", fontsize=9)
    ax.tick_params(axis="x", labelsize=7, rotation=20)
  return rows


if __name__ == "__main__":
  main()
