"""LocFedMix-SL on CIFAR-10 with 10 clients (VGG-style model, IID).

    python -m lfmjax.main --config=configs/cifar.py --workdir=runs/cifar

Expected: 62.41 % test accuracy after the 1,000 iterations (49.2 % at 250, 53.8 % at
500, 60.2 % at 750), measured on 2 CPU cores in 33 minutes (0.5-0.6 it/s; the machine
was shared with other jobs). Far from converged: on a GPU raise num_iterations.
Data: the official python archive, an image-folder tree or tarball, or tfds (README).
"""
from lfmjax.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "locfedmix"        # Loc + Fed + Mix on top of parallel SL
  c.dataset = "cifar10"            # 50,000 train / 10,000 test, 32x32x3
  c.model = "vgg"                  # VGG-style, two conv blocks on each client
  c.input.normalize = "standard"   # per-channel standardisation
  c.input.mean = (0.4914, 0.4822, 0.4465)  # CIFAR-10 train mean
  c.input.std = (0.2470, 0.2435, 0.2616)   # CIFAR-10 train std
  c.num_clients = 10               # C
  c.batch_size = 32                # per client per iteration
  c.client_optimizer = "adam"      # Adam on both sides
  c.client_lr = 1e-3               # eta_c (= eta_s)
  c.num_iterations = 1000          # 6.4 epochs of each client's 5,000 samples
  c.eval_every = 250               # test evaluations
  return c
