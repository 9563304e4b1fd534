"""Fused lookup-table dequant-matmul kernels for one precision bucket (Pallas, Triton backend).

One bucket of a `QuantizedTensor` holds Nb output channels at b bits (b in {1, 2, 4}): codes in one
uint8 plane P[Kp, Nb] packed planar along K (Kp = K_pad * b / 8, p = 8 / b codes per byte, byte r
holding rows r + i * Kp for i < p), per-channel tables T[2^b, Nb] (one column per channel) and
group scales S[G, Nb]:

    W[k, n] = T[code[k, n], n] * S[k // group, n]

`lut_matmul(x, ...)`   = x[M, K_pad] @ W     -> partial sums [splits, M, Nb]     (forward)
`lut_matmul_t(g, ...)` = g[M, Nb]    @ W^T   -> partial sums [splits, M, K_pad]  (input grad)
`lut_matmul_buckets` is the forward of all buckets of a mixed tensor in one launch (programs pick
their bucket by channel block), so the small buckets share the GPU instead of running in turn.
W is read only in packed form. A program loads a tile of packed rows [block_k, block_n] once and
handles each of its p row slabs; block_k divides the group size, so a slab lies in one group and
its scale row is folded into the channel's 2^b table levels ([1, block_n] vectors) before the
lookup. The lookup itself is a tree of selects on the code bits, tested in place in the packed
bytes (no shift or mask per slab). The slab then feeds the tensor cores with fp32 accumulation.
Small M gets more programs by splitting the reduction (K for the forward, N for the backward)
into partial sums that XLA adds up afterwards -- deterministic, unlike atomics; with one split the
kernel writes the result in its final dtype. Ragged M and Nb are masked in the kernel (no padding
copies); masks are only emitted where a dimension is ragged, so full tiles get vector loads.
`dequantize_reference` is the jnp equivalent of the dequantization.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lowra_jax.quantize.qtensor import select_levels


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Block sizes (powers of two), reduction splits and Triton launch settings.

  block_k counts *packed* rows per step; each step covers p = 8 / bits slabs of block_k code rows.
  splits: the reduction (K forward, N backward) is cut into this many partial sums.
  narrow: look levels up in the activation dtype instead of float32.
  """

  block_m: int = 16
  block_n: int = 64
  block_k: int = 32
  splits: int = 1
  num_warps: int = 4
  num_stages: int = 3
  narrow: bool = False


def max_block_k(kp: int, group: int) -> int:
  """Largest power of two <= 64 dividing Kp and the group size (0 if below 16: no kernel)."""
  bk = 64
  while bk >= 16 and (kp % bk or group % bk):
    bk //= 2
  return bk if bk >= 16 else 0


def _mask(offset, size, limit, axis):
  """bool [size, 1] (axis 0) or [1, size] (axis 1): offset + i < limit."""
  shape = (size, 1) if axis == 0 else (1, size)
  return offset + jax.lax.broadcasted_iota(jnp.int32, shape, axis) < limit


def _load(ref, rows, cols, mask):
  """ref[rows, cols] with masked-out elements 0; mask None loads unmasked (vectorised)."""
  if mask is None:
    return plgpu.load(ref.at[rows, cols])
  return plgpu.load(ref.at[rows, cols], mask=mask, other=0)


