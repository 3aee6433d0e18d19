"""LocFedMix-SL (Oh et al., WWW 2022): PSL + Loc + Fed + Mix (the same run as configs/fmnist.py).

    python -m lfmjax.main --config=configs/locfedmix.py --workdir=runs/locfedmix

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
  c.algorithm = "locfedmix"
  return c
