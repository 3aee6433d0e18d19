"""Clients that come and go (issue 18): accuracy against simulated time when K of the C
clients take part in each iteration, on devices that differ, with and without a deadline.

    python experiments/participation.py --data_dir D/fashion-mnist     # hours
    python experiments/participation.py --quick                         # minutes

Setting `fmnist_mlp` at C = 50 (SGLR's data and optimiser with the `mlp` split model: the
cheapest setting in which the algorithms differ), for LocFedMix-SL, PSL, SFL-V1, SFL-V2
and SL, `--seeds` seeds in one program. Every run sees the same number of samples:
`--iterations` (500: four local epochs at K = C) x C / K iterations of K participants
(SL: the same samples, as local epochs), so a K = 5 run is ten times as long as a
K = 50 one and costs about the same.
Runs, by group:
  K         K in {5, 10, 25, 50} (50: everyone), every device at the configured rates;
  devices   K = 10 on lognormal devices, spread 1 and 2 (sigma of log-rate; the
            configured rates are the medians);
  deadline  the same with a deadline of twice the iteration time of the median device
            (the algorithm's own, from its homogeneous K = 10 run): slower participants
            are dropped from the iteration.
Writes `results/participation_<setting>/participation_<setting>.csv` (a row a run:
accuracy, simulated seconds, participants present, dropped, late, the time the deadline
saved), `..._curves.csv` (every evaluation: accuracy against simulated seconds) and the
plots `..._K.png` and `..._devices.png`.
A killed script resumes where it stopped (every run has its own checkpointed workdir).
"""
from __future__ import annotations

import json
import os

import common

ALGORITHMS = ("locfedmix", "psl", "sfl_v1", "sfl_v2", "sl")
FULL_K, QUICK_K = (5, 10, 25, 50), (2, 4)
SPREADS, QUICK_SPREADS = (1.0, 2.0), (2.0,)
DEADLINE_FACTOR = 2.0  # the deadline: this many times the median device's iteration


def run_config(args, algorithm: str, clients: int, k: int, base_iterations: int,
               spread: float | None = None, deadline_s: float | None = None):
  """One run: K of C participants for base_iterations x C / K iterations."""
  config = common.make_config(args, algorithm, clients, base_iterations * clients // k)
  config.clients_per_round = None if k == clients else k
  if spread is not None:
    config.devices.distribution, config.devices.spread = "lognormal", spread
  config.deadline_s = deadline_s
  return config


def median_device_seconds(base: str, config) -> float:
  """A participant's simulated seconds an iteration on the configured (median) device:
  the homogeneous run's iteration time, a turn of vanilla SL (its iteration is K turns)."""
  summary = [r for r in map(json.loads, open(os.path.join(common.run_dir(base, config),
                                                          "metrics.jsonl")))
             if r.get("type") == "summary"][-1]
  per_iteration = summary["latency_per_iteration_s"]
  k = config.clients_per_round or config.num_clients
  return per_iteration / k if config.algorithm == "sl" else per_iteration


def make_runs(args, base: str, group: str) -> list[common.Run]:
  clients = args.clients or (4 if args.quick else 50)
  ks = QUICK_K if args.quick else FULL_K
  k_devices = ks[0] if args.quick else 10
  iterations = args.iterations or (4 if args.quick else 500)
  spreads = QUICK_SPREADS if args.quick else SPREADS
  algorithms = args.algorithms.split(",") if args.algorithms else ALGORITHMS
  runs = []

  def add(algorithm, k, devices, deadline=None, spread=None):
    config = run_config(args, algorithm, clients, k, iterations, spread,
                        None if deadline is None else round(deadline, 6))
    labels = {"group": group, "algorithm": algorithm, "clients": clients,
              "clients_per_round": k, "devices": devices,
              "deadline_s": "" if deadline is None else round(deadline, 6)}
    runs.append(common.Run(f"{algorithm}_K{k}_{devices}" + ("_deadline" if deadline else ""),
                           labels, config))

  for algorithm in algorithms:
    if group == "K":
      for k in ks:
        add(algorithm, k, "homogeneous")
    elif group == "devices":
      for spread in spreads:
        add(algorithm, k_devices, f"lognormal{spread:g}", spread=spread)
    else:  # the deadline, from the homogeneous run of group K
      median = median_device_seconds(base, run_config(args, algorithm, clients, k_devices,
                                                      iterations))
      for spread in spreads:
        add(algorithm, k_devices, f"lognormal{spread:g}", DEADLINE_FACTOR * median, spread)
  return runs


def participation_columns(workdir: str, k: int) -> dict:
  """The last evaluation's participation record: present and dropped an iteration (its
  window), late ones, and the seconds the deadline saved over the run (K = C: all K)."""
  last = common.evaluations(workdir)[-1]
  return {"participants": round(last.get("participants", k), 3),
          "dropped": round(last.get("dropped", 0.0), 3),
          "late": round(last.get("late", 0.0), 3),
          "time_saved_s": round(last.get("time_saved_s", 0.0), 2)}


def curve_rows(row: dict, workdir: str) -> list[dict]:
  keys = ("group", "algorithm", "clients_per_round", "devices", "deadline_s")
  return [{**{k: row[k] for k in keys}, "iteration": e["iteration"],
           "latency_s": round(e["latency_s"], 4),
           "test_accuracy": round(100 * e["test_accuracy"], 2),
           "test_accuracy_std": round(100 * e.get("test_accuracy_std", 0.0), 2)}
          for e in common.evaluations(workdir)]


def plot_curves(path: str, curves: list[dict], lines: str, title: str) -> None:
  """Accuracy against simulated seconds, a panel per algorithm, a line per `lines`
  value (K, or the devices and deadline)."""
  algorithms = list(dict.fromkeys(r["algorithm"] for r in curves))
  with common.figure(path, nrows=1, ncols=len(algorithms),
                     figsize=(3.2 * len(algorithms), 3.2), squeeze=False) as (fig, axes):
    for ax, algorithm in zip(axes[0], algorithms):
      mine = [r for r in curves if r["algorithm"] == algorithm]
      for label in dict.fromkeys(_label(r, lines) for r in mine):
        pts = [r for r in mine if _label(r, lines) == label]
        ax.plot([float(r["latency_s"]) for r in pts],
                [float(r["test_accuracy"]) for r in pts], "o-", markersize=2, label=label)
      ax.set_xscale("log")
      ax.set_title(algorithm, fontsize=9)
      ax.set_xlabel("simulated seconds")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=6)
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.suptitle(title, fontsize=9)


