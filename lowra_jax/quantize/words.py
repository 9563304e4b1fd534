"""The word layout: a decode-time form of 1- to 4-bit buckets, read by `word_gemv` at M <= 4.

A bucket's codes C[K_pad, Nb] become int32 words [G, wpg, Nb]: G scale groups of `group` rows,
wpg = group * f / 32 words each, channels contiguous, where a code takes a field of f bits
(`field_bits`: its own bits, 4 for 3-bit codes). Word q of a group holds its rows [R q, R q + R),
R = 32 / f, two adjacent rows (2p, 2p + 1) -- a *pair* -- at bits a_p and a_p + 8:

    word = sum_p C[R q + 2p] << a_p  |  C[R q + 2p + 1] << (a_p + 8)
    a_p = (0, ..., 7, 16, ..., 23) at f = 1, (0, 2, 4, 6, 16, ..., 22) at 2, (0, 4, 16, 20) at 4.

A pair lies in one channel and one scale group, so the GEMV looks both codes up at once with
byte permutations in the channel's levels, held as float16 pairs (`level_words`: L0 | L1 << 16,
L2 | L3 << 16, ...; levels are rounded to float16, which LowRA's tables already are): one
permutation up to 2 bits, a tree of them above (`word_gemv.pair_lookup`). The scales stay as
stored. The codes take the planes' bits (`packing`), 3-bit codes a third more; per-channel level
words (2^b / 2 words a channel, ~0.06 bits a weight at 4 bits and K = 4096) replace shared or
indexed tables, so converting and dropping the planes costs little memory.

`to_word_layout(tree)` converts every `QuantizedTensor` whose buckets all have 1 to 4 bits (group
size a multiple of 32 / f) and leaves the rest. Converted tensors still dequantize (`WordBucket`
has the `Bucket` methods the dense paths use), so `quantized_matmul` runs them at any M: by
`word_gemv` up to 4 rows, else on a transient weight dequantized by XLA. They are for decoding
(batch <= 4); training, saving and the plane kernels need the stored planes.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from lowra_jax.quantize import packing
from lowra_jax.quantize.qtensor import Bucket, QuantizedTensor, is_quantized, select_levels
from lowra_jax.quantize.scaling import GroupScales, expand_groups

PAIR_BITS = {  # by field width
  1: (*range(8), *range(16, 24)),
  2: (0, 2, 4, 6, 16, 18, 20, 22),
  4: (0, 4, 16, 20),
}
FIELD_BITS = {1: 1, 2: 2, 3: 4, 4: 4}  # code bits -> the width of its field in a word


def field_bits(bits: int) -> int:
  """The bits a `bits`-bit code takes in a word."""
  return FIELD_BITS[bits]


def rows_per_word(bits: int) -> int:
  return 32 // field_bits(bits)


def covers(bits: int, group: int) -> bool:
  """Whether the word layout holds b-bit codes with this group size (whole words per group)."""
  return bits in FIELD_BITS and group % rows_per_word(bits) == 0


def pack_words(codes: jax.Array, bits: int, group: int) -> jax.Array:
  """codes uint8 [K_pad, Nb] (K_pad a multiple of `group`) -> int32 words [G, wpg, Nb]."""
  k, n = codes.shape
  r = rows_per_word(bits)
  c = codes.astype(jnp.uint32).reshape(k // r, r, n)
  word = jnp.zeros((k // r, n), jnp.uint32)
  for p, at in enumerate(PAIR_BITS[field_bits(bits)]):
    word = word | (c[:, 2 * p] << at) | (c[:, 2 * p + 1] << (at + 8))
  return jax.lax.bitcast_convert_type(word, jnp.int32).reshape(k // group, group // r, n)


def unpack_words(words: jax.Array, bits: int) -> jax.Array:
  """Inverse of `pack_words`: int32 [G, wpg, Nb] -> uint8 [K_pad, Nb]."""
  w = jax.lax.bitcast_convert_type(words, jnp.uint32).reshape(-1, 1, words.shape[2])
  # row r of a word at bit shifts[r]: one broadcast shift (a stack of per-row slices made XLA
  # interleave them in a separate copy, ~70x slower on CPU)
  field = field_bits(bits)
  shifts = jnp.array([s for at in PAIR_BITS[field] for s in (at, at + 8)], jnp.uint32)
  codes = (w >> shifts[:, None]) & jnp.uint32((1 << field) - 1)
  return codes.reshape(-1, words.shape[2]).astype(jnp.uint8)


def float16_pairs(a: jax.Array) -> jax.Array:
  """[..., 2n] -> int32 [..., n]: adjacent elements as float16, the first in the low half (a
  conversion and a reinterpretation of its bytes: no shifts, so XLA can fuse it into the
  producer of `a`)."""
  pairs = a.astype(jnp.float16).reshape(*a.shape[:-1], a.shape[-1] // 2, 2)
  return jax.lax.bitcast_convert_type(pairs, jnp.int32)


def level_words(tables: jax.Array) -> jax.Array:
  """Per-channel tables [Nb, 2^b] -> int32 [2^b / 2, Nb]: float16 levels in pairs (word i holds
  levels 2i and 2i + 1)."""
  return float16_pairs(tables).T


@flax.struct.dataclass
class WordBucket:
  """One precision bucket in the word layout (module docstring).

  words: int32 [G, wpg, Nb]; level_words: int32 [2^b / 2, Nb]; scales: the bucket's
  `GroupScales` [G, Nb], as stored; bits: the codes' (a field of `field_bits(bits)` each)."""

  words: jax.Array
  level_words: jax.Array
  scales: GroupScales
  bits: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def num_channels(self) -> int:
    return self.words.shape[2]

  def channel_tables(self) -> jax.Array:
    """float32 [Nb, 2^b]: each channel's (float16-rounded) levels."""
    u = jax.lax.bitcast_convert_type(self.level_words, jnp.uint32).T  # [Nb, 2^b / 2]
    halves = jnp.stack([u & 0xFFFF, u >> 16], axis=2).reshape(u.shape[0], -1)
    return jax.lax.bitcast_convert_type(halves.astype(jnp.uint16), jnp.float16).astype(
      jnp.float32
    )

  def dequantize(self, group_size: int) -> jax.Array:
    """float32 [K_pad, Nb]."""
    codes = unpack_words(self.words, self.bits)
    tables = self.channel_tables()
    values = select_levels(codes, [tables[None, :, j] for j in range(tables.shape[1])])
    return values * expand_groups(self.scales.dequantize(), group_size)


