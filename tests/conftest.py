"""The CPU test process gets 8 host devices (as XLA_FLAGS=--xla_force_host_platform_device_count=8
would), so the multi-device tests run in the same `pytest` as the rest; unsharded code still runs
on device 0. Set before any test touches a device; an explicit XLA_FLAGS device count wins."""

import os

import jax

DEVICES = 8

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  jax.config.update("jax_num_cpu_devices", DEVICES)


# The files that take longest (a minute or more each on 2 cores: train.py / eval.py children,
# module fixtures, many kernel cases), longest first. With xdist's `--dist loadfile
# --no-loadscope-reorder` (pyproject.toml) workers take whole files in collection order, so the
# long files start at once and the many short ones fill in around them, rather than one long file
# running alone at the end. Other files keep their order; without xdist the order changes nothing
# else.
LONGEST_FIRST = (
  "test_demo.py",
  "test_train.py",
  "test_quantized_matmul.py",
  "test_generate.py",
  "test_stream.py",
  "test_readme.py",
  "test_multihost.py",
  "test_lora.py",
  "test_quantize.py",
  "test_quant_stream_bench.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected
