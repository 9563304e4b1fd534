"""Decode GEMV over a channel-major word layout (Pallas, Triton backend): y = x @ W for M <= 4.

The layout (`pack_words`, `words_bucket`): a b-bit bucket's codes as uint32 words [Nb, K_pad*b/32],
one row per output channel, so a program streams whole 16-byte vectors of one channel. Within
group g of G input rows (the scale group), word i of the channel holds P = 32/b codes, code j (bits
[j*b, j*b + b)) being row g*G + j*V + i, V = G*b/32 words per group:

    words[n, g*V + i] = sum_j code[g*G + j*V + i, n] << (j*b)

so all codes of a word share the channel's table and the group's scale, and slab j of a step is
the activations' rows {g*G + j*V + i}. Scales are stored channel-major too: int8 codes [Nb, G]
(double-quantized as `GroupScales`: block absmax [G, ceil(Nb / dq_block)] and offset) or float32
values [Nb, G]; tables as the bucket stores them. Bytes equal the planar format's.

A program owns `block_n` channels and a range of groups (the reduction split over K), and runs
without tensor cores: per step it loads words [block_n, block_g*V], looks each code up in its
channel's levels (a select tree on the bits, tested in place in the word), multiplies by the
activations of that slab (gathered: a few values shared by all channels) and accumulates in fp32;
the group scales multiply each step's sums. Partial sums [splits, N, M] are added by XLA.
`gemv_buckets` runs every bucket of a mixed tensor in one launch and writes channel order.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lowra_jax.quantize import packing
from lowra_jax.quantize.qtensor import Bucket, QuantizedTensor, select_levels
from pallas_kernels.lut_matmul import by_channel_block, launch

MAX_M = 4


def words_per_group(bits: int, group: int) -> int:
  """V = group * bits / 32: words of one channel per scale group (ValueError if not whole)."""
  if bits not in (1, 2, 4) or (group * bits) % 32:
    raise ValueError(f"{bits}-bit codes in groups of {group} do not fill whole 32-bit words.")
  return group * bits // 32


def pack_words(codes, bits: int, group: int, xp=np):
  """codes uint8 [K_pad, N] (K_pad a multiple of `group`) -> uint32 words [N, K_pad*bits/32]."""
  k, n = codes.shape
  v = words_per_group(bits, group)
  c = xp.asarray(codes).astype(xp.uint32).reshape(k // group, 32 // bits, v, n)  # [g, j, i, n]
  words = c[:, 0]
  for j in range(1, 32 // bits):
    words = words | (c[:, j] << xp.uint32(j * bits))
  return words.reshape(k // group * v, n).T


@flax.struct.dataclass
class WordsBucket:
  """One precision bucket in the word layout (module docstring).

  words uint32 [Nb, K_pad*bits/32]; tables, table_index as `Bucket`'s; scales: `codes` int8
  [Nb, G] with `block_absmax` float32 [G, ceil(Nb / dq_block)] and `offset` float32 [], or
  `values` float32 [Nb, G] (dq_block 0).
  """

  words: jax.Array
  tables: jax.Array
  scale_codes: jax.Array | None
  scale_values: jax.Array | None
  block_absmax: jax.Array | None
  offset: jax.Array | None
  table_index: jax.Array | None = None
  bits: int = flax.struct.field(pytree_node=False, default=0)
  dq_block: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def num_channels(self) -> int:
    return self.words.shape[0]


def words_bucket(bucket: Bucket, group: int) -> WordsBucket:
  """A planar `Bucket` (1, 2 or 4 bits) in the word layout; traceable."""
  if len(bucket.planes) != 1:
    raise NotImplementedError(f"{bucket.bits}-bit buckets (two planes) have no GEMV kernel.")
  codes = packing.unpack(bucket.planes, bucket.bits)
  s = bucket.scales
  return WordsBucket(
    words=pack_words(codes, bucket.bits, group, xp=jnp),
    tables=bucket.tables,
    scale_codes=None if s.codes is None else s.codes.T,
    scale_values=None if s.values is None else jnp.asarray(s.values, jnp.float32).T,
    block_absmax=s.block_absmax,
    offset=s.offset,
    table_index=bucket.table_index,
    bits=bucket.bits,
    dq_block=s.dq_block,
  )


@dataclasses.dataclass(frozen=True)
class GemvTiles:
  """block_n channels x block_g groups per step; splits of the groups (K); Triton settings."""

  block_n: int = 64
  block_g: int = 4
  splits: int = 1
  num_warps: int = 4
  num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class WordsLayout:
  """Static description of one bucket's kernel operands (`_operands`)."""

  bits: int
  nb: int
  groups: int
  tables: str  # "channel" [Nb, 2^b], "indexed" [C, 2^b] + index, "shared" [1, 2^b]
  dq_block: int  # 0: float32 scale values

  @property
  def num_refs(self) -> int:
    return 3 + (self.tables == "indexed") + (2 if self.dq_block else 0)


