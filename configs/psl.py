"""Parallel SL (PSL) on Fashion-MNIST with 10 clients: LocFedMix-SL without Loc, Fed, Mix.

    python -m lfmjax.main --config=configs/psl.py --workdir=runs/psl

Same data, model, optimiser and iterations as configs/fmnist.py, so the two runs differ
only in the algorithm.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import fmnist  # noqa: E402  (the base this variant overrides)


def get_config():
  c = fmnist.get_config()
  c.algorithm = "psl"              # all three components off
  return c
