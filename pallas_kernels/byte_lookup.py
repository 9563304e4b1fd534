"""Table lookups by byte permutation (PTX `prmt`): 16-bit levels of 2-, 3- and 4-bit codes.

`prmt.b32 d, a, b, s` fills each byte of d with one of the 8 bytes of a (bytes 0-3) and b
(bytes 4-7), picked by the nibbles of s. A 2-bit code's four 16-bit levels are exactly those 8
bytes (`level_words`), and nibbles (2c, 2c + 1) copy level c into one half of d. The selector
comes from the packed byte in two integer ops, with no shift: the code's field is masked in
place and one multiply-add moves two copies of it to the nibbles of one half of s (the low half
for the field at bit 0, the high half for the others, whose code sits too high for the low one).
A 4-bit code looks its two low bits up in four word pairs of 4 levels each with that selector and
picks the pair by its two high bits (3 selects); a 3-bit code in two pairs, picked by its high bit
(1 select). A 3-bit code need not sit in one field: with `high`, its two low bits are a 2-bit
field and its third bit any other bit of the word, both tested in place (the LUT kernels hold a
3-bit bucket's two planes side by side in one word, so no shifts gather the code first).

Per weight that is 3 instructions (2 bits), 6 (3 bits) or 10 (4 bits) instead of a select tree of
3, 7 or 15 selects and 2, 3 or 4 bit tests, which makes the forward and transient-weight kernels
faster (docs/results.md). The backward (levels looked up in float32 for its transposed dot) is
slower with it, so only the kernels looking levels up in the activation dtype use it.

Compiled kernels run the instruction as inline PTX; in Pallas' interpreter (CPU tests) the same
selectors go through `prmt_reference`, the instruction in jnp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu


def covers(bits: int, dtype) -> bool:
  """Whether `lookup` handles b-bit codes with levels in `dtype` (2 to 4 bits, 16-bit levels)."""
  return bits in (2, 3, 4) and jnp.dtype(dtype).itemsize == 2


def level_words(levels: list) -> list:
  """Pairs of 16-bit levels as int32 words: word j = levels[2j] | levels[2j + 1] << 16.

  levels: 2^b arrays of one 16-bit dtype, [1, C] each -> 2^(b-1) int32 arrays [1, C]."""
  bits = [jax.lax.bitcast_convert_type(v, jnp.int16).astype(jnp.int32) & 0xFFFF for v in levels]
  return [bits[j] | (bits[j + 1] << 16) for j in range(0, len(bits), 2)]


def _fields(field: int, bits: int, high: int | None) -> tuple[tuple[int, int, int, int], list]:
  """(`_selector` of the code's two low bits, masks of its higher bits) for a b-bit code in bits
  [field * bits, +bits) of a packed byte; with `high` (3-bit codes), for a code whose two low
  bits are the 2-bit field `field` and whose third bit is bit `high`."""
  if high is None:
    p = field * bits
    return _selector(field, bits), [4 << p, 8 << p][: bits - 2]
  return _selector(field, 2), [1 << high]


def _selector(field: int, bits: int) -> tuple[int, int, int, int]:
  """(mask, mul, add, half) for the code in bits [field * bits, +bits) of a packed byte:
  s = (byte & mask) * mul + add has nibbles (2c, 2c + 1) at d's half `half` (0 low, 1 high),
  c the code's two low bits."""
  p = field * bits
  if p == 0:
    return 0x3, 0x22, 0x10, 0
  return 0x3 << p, (1 << (9 - p)) + (1 << (13 - p)), 0x1000, 1


def prmt_reference(a, b, s):
  """PTX `prmt.b32` (default mode) in jnp: byte j of the result is byte (s >> 4j) & 7 of the
  8-byte value b:a. int32 arrays of one shape. (Nibbles with bit 3 set, sign replication in
  PTX, are not used here.)"""
  out = jnp.zeros_like(a)
  for j in range(4):
    pick = jax.lax.shift_right_logical(s, 4 * j) & 7
    src = jnp.where(pick < 4, a, b)
    byte = jax.lax.shift_right_logical(src, 8 * (pick & 3)) & 0xFF
    out = out | (byte << (8 * j))
  return out


def _lookup_reference(codes, field, bits, words, high=None):
  """int32 [R, C]: the looked-up level's 16 bits (as a signed int16 value)."""
  (mask, mul, add, half), highs = _fields(field, bits, high)
  s = (codes & mask) * mul + add
  words = [jnp.broadcast_to(w, codes.shape) for w in words]
  found = [prmt_reference(words[j], words[j + 1], s) for j in range(0, len(words), 2)]
  for bit in highs:  # pick each pair of word pairs by bit 2, then by bit 3
    on = (codes & bit) != 0
    found = [jnp.where(on, found[j + 1], found[j]) for j in range(0, len(found), 2)]
  if half == 0:
    return (found[0] << 16) >> 16  # sign-extended: the int16 value in an int32
  return found[0] >> 16


def _asm(field: int, bits: int, high: int | None = None) -> str:
  """The PTX of one lookup: $0 the 16-bit level, $1 the packed byte, $2.. the level words."""
  (mask, mul, add, half), highs = _fields(field, bits, high)
  take = "mov.b32 {l, h}, d; mov.b16 $0, " + ("h;" if half else "l;")
  head = f"and.b32 c, $1, {mask}; mad.lo.u32 s, c, {mul}, {add}; "
  if bits == 2:
    return "{ .reg .b32 c, s, d; .reg .b16 l, h; " + head + "prmt.b32 d, $2, $3, s; " + take + " }"
  if bits == 3:
    return (
      "{ .reg .b32 c, s, d, d0, d1; .reg .pred p2; .reg .b16 l, h; "
      + head
      + "prmt.b32 d0, $2, $3, s; prmt.b32 d1, $4, $5, s; "
      + f"and.b32 c, $1, {highs[0]}; setp.ne.u32 p2, c, 0; selp.b32 d, d1, d0, p2; "
      + take
      + " }"
    )
  return (
    "{ .reg .b32 c, s, d, d0, d1, d2, d3, e0, e1; .reg .pred p2, p3; .reg .b16 l, h; "
    + head
    + "prmt.b32 d0, $2, $3, s; prmt.b32 d1, $4, $5, s; "
    + "prmt.b32 d2, $6, $7, s; prmt.b32 d3, $8, $9, s; "
    + f"and.b32 c, $1, {highs[0]}; setp.ne.u32 p2, c, 0; "
    + f"and.b32 c, $1, {highs[1]}; setp.ne.u32 p3, c, 0; "
    + "selp.b32 e0, d1, d0, p2; selp.b32 e1, d3, d2, p2; selp.b32 d, e1, e0, p3; "
    + take
    + " }"
  )


def lookup(
  codes, field: int, bits: int, levels: list, *, interpret: bool, high: int | None = None
):
  """levels[code] for the b-bit code in bits [field * bits, +bits) of each packed byte.

  Args:
    codes: int32 [R, C], packed bytes (values 0..255), or words holding them.
    field: which code of the byte (0 .. 8 // bits - 1); bits: 2, 3 or 4 (`covers`).
    levels: 2^bits arrays [1, C] of one 16-bit dtype: each channel's levels.
    interpret: emulate the instruction in jnp (Pallas' interpreter) instead of inline PTX.
    high: 3-bit codes only: the code's two low bits are the 2-bit field `field` (bits
      [2 * field, +2)) and its third bit is bit `high` of `codes` (a 3-bit bucket's two planes
      side by side in one word: no shifts to gather the code first).
  Returns:
    [R, C] in the levels' dtype.
  """
  dtype = levels[0].dtype
  if not covers(bits, dtype):
    raise ValueError(f"byte lookup needs 2- to 4-bit codes and 16-bit levels, not {bits}, {dtype}")
  if high is not None and bits != 3:
    raise ValueError(f"a code split over two fields (high={high}) must have 3 bits, not {bits}.")
  words = level_words(levels)
  if interpret:
    found = _lookup_reference(codes, field, bits, words, high).astype(jnp.int16)
    return jax.lax.bitcast_convert_type(found, dtype)
  args = [codes] + [jnp.broadcast_to(w, codes.shape) for w in words]
  (found,) = plgpu.elementwise_inline_asm(
    _asm(field, bits, high),
    args=args,
    constraints=",".join(["=h"] + ["r"] * len(args)),
    pack=1,
    result_shape_dtypes=[jax.ShapeDtypeStruct(codes.shape, dtype)],
  )
  return found