def _operands(b: WordsBucket) -> tuple[WordsLayout, tuple]:
  """(layout, flat arrays): words, tables, [table_index], scale codes or values, [absmax, offset]."""
  nb, kw = b.words.shape
  groups = kw // words_per_group_of(b)
  arrays = [b.words, b.tables.reshape(-1)]
  if b.table_index is not None:
    mode = "indexed"
    arrays.append(b.table_index.reshape(-1))
  else:
    mode = "shared" if b.tables.shape[0] == 1 else "channel"
  if b.dq_block:
    arrays += [b.scale_codes.reshape(-1), b.block_absmax.reshape(-1), jnp.reshape(b.offset, (1,))]
  else:
    arrays.append(b.scale_values.reshape(-1))
  return WordsLayout(b.bits, nb, groups, mode, b.dq_block), tuple(arrays)


def words_per_group_of(b: WordsBucket) -> int:
  """V of a bucket, from its words and scale shapes."""
  scales = b.scale_codes if b.dq_block else b.scale_values
  return b.words.shape[1] // scales.shape[1]


def _gather(flat_ref, index, mask):
  """flat_ref[index] as float32; masked-out elements read 0."""
  view = flat_ref.at[index]
  v = plgpu.load(view) if mask is None else plgpu.load(view, mask=mask, other=0)
  return v.astype(jnp.float32)


