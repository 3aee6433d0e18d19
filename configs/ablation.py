"""Ablations of LocFedMix-SL: any subset of {Loc, Fed, Mix} on top of parallel SL.

    python -m lfmjax.main --config=configs/ablation.py:loc,fed --workdir=runs/locfed
    python -m lfmjax.main --config=configs/ablation.py:mix     --workdir=runs/mix_psl
    python -m lfmjax.main --config=configs/ablation.py:        --workdir=runs/psl

The argument after the colon names the components switched on (comma-separated; empty
for plain PSL); everything else is configs/fmnist.py. Same as
`--config=configs/fmnist.py --config.algorithm=psl --config.loc=True ...`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import fmnist  # noqa: E402  (the base this variant overrides)

COMPONENTS = ("loc", "fed", "mix")


def get_config(components: str = ""):
  chosen = [c.strip() for c in (components or "").split(",") if c.strip()]
  unknown = sorted(set(chosen) - set(COMPONENTS))
  if unknown:
    raise ValueError(f"configs/ablation.py:{components}: unknown component(s) "
                     f"{', '.join(unknown)}; use a subset of {', '.join(COMPONENTS)}")
  c = fmnist.get_config()
  c.algorithm = "psl"              # the base all three components are added to
  for name in COMPONENTS:
    setattr(c, name, name in chosen)  # Loc / Fed / Mix switches
  return c
