"""Fused lookup-table dequant-matmul kernels for one precision bucket (Pallas, Triton backend).

One bucket of a `QuantizedTensor` holds Nb output channels at b bits (b in {1, 2, 4}): codes in one
uint8 plane P[Kp, Nb] packed planar along K (Kp = K_pad * b / 8, p = 8 / b codes per byte, byte r
holding rows r + i * Kp for i < p; 3-bit codes: their low 2 bits in such a plane, their high bits
in a second, 1-bit one, which the forward kernels read alongside), its tables (one per channel,
shared through an index, or one for the bucket) and group scales S[G, Nb] (float32 or
double-quantized int8):

    W[k, n] = table_n[code[k, n]] * S[k // group, n]

`lut_matmul(x, bucket)`   = x[M, K_pad] @ W     -> partial sums [splits, M, Nb]     (forward)
`lut_matmul_t(g, bucket)` = g[M, Nb]    @ W^T   -> partial sums [splits, M, K_pad]  (input grad)
`lut_matmul_buckets` is the forward of all buckets of a mixed tensor in one launch (programs pick
their bucket by channel block), so the small buckets share the GPU instead of running in turn.
W is read only in packed form. The forward kernels read tables and scales as stored (`operands`):
a program's table levels once (gathered through the index where tables are shared), its scale rows
dequantized per slab -- no preparation kernels per call; the backward reads them prepared by XLA.
`lut_matmul_buckets` can also write its columns in channel order (a mixed tensor's permutation),
so that no scatter follows it. A program loads a tile of packed rows [block_k, block_n] once and
handles each of its p row slabs; block_k divides the group size, so a slab lies in one
group and its scale row is folded into the channel's 2^b table levels ([1, block_n] vectors) before
the lookup. Looking levels up in a 16-bit activation dtype (`Tiles.narrow`, the forward up to
M = 64), 2-, 3- and 4-bit codes go through byte permutations (`byte_lookup`); otherwise the
lookup is a tree of selects on the code bits, tested in place in the packed bytes (no shift or mask
per slab). The slab then feeds the tensor cores with fp32 accumulation.
Small M gets more programs by splitting the reduction (K for the forward, N for the backward)
into partial sums that XLA adds up afterwards -- deterministic, unlike atomics; with one split the
kernel writes the result in its final dtype. Ragged M and Nb are masked in the kernel (no padding
copies); masks are only emitted where a dimension is ragged, so full tiles get vector loads. A
ragged bucket masks all its channel blocks: masking only its last one (a branch per program,
doubling the kernel's code) is slower.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lowra_jax.quantize.qtensor import Bucket, select_levels
from pallas_kernels import byte_lookup


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


def range_mask(offset, size, limit, axis):
  """bool [size, 1] (axis 0) or [1, size] (axis 1): offset + i < limit."""
  shape = (size, 1) if axis == 0 else (1, size)
  return offset + jax.lax.broadcasted_iota(jnp.int32, shape, axis) < limit


def masked_load(ref, rows, cols, mask):
  """ref[rows, cols] with masked-out elements 0; mask None loads unmasked (vectorised)."""
  if mask is None:
    return plgpu.load(ref.at[rows, cols])
  return plgpu.load(ref.at[rows, cols], mask=mask, other=0)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static layout of one bucket's kernel operands (`operands`).

  kp: rows of the (first) plane; kp1: a 3-bit bucket's second plane's rows (its codes' high
  bits, 1 per field, kp1 = kp / 2), 0 for one-plane buckets.
  tables: "levels" (prepared: float32 [2^b, Nb], row j holds every channel's level j), or as
  stored: "channel" (tables [Nb, 2^b], one per channel), "indexed" (tables [C, 2^b] shared through
  table_index uint8 [Nb]) or "shared" (one table [1, 2^b] for the bucket).
  dq_block: 0 for float32 scales [G, Nb]; else the scales are double-quantized: int8 codes [G, Nb],
  float32 block absmax [G, ceil(Nb / dq_block)] and offset [1], scale = offset + code * absmax / 127.
  """

  bits: int
  kp: int
  nb: int
  tables: str
  dq_block: int
  kp1: int = 0

  @property
  def slabs(self) -> int:
    """Code-row slabs per packed row of the first plane (fields of 2 bits for 3-bit codes)."""
    return 4 if self.bits == 3 else 8 // self.bits

  @property
  def num_planes(self) -> int:
    return 2 if self.kp1 else 1

  @property
  def num_refs(self) -> int:
    return 2 + self.num_planes + (self.tables == "indexed") + (2 if self.dq_block else 0)


