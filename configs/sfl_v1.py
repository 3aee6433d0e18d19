"""SplitFed V1: one server copy per client, averaged with the lowers every T_c iterations.

    python -m lfmjax.main --config=configs/sfl_v1.py --workdir=runs/sfl_v1

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
  c.algorithm = "sfl_v1"
  return c
