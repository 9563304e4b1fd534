"""Fused lookup-table dequant-matmul kernels for one precision bucket (Pallas, Triton backend).

One bucket of a `QuantizedTensor` holds Nb output channels at b bits (b in {1, 2, 4}): codes in one
uint8 plane P[Kp, Nb] packed planar along K (Kp = K_pad * b / 8, p = 8 / b codes per byte, byte r
holding rows r + i * Kp for i < p), per-channel tables T[2^b, Nb] (one column per channel) and
group scales S[G, Nb]:

    W[k, n] = T[code[k, n], n] * S[k // group, n]

`lut_matmul(x, ...)`   = x[M, K_pad] @ W     -> fp32 partial sums [splits, M, Nb]     (forward)
`lut_matmul_t(g, ...)` = g[M, Nb]    @ W^T   -> fp32 partial sums [splits, M, K_pad]  (input grad)
`lut_dequantize(...)`  = W in bf16           -> [K_pad, Nb] (for XLA's dot at large M)
W is read only in packed form. A program loads a tile of packed rows [block_k, block_n] and, for
each of the p row slabs it holds, unpacks it with one shift and mask, picks each code's level
from the channel's table columns with selects (the columns are loaded once per tile of channels;
no gathers), multiplies by the group scale (at most two scale rows per slab,
selected per row) and feeds the tile to the tensor cores with fp32 accumulation. Small M gets more
programs by splitting the reduction (K for the forward, N for the backward) into partial sums that
XLA adds up afterwards -- deterministic, unlike atomics. `dequantize_reference` is the jnp
equivalent of the dequantization.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Block sizes (powers of two), reduction splits and Triton launch settings.

  block_k counts *packed* rows per step; each step covers p = 8 / bits slabs of block_k code rows.
  splits: the reduction (K forward, N backward) is cut into this many partial sums.
  """

  block_m: int = 16
  block_n: int = 64
  block_k: int = 32
  splits: int = 1
  num_warps: int = 4
  num_stages: int = 3


def max_block_k(kp: int) -> int:
  """Largest power of two <= 64 dividing Kp (0 if below 16: the kernels do not apply)."""
  bk = 64
  while bk >= 16 and kp % bk:
    bk //= 2
  return bk if bk >= 16 else 0


def _lookup(codes, columns):
  """codes int32 [R, C] -> columns[codes]; columns: 2^b arrays [1, C].

  Up to 4 levels: a binary tree of selects on the code bits (fewest operations). 16 levels: a
  chain of compare-and-selects, which keeps one tile live instead of the tree's eight (the tree
  spilled registers and ran ~30x slower at 4 bits on the H200).
  """
  if len(columns) > 4:
    out = columns[0]
    for j in range(1, len(columns)):
      out = jnp.where(codes == j, columns[j], out)
    return out
  level, bit = list(columns), 0
  while len(level) > 1:
    take_hi = (codes & (1 << bit)) != 0
    level = [jnp.where(take_hi, hi, lo) for lo, hi in zip(level[::2], level[1::2])]
    bit += 1
  return level[0]


