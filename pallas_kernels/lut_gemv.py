"""Decode GEMV: x [M, K_pad] @ W for M <= 4 over 1- and 2-bit buckets, without tensor cores.

Reads the stored planar layout as it is. A bucket's plane uint8 [Kp, Nb] is viewed as int32 words
[Kp, Nb / 4], each word holding one plane row of 4 adjacent channels. A thread owns 4 channels (a
"quad"): per step it loads the words of 4 consecutive plane rows r .. r + 3 (coalesced: a warp
reads 128 contiguous bytes per row) and transposes the 4 x 4 bytes in registers (`_transpose`, 8
PRMTs), so that it holds per channel one word whose byte j is plane row r + j. Field f (bits
[f*b, f*b + b)) of byte j is the code of row r + j + f*Kp (the planar packing), so the codes of
bytes 0 and 1 (and of 2 and 3) in one field are two *adjacent* rows of one channel in one scale
group: one PRMT looks both up in the channel's level words (their 16-bit levels scaled by the
group's scale and rounded to the activation dtype, exactly the weights `dequantize` gives), the
selector made from both codes by one AND and one multiply-add (`_pair_selector`). The two levels
become float32 by a shift and an AND (bf16; fp16: two conversions) and meet the two float32
activations of those rows in two FMAs per row of x. That is ~3.7 instructions per weight at
M = 1, against ~10 for the tensor-core kernels of `lut_matmul`, whose B operand goes through a
layout conversion (docs/results.md, "What bounds the decode kernels").

A program owns `quads` quads (4 * quads channels) and a range of plane rows; it walks the range in
chunks of `chunk` rows (gcd(Kp, group): within a chunk every field stays in one scale group),
building the chunk's scaled level words (per field and channel) before its inner loop of 4-row
steps. The reduction over K is split over `splits` programs per quad block; their float32 partial
sums are added by XLA (no atomics: deterministic). Several buckets of a mixed tensor run in one
launch (each program takes the bucket owning its quad block) and write their columns where
`columns` says (a tensor's `perm`: channel order).

In Pallas' interpreter (CPU tests) the inline PTX is replaced by the same operations in jnp
(`byte_lookup.prmt_reference`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import byte_lookup
from pallas_kernels import lut_matmul as lm

MAX_M = 4
BITS = (1, 2)


@dataclasses.dataclass(frozen=True)
class GemvTiles:
  """quads: quads (4 channels) per program, a multiple of 32 * num_warps (one or more per
  thread); splits: programs sharing a quad block's reduction (chunks of rows, as even as they go)."""

  quads: int = 128
  splits: int = 1
  num_warps: int = 4
  num_stages: int = 3
  chunk: int = 0  # plane rows per chunk (a multiple of 4 dividing gcd(Kp, group)); 0: the gcd
  unroll: int = 2  # 4-row steps per loop iteration (the next iteration's loads are issued first)


def covers(bucket, m: int, dtype) -> bool:
  """Whether the GEMV handles this bucket at M rows of `dtype`: 1 or 2 bits in one plane, a
  multiple of 4 channels, M <= 4, 16-bit activations."""
  return (
    m <= MAX_M
    and bucket.bits in BITS
    and len(bucket.planes) == 1
    and bucket.num_channels % 4 == 0
    and jnp.dtype(dtype).itemsize == 2
  )


def chunk_rows(kp: int, group: int) -> int:
  """Plane rows of one chunk: gcd(Kp, group), so each field's rows stay in one scale group."""
  return math.gcd(kp, group)


