"""Eight fake CPU devices for every test (multi-device code is tested on them; runs that
are not about devices pin `num_devices=1`), and shared helpers (`from test_round import
...`). The flag must be set before JAX is imported; subprocesses inherit it.

JAX's persistent compilation cache, in a fresh directory per test session, lets the
CLI's subprocesses and repeated configs reuse compiled programs (the same executables,
so the same numbers): test_cli.py took 126 s with it against 150 s without."""
import os
import sys
import tempfile

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lfmjax-test-jax-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

sys.path.insert(0, os.path.dirname(__file__))
