"""Tensor-core matmul over 32-bit code words for small batches (5 <= M <= 64): x[M, K] @ W for 1-
to 4-bit buckets in the word layout (`lowra_jax.quantize.words`), as `word_gemv` reads them.

A program owns `block_n` channels of one bucket and a range of scale groups, one group a step.
Its threads look a group's pairs up for their channels, vectorised over the pairs: each pair's
word shifted by the pair's bit, masked, and its two float16 levels looked up as `word_gemv` does
(`word_gemv.pair_lookup`: up to 2 bits a multiply-add into the `prmt` selector and one `prmt`,
a tree of them above), then each pair split into its two
halves, interleaved along K: W^T [block_n, group]. One tensor-core `dot` of that tile with the
group's activations x^T [group, M_pad] (float16, M padded to a power of two >= 16) gives float32
[block_n, M_pad], scaled by the group's scales and accumulated: `word_gemv`'s float16x2 FMA per
pair and row of x becomes tensor-core work independent of M, and products are summed in float32.
Levels (at most 1 in magnitude) and activations are float16; activations must be below 65504 in
magnitude.

`word_mma(x, buckets)` computes every bucket of a tensor in one launch, columns optionally in
channel order, as partial sums over `splits` ranges of groups, like `word_gemv`. Pallas'
interpreter (CPU tests) runs the same lookups in jnp.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lowra_jax.quantize.words import PAIR_BITS, field_bits
from pallas_kernels import lut_matmul as lm
from pallas_kernels import word_gemv as wg

MIN_ROWS, MAX_ROWS = 5, 64  # below: `word_gemv`


@dataclasses.dataclass(frozen=True)
class MmaTiles:
  """block_n: channels per program; splits: ranges of groups, each a program's partial sum."""

  block_n: int = 64
  splits: int = 1
  num_warps: int = 4
  num_stages: int = 1  # > 1: the group loop software-pipelined (`loop_stages`)


def _halves(v):
  """(low, high) float16 halves [R, C] of int32 words [R, C] (truncations: register halves)."""
  h = [jax.lax.shift_right_logical(v, 16 * i).astype(jnp.int16) for i in (0, 1)]
  return [jax.lax.bitcast_convert_type(x, jnp.float16) for x in h]


def pair_shifts(field: int, pairs: int):
  """int32 [1, pairs]: the bit of each of a group's pairs in its word (`PAIR_BITS` of codes in
  `field`-bit fields, repeated)."""
  per_word = len(PAIR_BITS[field])
  q = jax.lax.broadcasted_iota(jnp.int32, (1, pairs), 1) % per_word
  half = per_word // 2
  return (q % half) * field + 16 * (q // half)


def levels_t(words, levels, bits: int, interpret: bool):
  """float16 [C, group]: W^T of one scale group for C channels, K in order.

  words: int32 [C, wpg], the group's words of each channel (word q holds rows [R q, R q + R),
  R = 32 / f, f = `field_bits(bits)`); levels: the channels' 2^b / 2 level words, int32 [C, 1]
  each. Each pair's word is shifted by the pair's bit and masked, its levels looked up
  (`word_gemv.pair_lookup`: a multiply-add and a `prmt` per pair up to 2 bits), its two float16
  levels split and interleaved along K."""
  c, wpg = words.shape
  field = field_bits(bits)
  per_word = len(PAIR_BITS[field])
  pairs = wpg * per_word
  w = jnp.broadcast_to(words[:, :, None], (c, wpg, per_word)).reshape(c, pairs)
  t = jax.lax.shift_right_logical(w, pair_shifts(field, pairs)) & ((1 << bits) - 1) * 0x0101
  v = wg.pair_lookup(t, levels, bits, interpret)  # [C, pairs]
  lo, hi = _halves(v)
  return jnp.stack([lo, hi], axis=-1).reshape(c, 2 * pairs)


def _body(xt_ref, refs, c_ref, o_ref, block, split, offset, layout, tiles, m, interpret):
  """Channel block `block` of one bucket over group range `split`; written at output columns
  offset + channel, or at c_ref[offset + channel] (int [1, N]) if given."""
  bn = tiles.block_n
  n0 = block * bn
  group, m_pad = xt_ref.shape[0] // layout.groups, xt_ref.shape[1]
  n_ok = None if layout.nb % bn == 0 else lm.range_mask(n0, bn, layout.nb, 1)
  words_ref, lv_ref = refs[:2]
  channels = n0 + jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)
  cols = offset + channels if c_ref is None else wg.columns(c_ref, o_ref, offset, n0, bn, n_ok)
  rows_n = channels.reshape(bn, 1)
  ok_n = None if n_ok is None else n_ok.reshape(bn, 1)
  levels = [lm.masked_load(lv_ref, jnp.full((1, 1), i, jnp.int32), rows_n, ok_n)
            for i in range(layout.level_words)]  # [bn, 1] each
  word_cols = rows_n + layout.nb * jax.lax.broadcasted_iota(jnp.int32, (1, layout.per_group), 1)

  def step(g, acc):
    words = lm.masked_load(words_ref, jnp.full((1, 1), g, jnp.int32), word_cols, ok_n)
    wt = levels_t(words, levels, layout.bits, interpret)  # [bn, group]
    xt = plgpu.load(xt_ref.at[pl.ds(g * group, group), pl.ds(0, m_pad)])  # [group, m_pad]
    scale = wg.scales(refs, layout, g, 1, n0, bn, n_ok).reshape(bn, 1)
    return acc + jnp.dot(wt, xt, preferred_element_type=jnp.float32) * scale

  per_split = pl.cdiv(layout.groups, tiles.splits)
  lo = split * per_split
  acc = jnp.zeros((bn, m_pad), jnp.float32)
  acc = jax.lax.fori_loop(lo, jnp.minimum(layout.groups, lo + per_split), step, acc)
  rows = jax.lax.broadcasted_iota(jnp.int32, (1, m_pad), 1)
  ok = rows < m if n_ok is None else (rows < m) & n_ok.reshape(bn, 1)
  plgpu.store(o_ref.at[split, rows, cols.reshape(bn, 1)], acc, mask=ok)


def word_mma(
  x,
  buckets,
  *,
  group: int,
  tiles: MmaTiles = MmaTiles(),
  columns=None,
  interpret: bool = False,
  out=None,
):
  """x [M, K_pad] (M <= 64) @ [W_1 | W_2 | ...] -> float32 partial sums [splits, M, sum Nb].

  Args:
    buckets: `WordBucket`s of one tensor (1 to 4 bits), computed in one launch.
    group: the tensor's group size (a power of two).
    columns: optional int [sum Nb]: bucket-order column c is written at output column columns[c]
      (a mixed tensor's `perm` gives channel order).
    out: optional buffer the result is written into (aliased); NaN-poison it to test coverage.
  """
  m = x.shape[0]
  if not 1 <= m <= MAX_ROWS:
    raise ValueError(f"word_mma multiplies 1 to {MAX_ROWS} rows, not {m}.")
  if group & (group - 1):
    raise ValueError(f"word_mma needs a power-of-two group size, not {group}.")
  m_pad = max(16, 1 << (m - 1).bit_length())  # Triton tiles: powers of two
  body = functools.partial(_body, tiles=tiles, m=m, interpret=interpret)
  xt = jnp.pad(x.astype(jnp.float16), ((0, m_pad - m), (0, 0))).T  # [K_pad, M_pad]
  return wg.launch_buckets("word_mma", body, xt, buckets, m, tiles, columns, interpret, out)
