"""LocFedMix-SL on CIFAR-10 with 10 clients and a split ViT: patches and the first two
blocks on each client, the other four, pooling and head on the server.

    python -m lfmjax.main --config=configs/cifar_vit.py --workdir=runs/cifar_vit
    python -m lfmjax.main --config=configs/cifar_vit.py:psl --workdir=runs/cifar_vit_psl

The argument is an algorithm (`python -m lfmjax.main --list`). Smashed data: the 64
tokens of width 64 at the cut; Loc's decoder maps each token back to its patch.

Expected: not yet measured (issue 35's experiment records it in experiments/README).
"""
from lfmjax.algorithms import ALGORITHMS
from lfmjax.config import base_config


def get_config(arg: str | None = None):
  algorithm = (arg or "locfedmix").strip()
  if algorithm not in ALGORITHMS:
    raise ValueError(f"configs/cifar_vit.py:{arg}: use one of {', '.join(sorted(ALGORITHMS))}")
  c = base_config()
  c.algorithm = algorithm          # locfedmix: Loc + Fed + Mix on top of parallel SL
  c.dataset = "cifar10"            # 50,000 train / 10,000 test, 32x32x3
  c.model = "vit"                  # split ViT
  c.model_overrides.patch = 4      # 8 x 8 = 64 tokens
  c.model_overrides.width = 64     # token width
  c.model_overrides.depth = 6      # blocks in all
  c.model_overrides.heads = 4      # attention heads
  c.model_overrides.cut = 2        # blocks on the client
  c.input.normalize = "standard"   # per-channel standardisation
  c.input.mean = (0.4914, 0.4822, 0.4465)  # CIFAR-10 train mean
  c.input.std = (0.2470, 0.2435, 0.2616)   # CIFAR-10 train std
  c.num_clients = 10               # C
  c.batch_size = 32                # per client per iteration
  c.client_optimizer = "adam"      # Adam on both sides
  c.client_lr = 1e-3               # eta_c (= eta_s)
  c.num_iterations = 1000          # iterations
  c.eval_every = 250               # test evaluations
  return c
