"""Privacy: what each algorithm leaks, and what the defences cost (issue 17).

    python experiments/privacy.py --setting sglr_resnet16 --clients 10 \
        --iterations 625 --eval_every 125 --eval_clients 2       # hours
    python experiments/privacy.py --quick                         # minutes

Every run is trained as the other experiments train it (its workdir named by its config,
so the eight algorithms' runs are shared with scalability.py's at the same C), then
attacked at its last checkpoint by `lfmjax.attack` (an honest-but-curious server's
inverse network, trained on train images no client holds, scored on test images).
A finished run whose checkpoints are gone (they are not committed; a new machine has
none) is trained again in `<workdir>/retrained` and attacked there; its row gives the
retrained run's accuracy (the attacked model's), the committed one, and whether they are
equal bit for bit (on another kind of CPU they are not: BUILD.md).
Runs:
  * the eight algorithms;
  * LocFedMix-SL with the Loc weight mu in {0, 0.5, 1, 2} (mu = 1 is the preset);
  * LocFedMix-SL with each defence at three strengths: Gaussian noise at a target SNR,
    NoPeek's dCor weight, and k-bit quantisation of the smashed data.
Writes `results/privacy_<setting>/privacy_<setting>.csv` (accuracy, PSNR, SSIM, MSE,
reconstruction cross-entropy and dCor, each mean and spread over the attacked lowers)
and the frontier plots `privacy_<setting>_psnr.png` and `..._dcor.png`.
"""
from __future__ import annotations

import os

import attacked_runs
import common
from lfmjax import attack
from lfmjax.checkpoint import checkpoint_steps

ALGORITHMS = ("sl", "psl", "sfl_v1", "sfl_v2", "locsplitfed", "locfedmix", "sglr", "mix2sfl")
MU = (0.0, 0.5, 2.0)                 # and 1.0, the locfedmix run
DEFENCES = {                         # privacy.FIELD: three strengths, weak to strong
    "noise_snr_db": (20.0, 10.0, 0.0),
    "nopeek_weight": (0.3, 1.0, 3.0),
    "quantize_bits": (8, 4, 2),
}


def make_runs(args) -> list[common.Run]:
  iterations = args.iterations or (4 if args.quick else 625)
  clients = args.clients or (2 if args.quick else 10)
  runs = []

  def add(name, labels, algorithm, **privacy):
    config = common.make_config(args, algorithm, clients, iterations)
    if "mu" in labels:
      config.local_loss_weight = labels["mu"]
    for field, value in privacy.items():
      config.privacy[field] = value
    runs.append(common.Run(name, {"variant": name, "algorithm": algorithm,
                                  "clients": clients, **labels}, config))

  for algorithm in ALGORITHMS:
    add(algorithm, {}, algorithm)
  for mu in MU:
    add(f"locfedmix_mu{mu:g}", {"mu": mu}, "locfedmix")
  for field, strengths in DEFENCES.items():
    for value in strengths:
      add(f"locfedmix_{field}_{value:g}", {"defence": field, "strength": value}, "locfedmix",
          **{field: value})
  if args.variants:
    keep = set(args.variants.split(","))
    runs = [r for r in runs if r.name in keep]
  return runs


def attack_settings(args):
  settings = attack.attack_config()
  if args.quick:
    settings.update(num_steps=10, batch_size=16, hidden=8, num_test=50, aux_size=50,
                    grid=4, dcor_size=50)
  else:
    settings.update(num_steps=args.attack_steps, hidden=args.attack_hidden,
                    batch_size=32, num_test=1000, aux_size=5000)
  return settings


def attacked(config, workdir: str, settings, log=print) -> tuple[dict, dict]:
  """The run's attack report (made now unless kept, so the script resumes where it
  stopped) and how the attacked run was had: its own, or trained again."""
  how = {"committed_accuracy": "", "retrained": False, "bit_equal": "",
         "retrain_max_diff": ""}
  report = attacked_runs.kept_report(workdir, "attack.json", settings,
                                     config.num_iterations)
  if report is None and not checkpoint_steps(workdir):
    workdir, how = attacked_runs.retrained(config, workdir, log)
    report = attacked_runs.kept_report(workdir, "attack.json", settings,
                                       config.num_iterations)
  if report is None:
    report = attack.run_attack(workdir, settings, log=log)
  return report, how


SCORES = ("psnr", "ssim", "mse", "cross_entropy", "dcor")


