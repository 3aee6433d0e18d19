"""Transformers in split learning (issue 35): the eight algorithms on a split ViT, split
LoRA fine-tuning of a pretrained byte LM, and the inversion attack on the ViT's tokens.

    python experiments/transformers.py vit     # 16 runs of 250 iterations, 3 seeds: ~4 h
    python experiments/transformers.py lora    # pretraining + 19 runs of 300: ~3.5 h
    python experiments/transformers.py vit --quick                        # minutes
    python experiments/transformers.py lora --quick
    python experiments/transformers.py lora --replot   # the plots from the CSV so far

`vit`: every algorithm on CIFAR-10 with the split ViT of `configs/cifar_vit.py`, C = 10,
IID and Dirichlet(0.3), trained from scratch (`common.cifar_vit`: 5,000 train images held
out, the rates dropped x0.1 at 80 %); each run is attacked as soon as it is trained
(`--attack_variants`, default psl, sfl_v2, locfedmix, sl) by `lfmjax.attack`'s inverse
network on the smashed tokens, trained on the held-out images (privacy.py's `attacked`).

`lora`: the byte LM (`common.kjv_lm`, configs/text_lm.py) pretrained centrally on the
16 public books no client holds (PSL with C = 1), saved, then fine-tuned split by the 10
clients on their 50 books: PSL, SFL-V1, SFL-V2 and LocFedMix-SL with LoRA of each rank in
`--ranks` (q/k/v/out of every block on both segments, alpha = 2 r, the backbone frozen
and held once), with full fine-tuning (every parameter), with local-only training (each
client fine-tunes the whole pretrained model on its own books alone: SFL-V1 without
FedAvg, evaluated client by client), with the pretrained backbone as it is (one step at
a rate of 1e-12) and with the model trained from scratch. Test perplexity (per byte, on
every book's last 10 % of windows) against the bytes communicated and the simulated latency.

Every run is `lfmjax.train.train_and_evaluate` in its own workdir named by its config
(`common.run_all`), so a killed script resumes each run from its last checkpoint and a
finished run is read back, not redone. Writes `results/transformers_<part>/`: the CSV,
the plots, and the attack's report beside each attacked run.
"""
from __future__ import annotations

import argparse
import copy
import os

import common
import privacy

VIT_SETTINGS = ("cifar_vit_iid", "cifar_vit_dir03")
ATTACKED = ("psl", "sfl_v2", "locfedmix", "sl")
LORA_ALGORITHMS = ("psl", "sfl_v1", "sfl_v2", "locfedmix")
RANKS = (2, 8, 32)
PRETRAIN_ITERATIONS = 2000
ROOT = os.path.dirname(common.HERE)


def flags() -> argparse.ArgumentParser:
  p = common.common_flags(__doc__.splitlines()[0])
  p.add_argument("part", choices=("vit", "lora"))
  p.add_argument("--clients", type=int, default=None, help="default 10 (2 with --quick)")
  p.add_argument("--algorithms", default=None, help="comma-separated (default: the part's)")
  p.add_argument("--ranks", default=",".join(map(str, RANKS)), help="LoRA ranks")
  p.add_argument("--pretrain_iterations", type=int, default=PRETRAIN_ITERATIONS)
  p.add_argument("--attack_variants", default=",".join(ATTACKED),
                 help="vit: algorithms whose runs are attacked ('' for none)")
  p.add_argument("--attack_steps", type=int, default=500, help="the inverse network's steps")
  p.add_argument("--attack_hidden", type=int, default=32, help="its width")
  p.add_argument("--seq_len", type=int, default=64,
                 help="lora: bytes a window (configs/text_lm.py: 128; 64 for the CPU budget)")
  p.add_argument("--batch", type=int, default=8,
                 help="lora: windows a client an iteration (configs/text_lm.py: 16)")
  p.add_argument("--replot", action="store_true",
                 help="redraw the part's plots from its CSV (as far as it goes); trains nothing")
  p.set_defaults(eval_every=50, eval_clients=2)
  return p


def results_name(args) -> str:
  """The part's results directory and CSV stem: transformers_<part>[_quick]."""
  return f"transformers_{args.part}" + ("_quick" if args.quick else "")


