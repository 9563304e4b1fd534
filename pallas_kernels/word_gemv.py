"""GEMV over 32-bit code words for decode sizes (M <= 4): x[M, K] @ W for 1- to 4-bit buckets in
the word layout (`lowra_jax.quantize.words`).

A word holds pairs of codes of one channel and scale group (rows 2p, 2p + 1 at bits a_p and
a_p + 8), so one byte permutation (PTX `prmt`) looks a 1- or 2-bit pair up at once in the
channel's float16 levels (two level words at 2 bits, one at 1 bit), and one float16x2 FMA per
activation row multiplies it by the pair's activations. The selector s = 0x1010 + 0x22 (a + 256 b)
of codes a, b is a multiply-add of the masked word (`SelectorPlan`): the pairs at bits a_p and
a_p + 16 share one shift, mask and `mad.lo` (each pair's selector in its own 16 bits), and the
second's is shifted down: 2 integer instructions a pair besides its `prmt` (1.5 without the
shift). A word's products are summed in float16 (4 to 16 pairs), then in float32 with the
group's scale: about 2 instructions a weight at M = 1 plus one FMA per pair and further row,
against ~10 for the tensor-core kernels' byte lookups (`lut_matmul`).

3- and 4-bit codes (4-bit fields) take a tree of permutations (`pair_lookup`): the two low bits
select in each pair of level words, each further bit between pairs of those results, one
selector a stage (`stage_plans`, each stage's selectors shared by the pairs at a_p and a_p + 16,
the second's shifted down): 2 + 1 `prmt`s and ~3.5 selector instructions a 3-bit pair, 4 + 2 + 1
and ~5.5 a 4-bit pair, about 6.75 instructions a weight at 4 bits and M = 1 by count (7.8 in
its SASS: `benchmarks/kernel_sass.py`).

Activations are converted to float16 (`x_pairs`), so a word's partial sum overflows when its 16 / f
products (f-bit fields) of |x| |level| exceed 65504 (levels are at most 1 in magnitude: |x| up to
~2000 at 1 bit, ~4000 at 2, ~8000 at 3 and 4): a limit to check on models with massive activations.

`word_gemv(x, buckets)` computes every bucket of a tensor in one launch, columns optionally in
channel order (a mixed tensor's permutation), as partial sums over `splits` ranges of groups. A
program owns `block_n` channels of one bucket and a range of groups, `block_g` groups a step.
With a `LowRank` (unmerged adapters: h = x @ A, and B), the programs of group range 0 add
scale * h @ B at their columns before storing, so decoding with adapters launches no kernels for
them after the GEMV (`low_rank_reference` is its jnp form). Compiled kernels run the per-pair
work as inline PTX; Pallas' interpreter (CPU tests) runs the same lookups and arithmetic in jnp
(`prmt` by `byte_lookup.prmt_reference`, float16 rounding per FMA), its selectors computed
directly: the inline PTX of each lookup (`lookup_code`) is run on Python integers by the tests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lowra_jax.quantize.words import PAIR_BITS, WordBucket, field_bits, float16_pairs
from pallas_kernels import byte_lookup, loop_stages
from pallas_kernels import lut_matmul as lm

MAX_ROWS = 4  # activation rows one program multiplies (a float16x2 FMA per pair and row)


def x_pairs(x: jax.Array, group: int) -> jax.Array:
  """x [M, K_pad] -> int32 [M, G, group / 2]: float16 pairs of adjacent inputs, per group."""
  m, k = x.shape
  return float16_pairs(x).reshape(m, k // group, group // 2)


@dataclasses.dataclass(frozen=True)
class SelectorPlan:
  """How the `prmt` selectors of the pairs at bits `at` and `at + 16` of a word are built: with
  t = (word >> shift) & mask (both pairs' codes), s = t * mul + add (`mad.lo`) holds the first
  pair's selector in its low 16 bits and the second's in its high 16 bits (no carry crosses
  between them); `prmt` reads a selector's low 16 bits only, so the second pair takes s >> 16."""

  shift: int
  mask: int
  mul: int
  add: int = 0x10101010


def selector_plan(at: int, bits: int) -> SelectorPlan:
  """The `SelectorPlan` of the pairs at `at` (< 8) and `at + 16` of `bits`-bit codes. A pair's
  selector must be 0x1010 + 34 (c0 + 256 c1) for codes c0 at its bit a and c1 at a + 8
  (`tests/test_word_gemv.py` checks every plan against Python integers)."""
  shift = 0 if at == 1 else at  # at 1 the masked codes are 2 c: multiplied by 17, no shift
  mask = ((1 << bits) - 1) * 0x01010101 << (at - shift)
  return SelectorPlan(shift, mask, 17 if at == 1 else 34)


def stage_plans(at: int, bits: int) -> tuple[SelectorPlan, ...]:
  """The `SelectorPlan` of each stage of `pair_lookup` for the pairs at `at` and `at + 16`: up to
  2 bits `selector_plan`'s; above, the low two bits' (0x1010 + 34 (l0 + 256 l1)), then for each
  further bit k one giving 0x3210 + 0x44 (b0 + 256 b1) from the codes' bits k (moved to bit 2)."""
  if bits <= 2:
    return (selector_plan(at, bits),)
  high = (SelectorPlan(at + k - 2, 0x04040404, 17, 0x32103210) for k in range(2, bits))
  return (SelectorPlan(at, 0x03030303, 34), *high)


def pair_lookup(t, levels, bits: int, interpret: bool):
  """int32 [R, C]: the float16 levels of codes c0 (low half) and c1 (high half) of b-bit codes
  t = c0 + 256 c1 (int32 [R, C]); levels: the 2^b / 2 level words (broadcast to t).

  Up to 2 bits one `prmt` of the level words. Above, a tree: the two low bits select in every
  pair of level words (4 levels each), then each further bit of a code selects its half between
  pairs of those results (`prmt` selector 0x3210 + 0x44 (b0 + 256 b1)): 2^b / 4 + ... + 1
  permutations."""
  low = t & 0x0303 if bits > 2 else t
  found = [prmt(levels[i], levels[min(i + 1, len(levels) - 1)], low * 34 + 0x1010, interpret)
           for i in range(0, len(levels), 2)]  # fmt: skip
  for k in range(2, bits):
    s = (jax.lax.shift_right_logical(t, k) & 0x0101) * 0x44 + 0x3210
    found = [prmt(found[i], found[i + 1], s, interpret) for i in range(0, len(found), 2)]
  (pairs,) = found
  return pairs


def lookup_code(plans: tuple[SelectorPlan, ...], down: bool) -> str:
  """Inline PTX of one pair's `pair_lookup`: each stage's selector from the word ($1) by its
  plan (shifted down by 16 when `down`: the pair at `at + 16`), then the tree of `prmt`s over
  the level words ($2, $3, ...; two of them for one stage) into $0."""
  code, names, temps = [], [f"${2 + i}" for i in range(2 ** len(plans))], []
  for i, plan in enumerate(plans):
    code.append(f"shr.u32 t, $1, {plan.shift};" if plan.shift else "mov.b32 t, $1;")
    code.append(f"and.b32 s{i}, t, {plan.mask:#x};")
    code.append(f"mad.lo.u32 s{i}, s{i}, {plan.mul}, {plan.add:#x};")
    code += [f"shr.u32 s{i}, s{i}, 16;"] if down else []
  for i in range(len(plans)):
    found = []
    for j in range(0, len(names), 2):
      found.append("$0" if len(names) == 2 else f"v{len(temps)}")
      temps += [found[-1]] if len(names) > 2 else []
      code.append(f"prmt.b32 {found[-1]}, {names[j]}, {names[j + 1]}, s{i};")
    names = found
  regs = ", ".join(["t", *(f"s{i}" for i in range(len(plans))), *temps])
  return "{ .reg .b32 " + regs + "; " + " ".join(code) + " }"


def lookup_pairs(word, levels, at: int, bits: int, interpret: bool):
  """int32 [R, C] each: the float16 levels of the pairs at bits `at` and `at + 16` of each word
  (low half: the pair's first row's). word int32 [R, C]; levels: the 2^b / 2 level words [R, C]
  (or [1, C])."""
  if interpret:
    mask = ((1 << bits) - 1) * 0x0101
    return [pair_lookup(jax.lax.shift_right_logical(word, a) & mask, levels, bits, interpret)
            for a in (at, at + 16)]  # fmt: skip
  plans = stage_plans(at, bits)
  table = levels if bits > 2 else (levels[0], levels[-1])
  table = [jnp.broadcast_to(v, word.shape) for v in table]
  # one asm block per pair (Pallas lowers one output per block); both compute the same selector
  # words, which ptxas computes once
  return [_asm(lookup_code(plans, down), word, *table) for down in (False, True)]


def prmt(a, b, s, interpret: bool):
  """int32 [R, C]: PTX `prmt.b32` of the 8 bytes b:a by selectors s (a, b broadcast to s)."""
  a, b = (jnp.broadcast_to(v, s.shape) for v in (a, b))
  if interpret:
    return byte_lookup.prmt_reference(a, b, s)
  return _asm("prmt.b32 $0, $1, $2, $3;", a, b, s)


def _asm(code: str, *args, out="r", dtype=jnp.int32):
  """One output of inline PTX `code` over int32 args of one shape ($0 the output)."""
  (found,) = plgpu.elementwise_inline_asm(
    code,
    args=list(args),
    constraints=",".join([f"={out}"] + ["r"] * len(args)),
    pack=1,
    result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, dtype)],
  )
  return found


