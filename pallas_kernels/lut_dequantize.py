"""`lut_dequantize_t(qt)`: a quantized weight as W_hat^T [N, K], rows in channel order,
written by one Pallas (Triton) launch over all its buckets.

The dense path of `quantized_matmul` (training-size M) dequantizes the packed weight once into a
transient bf16 buffer for XLA's GEMM. Dequantized by XLA, a mixed tensor's buckets come out in
bucket order and one more copy puts the rows in channel order (`row_gather`), after XLA's
concatenation of the buckets. Here program (j, r) owns channel block j (numbered over the buckets
in turn, as in `lut_matmul_buckets`) and packed rows [r * block_k, +block_k) of that bucket: it
reads the bucket as stored and looks each slab up like the LUT matmul kernels (`BucketView`),
then stores the slab transposed, [block_n, block_k], at the rows the permutation sends its
channels to. Every weight is written once, where the GEMM reads it. Programs past the packed rows
of their bucket (narrower buckets have fewer) do nothing.

`lut_dequantize_t_reference` is the same by XLA (`qtensor.dequantize_channels`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lowra_jax.quantize import dequantize_channels
from lowra_jax.quantize.qtensor import QuantizedTensor
from pallas_kernels import lut_matmul as lm

# Channels per program (it stores BLOCK_N rows x block_k columns per slab) and Triton settings.
BLOCK_N = 128
NUM_WARPS, NUM_STAGES = 4, 2
NARROW = True  # look levels up in the output dtype


def block_ks(qt: QuantizedTensor) -> tuple[int, ...] | None:
  """Each bucket's packed rows per program, or None where the kernel does not cover `qt` (no
  power-of-two block >= 16 dividing the group and `lm.block_rows`: a 3-bit bucket's second plane
  has half the rows)."""
  out = []
  for b in qt.buckets:
    if len(b.planes) != (2 if b.bits == 3 else 1):
      return None
    bk = lm.max_block_k(lm.block_rows(b), qt.group_size)
    if not bk:
      return None
    out.append(bk)
  return tuple(out)


def _kernel(*refs, layouts, block_ks, group, k, permuted, interpret):
  o_ref, (j, r) = refs[-1], (pl.program_id(0), pl.program_id(1))
  rows_ref, refs = (refs[-2], refs[:-2]) if permuted else (None, refs[:-1])

  def body(index, bucket_refs, local, offset):
    layout, bk = layouts[index], block_ks[index]
    tiles = lm.Tiles(block_n=BLOCK_N, block_k=bk, narrow=NARROW)
    n0, r0 = local * BLOCK_N, r * bk
    b = lm.bucket_view(bucket_refs, layout, group=group, n0=n0, tiles=tiles, interpret=interpret)
    n_ok = None if b.n_ok is None else lm.range_mask(n0, BLOCK_N, layout.nb, 0)  # [bn, 1]
    if rows_ref is None:
      rows = offset + n0 + jax.lax.broadcasted_iota(jnp.int32, (BLOCK_N, 1), 0)
    else:  # masked-out channels get a row past the end: no interpreter store collides there
      view = rows_ref.at[pl.ds(offset + n0, BLOCK_N), pl.ds(0, 1)]
      other = o_ref.shape[0]
      rows = plgpu.load(view) if n_ok is None else plgpu.load(view, mask=n_ok, other=other)
      rows = rows.astype(jnp.int32)

    @pl.when(r0 < layout.kp)
    def _():
      invariants, packed = b.invariants(), b.packed(r0, bk)
      for i in range(layout.slabs):
        w = b.slab(packed, i, r0, invariants, o_ref.dtype)  # [bk, bn]
        cols = r0 + i * layout.kp + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        mask = n_ok
        if layout.kp * layout.slabs != k:  # K padded to the group size: drop the padding
          mask = cols < k if mask is None else mask & (cols < k)
        plgpu.store(o_ref.at[rows, cols], w.T, mask=mask)

  lm.by_channel_block(j, layouts, BLOCK_N, refs, body)


def lut_dequantize_t(
  qt: QuantizedTensor, dtype=jnp.bfloat16, *, interpret: bool = False, out=None
) -> jax.Array:
  """W_hat^T [N, K] in `dtype`, row n = output channel n (`dequantize_channels`), one launch.

  Args:
    qt: a tensor the kernel covers (`block_ks(qt)` is not None).
    out: optional [N, K] buffer the result is written into (aliased); NaN-poison it to test
      coverage.
  """
  bks = block_ks(qt)
  if bks is None:
    raise ValueError(
      f"lut_dequantize_t covers buckets whose packed rows and group {qt.group_size} are "
      "divisible by 16; use lut_dequantize_t_reference for this tensor."
    )
  k, n = qt.shape
  checked = [lm.checked_operands(b, bk, qt.group_size) for b, bk in zip(qt.buckets, bks)]
  layouts = tuple(layout for layout, _ in checked)
  flat = [a for _, arrays in checked for a in arrays]
  if qt.perm is not None:
    flat.append(qt.perm.reshape(-1, 1))
  kernel = functools.partial(
    _kernel,
    layouts=layouts,
    block_ks=bks,
    group=qt.group_size,
    k=k,
    permuted=qt.perm is not None,
    interpret=interpret,
  )
  blocks = sum(pl.cdiv(layout.nb, BLOCK_N) for layout in layouts)
  grid = (blocks, max(layout.kp // bk for layout, bk in zip(layouts, bks)))
  tiles = lm.Tiles(block_n=BLOCK_N, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
  name = "lut_dequantize_t_" + "_".join(f"{lo.bits}bit" for lo in layouts)
  shape = jax.ShapeDtypeStruct((n, k), dtype)
  return lm.launch(kernel, tuple(flat), shape, grid, tiles, interpret, name, out)


def lut_dequantize_t_reference(qt: QuantizedTensor, dtype=jnp.bfloat16) -> jax.Array:
  """W_hat^T [N, K] by XLA."""
  return dequantize_channels(qt, dtype)