def _body(x_ref, refs, c_ref, o_ref, n_block, split, offset, layout: WordsLayout, group, tiles, m):
  """Channels [n0, n0 + block_n) of one bucket over split `split` of its groups; sums written at
  o_ref[split, offset + channel, :m] (or at c_ref[offset + channel] given a permutation)."""
  bn, bg, bits = tiles.block_n, tiles.block_g, layout.bits
  v, p = group * bits // 32, 32 // bits
  bw = bg * v
  n0 = n_block * bn
  rows = n0 + jax.lax.broadcasted_iota(jnp.int32, (bn, 1), 0)  # [bn, 1] channels
  n_ok = None if layout.nb % bn == 0 else rows < layout.nb
  col = jax.lax.broadcasted_iota(jnp.int32, (1, bw), 1)
  words_ref, tables_ref = refs[0], refs[1]

  levels_n = 1 << bits
  if layout.tables == "shared":
    table_row = jnp.zeros((bn, 1), jnp.int32)
  elif layout.tables == "indexed":
    table_row = _gather(refs[2], rows, n_ok).astype(jnp.int32)
  else:
    table_row = rows
  levels = [_gather(tables_ref, table_row * levels_n + j, n_ok) for j in range(levels_n)]
  if layout.dq_block:
    codes_ref, absmax_ref, off_ref = refs[-3:]
    offset_v = _gather(off_ref, jnp.zeros((1, 1), jnp.int32), None)
    n_blocks = pl.cdiv(layout.nb, layout.dq_block)
  else:
    values_ref = refs[-1]

  steps = pl.cdiv(layout.groups, bg)
  g_ragged = layout.groups % bg != 0
  x_len = x_ref.shape[0] // m

  def step(s, accs):
    g = s * bg + col // v  # [1, bw]: each word column's group
    i = col % v
    g_ok = (g < layout.groups) if g_ragged else None
    mask = n_ok if g_ok is None else (g_ok if n_ok is None else n_ok & g_ok)
    wview = words_ref.at[pl.ds(n0, bn), pl.ds(s * bw, bw)]
    words = plgpu.load(wview) if mask is None else plgpu.load(wview, mask=mask, other=0)
    parts = [jnp.zeros((bn, bw), jnp.float32) for _ in range(m)]
    for j in range(p):
      w = select_levels(words, levels, j * bits)  # [bn, bw] float32
      at = g * group + j * v + i
      for r in range(m):
        parts[r] += w * _gather(x_ref, r * x_len + at, g_ok)
    if layout.dq_block:
      code = _gather(codes_ref, rows * layout.groups + g, mask)
      if layout.dq_block % bn == 0:
        absmax = _gather(absmax_ref, g * n_blocks + n0 // layout.dq_block, g_ok)
      else:
        absmax = _gather(absmax_ref, g * n_blocks + rows // layout.dq_block, mask)
      scale = offset_v + code * (absmax * (1 / 127))
    else:
      scale = _gather(values_ref, rows * layout.groups + g, mask)
    return tuple(a + q * scale for a, q in zip(accs, parts, strict=True))

  per_split = pl.cdiv(steps, tiles.splits)
  lo = split * per_split
  init = tuple(jnp.zeros((bn, bw), jnp.float32) for _ in range(m))
  accs = jax.lax.fori_loop(lo, jnp.minimum(steps, lo + per_split), step, init)
  out_rows = offset + rows
  if c_ref is not None:  # masked-out rows get one past the end: no interpreted store collides
    view = c_ref.at[out_rows]
    out_rows = plgpu.load(view) if n_ok is None else plgpu.load(view, mask=n_ok, other=o_ref.shape[1])
    out_rows = out_rows.astype(jnp.int32)
  for r in range(m):
    total = jnp.sum(accs[r], axis=1, keepdims=True)  # [bn, 1]
    at = o_ref.at[split, out_rows, jnp.full((1, 1), r, jnp.int32)]
    plgpu.store(at, total.astype(o_ref.dtype), mask=n_ok)


def _kernel(x_ref, *refs, layouts, group, tiles, m, permuted):
  o_ref, (j, split) = refs[-1], (pl.program_id(0), pl.program_id(1))
  c_ref, refs = (refs[-2], refs[:-2]) if permuted else (None, refs[:-1])

  def body(index, bucket_refs, local, offset):
    _body(x_ref, bucket_refs, c_ref, o_ref, local, split, offset, layouts[index], group, tiles, m)

  by_channel_block(j, layouts, tiles.block_n, refs, body)


def gemv_buckets(
  x,
  buckets: tuple[WordsBucket, ...],
  *,
  group: int,
  tiles: GemvTiles = GemvTiles(),
  columns=None,
  interpret: bool = False,
  out=None,
):
  """x [M, K_pad] (M <= MAX_M) @ [W_1 | W_2 | ...] -> float32 partial sums [splits, sum Nb, M].

  Args:
    buckets: the tensor's buckets in the word layout (`words_bucket`).
    columns: optional int [sum Nb]: bucket-order channel c is written at row columns[c] (a mixed
      tensor's `perm` gives channel order).
    out: optional buffer the result is written into (aliased); NaN-poison it to test coverage.
  """
  m, k_pad = x.shape
  if not 1 <= m <= MAX_M:
    raise ValueError(f"the GEMV kernel takes 1 to {MAX_M} rows, not {m}.")
  flat, layouts = [], []
  for b in buckets:
    layout, arrays = _operands(b)
    if layout.groups * group != k_pad:
      raise ValueError(f"x has {k_pad} columns but the bucket covers {layout.groups * group} rows.")
    layouts.append(layout)
    flat += arrays
  if columns is not None:
    flat.append(columns.reshape(-1))
  kernel = functools.partial(
    _kernel,
    layouts=tuple(layouts),
    group=group,
    tiles=tiles,
    m=m,
    permuted=columns is not None,
  )
  blocks = sum(pl.cdiv(lo.nb, tiles.block_n) for lo in layouts)
  shape = jax.ShapeDtypeStruct((tiles.splits, sum(lo.nb for lo in layouts), m), jnp.float32)
  name = "gemv_" + "_".join(f"{lo.bits}bit" for lo in layouts)
  grid = (blocks, tiles.splits)
  return launch(kernel, (x.reshape(-1), *flat), shape, grid, tiles, interpret, name, out)


def gemv(
  x, qt: QuantizedTensor, words: tuple[WordsBucket, ...], *, tiles=GemvTiles(), interpret=False
):
  """x [M, K] @ dequantize(qt) -> [M, N] in x.dtype, from the tensor's buckets in the word layout
  (`words`, made once by `words_bucket`); channel order restored in the kernel."""
  k_pad = words[0].words.shape[1] * 32 // words[0].bits
  xp = jnp.pad(x, ((0, 0), (0, k_pad - x.shape[1])))
  partial = gemv_buckets(
    xp, words, group=qt.group_size, tiles=tiles, columns=qt.perm, interpret=interpret
  )
  return partial.sum(axis=0).T.astype(x.dtype)


def gemv_reference(x, qt: QuantizedTensor) -> jax.Array:
  """x @ dequantize(qt) in float32 by plain jnp."""
  from lowra_jax.quantize import dequantize

  return jnp.dot(x.astype(jnp.float32), dequantize(qt, jnp.float32))
