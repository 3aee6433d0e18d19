"""SIGINT before the training loop, at the command line: one line and status 130.

The training loop catches SIGINT itself and saves a checkpoint first
(`run.loop.signals_caught`). Outside it, Python's KeyboardInterrupt can be raised inside
a callback that swallows it (JAX's garbage-collection hook, while JAX imports), and the
run would go on as if nothing happened, so the CLI exits at once instead. Only the
standard library here: this module is imported before JAX.
"""
import os
import signal
import sys


def interrupted_outside_loop(signum, frame):
  print("error: interrupted (SIGINT) outside the training loop; checkpoints already in the "
        "workdir are kept", file=sys.stderr, flush=True)
  os._exit(128 + signal.SIGINT)


def install() -> None:
  signal.signal(signal.SIGINT, interrupted_outside_loop)


def starting_cli() -> bool:
  """Whether `python -m lfmjax.main` is importing the package: while -m locates the
  module, sys.argv[0] is '-m' (Python's documented behaviour)."""
  return sys.argv[:1] == ["-m"] and any("lfmjax" in a for a in sys.orig_argv[:4])