def _label(row: dict, lines: str) -> str:
  if lines == "K":
    return f"K = {row['clients_per_round']}"
  return row["devices"] + (" + deadline" if row["deadline_s"] not in ("", None) else "")


def main(argv=None):
  p = common.common_flags(__doc__.splitlines()[0])
  p.set_defaults(setting="fmnist_mlp")
  p.add_argument("--clients", type=int, default=None, help="C (default 50)")
  p.add_argument("--algorithms", default=None,
                 help=f"comma-separated (default: {','.join(ALGORITHMS)})")
  args = p.parse_args(argv)
  name = f"participation_{args.setting}" + ("_quick" if args.quick else "")
  base = args.out or common.RESULTS
  rows, curves = [], []
  for group in ("K", "devices", "deadline"):
    runs = make_runs(args, base, group)
    done = common.run_all(name, runs, args.out, csv_name=f"{name}_{group}",
                          extend_from=args.extend_from)
    for row in done:
      workdir = os.path.normpath(os.path.join(base, name, row["workdir"]))
      rows.append({**row, **participation_columns(workdir, row["clients_per_round"])})
      curves += curve_rows(row, workdir)
    common.write_csv(os.path.join(base, name, f"{name}.csv"), rows)
    common.write_csv(os.path.join(base, name, f"{name}_curves.csv"), curves)
  c = rows[0]["clients"]
  plot_curves(os.path.join(base, name, f"{name}_K.png"),
              [r for r in curves if r["group"] == "K"], "K",
              f"{args.setting}, C = {c}: K participants an iteration, equal samples")
  k = [r for r in rows if r["group"] == "devices"][0]["clients_per_round"]
  plot_curves(os.path.join(base, name, f"{name}_devices.png"),
              [r for r in curves if r["group"] != "K" and r["clients_per_round"] == k
               or r["group"] == "K" and r["clients_per_round"] == k], "devices",
              f"{args.setting}, C = {c}, K = {k}: devices and a deadline")
  return rows


if __name__ == "__main__":
  main()
