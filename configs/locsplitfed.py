"""LocSplitFed (Han et al. 2021): clients learn from a local aux head, no gradient download.

    python -m lfmjax.main --config=configs/locsplitfed.py --workdir=runs/locsplitfed

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
  c.algorithm = "locsplitfed"
  c.local_ce_weight = 1.0          # the aux head's CE is the clients' whole loss
  return c