def word_bucket(bucket: Bucket, group: int) -> WordBucket:
  """A stored bucket in the word layout (traceable)."""
  if not covers(bucket.bits, group):
    raise ValueError(
      f"the word layout holds 1- to 4-bit codes in whole words per group, not bits="
      f"{bucket.bits} with group size {group}."
    )
  codes = packing.unpack(bucket.planes, bucket.bits)
  words = pack_words(codes, bucket.bits, group)
  return WordBucket(words, level_words(bucket.channel_tables()), bucket.scales, bucket.bits)


def is_word_layout(qt: QuantizedTensor) -> bool:
  return any(isinstance(b, WordBucket) for b in qt.buckets)


def convertible(qt: QuantizedTensor) -> bool:
  """Whether every bucket of `qt` fits the word layout."""
  return all(isinstance(b, Bucket) and covers(b.bits, qt.group_size) for b in qt.buckets)


def to_word_layout(tree):
  """`tree` with every `convertible` `QuantizedTensor` in the word layout (others unchanged).

  A pure function of the tree (jit it to convert on the device); the converted tensors hold the
  originals' code bits, so convert and drop the originals rather than keep both."""

  def convert(x):
    if not is_quantized(x) or not convertible(x):
      return x
    buckets = tuple(word_bucket(b, x.group_size) for b in x.buckets)
    return x.replace(buckets=buckets)

  return jax.tree_util.tree_map(convert, tree, is_leaf=is_quantized)

