"""LocFedMix-SL on Fashion-MNIST with 10 clients: the demo run.

    python -m lfmjax.main --config=configs/fmnist.py --workdir=runs/fmnist

Expected: about 87-88 % test accuracy after 600 iterations (87.72 % measured), in about
2.5 minutes of training on 2 CPU cores (bench_cnn on 28x28x1, Adam 1e-3, batch 32 per client).
"""
from lfmjax.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "locfedmix"        # Loc + Fed + Mix on top of parallel SL
  c.dataset = "fashion_mnist"      # the original idx files (see README: data)
  c.model = "bench_cnn"            # the speed benchmark's CNN, at 28x28x1
  c.num_clients = 10               # C
  c.batch_size = 32                # per client per iteration
  c.client_optimizer = "adam"      # Adam on both sides
  c.client_lr = 1e-3               # eta_c (= eta_s)
  c.num_iterations = 600           # 3.2 epochs of each client's 6,000 samples
  c.eval_every = 100               # six evaluations on the 10,000 test images
  return c
