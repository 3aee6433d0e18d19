"""Eight fake CPU devices for every test (multi-device code is tested on them; runs that
are not about devices pin `num_devices=1`), and shared helpers (`from test_round import
...`). The flag must be set before JAX is imported; subprocesses inherit it."""
import os
import sys

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

sys.path.insert(0, os.path.dirname(__file__))