def _halves(v):
  """The two float16 halves of int32 words, as float32 (low, high)."""
  h = [(jax.lax.shift_right_logical(v, 16 * i) & 0xFFFF).astype(jnp.uint16) for i in (0, 1)]
  return [jax.lax.bitcast_convert_type(x, jnp.float16).astype(jnp.float32) for x in h]


def _fma2(v, x, acc, interpret: bool):
  """float16x2 v * x + acc (acc None: v * x), int32 words; the interpreter rounds each half's
  float32 result to float16 (PTX rounds the fused result once: they may differ in the last
  bit)."""
  if interpret:
    a, b = _halves(v), _halves(x)
    c = _halves(acc) if acc is not None else (0.0, 0.0)
    h = [(a[i] * b[i] + c[i]).astype(jnp.float16) for i in (0, 1)]
    h = [jax.lax.bitcast_convert_type(y, jnp.uint16).astype(jnp.uint32) for y in h]
    return jax.lax.bitcast_convert_type(h[0] | (h[1] << 16), jnp.int32)
  x = jnp.broadcast_to(x, v.shape)
  if acc is None:
    return _asm("mul.rn.f16x2 $0, $1, $2;", v, x)
  return _asm("fma.rn.f16x2 $0, $1, $2, $3;", v, x, acc)


