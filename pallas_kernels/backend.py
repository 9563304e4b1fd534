"""Which implementation runs `quantized_matmul`, and the Triton deprecation notice.

Implementations: `triton` (Pallas kernels compiled through Triton; GPU), `interpret` (the same
kernels in Pallas' interpreter; CPU tests), `xla` (dequantize the bucket, then XLA's dot; CPU and
the fallback for layouts the kernels do not cover). `auto` picks `triton` on GPU, else `xla`,
unless `set_default` named another implementation (train.py / eval.py: `config.model.kernels`).
A Mosaic GPU implementation would be one more name here.

JAX >= 0.11 deprecates Pallas' Triton backend with a warning at every kernel; we replace it with a
single logged line the first time a Triton kernel is built.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import jax

Backend = Literal["auto", "triton", "interpret", "xla"]
BACKENDS = ("auto", "triton", "interpret", "xla")
_TRITON_DEPRECATION = r".*Triton backend is deprecated.*"
_notified = False
_default = "auto"


def set_default(backend: str) -> None:
  """What `auto` means from now on, for functions traced afterwards ('auto' restores it)."""
  global _default
  if backend not in BACKENDS:
    raise ValueError(f"unknown kernel backend {backend!r}: use one of {BACKENDS}.")
  _default = backend


def resolve(backend: str) -> str:
  """The concrete implementation for `backend`."""
  if backend not in BACKENDS:
    raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}.")
  if backend == "auto" and _default != "auto":
    backend = _default
  if backend == "auto":
    return "triton" if jax.default_backend() == "gpu" else "xla"
  if backend == "triton":
    _notify_triton()
  return backend


def _notify_triton() -> None:
  global _notified
  if _notified:
    return
  _notified = True
  warnings.filterwarnings("ignore", message=_TRITON_DEPRECATION)
  logging.getLogger("lowra_jax").info(
    "quantized_matmul uses Pallas' Triton backend (deprecated in JAX >= 0.11 in favour of "
    "Mosaic GPU; supported here until a Mosaic GPU kernel lands)."
  )