def _dequant_slab(packed, i, *, bits, row0, columns, s_ref, n0, n_ok, group):
  """Slab i of a packed tile [block_k, block_n] -> float32 weights of rows row0 + [0, block_k)."""
  block_k, block_n = packed.shape
  codes = ((packed >> (i * bits)) & ((1 << bits) - 1)).astype(jnp.int32)
  values = _lookup(codes, columns)
  g_lo = row0 // group  # a slab of block_k <= group rows spans at most two groups
  g_hi = jnp.minimum(g_lo + 1, s_ref.shape[0] - 1)
  s_lo = plgpu.load(s_ref.at[pl.ds(g_lo, 1), pl.ds(n0, block_n)], mask=n_ok, other=0.0)
  s_hi = plgpu.load(s_ref.at[pl.ds(g_hi, 1), pl.ds(n0, block_n)], mask=n_ok, other=0.0)
  rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
  return values * jnp.where(rows // group > g_lo, s_hi, s_lo)


def _columns(t_ref, n0, block_n, n_ok):
  """The 2^b table rows of this tile of channels: list of float32 [1, block_n]."""
  return [
    plgpu.load(t_ref.at[pl.ds(j, 1), pl.ds(n0, block_n)], mask=n_ok, other=0.0)
    for j in range(t_ref.shape[0])
  ]


def _channels_ok(n0, block_n, nb):
  """bool [1, block_n]: which channels of the tile starting at n0 exist."""
  return (n0 + jax.lax.broadcasted_iota(jnp.int32, (1, block_n), 1)) < nb


def _tile(p_ref, t_ref, s_ref, *, r0, n0, block_k, block_n, nb, kp, bits, group, columns=None):
  """Loads packed rows [r0, r0 + block_k) of channels [n0, n0 + block_n).

  Returns slab(i) -> float32 [block_k, block_n], the weights of code rows r0 + i * kp + [0, block_k).
  `columns` may be passed when they were loaded once outside a loop.
  """
  n_ok = _channels_ok(n0, block_n, nb)
  packed = plgpu.load(p_ref.at[pl.ds(r0, block_k), pl.ds(n0, block_n)], mask=n_ok, other=0)
  if columns is None:
    columns = _columns(t_ref, n0, block_n, n_ok)
  return lambda i: _dequant_slab(
    packed,
    i,
    bits=bits,
    row0=r0 + i * kp,
    columns=columns,
    s_ref=s_ref,
    n0=n0,
    n_ok=n_ok,
    group=group,
  )


def _tiler(p_ref, t_ref, s_ref, *, bits, kp, nb, group, tiles):
  """`_tile` bound to one bucket's refs and this launch's block sizes: call with r0=, n0=."""
  return functools.partial(
    _tile,
    p_ref,
    t_ref,
    s_ref,
    block_k=tiles.block_k,
    block_n=tiles.block_n,
    nb=nb,
    kp=kp,
    bits=bits,
    group=group,
  )


def _fwd_kernel(x_ref, p_ref, t_ref, s_ref, o_ref, *, bits, kp, nb, group, tiles):
  bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
  m0, n0, split = pl.program_id(0) * bm, pl.program_id(1) * bn, pl.program_id(2)
  n_ok = _channels_ok(n0, bn, nb)
  columns = _columns(t_ref, n0, bn, n_ok)  # loop-invariant: this program's channels are fixed
  tile = _tiler(p_ref, t_ref, s_ref, bits=bits, kp=kp, nb=nb, group=group, tiles=tiles)

  def step(s, acc):
    r0 = s * bk
    slab = tile(r0=r0, n0=n0, columns=columns)
    for i in range(8 // bits):
      x = x_ref[pl.ds(m0, bm), pl.ds(r0 + i * kp, bk)]
      acc += jnp.dot(x, slab(i).astype(x.dtype), preferred_element_type=jnp.float32)
    return acc

  steps = kp // bk
  per_split = pl.cdiv(steps, tiles.splits)
  lo = split * per_split
  acc = jax.lax.fori_loop(
    lo, jnp.minimum(steps, lo + per_split), step, jnp.zeros((bm, bn), jnp.float32)
  )
  plgpu.store(o_ref.at[split, pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask=n_ok)


def _bwd_kernel(g_ref, p_ref, t_ref, s_ref, o_ref, *, bits, kp, nb, group, tiles):
  bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
  m0, r0, split = pl.program_id(0) * bm, pl.program_id(1) * bk, pl.program_id(2)
  per = 8 // bits
  tile = _tiler(p_ref, t_ref, s_ref, bits=bits, kp=kp, nb=nb, group=group, tiles=tiles)

  def step(s, accs):
    n0 = s * bn
    n_ok = _channels_ok(n0, bn, nb)
    g = plgpu.load(g_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], mask=n_ok, other=0)
    slab = tile(r0=r0, n0=n0)
    contract_n = (((1,), (1,)), ((), ()))  # g [bm, bn] . w [bk, bn] -> [bm, bk]
    return tuple(
      accs[i]
      + jax.lax.dot_general(
        g, slab(i).astype(g.dtype), contract_n, preferred_element_type=jnp.float32
      )
      for i in range(per)
    )

  steps = pl.cdiv(nb, bn)
  per_split = pl.cdiv(steps, tiles.splits)
  lo = split * per_split
  init = tuple(jnp.zeros((bm, bk), jnp.float32) for _ in range(per))
  accs = jax.lax.fori_loop(lo, jnp.minimum(steps, lo + per_split), step, init)
  for i in range(per):
    o_ref[split, pl.ds(m0, bm), pl.ds(r0 + i * kp, bk)] = accs[i].astype(o_ref.dtype)


def _dequant_kernel(p_ref, t_ref, s_ref, o_ref, *, bits, kp, nb, group, tiles):
  bn, bk = tiles.block_n, tiles.block_k
  r0, n0 = pl.program_id(0) * bk, pl.program_id(1) * bn
  tile = _tiler(p_ref, t_ref, s_ref, bits=bits, kp=kp, nb=nb, group=group, tiles=tiles)
  slab = tile(r0=r0, n0=n0)
  n_ok = _channels_ok(n0, bn, nb)
  for i in range(8 // bits):
    plgpu.store(
      o_ref.at[pl.ds(r0 + i * kp, bk), pl.ds(n0, bn)], slab(i).astype(o_ref.dtype), mask=n_ok
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


def _check(rows, plane, tables, scales, tiles: Tiles, bits: int, group: int):
  kp, nb = plane.shape
  if bits not in (1, 2, 4):
    raise NotImplementedError(f"{bits=}: the LUT kernels handle 1, 2 and 4 bits.")
  if rows % tiles.block_m:
    raise ValueError(f"{rows=} must be a multiple of {tiles.block_m=} (pad M).")
  if kp % tiles.block_k or tiles.block_k > group:
    raise ValueError(f"packed rows {kp=} must be a multiple of {tiles.block_k=} <= {group=}.")
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
  interpret: bool = False,
  out=None,
):
  """x [M, K_pad] @ W -> float32 partial sums [tiles.splits, M, Nb]; sum over axis 0.

  Args:
    x: [M, K_pad] activations, M a multiple of tiles.block_m.
    plane: uint8 [Kp, Nb] packed codes (Kp = K_pad * bits / 8).
    tables: float32 [2**bits, Nb], column n is channel n's table.
    scales: float32 [K_pad / group, Nb] group scales.
    out: optional buffer the result is written into (aliased); NaN-poison it to test coverage.
  """
  _check(x.shape[0], plane, tables, scales, tiles, bits, group)
  kp, nb = plane.shape
  kernel = functools.partial(_fwd_kernel, bits=bits, kp=kp, nb=nb, group=group, tiles=tiles)
  grid = (x.shape[0] // tiles.block_m, pl.cdiv(nb, tiles.block_n), tiles.splits)
  shape = jax.ShapeDtypeStruct((tiles.splits, x.shape[0], nb), jnp.float32)
  return _call(
    kernel, (x, plane, tables, scales), shape, grid, tiles, interpret, f"lut_matmul_{bits}bit", out
  )


def lut_matmul_t(
  g,
  plane,
  tables,
  scales,
  *,
  bits: int,
  group: int,
  tiles: Tiles = Tiles(),
  interpret: bool = False,
  out=None,
):
  """g [M, Nb] @ W^T -> float32 partial sums [tiles.splits, M, K_pad]; other args: lut_matmul."""
  _check(g.shape[0], plane, tables, scales, tiles, bits, group)
  kp, nb = plane.shape
  kernel = functools.partial(_bwd_kernel, bits=bits, kp=kp, nb=nb, group=group, tiles=tiles)
  grid = (g.shape[0] // tiles.block_m, kp // tiles.block_k, tiles.splits)
  shape = jax.ShapeDtypeStruct((tiles.splits, g.shape[0], kp * 8 // bits), jnp.float32)
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


def lut_dequantize(
  plane,
  tables,
  scales,
  *,
  bits: int,
  group: int,
  dtype=jnp.bfloat16,
  tiles: Tiles = Tiles(),
  interpret: bool = False,
  out=None,
):
  """W [K_pad, Nb] in `dtype`, written once (a transient buffer for XLA's dot at large M).

  Arguments as `lut_matmul`; tiles.block_m is unused.
  """
  _check(tiles.block_m, plane, tables, scales, tiles, bits, group)
  kp, nb = plane.shape
  kernel = functools.partial(_dequant_kernel, bits=bits, kp=kp, nb=nb, group=group, tiles=tiles)
  grid = (kp // tiles.block_k, pl.cdiv(nb, tiles.block_n))
  shape = jax.ShapeDtypeStruct((kp * 8 // bits, nb), dtype)
  return _call(
    kernel, (plane, tables, scales), shape, grid, tiles, interpret, f"lut_dequantize_{bits}bit", out
  )


def dequantize_reference(plane, tables, scales, *, bits: int, group: int):
  """jnp dequantization of one bucket: float32 [K_pad, Nb]."""
  per = 8 // bits
  codes = jnp.concatenate([(plane >> (i * bits)) & ((1 << bits) - 1) for i in range(per)], axis=0)
  values = jnp.take_along_axis(tables, codes.astype(jnp.int32), axis=0)
  return values * jnp.repeat(scales, group, axis=0)