def operands(bucket: Bucket, prepared: bool = False) -> tuple[Layout, tuple[jax.Array, ...]]:
  """(layout, arrays) of a bucket: plane(s), tables, [table_index [1, Nb]], scales (values, or
  codes + flattened block absmax + offset [1]).

  As stored (default) the arrays are the bucket's own (reshapes only: no per-call preparation
  kernels). `prepared`: tables as float32 [2^b, Nb] and float32 scales, made by XLA here (two
  small kernels) -- for the backward kernel, which rereads them for every channel block."""
  plane = bucket.planes[0]
  kp, nb = plane.shape
  kp1 = bucket.planes[1].shape[0] if bucket.bits == 3 else 0
  s = bucket.scales
  if prepared:
    tables = bucket.channel_tables().astype(jnp.float32).T
    return Layout(bucket.bits, kp, nb, "levels", 0), (plane, tables, s.dequantize())
  arrays = [*bucket.planes, bucket.tables.reshape(-1)]
  if bucket.table_index is not None:
    mode = "indexed"
    arrays.append(bucket.table_index.reshape(1, nb))
  else:
    mode = "shared" if bucket.tables.shape[0] == 1 else "channel"
  if s.dq_block:
    arrays += [s.codes, s.block_absmax.reshape(-1), jnp.reshape(s.offset, (1,))]
  else:
    arrays.append(s.values)
  return Layout(bucket.bits, kp, nb, mode, s.dq_block, kp1), tuple(arrays)


