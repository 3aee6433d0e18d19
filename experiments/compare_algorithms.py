"""The same short run for every SL algorithm: accuracy, bytes and simulated latency.

    python experiments/compare_algorithms.py                       # Fashion-MNIST
    python experiments/compare_algorithms.py --dataset cifar10 --iterations 100

Each algorithm runs `lfmjax.train.train_and_evaluate` (what the CLI runs) on the same
data, model, seed and optimiser; only `config.algorithm` differs. Writes
`experiments/results/compare_<dataset>.csv` and `.md`.
"""
from __future__ import annotations

import argparse
import csv
import os

from lfmjax import algorithms
from lfmjax.config import base_config
from lfmjax.train import train_and_evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def make_config(args, algorithm: str):
  c = base_config()
  c.algorithm = algorithm
  c.dataset = args.dataset
  c.data_dir = args.data_dir
  c.model = args.model
  c.num_clients = args.clients
  c.batch_size = args.batch
  c.client_optimizer = "adam"
  c.client_lr = 1e-3
  c.num_iterations = args.iterations
  c.eval_every = args.iterations
  c.seed = args.seed
  if args.dataset == "cifar10":
    c.input.normalize = "standard"
    c.input.mean, c.input.std = CIFAR_STATS
  return c


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--dataset", default="fashion_mnist")
  p.add_argument("--data_dir", default=None)
  p.add_argument("--model", default="bench_cnn")
  p.add_argument("--clients", type=int, default=10)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--iterations", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--algorithms", default=",".join(algorithms.ALGORITHMS))
  args = p.parse_args()

  rows = []
  for algorithm in args.algorithms.split(","):
    summary = train_and_evaluate(make_config(args, algorithm), None, quiet=True)
    n = summary["iterations"]
    rows.append({
        "algorithm": algorithm,
        "test_accuracy": round(100 * summary["final_test_accuracy"], 2),
        "up_bytes_per_iteration": summary["bytes_up"] // n,
        "down_bytes_per_iteration": summary["bytes_down"] // n,
        "simulated_s_per_iteration": round(summary["latency_s"] / n, 4),  # incl. FedAvg
    })
    print(rows[-1], flush=True)

  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  stem = os.path.join(HERE, "results", f"compare_{args.dataset}")
  with open(stem + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  setting = (f"{args.dataset}, {args.model}, C={args.clients}, B={args.batch}, Adam 1e-3, "
             f"{args.iterations} iterations, seed {args.seed}, 2-core CPU")
  with open(stem + ".md", "w") as f:
    f.write(f"Setting: {setting}. Bytes are totals over all clients, averaged per iteration "
            f"(FedAvg included); simulated time uses lfmjax's default rates.\n\n")
    f.write("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n")
    for row in rows:
      f.write("| " + " | ".join(str(v) for v in row.values()) + " |\n")
  print(open(stem + ".md").read())


if __name__ == "__main__":
  main()