@dataclasses.dataclass(frozen=True)
class _Bucket:
  """One bucket's refs and static layout, as seen by a program owning channels [n0, n0 + bn)."""

  p_ref: object
  t_ref: object
  s_ref: object
  bits: int
  kp: int
  group: int
  n0: object
  bn: int
  n_ok: object  # bool [1, bn] or None (Nb a multiple of bn)
  narrow: bool

  def columns(self):
    """The 2^b table rows of these channels: list of float32 [1, bn] (load once per program)."""
    cols = pl.ds(self.n0, self.bn)
    return [_load(self.t_ref, pl.ds(j, 1), cols, self.n_ok) for j in range(self.t_ref.shape[0])]

  def packed(self, r0, bk):
    """int32 [bk, bn]: packed rows [r0, r0 + bk)."""
    return _load(self.p_ref, pl.ds(r0, bk), pl.ds(self.n0, self.bn), self.n_ok).astype(jnp.int32)

  def slab(self, packed, i, r0, columns, dtype):
    """Weights [bk, bn] in `dtype` of code rows r0 + i * kp + [0, bk) (one group)."""
    g = (r0 + i * self.kp) // self.group
    scale = _load(self.s_ref, pl.ds(g, 1), pl.ds(self.n0, self.bn), self.n_ok)
    levels = [c * scale for c in columns]
    if self.narrow:
      return select_levels(packed, [v.astype(dtype) for v in levels], i * self.bits)
    return select_levels(packed, levels, i * self.bits).astype(dtype)


def _bucket(p_ref, t_ref, s_ref, *, bits, kp, nb, group, n0, tiles):
  """The `_Bucket` view of channels [n0, n0 + block_n)."""
  n_ok = None if nb % tiles.block_n == 0 else _mask(n0, tiles.block_n, nb, 1)
  return _Bucket(p_ref, t_ref, s_ref, bits, kp, group, n0, tiles.block_n, n_ok, tiles.narrow)


def _fwd_kernel(x_ref, p_ref, t_ref, s_ref, o_ref, *, bits, kp, nb, group, tiles):
  ids = (pl.program_id(0), pl.program_id(1), pl.program_id(2))
  _fwd_body(x_ref, p_ref, t_ref, s_ref, o_ref, ids, 0, bits, kp, nb, group, tiles)


def _fwd_buckets_kernel(x_ref, *refs, layout, group, tiles):
  """Program (i, j, s) runs the bucket whose channel blocks include j (`layout`, static)."""
  o_ref, (i, j, split) = refs[-1], (pl.program_id(0), pl.program_id(1), pl.program_id(2))
  for b, (bits, kp, nb, block_k, first, offset) in enumerate(layout):
    p_ref, t_ref, s_ref = refs[3 * b : 3 * b + 3]
    last = first + pl.cdiv(nb, tiles.block_n)
    t = dataclasses.replace(tiles, block_k=block_k)
    ids = (i, j - first, split)  # read outside the branch (the interpreter needs them there)
    args = (x_ref, p_ref, t_ref, s_ref, o_ref, ids, offset, bits, kp, nb, group, t)
    pl.when((j >= first) & (j < last))(functools.partial(_fwd_body, *args))