@dataclasses.dataclass(frozen=True)
class BucketView:
  """One bucket's refs as seen by a program owning channels [n0, n0 + bn).

  Per-channel values are read as [1, bn] tiles in the layout of the weight tiles (gathers by
  [1, bn] index arrays where they are not contiguous): 1-D loads broadcast into the tiles are
  slower (layout conversions in the inner loop)."""

  refs: tuple
  layout: Layout
  group: int
  n0: object
  bn: int
  n_ok: object  # bool [1, bn] or None (Nb a multiple of bn)
  narrow: bool
  interpret: bool  # Pallas' interpreter: no inline PTX

  def _channels(self):
    """int32 [1, bn]: the channel indices."""
    return self.n0 + jax.lax.broadcasted_iota(jnp.int32, (1, self.bn), 1)

  def _gather(self, flat_ref, index):
    """float32 [1, bn]: flat_ref[index] for index int32 [1, bn]; masked-out channels read 0."""
    view = flat_ref.at[index]
    v = plgpu.load(view) if self.n_ok is None else plgpu.load(view, mask=self.n_ok, other=0)
    return v.astype(jnp.float32)

  def invariants(self):
    """(levels, offset): the 2^b table levels of these channels, float32 [1, bn] each, and the
    scales' offset [1, bn] (None unless double-quantized). Loaded once per channel block."""
    mode, levels = self.layout.tables, 1 << self.layout.bits
    cols, at = pl.ds(self.n0, self.bn), self.layout.num_planes  # refs[at]: the tables
    if mode == "levels":
      return [masked_load(self.refs[at], pl.ds(j, 1), cols, self.n_ok) for j in range(levels)], None
    if mode == "shared":
      rows = jnp.zeros((1, self.bn), jnp.int32)
    elif mode == "indexed":
      rows = masked_load(self.refs[at + 1], pl.ds(0, 1), cols, self.n_ok)
      rows = rows.astype(jnp.int32)
    else:
      rows = self._channels()
    table = [self._gather(self.refs[at], rows * levels + j) for j in range(levels)]
    offset = None
    if self.layout.dq_block:
      offset = self._gather(self.refs[-1], jnp.zeros((1, self.bn), jnp.int32))
    return table, offset

  def packed(self, r0, bk):
    """int32 [bk, bn]: packed rows [r0, r0 + bk). A 3-bit bucket's word holds the first plane's
    byte in bits 0-7 and, from bit 8, its second plane's byte of rows r0 mod kp1 shifted so that
    bit 2i is field i's high bit (code row r + i * kp has its high bit in second-plane row
    r mod kp1, bit 2i + r // kp1; bk divides kp1, so r // kp1 is one value per step)."""
    cols = pl.ds(self.n0, self.bn)
    low = masked_load(self.refs[0], pl.ds(r0, bk), cols, self.n_ok).astype(jnp.int32)
    kp1 = self.layout.kp1
    if not kp1:
      return low
    high = masked_load(self.refs[1], pl.ds(r0 % kp1, bk), cols, self.n_ok).astype(jnp.int32)
    return low | ((high >> (r0 // kp1)) << 8)

  def scale(self, g, offset):
    """float32 [1, bn]: group row g's scales of these channels."""
    cols, dq = pl.ds(self.n0, self.bn), self.layout.dq_block
    if not dq:
      return masked_load(self.refs[-1], pl.ds(g, 1), cols, self.n_ok)
    codes_ref, absmax_ref, _ = self.refs[-3:]
    codes = masked_load(codes_ref, pl.ds(g, 1), cols, self.n_ok).astype(jnp.float32)
    at = g * pl.cdiv(self.layout.nb, dq)
    if dq % self.bn == 0:  # one block holds the program's channels (n0 is a multiple of bn)
      # A [1, 1] tile, not a scalar load (Triton does not pipeline it) nor a [1, bn] gather.
      absmax = plgpu.load(absmax_ref.at[at + self.n0 // dq + jnp.zeros((1, 1), jnp.int32)])
    else:
      absmax = self._gather(absmax_ref, at + self._channels() // dq)
    return offset + codes * (absmax * (1 / 127))  # a division per slab would be slower

  def slab(self, packed, i, r0, invariants, dtype):
    """Weights [bk, bn] in `dtype` of code rows r0 + i * kp + [0, bk) (one group)."""
    table, offset = invariants
    bits = self.layout.bits
    scale = self.scale((r0 + i * self.layout.kp) // self.group, offset)
    levels = [c * scale for c in table]
    if self.narrow and byte_lookup.covers(bits, dtype):
      levels = [v.astype(dtype) for v in levels]
      high = 8 + 2 * i if bits == 3 else None  # a 3-bit code's third bit (`packed`)
      return byte_lookup.lookup(packed, i, bits, levels, interpret=self.interpret, high=high)
    if bits == 3:  # the code, gathered from bits 2i, 2i + 1 and 8 + 2i (`packed`)
      packed = ((packed >> 2 * i) & 3) | ((packed >> 6 + 2 * i) & 4)
      i = 0
    if not self.narrow:
      return select_levels(packed, levels, i * bits).astype(dtype)
    return select_levels(packed, [v.astype(dtype) for v in levels], i * bits)


def bucket_view(refs, layout: Layout, *, group, n0, tiles, interpret):
  """The `BucketView` of channels [n0, n0 + block_n)."""
  n_ok = None if layout.nb % tiles.block_n == 0 else range_mask(n0, tiles.block_n, layout.nb, 1)
  return BucketView(tuple(refs), layout, group, n0, tiles.block_n, n_ok, tiles.narrow, interpret)


def _fwd_kernel(x_ref, *refs, layout: Layout, group, tiles, interpret):
  ids = (pl.program_id(0), pl.program_id(1), pl.program_id(2))
  _fwd_body(x_ref, refs[:-1], None, refs[-1], ids, 0, layout, group, tiles, interpret)


def by_channel_block(j, layouts, block_n: int, refs, body):
  """Runs body(index, bucket_refs, j_local, offset) for the bucket whose channel blocks (of
  block_n, numbered over the buckets in turn) include block j: j_local is the block within that
  bucket, offset its first column in bucket order. Static `layouts`: one `pl.when` per bucket."""
  first, offset, at = 0, 0, 0
  for index, layout in enumerate(layouts):
    last = first + pl.cdiv(layout.nb, block_n)
    local = j - first  # computed outside the branch (the interpreter needs program ids there)
    args = (index, refs[at : at + layout.num_refs], local, offset)
    pl.when((j >= first) & (j < last))(functools.partial(body, *args))
    first, offset, at = last, offset + layout.nb, at + layout.num_refs


def _fwd_buckets_kernel(x_ref, *refs, layouts, block_ks, group, tiles, permuted, interpret):
  """Program (i, j, s) runs the bucket whose channel blocks include j (static `layouts`)."""
  o_ref, (i, j, split) = refs[-1], (pl.program_id(0), pl.program_id(1), pl.program_id(2))
  c_ref, refs = (refs[-2], refs[:-2]) if permuted else (None, refs[:-1])

  def body(index, bucket_refs, local, offset):
    t = dataclasses.replace(tiles, block_k=block_ks[index])
    ids = (i, local, split)
    _fwd_body(x_ref, bucket_refs, c_ref, o_ref, ids, offset, layouts[index], group, t, interpret)

  by_channel_block(j, layouts, tiles.block_n, refs, body)


def _fwd_body(x_ref, refs, c_ref, o_ref, ids, offset, layout: Layout, group, tiles, interpret):
  """Rows block ids[0] x channel block ids[1] of one bucket, reduction split ids[2]; written at
  output columns offset + channel, or at c_ref[offset + channel] (int [1, N]) if given."""
  bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
  m0, n0, split = ids[0] * bm, ids[1] * bn, ids[2]
  m = x_ref.shape[0]
  m_ok = None if m % bm == 0 else range_mask(m0, bm, m, 0)
  b = bucket_view(refs, layout, group=group, n0=n0, tiles=tiles, interpret=interpret)
  invariants = b.invariants()  # this program's channels are fixed
  kp = layout.kp

  def step(s, acc):
    r0 = s * bk
    packed = b.packed(r0, bk)
    for i in range(layout.slabs):
      x = masked_load(x_ref, pl.ds(m0, bm), pl.ds(r0 + i * kp, bk), m_ok)
      w = b.slab(packed, i, r0, invariants, x.dtype)
      acc += jnp.dot(x, w, preferred_element_type=jnp.float32)
    return acc

  steps = kp // bk
  per_split = pl.cdiv(steps, tiles.splits)
  lo = split * per_split
  acc = jax.lax.fori_loop(
    lo, jnp.minimum(steps, lo + per_split), step, jnp.zeros((bm, bn), jnp.float32)
  )
  mask = _both(m_ok, b.n_ok)
  cols = pl.ds(offset + n0, bn)
  if c_ref is None:
    plgpu.store(o_ref.at[split, pl.ds(m0, bm), cols], acc.astype(o_ref.dtype), mask=mask)
    return
  view = c_ref.at[pl.ds(0, 1), cols]
  if b.n_ok is None:
    cols = plgpu.load(view).astype(jnp.int32)  # [1, bn]
  else:  # masked-out lanes get a column past the end: no store in the interpreter collides there
    cols = plgpu.load(view, mask=b.n_ok, other=o_ref.shape[2]).astype(jnp.int32)
  rows = m0 + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
  plgpu.store(o_ref.at[split, rows, cols], acc.astype(o_ref.dtype), mask=mask)


def _both(row_ok, col_ok):
  """Combined store mask (None when neither dimension is ragged)."""
  if row_ok is None or col_ok is None:
    return row_ok if col_ok is None else col_ok
  return row_ok & col_ok


def _bwd_kernel(g_ref, *refs, layout: Layout, group, tiles, interpret):
  refs, o_ref = refs[:-1], refs[-1]
  bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
  m0, r0, split = pl.program_id(0) * bm, pl.program_id(1) * bk, pl.program_id(2)
  m = g_ref.shape[0]
  m_ok = None if m % bm == 0 else range_mask(m0, bm, m, 0)
  per, kp = 8 // layout.bits, layout.kp

  def step(s, accs):
    n0 = s * bn
    b = bucket_view(refs, layout, group=group, n0=n0, tiles=tiles, interpret=interpret)
    g = masked_load(g_ref, pl.ds(m0, bm), pl.ds(n0, bn), _both(m_ok, b.n_ok))
    packed, invariants = b.packed(r0, bk), b.invariants()
    contract_n = (((1,), (1,)), ((), ()))  # g [bm, bn] . w [bk, bn] -> [bm, bk]
    return tuple(
      accs[i]
      + jax.lax.dot_general(
        g,
        b.slab(packed, i, r0, invariants, g.dtype),
        contract_n,
        preferred_element_type=jnp.float32,
      )
      for i in range(per)
    )

  steps = pl.cdiv(layout.nb, bn)
  per_split = pl.cdiv(steps, tiles.splits)
  lo = split * per_split
  init = tuple(jnp.zeros((bm, bk), jnp.float32) for _ in range(per))
  accs = jax.lax.fori_loop(lo, jnp.minimum(steps, lo + per_split), step, init)
  for i in range(per):
    plgpu.store(
      o_ref.at[split, pl.ds(m0, bm), pl.ds(r0 + i * kp, bk)], accs[i].astype(o_ref.dtype), mask=m_ok
    )


def launch(kernel, operands, out_shape, grid, tiles: Tiles, interpret: bool, name: str, out):
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


def block_rows(bucket: Bucket) -> int:
  """Packed rows that block_k must divide: the plane's, or a 3-bit bucket's second plane's."""
  return bucket.planes[-1].shape[0]


def checked_operands(bucket: Bucket, block_k: int, group: int, prepared: bool = False):
  """`operands(bucket, prepared)` after checking that the kernels cover it with this block_k
  (3-bit buckets: the forward kernels only, which read the tables and scales as stored)."""
  covered = (1, 2, 4) if prepared else (1, 2, 3, 4)
  if bucket.bits not in covered:
    which = "the backward LUT kernel" if prepared else "the LUT kernels"
    raise NotImplementedError(f"bits={bucket.bits}: {which} handle {covered} bits.")
  layout, arrays = operands(bucket, prepared)
  rows = block_rows(bucket)
  if rows % block_k or group % block_k:
    raise ValueError(f"block_k={block_k} must divide the packed rows {rows} and {group=}.")
  return layout, arrays


def lut_matmul(
  x,
  bucket: Bucket,
  *,
  group: int,
  tiles: Tiles = Tiles(),
  dtype=jnp.float32,
  interpret: bool = False,
  out=None,
):
  """x [M, K_pad] @ W -> partial sums [tiles.splits, M, Nb] in `dtype`; sum over axis 0.

  Args:
    x: [M, K_pad] activations (any M).
    bucket: one precision bucket of a `QuantizedTensor` (1, 2 or 4 bits, one plane), as stored.
    group: the tensor's group size.
    dtype: of the partial sums (float32 unless there is a single split).
    out: optional buffer the result is written into (aliased); NaN-poison it to test coverage.
  """
  layout, arrays = checked_operands(bucket, tiles.block_k, group)
  kernel = functools.partial(
    _fwd_kernel, layout=layout, group=group, tiles=tiles, interpret=interpret
  )
  grid = (pl.cdiv(x.shape[0], tiles.block_m), pl.cdiv(layout.nb, tiles.block_n), tiles.splits)
  shape = jax.ShapeDtypeStruct((tiles.splits, x.shape[0], layout.nb), dtype)
  name = f"lut_matmul_{layout.bits}bit"
  return launch(kernel, (x, *arrays), shape, grid, tiles, interpret, name, out)


def lut_matmul_buckets(
  x,
  buckets,
  *,
  block_ks: tuple[int, ...],
  group: int,
  tiles: Tiles = Tiles(),
  dtype=jnp.float32,
  columns=None,
  interpret: bool = False,
  out=None,
):
  """`lut_matmul` of several buckets in one launch: x [M, K_pad] @ [W_1 | W_2 | ...] -> partial
  sums [tiles.splits, M, sum Nb] (columns in bucket order, or as `columns` says).

  Args:
    buckets: the buckets, as for `lut_matmul`; block_ks: their block_k (tiles.block_k is ignored;
      the rest of `tiles` is shared).
    columns: optional int [sum Nb], a permutation: bucket-order column c is written at output
      column columns[c] (a mixed tensor's `perm` gives channel order).
  """
  checked = [checked_operands(b, bk, group) for b, bk in zip(buckets, block_ks, strict=True)]
  layouts = tuple(layout for layout, _ in checked)
  kernel = functools.partial(
    _fwd_buckets_kernel,
    layouts=layouts,
    block_ks=tuple(block_ks),
    group=group,
    tiles=tiles,
    permuted=columns is not None,
    interpret=interpret,
  )
  blocks = sum(pl.cdiv(layout.nb, tiles.block_n) for layout in layouts)
  grid = (pl.cdiv(x.shape[0], tiles.block_m), blocks, tiles.splits)
  shape = jax.ShapeDtypeStruct((tiles.splits, x.shape[0], sum(lo.nb for lo in layouts)), dtype)
  flat = [a for _, arrays in checked for a in arrays]
  if columns is not None:
    flat.append(columns.reshape(1, -1))
  name = "lut_matmul_" + "_".join(f"{lo.bits}bit" for lo in layouts)
  return launch(kernel, (x, *flat), shape, grid, tiles, interpret, name, out)


def lut_matmul_t(
  g,
  bucket: Bucket,
  *,
  group: int,
  tiles: Tiles = Tiles(),
  dtype=jnp.float32,
  interpret: bool = False,
  out=None,
):
  """g [M, Nb] @ W^T -> partial sums [tiles.splits, M, K_pad] in `dtype`; args: lut_matmul.

  Reads prepared tables and scales (`operands(prepared=True)`): read as stored, the gathers and
  scale dequantization repeated for every channel block of its loop make it slower."""
  layout, arrays = checked_operands(bucket, tiles.block_k, group, prepared=True)
  kernel = functools.partial(
    _bwd_kernel, layout=layout, group=group, tiles=tiles, interpret=interpret
  )
  grid = (pl.cdiv(g.shape[0], tiles.block_m), layout.kp // tiles.block_k, tiles.splits)
  shape = jax.ShapeDtypeStruct((tiles.splits, g.shape[0], layout.kp * 8 // layout.bits), dtype)
  name = f"lut_matmul_t_{layout.bits}bit"
  return launch(kernel, (g, *arrays), shape, grid, tiles, interpret, name, out)
