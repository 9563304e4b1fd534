"""`row_gather(src, idx)` = src[idx]: whole rows of a 2-D array copied in a new order (Pallas Triton).

The dense path of a mixed-precision `quantized_matmul` puts bucket-order rows back in channel
order (rows of the transient weight W_hat^T [N, K], or of the output y^T [N, M]). XLA's GPU
gather copies such rows at ~0.6 TB/s on the H200; this kernel at ~3.9 TB/s, the copy bandwidth
(docs/results.md). Program (i, j) writes output rows [i * block_rows, +block_rows) x columns
[j * block_cols, +block_cols): it reads src through a flat view, so each of its loads is a
gather of whole contiguous row segments. No masking: the blocks must divide the array
(`block_shape`), callers fall back to `row_gather_reference` otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK_ROWS = 16
MAX_BLOCK_COLS = 512


def block_shape(rows: int, cols: int) -> tuple[int, int] | None:
  """(block_rows, block_cols) tiling [rows, cols] exactly, or None (use the reference)."""
  if rows % BLOCK_ROWS:
    return None
  bc = MAX_BLOCK_COLS
  while bc >= 16 and cols % bc:
    bc //= 2
  return (BLOCK_ROWS, bc) if bc >= 16 else None


def _kernel(idx_ref, src_ref, o_ref, *, cols: int, block_rows: int, block_cols: int):
  rows = idx_ref[pl.ds(pl.program_id(0) * block_rows, block_rows)]
  offsets = pl.program_id(1) * block_cols + jax.lax.broadcasted_iota(jnp.int32, (1, block_cols), 1)
  o_ref[...] = src_ref[rows[:, None] * cols + offsets]


def row_gather(src: jax.Array, idx: jax.Array, *, interpret: bool = False) -> jax.Array:
  """src [R, C] (any dtype), idx int32 [R2] with values in [0, R) -> src[idx] [R2, C].

  R2 must be a multiple of BLOCK_ROWS and C of a power of two >= 16 (see `block_shape`);
  R * C < 2**31.
  """
  shape = block_shape(idx.shape[0], src.shape[1])
  if shape is None or src.size >= 2**31:
    raise ValueError(f"row_gather: no exact tiling of {idx.shape[0]} x {src.shape[1]}.")
  (br, bc), cols = shape, src.shape[1]
  return pl.pallas_call(
    lambda i, s, o: _kernel(i, s, o, cols=cols, block_rows=br, block_cols=bc),
    grid=(idx.shape[0] // br, cols // bc),
    in_specs=[pl.no_block_spec, pl.no_block_spec],
    out_specs=pl.BlockSpec((br, bc), lambda i, j: (i, j)),
    out_shape=jax.ShapeDtypeStruct((idx.shape[0], cols), src.dtype),
    interpret=interpret,
    name="row_gather",
    compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=1),
  )(idx.astype(jnp.int32), src.reshape(-1))


def row_gather_reference(src: jax.Array, idx: jax.Array) -> jax.Array:
  """src[idx] by XLA."""
  return src[idx]
