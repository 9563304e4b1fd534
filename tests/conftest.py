"""The CPU test process gets 8 host devices (as XLA_FLAGS=--xla_force_host_platform_device_count=8
would), so the multi-device tests run in the same `pytest` as the rest; unsharded code still runs
on device 0. Set before any test touches a device; an explicit XLA_FLAGS device count wins."""

import os

import jax

DEVICES = 8

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  jax.config.update("jax_num_cpu_devices", DEVICES)
