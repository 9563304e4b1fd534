"""Fused lookup-table dequant-matmul kernels for one precision bucket (Pallas, Triton backend).

One bucket of a `QuantizedTensor` holds Nb output channels at b bits (b in {1, 2, 4}): codes in one
uint8 plane P[Kp, Nb] packed planar along K (Kp = K_pad * b / 8, p = 8 / b codes per byte, byte r
holding rows r + i * Kp for i < p), per-channel tables T[Nb, 2^b] and group scales S[G, Nb]:

    W[k, n] = T[n, code[k, n]] * S[k // group, n]

`lut_matmul(x, ...)`   = x[M, K_pad] @ W          -> [M, Nb]     (forward)
`lut_matmul_t(g, ...)` = g[M, Nb]    @ W^T        -> [M, K_pad]  (input gradient)
Both read W only in packed form: a program loads a tile of packed rows [block_k, block_n] once and,
for each of the p row slabs it holds, unpacks it with one shift and mask, looks the codes up in the
channel tables and multiplies by the scales (gathers from the flat table/scale refs, which Triton
lowers to pointer gathers served by L1), then feeds the bf16 tile to the tensor cores with fp32
accumulation. `*_reference` are the plain jnp equivalents (used on CPU and as test oracles' inputs).
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
  """Block sizes (powers of two) and Triton launch settings.

  block_k counts *packed* rows per step; each step covers p = 8 / bits slabs of block_k code rows.
  """

  block_m: int = 16
  block_n: int = 64
  block_k: int = 32
  num_warps: int = 4
  num_stages: int = 3


def max_block_k(kp: int) -> int:
  """Largest power of two <= 64 dividing Kp (0 if below 16: the kernels do not apply)."""
  bk = 64
  while bk >= 16 and kp % bk:
    bk //= 2
  return bk if bk >= 16 else 0


def _dequant_slab(packed, i, *, bits, row0, t_ref, s_ref, n_cl, nb, levels, group):
  """Slab i of a packed tile [block_k, block_n] -> float32 weights of rows row0 + [0, block_k)."""
  block_k = packed.shape[0]
  codes = ((packed >> (i * bits)) & ((1 << bits) - 1)).astype(jnp.int32)
  values = t_ref[n_cl[None, :] * levels + codes]
  rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
  scales = s_ref[(rows // group) * nb + n_cl[None, :]]
  return values * scales


def _fwd_kernel(x_ref, p_ref, t_ref, s_ref, o_ref, *, bits, kp, nb, levels, group, tiles):
  bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
  m0, n0 = pl.program_id(0) * bm, pl.program_id(1) * bn
  n_idx = n0 + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
  n_ok = n_idx < nb
  n_cl = jnp.minimum(n_idx, nb - 1)
  dq = functools.partial(_dequant_slab, bits=bits, t_ref=t_ref, s_ref=s_ref, n_cl=n_cl, nb=nb,
                         levels=levels, group=group)

  def step(s, acc):
    r0 = s * bk
    packed = plgpu.load(p_ref.at[pl.ds(r0, bk), pl.ds(n0, bn)], mask=n_ok[None, :], other=0)
    for i in range(8 // bits):
      x = x_ref[pl.ds(m0, bm), pl.ds(r0 + i * kp, bk)]
      w = dq(packed, i, row0=r0 + i * kp)
      acc += jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return acc

  acc = jax.lax.fori_loop(0, kp // bk, step, jnp.zeros((bm, bn), jnp.float32))
  plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask=n_ok[None, :])


def _bwd_kernel(g_ref, p_ref, t_ref, s_ref, o_ref, *, bits, kp, nb, levels, group, tiles):
  bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
  m0, r0 = pl.program_id(0) * bm, pl.program_id(1) * bk
  per = 8 // bits

  def step(s, accs):
    n0 = s * bn
    n_idx = n0 + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
    n_ok = n_idx < nb
    n_cl = jnp.minimum(n_idx, nb - 1)
    packed = plgpu.load(p_ref.at[pl.ds(r0, bk), pl.ds(n0, bn)], mask=n_ok[None, :], other=0)
    g = plgpu.load(g_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], mask=n_ok[None, :], other=0)
    out = []
    for i in range(per):
      w = _dequant_slab(packed, i, bits=bits, row0=r0 + i * kp, t_ref=t_ref, s_ref=s_ref,
                        n_cl=n_cl, nb=nb, levels=levels, group=group)
      out.append(accs[i] + jax.lax.dot_general(
          g, w.astype(g.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))
    return tuple(out)

  init = tuple(jnp.zeros((bm, bk), jnp.float32) for _ in range(per))
  accs = jax.lax.fori_loop(0, pl.cdiv(nb, bn), step, init)
  for i in range(per):
    o_ref[pl.ds(m0, bm), pl.ds(r0 + i * kp, bk)] = accs[i].astype(o_ref.dtype)


def _call(kernel, operands, out_shape, grid, tiles: Tiles, interpret: bool, name: str, out):
  """Runs `kernel`; with `out` (e.g. NaN-poisoned in tests), results are written into it."""
  if out is not None:
    if out.shape != out_shape.shape or out.dtype != out_shape.dtype:
      raise ValueError(f"out {out.shape} {out.dtype} must be {out_shape.shape} {out_shape.dtype}.")
    kernel_with_out = lambda *refs: kernel(*refs[:-2], refs[-1])
    operands = (*operands, out)
  return pl.pallas_call(
      kernel if out is None else kernel_with_out, out_shape=out_shape, grid=grid,
      interpret=interpret, name=name,
      input_output_aliases={} if out is None else {len(operands) - 1: 0},
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages))(*operands)


def _check(x_rows, plane, tables, scales, tiles: Tiles, bits: int):
  kp, nb = plane.shape
  if bits not in (1, 2, 4):
    raise NotImplementedError(f"{bits=}: the LUT kernels handle 1, 2 and 4 bits.")
  if x_rows % tiles.block_m:
    raise ValueError(f"{x_rows=} must be a multiple of {tiles.block_m=} (pad M).")
  if kp % tiles.block_k:
    raise ValueError(f"packed rows {kp=} must be a multiple of {tiles.block_k=}.")
  if tables.shape != (nb * (1 << bits),) or scales.size % nb:
    raise ValueError(f"tables {tables.shape} / scales {scales.shape} do not match {nb=}, {bits=}.")


def lut_matmul(x, plane, tables, scales, *, bits: int, group: int, tiles: Tiles = Tiles(),
               interpret: bool = False, out=None):
  """x [M, K_pad] @ W -> [M, Nb] in x.dtype (fp32 accumulation).

  Args:
    x: [M, K_pad] activations, M a multiple of tiles.block_m.
    plane: uint8 [Kp, Nb] packed codes (Kp = K_pad * bits / 8).
    tables: float32 [Nb * 2**bits], channel n's table at [n * 2**bits, (n + 1) * 2**bits).
    scales: float32 [G * Nb], scale of (group g, channel n) at g * Nb + n.
    out: optional [M, Nb] buffer the result is written into (aliased).
  """
  _check(x.shape[0], plane, tables, scales, tiles, bits)
  kp, nb = plane.shape
  kernel = functools.partial(_fwd_kernel, bits=bits, kp=kp, nb=nb, levels=1 << bits, group=group,
                             tiles=tiles)
  grid = (x.shape[0] // tiles.block_m, pl.cdiv(nb, tiles.block_n))
  return _call(kernel, (x, plane, tables, scales), jax.ShapeDtypeStruct((x.shape[0], nb), x.dtype),
               grid, tiles, interpret, f"lut_matmul_{bits}bit", out)


def lut_matmul_t(g, plane, tables, scales, *, bits: int, group: int, tiles: Tiles = Tiles(),
                 interpret: bool = False, out=None):
  """g [M, Nb] @ W^T -> [M, K_pad] in g.dtype (fp32 accumulation); arguments as `lut_matmul`."""
  _check(g.shape[0], plane, tables, scales, tiles, bits)
  kp, nb = plane.shape
  kernel = functools.partial(_bwd_kernel, bits=bits, kp=kp, nb=nb, levels=1 << bits, group=group,
                             tiles=tiles)
  grid = (g.shape[0] // tiles.block_m, kp // tiles.block_k)
  k_pad = kp * 8 // bits
  return _call(kernel, (g, plane, tables, scales),
               jax.ShapeDtypeStruct((g.shape[0], k_pad), g.dtype), grid, tiles, interpret,
               f"lut_matmul_t_{bits}bit", out)


def dequantize_plane(plane, tables, scales, *, bits: int, group: int):
  """Reference dequantization of one bucket: float32 [K_pad, Nb]."""
  kp, nb = plane.shape
  per = 8 // bits
  codes = jnp.concatenate([(plane >> (i * bits)) & ((1 << bits) - 1) for i in range(per)], axis=0)
  values = jnp.take_along_axis(tables.reshape(nb, 1 << bits).T, codes.astype(jnp.int32), axis=0)
  return values * jnp.repeat(scales.reshape(-1, nb), group, axis=0)


def lut_matmul_reference(x, plane, tables, scales, *, bits: int, group: int):
  """jnp equivalent of `lut_matmul`."""
  w = dequantize_plane(plane, tables, scales, bits=bits, group=group).astype(x.dtype)
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def lut_matmul_t_reference(g, plane, tables, scales, *, bits: int, group: int):
  """jnp equivalent of `lut_matmul_t`."""
  w = dequantize_plane(plane, tables, scales, bits=bits, group=group).astype(g.dtype)
  return jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(g.dtype)