def words(plane: jax.Array) -> jax.Array:
  """uint8 [Kp, Nb] -> int32 [Kp, Nb / 4]: word (r, q) holds channels 4q .. 4q + 3 of plane row r
  (byte t = channel 4q + t; a bitcast, no copy)."""
  kp, nb = plane.shape
  return jax.lax.bitcast_convert_type(plane.reshape(kp, nb // 4, 4), jnp.int32)


def _activation_words(x: jax.Array) -> jax.Array:
  """[M, K_pad] 16-bit -> int32 [M, K_pad / 2]: rows 2i, 2i + 1 in word i (a bitcast)."""
  m, k = x.shape
  return jax.lax.bitcast_convert_type(x.reshape(m, k // 2, 2), jnp.int32)


# --- the per-thread instructions: inline PTX, and the same in jnp for the interpreter ----------

_TRANSPOSE = (0x5140, 0x7362, 0x5410, 0x7632)


def _prmt(a, b, selector: int, interpret: bool):
  """PTX `prmt.b32` of int32 arrays a, b with a constant selector."""
  if interpret:
    return byte_lookup.prmt_reference(a, b, jnp.full_like(a, selector))
  return _asm(f"prmt.b32 $0, $1, $2, {selector:#x};", a, b)


def _asm(text: str, *args):
  """One int32 result of inline PTX over int32 operands $1.. (one instance per element).
  (One result per call: Pallas' Triton lowering drops all but one of several results.)"""
  (out,) = plgpu.elementwise_inline_asm(
    "{ " + text + " }",
    args=list(args),
    constraints=",".join(["=r"] + ["r"] * len(args)),
    pack=1,
    result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.int32)],
  )
  return out


def _transpose(rows, interpret: bool):
  """Words of 4 plane rows (byte t: channel t) -> words of 4 channels (byte j: plane row j):
  8 PRMTs."""
  a, b, c, d = rows
  lo01, hi01 = _prmt(a, b, _TRANSPOSE[0], interpret), _prmt(a, b, _TRANSPOSE[1], interpret)
  lo23, hi23 = _prmt(c, d, _TRANSPOSE[0], interpret), _prmt(c, d, _TRANSPOSE[1], interpret)
  return [
    _prmt(x, y, sel, interpret) for x, y in ((lo01, lo23), (hi01, hi23)) for sel in _TRANSPOSE[2:]
  ]


def _pair_selector(bits: int, field: int, high: bool) -> tuple[int, int, int]:
  """(shift, mask, multiplier) for the codes of bytes 0 and 1 (high: 2 and 3) in field `field`:
  v = word & mask, then s = (v >> shift) * multiplier + 0x1010 has nibbles (2c0, 2c0 + 1, 2c1,
  2c1 + 1): level c0 in the low half of the PRMT's result, level c1 in its high half. In PTX the
  high pair's shift is folded into the multiply (`mad.hi` by multiplier << (32 - shift)), the
  low pair's is a `shr` before the mask."""
  pair = ((1 << bits) - 1) * 0x0101
  shift = 16 * high + field * bits
  return shift, pair << shift, 0x22


def _lookup_pair(word, field: int, bits: int, level_words, interpret: bool):
  """int32: the levels of the field's two codes in bytes 0, 1 (`high`: 2, 3) of each channel
  word -- low half: the first row's, high half: the second's -- as two 16-bit values; returns the
  pair for bytes (0, 1) and for bytes (2, 3)."""
  lw0 = level_words[0]
  lw1 = level_words[1] if len(level_words) > 1 else lw0
  out = []
  for high in (False, True):
    shift, mask, mul = _pair_selector(bits, field, high)
    if interpret:
      v = jax.lax.shift_right_logical(word & jnp.int32(mask - (mask >> 31 << 32)), shift)
      s = v * mul + 0x1010
      out.append(byte_lookup.prmt_reference(jnp.broadcast_to(lw0, word.shape), jnp.broadcast_to(lw1, word.shape), s))
      continue
    if high:
      select = f"and.b32 v, $1, {mask:#x}; mad.hi.u32 s, v, {mul << (32 - shift):#x}, 0x1010; "
    elif shift:
      select = f"shr.b32 v, $1, {shift}; and.b32 v, v, {mask >> shift:#x}; mad.lo.u32 s, v, {mul:#x}, 0x1010; "
    else:
      select = f"and.b32 v, $1, {mask:#x}; mad.lo.u32 s, v, {mul:#x}, 0x1010; "
    out.append(_asm(".reg .b32 v, s; " + select + "prmt.b32 $0, $2, $3, s;", word, jnp.broadcast_to(lw0, word.shape), jnp.broadcast_to(lw1, word.shape)))
  return out


def _halves(pair, dtype):
  """int32 pairs of 16-bit values in `dtype` -> (low, high) as float32."""
  if jnp.dtype(dtype) == jnp.bfloat16:
    lo = jax.lax.bitcast_convert_type(pair << 16, jnp.float32)
    return lo, jax.lax.bitcast_convert_type(pair & jnp.int32(-65536), jnp.float32)
  lo = jax.lax.bitcast_convert_type((pair & 0xFFFF).astype(jnp.uint16), dtype).astype(jnp.float32)
  hi = jax.lax.shift_right_logical(pair, 16).astype(jnp.uint16)
  return lo, jax.lax.bitcast_convert_type(hi, dtype).astype(jnp.float32)


def _field_fma(word, field, bits, level_words, xs, accs, dtype, interpret: bool):
  """accs[m] + sum over the field's 4 rows of x[m, row] * level[code]: xs[m] = the 4 float32
  activations of rows r + f*Kp + (0, 1, 2, 3); accs float32 per row of x."""
  out = list(accs)
  for high, pair in enumerate(_lookup_pair(word, field, bits, level_words, interpret)):
    lo, hi = _halves(pair, dtype)
    for m, x in enumerate(xs):
      out[m] = out[m] + lo * x[2 * high] + hi * x[2 * high + 1]
  return out


# --- the kernel -------------------------------------------------------------------------------


def _step_loads(word_ref, x_ref, r, q0, bq, q_ok, kp, fields):
  """What one 4-row step at plane row r reads: the 4 rows' words ([1, bq] int32 each) and, per
  row of x and field f, the activation words of rows r + f*Kp .. + 3 (2 int32 scalars)."""
  rows = [lm.masked_load(word_ref, pl.ds(r + j, 1), pl.ds(q0, bq), q_ok) for j in range(4)]
  half = jax.lax.shift_right_logical(r, 1)
  xs = [
    [x_ref[m, half + f * (kp // 2) + i] for f in range(fields) for i in range(2)]
    for m in range(x_ref.shape[0])
  ]
  return rows, xs


def _gemv_body(x_ref, refs, c_ref, o_ref, qb, split, offset, layout: lm.Layout, group, tiles, dtype, interpret):
  """Quad block qb of one bucket, reduction split `split`; written at output columns
  offset + channel, or at c_ref[offset + channel] if given."""
  bq, bits, kp = tiles.quads, layout.bits, layout.kp
  fields = 8 // bits
  m_rows = x_ref.shape[0]
  chunk = tiles.chunk or chunk_rows(kp, group)
  unroll = math.gcd(tiles.unroll, chunk // 4)
  word_ref = refs[0]
  q0 = qb * bq
  nq = layout.nb // 4
  q_ok = None if nq % bq == 0 else lm.range_mask(q0, bq, nq, 1)
  views = [
    lm.BucketView(refs, layout, group, 4 * q0 + t, bq, None if q_ok is None else q_ok, True, interpret)
    for t in range(4)
  ]

  def channels(t):
    return 4 * q0 + t + 4 * jax.lax.broadcasted_iota(jnp.int32, (1, bq), 1)

  # per channel t: its table levels and scale offset (loaded once)
  invariants = []
  for t, v in enumerate(views):
    invariants.append(_channel_invariants(v, channels(t)))

  def chunk_step(c, accs):
    r_c = c * chunk
    level_words = []  # [t][f] -> list of int32 [1, bq]
    for t, v in enumerate(views):
      table, offset = invariants[t]
      per_field = []
      for f in range(fields):
        scale = _scale(v, (r_c + f * kp) // group, offset, channels(t))
        levels = [(lvl * scale).astype(dtype) for lvl in table]
        per_field.append(byte_lookup.level_words(levels))
      level_words.append(per_field)

    def compute(loaded, accs):
      rows, xwords = loaded
      chans = _transpose(rows, interpret)
      accs = [list(a) for a in accs]
      for f in range(fields):
        xs = []
        for m in range(m_rows):
          vals = [v for i in range(2) for v in _halves(xwords[m][2 * f + i], dtype)]
          xs.append([jnp.broadcast_to(v, (1, bq)) for v in vals])
        for t in range(4):
          accs[t] = _field_fma(chans[t], f, bits, level_words[t][f], xs, accs[t], dtype, interpret)
      return accs

    def loads(s):  # steps s .. s + unroll - 1, clamped to the plane (prefetch past the end)
      return [
        _step_loads(word_ref, x_ref, jnp.minimum(r_c + 4 * (s + u), kp - 4), q0, bq, q_ok, kp, fields)
        for u in range(unroll)
      ]

    def row_steps(i, carry):  # computes `unroll` steps while the next ones' loads are in flight
      accs, loaded = carry
      ahead = loads((i + 1) * unroll)
      for step in loaded:
        accs = compute(step, accs)
      return accs, ahead

    accs, _ = jax.lax.fori_loop(0, chunk // 4 // unroll, row_steps, (accs, loads(0)))
    return accs

  chunks = kp // chunk
  per_split = pl.cdiv(chunks, tiles.splits)
  lo = split * per_split
  zeros = [[jnp.zeros((1, bq), jnp.float32) for _ in range(m_rows)] for _ in range(4)]
  accs = jax.lax.fori_loop(lo, jnp.minimum(chunks, lo + per_split), chunk_step, zeros)
  for t in range(4):
    cols = offset + channels(t)
    if c_ref is not None:
      other = o_ref.shape[2]  # masked-out lanes: a column past the end, where no store collides
      cols = plgpu.load(c_ref.at[cols], mask=q_ok, other=other) if q_ok is not None else plgpu.load(c_ref.at[cols])
      cols = cols.astype(jnp.int32)
    for m in range(m_rows):
      rows = jnp.full((1, 1), m, jnp.int32)
      plgpu.store(o_ref.at[split, rows, cols], accs[t][m].astype(o_ref.dtype), mask=q_ok)


def _channel_invariants(view: lm.BucketView, chans):
  """(levels, offset) of the channels `chans` int32 [1, bq]: 2^b float32 [1, bq] table levels and
  the double-quantized scales' offset (None for float32 scales)."""
  layout, levels = view.layout, 1 << view.layout.bits
  if layout.tables == "shared":
    rows = jnp.zeros_like(chans)
  elif layout.tables == "indexed":
    rows = view._gather(view.refs[2], chans).astype(jnp.int32)
  else:
    rows = chans
  table = [view._gather(view.refs[1], rows * levels + j) for j in range(levels)]
  offset = None
  if layout.dq_block:
    offset = view._gather(view.refs[-1], jnp.zeros_like(chans))
  return table, offset


def _scale(view: lm.BucketView, g, offset, chans):
  """float32 [1, bq]: group row g's scales of the channels `chans`."""
  layout = view.layout
  if not layout.dq_block:
    return view._gather(view.refs[-1], g * layout.nb + chans)
  codes_ref, absmax_ref, _ = view.refs[-3:]
  codes = view._gather(codes_ref, g * layout.nb + chans)
  absmax = view._gather(absmax_ref, g * pl.cdiv(layout.nb, layout.dq_block) + chans // layout.dq_block)
  return offset + codes * (absmax * (1 / 127))


def _kernel(x_ref, *refs, layouts, group, tiles, dtype, permuted, interpret):
  o_ref, (qb, split) = refs[-1], (pl.program_id(0), pl.program_id(1))
  c_ref, refs = (refs[-2], refs[:-2]) if permuted else (None, refs[:-1])

  def body(index, bucket_refs, local, offset):
    _gemv_body(x_ref, bucket_refs, c_ref, o_ref, local, split, offset, layouts[index], group, tiles, dtype, interpret)

  lm.by_channel_block(qb, layouts, 4 * tiles.quads, refs, body)


def _operands(bucket):
  """(layout, arrays) as `lut_matmul.operands`, the plane as words and every other array flat."""
  layout, arrays = lm.operands(bucket)
  flat = [words(arrays[0])] + [a.reshape(-1) for a in arrays[1:]]
  return layout, flat


def lut_gemv(x, buckets, *, group: int, tiles: GemvTiles = GemvTiles(), columns=None, interpret: bool = False, out=None):
  """x [M, K_pad] (M <= 4, 16-bit) @ [W_1 | W_2 | ...] -> float32 partial sums
  [tiles.splits, M, sum Nb]; sum over axis 0.

  Args:
    buckets: 1- or 2-bit buckets of one tensor (`covers`), as stored.
    group: the tensor's group size.
    columns: optional int [sum Nb]: bucket-order column c is written at output column columns[c].
    out: optional buffer the result is written into (aliased); NaN-poison it to test coverage.
  """
  m = x.shape[0]
  for b in buckets:
    if not covers(b, m, x.dtype):
      raise ValueError(f"lut_gemv does not cover a {b.bits}-bit bucket of {b.num_channels} channels at M={m}, {x.dtype}.")
  checked = [_operands(b) for b in buckets]
  layouts = tuple(layout for layout, _ in checked)
  kernel = functools.partial(
    _kernel, layouts=layouts, group=group, tiles=tiles, dtype=x.dtype, permuted=columns is not None, interpret=interpret
  )
  blocks = sum(pl.cdiv(lo.nb, 4 * tiles.quads) for lo in layouts)
  n = sum(lo.nb for lo in layouts)
  flat = [a for _, arrays in checked for a in arrays]
  if columns is not None:
    flat.append(columns.reshape(-1))
  shape = jax.ShapeDtypeStruct((tiles.splits, m, n), jnp.float32)
  launch_tiles = lm.Tiles(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
  name = "lut_gemv_" + "_".join(f"{lo.bits}bit" for lo in layouts)
  return lm.launch(kernel, (_activation_words(x), *flat), shape, (blocks, tiles.splits), launch_tiles, interpret, name, out)