def _fwd_body(x_ref, p_ref, t_ref, s_ref, o_ref, ids, offset, bits, kp, nb, group, tiles):
  """Rows block ids[0] x channel block ids[1] of one bucket, reduction split ids[2]; written at
  output columns offset + channel."""
  bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
  m0, n0, split = ids[0] * bm, ids[1] * bn, ids[2]
  m = x_ref.shape[0]
  m_ok = None if m % bm == 0 else _mask(m0, bm, m, 0)
  b = _bucket(p_ref, t_ref, s_ref, bits=bits, kp=kp, nb=nb, group=group, n0=n0, tiles=tiles)
  columns = b.columns()  # loop-invariant: this program's channels are fixed

  def step(s, acc):
    r0 = s * bk
    packed = b.packed(r0, bk)
    for i in range(8 // bits):
      x = _load(x_ref, pl.ds(m0, bm), pl.ds(r0 + i * kp, bk), m_ok)
      acc += jnp.dot(x, b.slab(packed, i, r0, columns, x.dtype), preferred_element_type=jnp.float32)
    return acc

  steps = kp // bk
  per_split = pl.cdiv(steps, tiles.splits)
  lo = split * per_split
  acc = jax.lax.fori_loop(
    lo, jnp.minimum(steps, lo + per_split), step, jnp.zeros((bm, bn), jnp.float32)
  )
  mask = _both(m_ok, b.n_ok)
  cols = pl.ds(offset + n0, bn)
  plgpu.store(o_ref.at[split, pl.ds(m0, bm), cols], acc.astype(o_ref.dtype), mask=mask)


def _both(row_ok, col_ok):
  """Combined store mask (None when neither dimension is ragged)."""
  if row_ok is None or col_ok is None:
    return row_ok if col_ok is None else col_ok
  return row_ok & col_ok


def _bwd_kernel(g_ref, p_ref, t_ref, s_ref, o_ref, *, bits, kp, nb, group, tiles):
  bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
  m0, r0, split = pl.program_id(0) * bm, pl.program_id(1) * bk, pl.program_id(2)
  m = g_ref.shape[0]
  m_ok = None if m % bm == 0 else _mask(m0, bm, m, 0)
  per = 8 // bits

  def step(s, accs):
    n0 = s * bn
    b = _bucket(p_ref, t_ref, s_ref, bits=bits, kp=kp, nb=nb, group=group, n0=n0, tiles=tiles)
    g = _load(g_ref, pl.ds(m0, bm), pl.ds(n0, bn), _both(m_ok, b.n_ok))
    packed, columns = b.packed(r0, bk), b.columns()
    contract_n = (((1,), (1,)), ((), ()))  # g [bm, bn] . w [bk, bn] -> [bm, bk]
    return tuple(
      accs[i]
      + jax.lax.dot_general(
        g, b.slab(packed, i, r0, columns, g.dtype), contract_n, preferred_element_type=jnp.float32
      )
      for i in range(per)
    )

  steps = pl.cdiv(nb, bn)
  per_split = pl.cdiv(steps, tiles.splits)
  lo = split * per_split
  init = tuple(jnp.zeros((bm, bk), jnp.float32) for _ in range(per))
  accs = jax.lax.fori_loop(lo, jnp.minimum(steps, lo + per_split), step, init)
  for i in range(per):
    plgpu.store(
      o_ref.at[split, pl.ds(m0, bm), pl.ds(r0 + i * kp, bk)], accs[i].astype(o_ref.dtype), mask=m_ok
    )


def _call(kernel, operands, out_shape, grid, tiles: Tiles, interpret: bool, name: str, out):
  """Runs `kernel`; with `out` (e.g. NaN-poisoned in tests), results are written into it."""
  if out is not None:
    if out.shape != out_shape.shape or out.dtype != out_shape.dtype:
      raise ValueError(f"out {out.shape} {out.dtype} must be {out_shape.shape} {out_shape.dtype}.")
    kernel_with_out = lambda *refs: kernel(*refs[:-2], refs[-1])
    operands = (*operands, out)
  return pl.pallas_call(
    kernel if out is None else kernel_with_out,
    out_shape=out_shape,
    grid=grid,
    interpret=interpret,
    name=name,
    input_output_aliases={} if out is None else {len(operands) - 1: 0},
    compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
  )(*operands)


def _check(plane, tables, scales, tiles: Tiles, bits: int, group: int):
  kp, nb = plane.shape
  if bits not in (1, 2, 4):
    raise NotImplementedError(f"{bits=}: the LUT kernels handle 1, 2 and 4 bits.")
  if kp % tiles.block_k or group % tiles.block_k:
    raise ValueError(f"{tiles.block_k=} must divide the packed rows {kp=} and {group=}.")
  if tables.shape != (1 << bits, nb) or scales.shape != (kp * 8 // bits // group, nb):
    raise ValueError(f"tables {tables.shape} / scales {scales.shape} do not match {nb=}, {bits=}.")


def lut_matmul(
  x,
  plane,
  tables,
  scales,
  *,
  bits: int,
  group: int,
  tiles: Tiles = Tiles(),
  dtype=jnp.float32,
  interpret: bool = False,
  out=None,
):
  """x [M, K_pad] @ W -> partial sums [tiles.splits, M, Nb] in `dtype`; sum over axis 0.

  Args:
    x: [M, K_pad] activations (any M).
    plane: uint8 [Kp, Nb] packed codes (Kp = K_pad * bits / 8).
    tables: float32 [2**bits, Nb], column n is channel n's table.
    scales: float32 [K_pad / group, Nb] group scales.
    dtype: of the partial sums (float32 unless there is a single split).
    out: optional buffer the result is written into (aliased); NaN-poison it to test coverage.
  """
  _check(plane, tables, scales, tiles, bits, group)
  kp, nb = plane.shape
  kernel = functools.partial(_fwd_kernel, bits=bits, kp=kp, nb=nb, group=group, tiles=tiles)
  grid = (pl.cdiv(x.shape[0], tiles.block_m), pl.cdiv(nb, tiles.block_n), tiles.splits)
  shape = jax.ShapeDtypeStruct((tiles.splits, x.shape[0], nb), dtype)
  return _call(
    kernel, (x, plane, tables, scales), shape, grid, tiles, interpret, f"lut_matmul_{bits}bit", out
  )


def lut_matmul_buckets(
  x,
  operands,
  *,
  bits: tuple[int, ...],
  block_ks: tuple[int, ...],
  group: int,
  tiles: Tiles = Tiles(),
  dtype=jnp.float32,
  interpret: bool = False,
  out=None,
):
  """`lut_matmul` of several buckets in one launch: x [M, K_pad] @ [W_1 | W_2 | ...] -> partial
  sums [tiles.splits, M, sum Nb] (columns in bucket order).

  Args:
    operands: one (plane, tables, scales) per bucket, as for `lut_matmul`.
    bits, block_ks: per bucket (tiles.block_k is ignored); the rest of `tiles` is shared.
  """
  layout, first, offset = [], 0, 0
  for (plane, tables, scales), b, bk in zip(operands, bits, block_ks, strict=True):
    _check(plane, tables, scales, dataclasses.replace(tiles, block_k=bk), b, group)
    kp, nb = plane.shape
    layout.append((b, kp, nb, bk, first, offset))
    first, offset = first + pl.cdiv(nb, tiles.block_n), offset + nb
  kernel = functools.partial(_fwd_buckets_kernel, layout=tuple(layout), group=group, tiles=tiles)
  grid = (pl.cdiv(x.shape[0], tiles.block_m), first, tiles.splits)
  shape = jax.ShapeDtypeStruct((tiles.splits, x.shape[0], offset), dtype)
  flat = [a for ops in operands for a in ops]
  name = "lut_matmul_" + "_".join(f"{b}bit" for b in bits)
  return _call(kernel, (x, *flat), shape, grid, tiles, interpret, name, out)


def lut_matmul_t(
  g,
  plane,
  tables,
  scales,
  *,
  bits: int,
  group: int,
  tiles: Tiles = Tiles(),
  dtype=jnp.float32,
  interpret: bool = False,
  out=None,
):
  """g [M, Nb] @ W^T -> partial sums [tiles.splits, M, K_pad] in `dtype`; args: lut_matmul."""
  _check(plane, tables, scales, tiles, bits, group)
  kp, nb = plane.shape
  kernel = functools.partial(_bwd_kernel, bits=bits, kp=kp, nb=nb, group=group, tiles=tiles)
  grid = (pl.cdiv(g.shape[0], tiles.block_m), kp // tiles.block_k, tiles.splits)
  shape = jax.ShapeDtypeStruct((tiles.splits, g.shape[0], kp * 8 // bits), dtype)
  return _call(
    kernel,
    (g, plane, tables, scales),
    shape,
    grid,
    tiles,
    interpret,
    f"lut_matmul_t_{bits}bit",
    out,
  )


def dequantize_reference(plane, tables, scales, *, bits: int, group: int):
  """jnp dequantization of one bucket: float32 [K_pad, Nb]."""
  per = 8 // bits
  codes = jnp.concatenate([(plane >> (i * bits)) & ((1 << bits) - 1) for i in range(per)], axis=0)
  values = jnp.take_along_axis(tables, codes.astype(jnp.int32), axis=0)
  return values * jnp.repeat(scales, group, axis=0)
