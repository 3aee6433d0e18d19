"""What a run's numbers were computed on, kept in its summary (metrics.jsonl).

XLA compiles for the host: on a CPU the generated code, and so the rounding of every
reduction, depends on the instruction sets it finds (and XLA_FLAGS such as
`--xla_cpu_max_isa`). A run is reproduced bit for bit on the same software and the same
kind of CPU, and to within training noise elsewhere; the record says which was which.
"""
from __future__ import annotations

import os
import platform

import jax

# The instruction sets that change XLA's CPU code, from /proc/cpuinfo's flags.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")


def cpu_description() -> dict:
  """The CPU's name, family and model, and which of ISA_FLAGS it has (Linux; else
  what `platform` knows)."""
  info: dict = {"cpu": platform.processor() or platform.machine()}
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read().split("\n\n")[0].splitlines()
  except OSError:
    return info
  fields = {k.strip(): v.strip() for k, _, v in (l.partition(":") for l in lines)}
  info["cpu"] = fields.get("model name", info["cpu"])
  info["cpu_family_model"] = f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}"
  flags = set(fields.get("flags", "").split())
  info["isa"] = [f for f in ISA_FLAGS if f in flags]
  return info


def environment() -> dict:
  """Software versions, the devices, the CPU and XLA's flags."""
  import flax
  import jaxlib
  import optax
  from lfmjax import __version__
  devices = jax.devices()
  return {"lfmjax": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "python": platform.python_version(), "platform": devices[0].platform,
          "device_kind": devices[0].device_kind, "devices": len(devices),
          **cpu_description(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