def tiny(config) -> None:
  """--quick: a model small enough for minutes on a CPU."""
  config.model_overrides.width = 16
  config.model_overrides.depth = 2
  config.model_overrides.heads = 2
  config.model_overrides.mlp_dim = 32
  config.model_overrides.cut = 1
  if config.dataset.startswith("kjv"):
    config.input.seq_len = 32
  config.eval_chunk = 64
  config.eval_every = config.checkpoint_every = max(1, config.num_iterations // 2)


def configured(args, setting: str, algorithm: str, clients: int, iterations: int):
  a = copy.copy(args)
  a.setting = setting
  config = common.make_config(a, algorithm, clients, iterations)
  if config.dataset.startswith("kjv"):
    config.input.seq_len = args.seq_len
    config.batch_size = args.batch
  if args.quick:
    tiny(config)
  return config


# ---------------------------------------------------------------------------- vit

def vit_runs(args) -> list[common.Run]:
  iterations = args.iterations or (4 if args.quick else 250)
  clients = args.clients or (2 if args.quick else 10)
  algorithms = args.algorithms.split(",") if args.algorithms else common.ALGORITHMS
  runs = []
  for setting in VIT_SETTINGS:
    for algorithm in algorithms:
      config = configured(args, setting, algorithm, clients, iterations)
      runs.append(common.Run(f"{setting} {algorithm}", {
          "setting": setting, "algorithm": algorithm, "clients": clients}, config))
  return runs


def vit(args) -> list[dict]:
  name, base = results_name(args), args.out or common.RESULTS
  settings = privacy.attack_settings(args)
  attacked = {a for a in args.attack_variants.split(",") if a}
  trained, rows = [], []
  for run in vit_runs(args):
    (row,) = common.run_all(name, [run], args.out, csv_name=f"{name}_runs", keep=trained)
    trained.append(row)
    if run.labels["algorithm"] in attacked and run.labels["setting"] == VIT_SETTINGS[0]:
      workdir = os.path.normpath(os.path.join(base, name, row["workdir"]))
      report, how = privacy.attacked(run.config, workdir, settings,
                                     log=lambda *a: print(*a, flush=True))
      row = {**row, **{k: round(report[k], 4) for k in privacy.SCORES},
             **{f"{k}_std": round(report[f"{k}_std"], 4) for k in privacy.SCORES},
             "attacked_lowers": len(report["targets"]), "attack_s": report["attack_s"],
             **how}
    rows.append(row)
    common.write_csv(os.path.join(base, name, f"{name}.csv"), rows)
  plot_vit(os.path.join(base, name), name, rows)
  return rows


def plot_vit(root: str, name: str, rows: list[dict]) -> None:
  """Final test accuracy of each algorithm, IID beside Dirichlet(0.3), with the spread
  over seeds."""
  algorithms = list(dict.fromkeys(r["algorithm"] for r in rows))
  with common.figure(os.path.join(root, f"{name}.png"), figsize=(8, 4)) as (fig, ax):
    width = 0.8 / len(VIT_SETTINGS)
    for i, setting in enumerate(VIT_SETTINGS):
      by = {r["algorithm"]: r for r in rows if r["setting"] == setting}
      if not by:  # a split not run yet: no empty legend entry
        continue
      xs = [j + i * width for j, a in enumerate(algorithms) if a in by]
      ys = [float(by[a]["test_accuracy"]) for a in algorithms if a in by]
      es = [float(by[a]["test_accuracy_std"]) for a in algorithms if a in by]
      ax.bar(xs, ys, width, yerr=es, capsize=2, label=setting)
    ax.set_xticks([j + width * (len(VIT_SETTINGS) - 1) / 2 for j in range(len(algorithms))],
                  algorithms, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"split ViT on CIFAR-10, C = {rows[0]['clients']}, from scratch", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


# --------------------------------------------------------------------------- lora

def pretrain_run(args) -> common.Run:
  """Centralised pretraining on the public books: PSL with one client holding them all."""
  config = configured(args, "kjv_lm", "psl", 1,
                      4 if args.quick else args.pretrain_iterations)
  config.dataset = "kjv_public"
  config.partition = "iid"
  config.batch_size = 64
  config.num_seeds = 1  # one backbone for every fine-tuning run
  if not args.quick:
    config.eval_every = config.checkpoint_every = 200
  return common.Run("pretrain", {"variant": "pretrain", "algorithm": "psl", "rank": "",
                                 "clients": 1}, config)


def lora_runs(args, backbone: str) -> list[common.Run]:
  iterations = args.iterations or (4 if args.quick else 300)
  clients = args.clients or (2 if args.quick else 10)
  algorithms = args.algorithms.split(",") if args.algorithms else LORA_ALGORITHMS
  ranks = [int(r) for r in args.ranks.split(",") if r]
  runs = []

  def add(variant, algorithm, rank, pretrained=True, **fields):
    config = configured(args, "kjv_lm", algorithm, clients, iterations)
    if pretrained:  # relative to the repository (main's working directory): one digest
      config.pretrained = (os.path.relpath(backbone, ROOT)
                           if backbone.startswith(ROOT + os.sep) else backbone)
    config.lora.rank = rank
    config.lora.alpha = 2.0 * rank if rank else config.lora.alpha
    config.lora.segments = "both"
    for field, value in fields.items():
      config[field] = value
    runs.append(common.Run(f"{variant} {algorithm}" + (f" r={rank}" if rank else ""), {
        "variant": variant, "algorithm": algorithm, "rank": rank or "",
        "clients": clients}, config))

  for algorithm in algorithms:
    for rank in ranks:
      add("lora", algorithm, rank)
    add("full", algorithm, 0)
  add("local_only", "sfl_v1", 0, fedavg=False)
  # One Adam step at 1e-12 from lora_b = 0: the backbone as pretrained, evaluated.
  add("pretrained_as_is", "psl", ranks[0], num_iterations=1, client_lr=1e-12, eval_every=1,
      checkpoint_every=1)
  add("scratch", "locfedmix", 0, pretrained=False)
  return runs


def lora(args) -> list[dict]:
  name, base = results_name(args), args.out or common.RESULTS
  pre = pretrain_run(args)
  (pre_row,) = common.run_all(name, [pre], args.out, csv_name=f"{name}_pretrain")
  backbone = os.path.normpath(os.path.join(base, name, pre_row["workdir"]))
  rows = []
  for run in lora_runs(args, backbone):
    (row,) = common.run_all(name, [run], args.out, csv_name=f"{name}_runs", keep=rows)
    row = {**row, **perplexity_columns(os.path.join(base, name, row["workdir"]))}
    if run.labels["variant"] == "local_only":  # a client holding the whole model sends nothing
      row["mib_communicated"] = 0.0
    rows.append(row)
    common.write_csv(os.path.join(base, name, f"{name}.csv"), rows)
  plot_lora(os.path.join(base, name), name, rows)
  return rows


def perplexity_columns(workdir: str) -> dict:
  """The last evaluation's test perplexity (mean over seeds, each seed's), and the
  bytes and simulated seconds at it."""
  last = common.evaluations(workdir)[-1]
  seeds = last.get("test_perplexity_seeds") or [last["test_perplexity"]]
  spread = (sum((p - last["test_perplexity"]) ** 2 for p in seeds) / len(seeds)) ** 0.5
  return {"test_perplexity": round(last["test_perplexity"], 3),
          "test_perplexity_std": round(spread, 3),
          "test_perplexity_seeds": " ".join(f"{p:.3f}" for p in seeds),
          "mib_communicated": round((last["bytes_up"] + last["bytes_down"]) / 2**20, 1),
          "simulated_s": round(last["latency_s"], 1)}


def plot_lora(root: str, name: str, rows: list[dict]) -> None:
  """Perplexity against bytes communicated and against simulated latency: a line per
  algorithm through its ranks and full fine-tuning; the baselines as marked points."""
  for x_field, xlabel, stem in (("mib_communicated", "MiB communicated (log)", "bytes"),
                                ("simulated_s", "simulated seconds (log)", "latency")):
    with common.figure(os.path.join(root, f"{name}_{stem}.png"), figsize=(7, 4.5)) as (fig, ax):
      for algorithm in dict.fromkeys(r["algorithm"] for r in rows if r["variant"] == "lora"):
        mine = [r for r in rows if r["algorithm"] == algorithm
                and r["variant"] in ("lora", "full")]
        mine.sort(key=lambda r: float(r[x_field]))
        xs = [max(float(r[x_field]), 1e-3) for r in mine]
        line, = ax.plot(xs, [float(r["test_perplexity"]) for r in mine], "o-",
                        label=algorithm, markersize=4)
        for r, x in zip(mine, xs):
          ax.annotate(f"r={r['rank']}" if r["rank"] else "full", (x, float(r["test_perplexity"])),
                      fontsize=6, color=line.get_color(), xytext=(3, 3),
                      textcoords="offset points")
      # The run from scratch sits far above the rest; drawn at the top edge with its value
      # so that the fine-tuning runs keep a readable scale.
      shown = [float(r["test_perplexity"]) for r in rows if r["variant"] != "scratch"]
      top = max(shown) + 0.1 * (max(shown) - min(shown))
      for r in rows:
        if r["variant"] in ("local_only", "pretrained_as_is", "scratch"):
          x, y = max(float(r[x_field]), 1e-3), float(r["test_perplexity"])
          label = r["variant"] if y <= top else f"{r['variant']}: {y:.2f} (off scale)"
          ax.plot([x], [min(y, top)], "kx" if y <= top else "k^")
          ax.annotate(label, (x, min(y, top)), fontsize=6, xytext=(3, -8),
                      textcoords="offset points")
      ax.set_ylim(min(shown) - 0.05 * (max(shown) - min(shown)), top * 1.005)
      ax.set_xscale("log")
      ax.set_xlabel(xlabel)
      ax.set_ylabel("test perplexity per byte (lower is better)")
      ax.set_title(f"split fine-tuning of the byte LM, C = {rows[0]['clients']}", fontsize=9)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)


def main(argv=None):
  args = flags().parse_args(argv)
  if args.out:
    args.out = os.path.abspath(args.out)
  os.chdir(ROOT)  # where the runs' relative `pretrained` paths start
  if args.replot:
    return replot(args)
  return vit(args) if args.part == "vit" else lora(args)


def replot(args) -> list[dict]:
  """The part's plots from the rows its CSV holds: the finished runs of a part that is
  still under way (the CSV grows by a row a run), or of one that is done."""
  name = results_name(args)
  root = os.path.join(args.out or common.RESULTS, name)
  rows = common.read_csv(os.path.join(root, f"{name}.csv"))
  (plot_vit if args.part == "vit" else plot_lora)(root, name, rows)
  return rows


if __name__ == "__main__":
  main()