def main(argv=None):
  args = attacked_runs.attack_flags(__doc__.splitlines()[0]).parse_args(argv)
  name = f"privacy_{args.setting}" + ("_quick" if args.quick else "")
  base = args.out or common.RESULTS
  if args.replot:
    rows = common.read_csv(os.path.join(base, name, f"{name}.csv"))
    plot_frontiers(base, name, rows, args.setting)
    return rows
  runs = make_runs(args)
  settings = attack_settings(args)
  trained, rows = [], []
  # Each run is attacked as soon as it is trained: checkpoints are not committed, so a
  # run left unattacked when the machine changes would have to be trained again.
  for run in runs:
    (row,) = common.run_all(name, [run], args.out, csv_name=f"{name}_runs",
                            extend_from=args.extend_from, keep=trained)
    trained.append(row)
    report, how = attacked(run.config, os.path.normpath(os.path.join(base, name, row["workdir"])),
                           settings, log=lambda *a: print(*a, flush=True))
    rows.append({**row, **{k: round(report[k], 4) for k in SCORES},
                 **{f"{k}_std": round(report[f"{k}_std"], 4) for k in SCORES},
                 "attacked_lowers": len(report["targets"]),
                 "attack_s": report["attack_s"], **how})
    common.write_csv(os.path.join(base, name, f"{name}.csv"), rows)
  plot_frontiers(base, name, rows, args.setting)
  return rows


def plot_frontiers(base, name, rows, setting):
  for score, label in (("psnr", "attack PSNR (dB, higher leaks more)"),
                       ("dcor", "dCor(x, u) (higher leaks more)")):
    plot_frontier(os.path.join(base, name, f"{name}_{score}.png"), rows, score, label,
                  f"{setting}, C = {rows[0]['clients']}: accuracy against leakage")


def frontier_series(rows) -> tuple[list[dict], dict[str, list[tuple[str, dict]]]]:
  """The algorithms' rows, and each sweep of LocFedMix-SL as (strength label, row) in
  order from the preset (mu = 1, no defence) outwards: mu, then each defence."""
  by_name = {row["variant"]: row for row in rows}
  preset = by_name.get("locfedmix")
  algorithms = [row for row in rows if row["variant"] in ALGORITHMS]
  sweeps = {}
  mus = [(float(row["mu"]), row) for row in rows if row.get("mu") not in (None, "")]
  if preset is not None:
    mus.append((1.0, preset))
  if len(mus) > 1:
    sweeps["mu"] = [(f"{mu:g}", row) for mu, row in sorted(mus, key=lambda m: m[0])]
  for field in DEFENCES:
    points = [(f"{float(row['strength']):g}", row) for row in rows
              if row.get("defence") == field]
    if points:
      sweeps[field] = ([("off", preset)] if preset is not None else []) + points
  return algorithms, sweeps


def plot_frontier(path, rows, score, label, title):
  """Accuracy against one leakage score: a labelled point per algorithm, and a line per
  sweep of LocFedMix-SL (mu, each defence) through its preset, each point marked with its
  strength."""
  algorithms, sweeps = frontier_series(rows)

  def xy(row):
    return (float(row[score]), float(row["test_accuracy"]),
            float(row[f"{score}_std"]), float(row["test_accuracy_std"]))

  with common.figure(path, figsize=(8, 5)) as (fig, ax):
    for row in algorithms:
      x, y, dx, dy = xy(row)
      ax.errorbar(x, y, xerr=dx, yerr=dy, fmt="o", color="black", markersize=4,
                  capsize=2, elinewidth=0.6)
      ax.annotate(row["variant"], (x, y), fontsize=7, xytext=(3, 3),
                  textcoords="offset points")
    for (field, points), marker in zip(sweeps.items(), "s^vD"):
      xs, ys = zip(*[xy(row)[:2] for _, row in points])
      line, = ax.plot(xs, ys, marker=marker, markersize=4, linewidth=1,
                      label=f"locfedmix, {field}: " + ", ".join(s for s, _ in points))
      for (strength, _), x, y in zip(points, xs, ys):
        if strength != "off":
          ax.annotate(strength, (x, y), fontsize=6, color=line.get_color(),
                      xytext=(3, -8), textcoords="offset points")
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if sweeps:
      ax.legend(fontsize=7, loc="best")


if __name__ == "__main__":
  main()
