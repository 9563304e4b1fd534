"""What a run reports about itself: bits per parameter of its base and peak device memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lowra_jax import lora
from lowra_jax.base import Prepared
from lowra_jax.quantize import BitsPerParam, bits_per_param
from lowra_jax.run_config import DTYPES

DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32"}  # short names of `DTYPES` for tables

def base_bits(prep: Prepared) -> BitsPerParam | None:
  """Code and total bits per quantized weight; None when the base is dense (method 'none')."""
  return bits_per_param(prep.frozen["quant"]) if prep.frozen["quant"] else None


def correction_bits(prep: Prepared) -> float:
  """Bits per quantized weight that frozen LoftQ corrections (init 'loftq_frozen', float32
  [in, r] + [r, out] per adapted module) add to the frozen base; 0.0 without any. Not part of
  `base_bits`' total, which counts the quantized tensors."""
  bits = base_bits(prep)
  _, corrections = lora.split_corrections(prep.frozen["params"])
  stored = sum(32 * (a.size + b.size) for a, b in corrections.values())
  return stored / bits.num_params if bits is not None and stored else 0.0


def bits_columns(bits: BitsPerParam | None, dtype: str) -> tuple[str, str]:
  """(code bits, total bits) as table text; the dtype's width for a dense base."""
  if bits is None:
    width = str(jnp.dtype(DTYPES[dtype]).itemsize * 8)
    return width, width
  return f"{bits.code:.3f}", f"{bits.total:.3f}"


def peak_memory_bytes() -> int | None:
  """Peak bytes in use on this process's first device so far (None where the backend does not
  say)."""
  return (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def peak_memory() -> str:
  """`peak_memory_bytes` as text ('n/a' where the backend does not say)."""
  peak = peak_memory_bytes()
  return f"{peak / 1e9:.2f} GB" if peak else "n/a on this backend"
