"""Knobs of LocFedMix-SL: FedAvg interval T_c, mixed batches n_s, mixup alpha, MI weight mu.

    python experiments/knobs.py            # (hours)
    python experiments/knobs.py --quick    # minutes

One knob at a time from LocFedMix-SL's defaults (T_c = 1, n_s = 1, alpha = 2, mu = 1)
at C clients (default 50), `--seeds` seeds in one program per value. Writes
`results/knobs_<setting>/knobs_<setting>.csv` and one `.png` with a panel per knob.
"""
from __future__ import annotations

import os

import common

KNOBS = {  # config field -> values (the default first)
    "fedavg_every": (1, 5, 20),
    "num_mixed": (1, 4),
    "mixup_alpha": (2.0, 0.5, 8.0),
    "local_loss_weight": (1.0, 0.0, 0.3),  # mu
}
QUICK_KNOBS = {k: v[:2] for k, v in KNOBS.items()}


def make_runs(args) -> list[common.Run]:
  iterations = args.iterations or (4 if args.quick else 1000)
  clients = args.clients or (2 if args.quick else 50)
  runs = []
  for knob, values in (QUICK_KNOBS if args.quick else KNOBS).items():
    if args.knobs and knob not in args.knobs.split(","):
      continue
    for value in values:
      config = common.make_config(args, "locfedmix", clients, iterations)
      config[knob] = value
      runs.append(common.Run(f"{knob}_{value}", {"knob": knob, "value": value,
                                                 "clients": clients}, config))
  return runs


def main(argv=None):
  p = common.common_flags(__doc__.splitlines()[0])
  p.add_argument("--clients", type=int, default=None)
  p.add_argument("--knobs", default=None, help="comma-separated knobs to vary (default all)")
  args = p.parse_args(argv)
  name = f"knobs_{args.setting}" + ("_quick" if args.quick else "")
  rows = common.run_all(name, make_runs(args), args.out,
                         extend_from=args.extend_from)
  knobs = list(dict.fromkeys(r["knob"] for r in rows))
  path = os.path.join(args.out or common.RESULTS, name, f"{name}.png")
  with common.figure(path, ncols=len(knobs), figsize=(3 * len(knobs), 3),
                     squeeze=False) as (fig, axes):
    for ax, knob in zip(axes[0], knobs):
      mine = sorted((r for r in rows if r["knob"] == knob), key=lambda r: r["value"])
      ax.errorbar([r["value"] for r in mine], [r["test_accuracy"] for r in mine],
                  yerr=[r["test_accuracy_std"] for r in mine], fmt="o-", capsize=2)
      ax.set_xlabel(knob)
      ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.suptitle(f"{args.setting}, LocFedMix-SL, C = {rows[0]['clients']}", fontsize=9)
  return rows


if __name__ == "__main__":
  main()
