"""The CPU test process gets 8 host devices (as XLA_FLAGS=--xla_force_host_platform_device_count=8
would), so the multi-device tests run in the same `pytest` as the rest; unsharded code still runs
on device 0. Set before any test touches a device; an explicit XLA_FLAGS device count wins.

Compilation dominates the entry points' runs on CPU, and the subprocess tests compile the same
programs again (train.py, then eval.py or a resumed train.py on the same model). So the session's
subprocesses share one persistent compilation cache, through the environment they inherit, in a new
temporary directory: every session starts cold and leaves nothing behind. A cache hit returns the
executable XLA would compile again. The test process itself does not use it: its many small
compilations rarely repeat a program, and keying each one costs more than the hits save (~10 % of
test_quantized_matmul.py). An explicit JAX_COMPILATION_CACHE_DIR wins.
"""

import atexit
import os
import shutil
import tempfile

import jax

DEVICES = 8

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  jax.config.update("jax_num_cpu_devices", DEVICES)

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _cache = tempfile.mkdtemp(prefix="lowra-jax-test-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ |= {
    "JAX_COMPILATION_CACHE_DIR": _cache,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }
