"""SGLR (Pal et al. 2021): PSL + SplitLr + GradMix over a fraction phi of clients.

    python -m lfmjax.main --config=configs/sglr.py --workdir=runs/sglr

Fashion-MNIST, 10 clients, bench_cnn, Adam 1e-3: configs/fmnist.py with only the
algorithm changed, so runs of configs/<algorithm>.py differ in one field. Measured
accuracy after the same short run for every algorithm: experiments/README.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import fmnist  # noqa: E402  (the base this variant overrides)


def get_config():
  c = fmnist.get_config()
  c.algorithm = "sglr"
  c.gradmix_fraction = 0.5         # phi: half the clients get their mean gradient
  c.server_lr_exponent = 0.0       # SplitLr alpha_lr: eta_s = eta_c * C ** alpha_lr (SPEC default 0)
  return c
