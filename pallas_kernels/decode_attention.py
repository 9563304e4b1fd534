"""Attention of one new token per row over a KV cache (a decode step) in one launch.

`decode_attention(q, keys, values, mask, n_valid)` replaces the three kernels XLA makes of a
decode step's attention (scores, softmax, probabilities times values). A program owns one row,
one KV head (its `g` query heads share each loaded key and value block) and one range of cache
slots, and keeps an online softmax (running max, sum and weighted values in float32) over blocks
of `block_s` slots up to `n_valid` (slots past it are not read). With more than one slot range
(long caches: more programs), the ranges' partial results are combined by jnp after the launch
(`combine`). `decode_attention_reference` is its jnp form.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_NEG = -1e30  # running max before any slot: finite, so exp(_NEG - max) is 0, never NaN


@dataclasses.dataclass(frozen=True)
class AttentionTiles:
  """block_s: cache slots a step (a power of two); range_s: slots a program covers (more
  slots: several programs per row and head, combined after)."""

  block_s: int = 32
  range_s: int = 512
  num_warps: int = 4


def supported(head_dim: int, group: int) -> bool:
  """Whether the kernel takes this head size and query heads per KV head (powers of two:
  Triton's block shapes)."""
  return head_dim & (head_dim - 1) == 0 and head_dim >= 16 and group & (group - 1) == 0


def decode_attention_reference(q, keys, values, mask) -> jax.Array:
  """float32 [B, H, D]: softmax(q k / sqrt(D)) v over the slots where mask holds.

  q [B, H, D]; keys, values [B, S, KV, D] (query head h reads KV head h // (H / KV)); mask bool
  [B, S] (at least one slot per row)."""
  b, h, d = q.shape
  kv = keys.shape[2]
  q = q.astype(jnp.float32).reshape(b, kv, h // kv, d) / math.sqrt(d)
  scores = jnp.einsum("bkgd,bskd->bkgs", q, keys.astype(jnp.float32))
  scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bkgs,bskd->bkgd", probs, values.astype(jnp.float32)).reshape(b, h, d)


def _kernel(q_ref, k_ref, v_ref, mask_ref, n_ref, o_ref, m_ref, l_ref, *, slots, kv, group, tiles):
  """Program (row * KV + kv head, slot range): partial softmax sums of the group's heads."""
  i, part = pl.program_id(0), pl.program_id(1)
  b, head = i // kv, i % kv
  d = k_ref.shape[1]
  bs = tiles.block_s
  lo = part * tiles.range_s
  hi = jnp.minimum(lo + tiles.range_s, n_ref[()])
  cols = jax.lax.broadcasted_iota(jnp.int32, (bs, d), 1)
  heads = b * kv * group + head * group  # the group's first query head (a row of q)
  q = [plgpu.load(q_ref.at[pl.ds(heads + j, 1), :]).astype(jnp.float32) for j in range(group)]

  def step(t, carry):
    s = lo + t * bs + jax.lax.broadcasted_iota(jnp.int32, (bs, 1), 0)  # [bs, 1] slots
    ok = s < hi
    rows = jnp.broadcast_to((b * slots + s) * kv + head, (bs, d))
    loaded = jnp.broadcast_to(ok, (bs, d))
    k = plgpu.load(k_ref.at[rows, cols], mask=loaded, other=0).astype(jnp.float32)
    v = plgpu.load(v_ref.at[rows, cols], mask=loaded, other=0).astype(jnp.float32)
    real = plgpu.load(mask_ref.at[jnp.full((bs, 1), b, jnp.int32), s], mask=ok, other=0)
    keep = ok & (real != 0)
    out = []
    for j in range(group):
      m, l, acc = carry[j]
      scores = jnp.where(keep, jnp.sum(k * q[j], axis=1, keepdims=True), -jnp.inf)  # [bs, 1]
      m_new = jnp.maximum(m, jnp.max(scores, axis=0, keepdims=True))
      p = jnp.exp(scores - m_new)
      shrink = jnp.exp(m - m_new)
      out.append(
        (m_new, l * shrink + jnp.sum(p, axis=0, keepdims=True),
         acc * shrink + jnp.sum(p * v, axis=0, keepdims=True))
      )
    return tuple(out)

  init = tuple(
    (jnp.full((1, 1), _NEG, jnp.float32), jnp.zeros((1, 1), jnp.float32),
     jnp.zeros((1, d), jnp.float32))
    for _ in range(group)
  )
  found = jax.lax.fori_loop(0, jnp.maximum(pl.cdiv(hi - lo, bs), 0), step, init)
  for j, (m, l, acc) in enumerate(found):
    row = pl.ds(heads + j, 1)
    plgpu.store(o_ref.at[part, row, :], acc)
    plgpu.store(m_ref.at[part, row, :], m)
    plgpu.store(l_ref.at[part, row, :], l)


def combine(acc, m, l) -> jax.Array:
  """float32 [B * H, D]: the slot ranges' partial results (acc [P, B * H, D], running max and
  sum [P, B * H, 1]) as one softmax average."""
  top = jnp.max(m, axis=0)
  weight = jnp.exp(m - top)
  total = jnp.sum(weight * l, axis=0)
  return jnp.sum(weight * acc, axis=0) / jnp.where(total > 0, total, 1)


def decode_attention(
  q, keys, values, mask, n_valid, *, tiles: AttentionTiles = AttentionTiles(),
  interpret: bool = False, out=None,
):
  """[B, H, D] in q.dtype: attention of each row's query over its cache slots.

  Args:
    q: [B, H, D], the new token's queries (rotary applied).
    keys, values: [B, S, KV, D], the cache with this step's keys and values written.
    mask: bool [B, S], slots holding real tokens (this step's included).
    n_valid: int32 [], slots [n_valid, S) are not read (none of them real).
    out: optional float32 [P, B * H, D] buffer the partial results are written into (aliased);
      NaN-poison it to test coverage (P: slot ranges, `cdiv(S, tiles.range_s)`).
  """
  b, h, d = q.shape
  _, s, kv, _ = keys.shape
  group = h // kv
  if h % kv or not supported(d, group):
    raise ValueError(f"decode_attention takes power-of-two head sizes and groups, not D={d}, "
                     f"{h} heads over {kv}.")
  if tiles.range_s % tiles.block_s:
    raise ValueError(f"block_s={tiles.block_s} must divide range_s={tiles.range_s}.")
  parts = pl.cdiv(s, tiles.range_s)
  qs = (q.astype(jnp.float32) / math.sqrt(d)).reshape(b * h, d)
  flat = [a.reshape(b * s * kv, d) for a in (keys, values)]
  n = jnp.minimum(n_valid, s).astype(jnp.int32)
  operands = (qs, *flat, mask.astype(jnp.int32), n)
  shapes = [
    jax.ShapeDtypeStruct((parts, b * h, d), jnp.float32),
    jax.ShapeDtypeStruct((parts, b * h, 1), jnp.float32),
    jax.ShapeDtypeStruct((parts, b * h, 1), jnp.float32),
  ]

  def kernel(*refs):
    _kernel(*refs, slots=s, kv=kv, group=group, tiles=tiles)

  aliases = {}
  if out is not None:
    operands, aliases = (*operands, out), {len(operands): 0}
    kernel = _dropping_out_input(kernel, len(operands) - 1)
  acc, m, l = pl.pallas_call(
    kernel,
    out_shape=shapes,
    grid=(b * kv, parts),
    interpret=interpret,
    name="decode_attention",
    input_output_aliases=aliases,
    compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=1),
  )(*operands)
  if parts == 1:
    o = acc[0] / jnp.where(l[0] > 0, l[0], 1)
  else:
    o = combine(acc, m, l)
  return o.reshape(b, h, d).astype(q.dtype)


def _dropping_out_input(kernel, index: int):
  """`kernel` for a call whose operand `index` is the aliased output buffer (its ref unused)."""
  return lambda *refs: kernel(*refs[:index], *refs[index + 1 :])
