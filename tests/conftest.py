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
# The suite's programs are tiny: compiling them dominates, running them does not. LLVM's
# cheaper code generation (the same HLO; floats may differ from the default build in the
# last bit, ~6e-8 after three rounds, so a bit-for-bit test compares runs made under the
# same flags, as every test here does): the suite with issue 35's tests ran in 708 s on
# 2 cores; CI took 850 s without them and without these flags. LFMJAX_TEST_FULL_OPT=1
# keeps XLA's defaults.
_CHEAP = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
if not os.environ.get("LFMJAX_TEST_FULL_OPT") and "xla_backend_optimization_level" not in \
    os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] = " ".join([os.environ["XLA_FLAGS"], *_CHEAP])

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lfmjax-test-jax-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

sys.path.insert(0, os.path.dirname(__file__))