def _sum2(acc, interpret: bool):
  """float32 [R, C]: the sum of the two float16 halves of each word."""
  if interpret:
    lo, hi = _halves(acc)
    return lo + hi
  code = (
    "{ .reg .b16 l, h; .reg .f32 fl, fh; mov.b32 {l, h}, $1; "
    "cvt.f32.f16 fl, l; cvt.f32.f16 fh, h; add.f32 $0, fl, fh; }"
  )
  return _asm(code, acc, out="f", dtype=jnp.float32)


def word_dots(word, levels, xs, bits: int, interpret: bool):
  """Per row of activations, each word's dot product with its pairs' activations, float32 [R, C].

  word int32 [R, C]; levels: the 2^b / 2 level words [R, C] (or [1, C]); xs: per row, the 16 / f
  pairs of float16 activations of the word's rows (f = `field_bits(bits)`), int32 [R, 1] each
  (row r's pair p at r * pairs + p). Levels times activations are summed in float16 over the
  word, then converted."""
  pair_bits = PAIR_BITS[field_bits(bits)]
  npairs = len(pair_bits)
  accs = [None] * (len(xs) // npairs)
  for p, at in enumerate(pair_bits[: npairs // 2]):  # pairs p and p + npairs / 2 (at + 16)
    for q, v in zip((p, p + npairs // 2), lookup_pairs(word, levels, at, bits, interpret)):
      accs = [_fma2(v, xs[r * npairs + q], a, interpret) for r, a in enumerate(accs)]
  return [_sum2(a, interpret) for a in accs]


@dataclasses.dataclass(frozen=True)
class GemvTiles:
  """block_g: scale groups per step; block_n: channels per program; splits: ranges of groups,
  each a program's partial sum."""

  block_g: int = 4
  block_n: int = 128
  splits: int = 1
  num_warps: int = 4
  num_stages: int = 1  # > 1: the step loop software-pipelined (`loop_stages`)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank:
  """An adapter term added to a GEMV's output: y[m, n] += scale * sum_j h[m, s(n) r + j] b[j, n],
  where s(n) is the segment of output column n (`bounds`: the first columns of segments 1, 2,
  ...; fused siblings' adapters side by side, each its own rank-r h).

  h: [M, S * r], the activations times each segment's A; b: [r, N], the segments' B's side by
  side in output-column order (both any float dtype; products and sums in float32)."""

  h: jax.Array
  b: jax.Array
  scale: float = dataclasses.field(metadata=dict(static=True))
  bounds: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))


def low_rank_reference(low_rank: LowRank) -> jax.Array:
  """float32 [M, N]: `LowRank`'s term by jnp, segment by segment."""
  rank, n = low_rank.b.shape
  edges = (0, *low_rank.bounds, n)
  h, b = (a.astype(jnp.float32) for a in (low_rank.h, low_rank.b))
  parts = [h[:, s * rank : (s + 1) * rank] @ b[:, lo:hi] for s, (lo, hi) in
           enumerate(zip(edges[:-1], edges[1:]))]
  return jnp.concatenate(parts, axis=1) * low_rank.scale


def low_rank_term(refs, low_rank: LowRank, row: int, cols, ok):
  """float32 [1, bn]: row `row`'s adapter term at output columns `cols` (int [1, bn]); loads
  masked by `ok` ([1, bn] bool: the lanes of this program that add it). The rank axis is padded
  to a power of two (Triton's block shapes), its extra rows masked."""
  h_ref, b_ref = refs
  rank = b_ref.shape[0]
  j = jax.lax.broadcasted_iota(jnp.int32, (pl.next_power_of_2(rank), 1), 0)
  segment = sum((cols >= bound).astype(jnp.int32) for bound in low_rank.bounds)
  mask = ok & (j < rank)  # [R, bn]; Triton takes index arrays of the loaded shape
  h_cols = jnp.broadcast_to(segment * rank + j, mask.shape)
  h = plgpu.load(h_ref.at[jnp.full(mask.shape, row, jnp.int32), h_cols], mask=mask, other=0)
  b = plgpu.load(b_ref.at[j, cols], mask=mask, other=0)
  product = h.astype(jnp.float32) * b.astype(jnp.float32)
  return product.sum(axis=0, keepdims=True) * low_rank.scale


@dataclasses.dataclass(frozen=True)
class WordLayout:
  """Static layout of one bucket's operands: words, level words, scales (values, or int8 codes +
  block absmax [G, ceil(Nb / dq_block)] + offset [1] when dq_block)."""

  bits: int
  groups: int
  per_group: int  # words per group
  nb: int
  dq_block: int

  @property
  def level_words(self) -> int:
    return 2 ** (self.bits - 1)

  @property
  def num_refs(self) -> int:
    return 2 + (3 if self.dq_block else 1)


def operands(b: WordBucket) -> tuple[WordLayout, tuple[jax.Array, ...]]:
  g, wpg, nb = b.words.shape
  s = b.scales
  layout = WordLayout(b.bits, g, wpg, nb, s.dq_block)
  if s.dq_block:
    scales = (s.codes, s.block_absmax, jnp.reshape(s.offset, (1,)))
  else:
    scales = (s.values,)
  return layout, (b.words.reshape(g, wpg * nb), b.level_words, *scales)


def scales(refs, layout: WordLayout, g0, bg, n0, bn, n_ok):
  """float32 [bg, bn]: the scales of groups [g0, g0 + bg) of channels [n0, n0 + bn)."""
  rows, cols = pl.ds(g0, bg), pl.ds(n0, bn)
  if not layout.dq_block:
    return lm.masked_load(refs[2], rows, cols, n_ok)
  codes_ref, absmax_ref, offset_ref = refs[2:]
  codes = lm.masked_load(codes_ref, rows, cols, n_ok).astype(jnp.float32)
  dq = layout.dq_block
  if dq % bn == 0:  # one absmax block holds the program's channels
    absmax = plgpu.load(absmax_ref.at[rows, pl.ds(n0 // dq, 1)])  # [bg, 1]
  else:
    index = (n0 + jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)) // dq
    absmax = plgpu.load(absmax_ref.at[g0 + jax.lax.broadcasted_iota(jnp.int32, (bg, 1), 0), index])
  offset = plgpu.load(offset_ref.at[jnp.zeros((1, 1), jnp.int32)])
  return offset + codes * (absmax * (1 / 127))


def _stream(view, n_ok, volatile: bool):
  """A step's words. Not pipelined, volatile loads, which the assembler keeps in order (it would
  otherwise move each next to its first use and wait for memory once per word); pipelined, plain
  loads, which Triton turns into asynchronous copies issued steps ahead."""
  other = {} if n_ok is None else dict(mask=n_ok, other=0)
  return plgpu.load(view, volatile=volatile, **other)


def columns(c_ref, o_ref, offset, n0, bn, n_ok):
  """Output column ids [1, bn] of channels [n0, n0 + bn) of a bucket at `offset`: those positions,
  or c_ref's entries there (int [1, N]) when given."""
  col_ids = pl.ds(offset + n0, bn)
  if c_ref is None:
    return col_ids
  view = c_ref.at[pl.ds(0, 1), col_ids]
  if n_ok is None:
    return plgpu.load(view).astype(jnp.int32)
  # masked-out lanes get a column past the end (no collisions in the interpreter)
  return plgpu.load(view, mask=n_ok, other=o_ref.shape[2]).astype(jnp.int32)


def _body(
  x_ref, refs, c_ref, o_ref, block, split, offset, layout: WordLayout, tiles, interpret,
  low_rank=None, low_rank_refs=None,
):
  """Channel block `block` of one bucket over group range `split`; written at output columns
  offset + channel, or at c_ref[offset + channel] (int [1, N]) if given; group range 0 also adds
  the `LowRank` term when given (its refs: h, b).

  A step's words are loaded before any of its arithmetic (`_stream`): a program waits for memory
  once a step, not once per word of a group. Its level words are loaded as [block_g, block_n]
  tiles in the words' own layout: loaded once as [1, block_n] and broadcast, they went through
  shared memory and barriers (a layout conversion) before the first word could be loaded."""
  bg, bn = tiles.block_g, tiles.block_n
  n0 = block * bn
  m = x_ref.shape[0] // layout.groups
  n_ok = None if layout.nb % bn == 0 else lm.range_mask(n0, bn, layout.nb, 1)
  words_ref, lv_ref = refs[:2]
  npairs = len(PAIR_BITS[field_bits(layout.bits)])
  col_ids = columns(c_ref, o_ref, offset, n0, bn, n_ok)
  channels = n0 + jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)

  volatile = tiles.num_stages == 1

  def step(t, accs):
    g0 = t * bg
    words = [
      _stream(words_ref.at[pl.ds(g0, bg), pl.ds(j * layout.nb + n0, bn)], n_ok, volatile)
      for j in range(layout.per_group)
    ]
    xs = [
      [
        plgpu.load(
          x_ref.at[pl.ds(r * layout.groups + g0, bg), pl.ds(j * npairs + p, 1)],
          volatile=volatile and j == r == p == 0,  # after the words: anchors them before the math
        )
        for r in range(m)
        for p in range(npairs)
      ]
      for j in range(layout.per_group)
    ]
    # the level words in the words' own layout ([bg, bn], rows repeated): no layout conversion
    levels = [
      lm.masked_load(lv_ref, jnp.full((bg, 1), i, jnp.int32), channels, n_ok)
      for i in range(layout.level_words)
    ]
    scale = scales(refs, layout, g0, bg, n0, bn, n_ok)
    sums = [jnp.zeros((bg, bn), jnp.float32) for _ in range(m)]
    for word, x in zip(words, xs):
      for r, d in enumerate(word_dots(word, levels, x, layout.bits, interpret)):
        sums[r] = sums[r] + d
    return tuple(a + s * scale for a, s in zip(accs, sums))

  steps = layout.groups // bg
  per_split = pl.cdiv(steps, tiles.splits)
  lo = split * per_split
  init = tuple(jnp.zeros((bg, bn), jnp.float32) for _ in range(m))
  accs = jax.lax.fori_loop(lo, jnp.minimum(steps, lo + per_split), step, init)
  out = [a.sum(axis=0, keepdims=True) for a in accs]  # [1, bn] per row
  if low_rank is not None:
    cols = offset + channels if c_ref is None else col_ids  # int [1, bn] output columns
    ok = jnp.full((1, bn), split == 0) if n_ok is None else n_ok & (split == 0)
    out = [o + low_rank_term(low_rank_refs, low_rank, r, cols, ok) for r, o in enumerate(out)]
  for r in range(m):
    row = pl.ds(r, 1) if c_ref is None else jnp.full((1, 1), r, jnp.int32)
    plgpu.store(o_ref.at[split, row, col_ids], out[r], mask=n_ok)


def launch_buckets(
  family, body, x, buckets, m: int, tiles, columns, interpret: bool, out, low_rank=None
):
  """One launch of `body` over every bucket's channel blocks (`tiles.block_n`) and
  `tiles.splits` group ranges -> float32 partial sums [splits, m, sum Nb]: program (j, split)
  runs body(x_ref, bucket_refs, c_ref, o_ref, block, split, offset, layout) for the bucket whose
  blocks include j (c_ref: `columns` as int [1, N], or None), and passes `low_rank` and its refs
  (h, b) as keywords when given. Shared by `word_gemv` and `word_mma` (`family`: the kernel's
  name; `x`: its activation operand)."""
  checked = [operands(b) for b in buckets]
  layouts = tuple(layout for layout, _ in checked)
  permuted = columns is not None
  extra = () if low_rank is None else (low_rank.h, low_rank.b)

  def kernel(x_ref, *refs):
    o_ref, (j, split) = refs[-1], (pl.program_id(0), pl.program_id(1))
    refs = refs[:-1]
    lr = {}
    if extra:
      lr = dict(low_rank=low_rank, low_rank_refs=refs[-2:])
      refs = refs[:-2]
    c_ref, refs = (refs[-1], refs[:-1]) if permuted else (None, refs)

    def run(index, bucket_refs, local, offset):
      body(x_ref, bucket_refs, c_ref, o_ref, local, split, offset, layouts[index], **lr)

    lm.by_channel_block(j, layouts, tiles.block_n, refs, run)

  blocks = sum(pl.cdiv(lo.nb, tiles.block_n) for lo in layouts)
  shape = jax.ShapeDtypeStruct((tiles.splits, m, sum(lo.nb for lo in layouts)), jnp.float32)
  flat = [a for _, arrays in checked for a in arrays]
  if permuted:
    flat.append(columns.reshape(1, -1))
  flat.extend(extra)
  variant = "_".join(f"{lo.bits}bit" for lo in layouts) + ("_lora" if extra else "")
  name = loop_stages.kernel_name(family, variant, tiles.num_stages, interpret)
  t = lm.Tiles(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
  return lm.launch(kernel, (x, *flat), shape, (blocks, tiles.splits), t, interpret, name, out)


def word_gemv(
  x,
  buckets,
  *,
  group: int,
  tiles: GemvTiles = GemvTiles(),
  columns=None,
  low_rank: LowRank | None = None,
  interpret: bool = False,
  out=None,
):
  """x [M, K_pad] (M <= 4) @ [W_1 | W_2 | ...] -> float32 partial sums [splits, M, sum Nb], plus
  `low_rank`'s term in partial sum 0 when given.

  Args:
    buckets: `WordBucket`s of one tensor (1 to 4 bits), computed in one launch.
    group: the tensor's group size; tiles.block_g must divide its group count.
    columns: optional int [sum Nb]: bucket-order column c is written at output column columns[c]
      (a mixed tensor's `perm` gives channel order).
    out: optional buffer the result is written into (aliased); NaN-poison it to test coverage.
  """
  m = x.shape[0]
  if not 1 <= m <= MAX_ROWS:
    raise ValueError(f"word_gemv multiplies 1 to {MAX_ROWS} rows, not {m}.")
  groups = buckets[0].words.shape[0]
  if groups % tiles.block_g:
    raise ValueError(f"block_g={tiles.block_g} must divide the {groups} groups.")
  body = functools.partial(_body, tiles=tiles, interpret=interpret)
  xp = x_pairs(x, group).reshape(-1, group // 2)  # [M * G, group / 2]
  if low_rank is not None and low_rank.h.shape[0] != m:
    raise ValueError(f"low_rank.h has {low_rank.h.shape[0]} rows for {m} rows of x.")
  return launch_buckets(
    "word_gemv", body, xp, buckets, m, tiles, columns, interpret, out, low_rank
  )
