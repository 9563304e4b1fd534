"""`quantized_matmul(x, qtensor)`: x @ dequantize(qtensor) without materialising the weight.

Forward: every precision bucket's columns come from `lut_matmul`, reading the bucket as stored; when
all buckets of a mixed tensor take the kernels, one `lut_matmul_buckets` launch computes them all
and stores them in channel order, otherwise the concatenated columns are put back in channel order.
Where a bucket does not take the kernels (M >= `Tuning.dense_from_m`, or from
`channel_order_dense_from_m` for mixed and 1-bit tensors; 3- and 4-bit buckets above M = 16 and in
the backward, the `xla` backend, layouts the kernels do not cover) XLA dequantizes it (a fused
select tree) into a transient transposed weight [Nb, K] for its dot. When every bucket is dense the
whole weight becomes one transient W_hat^T [N, K] in channel order and one GEMM computes the output
or dX. That weight is written by one `lut_dequantize_t` launch, rows already in channel order,
wherever the kernel covers the tensor (a single 2-, 3- or 4-bit bucket only in 16-bit dtypes,
which it looks up by bytes: in float32 XLA's fusion is faster); otherwise XLA dequantizes it, and
a mixed tensor's channel order is restored by gathering whole rows (`row_gather`) of the output
(below `permute_weight_from_m` rows; dY's columns in the backward) or of the weight. The custom VJP
returns only dX = dY @ W_hat^T the same ways (`lut_matmul_t`) -- the base is frozen, so there is
no dW and nothing but the packed tensor itself is kept for the backward pass (with `keep_weight`,
inside a remat'd layer, the dense forward's transient weight instead). A tensor in the word layout
(`quantize.to_word_layout`, for decoding) takes `word_gemv` in the forward up to 4 rows, `word_mma`
up to `word_rows()` (the Tuning's `word_max_rows`) and the dense path otherwise. `plan(qt, m,
dtype, impl, backward)` returns all these choices for one pass as an inspectable `Plan`, which
`_forward` / `_backward` execute.

Under a device mesh (traced inside `jax.set_mesh`, see `lowra_jax.sharding`) the rows of x are
split over the mesh's batch axes with `shard_map`: each device runs the same per-bucket kernels on
its own rows against the whole packed tensor, which `shard_map` all-gathers (still packed) from its
FSDP shards. Pallas calls cannot be partitioned by XLA, so this is what keeps them per device.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lowra_jax.quantize import QuantizedTensor, dequantize_buckets, dequantize_channels
from lowra_jax.quantize.words import is_word_layout
from lowra_jax.sharding import BATCH_AXES
from pallas_kernels import backend as backend_lib
from pallas_kernels import byte_lookup
from pallas_kernels import lut_dequantize as ld
from pallas_kernels import lut_matmul as lm
from pallas_kernels import row_gather as rg
from pallas_kernels import word_gemv as wg
from pallas_kernels import word_mma as wm

@dataclasses.dataclass(frozen=True)
class Tuning:
  """The numbers `plan` dispatches by, for one GPU model (from sweeps on it:
  `benchmarks/kernels.py --sweep M`, docs/results.md).

  dense_from_m: M from which a bucket is dequantized once into a transient weight for XLA's dot
    (training-size batches are compute-bound).
  channel_order_dense_from_m: the same, per pass, for mixed and 1-bit tensors whose transient
    weight `lut_dequantize_t` writes (one launch, in channel order): their one-launch LUT forward
    is faster up to M = 64, their backward (a launch per bucket) only below 32.
  permute_weight_from_m: M from which a mixed tensor's dense path permutes the transient weight (a
    fixed cost) rather than the output and dY (costs growing with M).
  resident: forward LUT programs resident per SM (4 warps at ~170 registers a thread), for the
    split model of `_forward_splits`.
  waves: programs per SM aimed at by `_target_splits`, (one-launch mixed forward, backward).
  decode, mid, large: forward `Tiles` of M <= 16, M <= 64 and above (block_k: the most a tensor
    gets; splits set per tensor); backward_above_16: (block_n, num_stages) of the backward above
    M = 16. gemv: `word_gemv`'s tiles for tensors in the word layout (block_g: the most a tensor
    gets), split to about `gemv_per_sm` programs per SM. word_max_rows: up to this M a tensor in
    the word layout takes the word kernels (`word_gemv` up to 4 rows, then `word_mma`), above it
    the dense path; 4: `word_mma` was no faster than the plane kernels at M = 8-64 on the H200
    (docs/results.md). mma: (up to M rows, `word_mma` tiles, programs per SM the splits aim at)
    in increasing M: block_n 256 needs 176 registers a thread (2 programs of 4 warps per SM) and
    spills at M = 64, where block_n 128 needs 193 (`benchmarks/kernel_sass.py --m=M`).
    gemv_low_rank: `quantized_matmul_low_rank` adds unmerged adapters' term inside the word GEMV's
    launch (False: XLA adds it after, the A/B of what that saves). Levels are looked up in the
    activation dtype (`narrow`, byte permutations) only in the forward up to M = 64: beyond, and
    in the backward, the float32 select tree feeds the tensor cores faster.
  """

  dense_from_m: int
  channel_order_dense_from_m: dict[str, int]
  permute_weight_from_m: int
  resident: int
  waves: tuple[int, int]
  decode: lm.Tiles
  mid: lm.Tiles
  large: lm.Tiles
  backward_above_16: tuple[int, int]
  gemv: wg.GemvTiles
  gemv_per_sm: int
  word_max_rows: int
  mma: tuple[tuple[int, wm.MmaTiles, int], ...]
  gemv_low_rank: bool


H200 = Tuning(
  dense_from_m=256,
  channel_order_dense_from_m={"forward": 65, "backward": 32},
  permute_weight_from_m=2048,
  resident=2,
  waves=(2, 4),
  decode=lm.Tiles(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3),
  mid=lm.Tiles(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=2),
  large=lm.Tiles(block_m=128, block_n=64, block_k=32, num_warps=8, num_stages=2),
  backward_above_16=(32, 3),
  gemv=wg.GemvTiles(block_g=4, block_n=128, num_warps=4, num_stages=1),
  gemv_per_sm=16,
  word_max_rows=4,
  mma=((16, wm.MmaTiles(block_n=256, num_warps=4), 2), (64, wm.MmaTiles(block_n=128), 2)),
  gemv_low_rank=True,
)
# Per `jax.Device.device_kind`; other GPUs (and the CPU's interpreted kernels) use the H200's.
TUNINGS = {"NVIDIA H200": H200}


def tuning() -> Tuning:
  """The `Tuning` of this process's first device."""
  return TUNINGS.get(jax.devices()[0].device_kind, H200)


def word_rows() -> int:
  """The most rows a tensor in the word layout is multiplied by its own kernels (`plan`)."""
  return min(max(tuning().word_max_rows, wg.MAX_ROWS), wm.MAX_ROWS)


def override_tuning(overrides: dict) -> Tuning:
  """This device's `Tuning` with `overrides` (field -> value; lists as tuples, a dict for a
  `Tiles`, `GemvTiles` or `MmaTiles` field replaces those of its fields) in its place from now
  on, for benchmarks' A/Bs (`--tuning` JSON). Returns it. Call before tracing: jitted functions
  keep the plans they made."""
  base, fields = tuning(), [f.name for f in dataclasses.fields(Tuning)]
  values = {}
  for name, value in overrides.items():
    if name not in fields:
      raise ValueError(f"Tuning has no field {name!r} — use one of {', '.join(fields)}.")
    old = getattr(base, name)
    if isinstance(old, (lm.Tiles, wg.GemvTiles, wm.MmaTiles)):
      value = dataclasses.replace(old, **value)
    values[name] = tuple(value) if isinstance(value, list) else value
  TUNINGS[jax.devices()[0].device_kind] = new = dataclasses.replace(base, **values)
  return new


def _num_sms() -> int:
  return getattr(jax.devices()[0], "core_count", 132) or 132


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def _base_tiles(m: int, kp: int, group: int, backward: bool) -> lm.Tiles | None:
  """The `Tuning`'s tiles of M's shape class, block_k fitted to the tensor (None: no kernel)."""
  bk = lm.max_block_k(kp, group)
  if not bk:
    return None
  tune = tuning()
  t = tune.decode if m <= 16 else tune.mid if m <= 64 else tune.large
  t = dataclasses.replace(t, block_k=min(bk, t.block_k))
  if backward and m > 16:
    block_n, stages = tune.backward_above_16
    t = dataclasses.replace(t, block_n=block_n, num_stages=stages)
  return dataclasses.replace(t, narrow=not backward and m <= 64)


def tiles_for(m: int, kp: int, nb: int, group: int, backward: bool) -> lm.Tiles | None:
  """Block sizes by shape class, with enough reduction splits to fill the GPU.

  None when the kernels do not apply (no power-of-two block >= 16 divides Kp and the group).
  """
  t = _base_tiles(m, kp, group, backward)
  if t is None:
    return None
  m_tiles = -(-m // t.block_m)
  n_steps = -(-nb // t.block_n)
  if backward:
    splits = _target_splits(m_tiles * kp // t.block_k, n_steps, backward=True)
  else:
    splits = _forward_splits(m_tiles * n_steps, kp // t.block_k)
  return dataclasses.replace(t, splits=splits)


def _target_splits(programs: int, steps: int, backward: bool) -> int:
  """Reduction splits giving `programs` unsplit programs about `Tuning.waves` programs per SM.
  Used by the backward and by the one-launch mixed forward, whose programs differ in length (its
  1-bit programs have half the steps), which the wave model below does not weigh."""
  return max(1, min(steps, -(-tuning().waves[backward] * _num_sms() // programs)))


def _forward_splits(tiles: int, steps: int) -> int:
  """K splits of a one-bucket forward launch of `tiles` output tiles of `steps` K steps each.

  Models the launch as waves of `Tuning.resident` programs per SM, each wave as long as a program
  (its steps per split plus one for its fixed work), and picks the split count with the fewest
  modelled steps among those filling at least 90 % of one wave (fewer programs leave SMs
  half-used, slower than the model); ties go to fewer splits. On the H200 it beats
  `_target_splits` on the LLaMA-7B/70B shapes at M = 1 and 16.
  """
  slots = tuning().resident * _num_sms()
  best = (math.inf, 1)
  for s in range(1, steps + 1):
    per = -(-steps // s)  # steps per split; trailing splits may get none
    programs = tiles * -(-steps // per)
    if programs < 0.9 * slots and s < steps:
      continue
    best = min(best, (-(-programs // slots) * (per + 1), s))
  return best[1]


def _sum_splits(partial, dtype):
  """[splits, M, C] partial sums -> [M, C] in `dtype` (a reshape when there is one split)."""
  if partial.shape[0] == 1:
    return partial[0].astype(dtype)
  return partial.sum(axis=0).astype(dtype)


def _kernels_apply(bucket, impl: str) -> bool:
  """Whether the LUT kernels can run this bucket (block sizes are checked by `tiles_for`)."""
  return impl in ("triton", "interpret") and (len(bucket.planes) == 1 or bucket.bits == 3)


def _kernel_tiles(bucket, m: int, group: int, impl: str, backward: bool) -> lm.Tiles | None:
  """Tiles of the LUT matmul kernel for this bucket at M rows; None: dense weight + XLA dot.

  4-bit buckets take the kernels only in the forward for M <= 16: their backward kernel (a
  16-level select tree in float32) is slower than the dense path at every M, and their
  forward loses to it from M = 64 (H200). 3-bit buckets likewise (the backward kernel does not
  cover them; their forward's limit is 4-bit's, not measured on its own).
  """
  wide = bucket.bits in (3, 4) and (backward or m > 16)
  if not _kernels_apply(bucket, impl) or m >= tuning().dense_from_m or wide:
    return None
  return tiles_for(m, lm.block_rows(bucket), bucket.num_channels, group, backward)


def _dense_t(bucket, group: int, k: int, dtype):
  """The bucket's weights transposed, [Nb, K] in `dtype`: a transient buffer dequantized by XLA."""
  return bucket.dequantize(group).T[:, :k].astype(dtype)


def _row_kernel(rows: int, cols: int, impl: str) -> bool:
  """Whether `row_gather` (Pallas) permutes [rows, cols]; else XLA's gather does."""
  return impl in ("triton", "interpret") and rg.block_shape(rows, cols) is not None


def _gather_rows(a, idx, gather: str, impl: str):
  """a[idx] (whole rows): by the Pallas row-gather kernel (`gather` "row_gather") or XLA's."""
  if gather == "row_gather":
    return rg.row_gather(a, idx, interpret=impl == "interpret")
  return rg.row_gather_reference(a, idx)


def _weight_rows(qt: QuantizedTensor, dtype, p: Plan, impl: str):
  """W_hat^T [N, K] in channel order, a transient buffer, as the dense plan `p` says: written by
  one `lut_dequantize_t` launch, or dequantized by XLA (a mixed tensor's rows then put in channel
  order by `p.gather`)."""
  if p.weight == "lut_dequantize":
    return ld.lut_dequantize_t(qt, dtype, interpret=impl == "interpret")
  if p.permute == "weight" and p.gather == "row_gather":
    return _gather_rows(dequantize_buckets(qt, dtype), qt.inverse_perm(), p.gather, impl)
  return dequantize_channels(qt, dtype)  # XLA's gather, or none without a permutation


def _dequantize_kernel(qt: QuantizedTensor, impl: str, dtype) -> bool:
  """Whether `lut_dequantize_t` writes the tensor's transient weight in `dtype`: wherever it covers
  the tensor (a mixed one then comes out in channel order at no extra cost: the dense path never
  permutes activations), except a single 2-, 3- or 4-bit bucket in a dtype it cannot look up by
  bytes (`byte_lookup`), where XLA's fused dequantization is faster (H200)."""
  if impl not in ("triton", "interpret") or ld.block_ks(qt) is None:
    return False
  bits = qt.buckets[0].bits
  return len(qt.buckets) > 1 or bits == 1 or byte_lookup.covers(bits, dtype)


def _all_dense(qt: QuantizedTensor, m: int, impl: str, dtype, backward: bool) -> bool:
  """Whether no bucket takes the kernels at M rows (then XLA dots on transient weights): from
  `Tuning.dense_from_m` rows, or from `channel_order_dense_from_m` (per pass) for mixed and 1-bit
  tensors whose weight `lut_dequantize_t` writes."""
  mixed_or_1bit = len(qt.buckets) > 1 or qt.buckets[0].bits == 1
  from_m = tuning().channel_order_dense_from_m["backward" if backward else "forward"]
  if m >= from_m and mixed_or_1bit and _dequantize_kernel(qt, impl, dtype):
    return True
  return all(_kernel_tiles(b, m, qt.group_size, impl, backward) is None for b in qt.buckets)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one pass of `quantized_matmul` runs at M rows: what `plan` returns, and all that
  `_forward` / `_backward` decide.

  dense: every bucket is dequantized into one transient weight W_hat^T [N, K] for one XLA dot;
    weight: who writes it, "lut_dequantize" (one launch, rows in channel order) or "xla";
    permute: where a mixed tensor's channel order is restored, None (no permutation, or the
    kernel wrote channel order), "weight" (rows of the weight) or "output" (rows of y^T; in the
    backward dY's columns); gather: "row_gather" (the Pallas kernel) or "xla" when permuting.
  Otherwise `buckets` holds per bucket its LUT kernel `Tiles` or None (that bucket dequantized
  for an XLA dot); one_launch: the forward of every bucket in one `lut_matmul_buckets` launch
  (the buckets' tiles then share all but block_k); or, for a tensor in the word layout, `gemv`
  holds the tiles of one `word_gemv` launch over all its buckets, or `mma` those of one
  `word_mma` launch.
  """

  dense: bool
  weight: str | None = None
  permute: str | None = None
  gather: str | None = None
  buckets: tuple[lm.Tiles | None, ...] = ()
  one_launch: bool = False
  gemv: wg.GemvTiles | None = None
  mma: wm.MmaTiles | None = None


def plan(qt: QuantizedTensor, m: int, dtype, impl: str, backward: bool = False) -> Plan:
  """The `Plan` of x [m, K] @ W_hat (forward) or dY [m, N] @ W_hat^T (backward) in `dtype` with
  the resolved implementation `impl` ("triton", "interpret" or "xla"). A tensor in the word
  layout takes `word_gemv` in the forward up to `word_gemv.MAX_ROWS` rows, `word_mma` up to
  `word_rows()` (power-of-two group sizes), else the dense path with a weight dequantized by XLA
  (the plane kernels do not read words)."""
  words = is_word_layout(qt)
  if words and not backward and impl in ("triton", "interpret"):
    if m <= wg.MAX_ROWS:
      return Plan(dense=False, gemv=gemv_tiles(qt))
    if m <= word_rows() and not qt.group_size & (qt.group_size - 1):
      return Plan(dense=False, mma=mma_tiles(qt, m))
  if words or _all_dense(qt, m, impl, dtype, backward):
    if not words and _dequantize_kernel(qt, impl, dtype):
      return Plan(dense=True, weight="lut_dequantize")
    if qt.perm is None:
      return Plan(dense=True, weight="xla")
    if m >= tuning().permute_weight_from_m:
      gather = "row_gather" if _row_kernel(qt.shape[1], qt.shape[0], impl) else "xla"
      return Plan(dense=True, weight="xla", permute="weight", gather=gather)
    # forward: rows of y^T [N, M]; backward: dY's columns, gathered by XLA
    gather = "row_gather" if not backward and _row_kernel(qt.shape[1], m, impl) else "xla"
    return Plan(dense=True, weight="xla", permute="output", gather=gather)
  tiles = tuple(_kernel_tiles(b, m, qt.group_size, impl, backward) for b in qt.buckets)
  if backward or len(tiles) == 1 or not all(tiles):
    return Plan(dense=False, buckets=tiles)
  m_tiles = -(-m // tiles[0].block_m)
  programs = m_tiles * sum(-(-b.num_channels // tiles[0].block_n) for b in qt.buckets)
  steps = min(b.planes[0].shape[0] // t.block_k for b, t in zip(qt.buckets, tiles, strict=True))
  splits = _target_splits(programs, steps, backward=False)
  shared = tuple(dataclasses.replace(t, splits=splits) for t in tiles)
  return Plan(dense=False, buckets=shared, one_launch=True)


def gemv_tiles(qt: QuantizedTensor) -> wg.GemvTiles:
  """`Tuning.gemv` for this tensor: block_g the largest power of two up to the tuned one that
  divides its group count, splits giving about `Tuning.gemv_per_sm` programs per SM."""
  tune = tuning()
  t, groups = tune.gemv, qt.buckets[0].words.shape[0]
  block_g = t.block_g
  while groups % block_g:
    block_g //= 2
  blocks = sum(-(-b.num_channels // t.block_n) for b in qt.buckets)
  splits = max(1, min(groups // block_g, round(tune.gemv_per_sm * _num_sms() / blocks)))
  return dataclasses.replace(t, block_g=block_g, splits=splits)


def mma_tiles(qt: QuantizedTensor, m: int) -> wm.MmaTiles:
  """`Tuning.mma`'s tiles for m rows of this tensor, split to about its programs per SM."""
  _, tiles, per_sm = next(entry for entry in tuning().mma if m <= entry[0])
  groups = qt.buckets[0].words.shape[0]
  blocks = sum(-(-b.num_channels // tiles.block_n) for b in qt.buckets)
  splits = max(1, min(groups, round(per_sm * _num_sms() / blocks)))
  return dataclasses.replace(tiles, splits=splits)


# Jitted so that layers of identical shapes share one traced and lowered function.
@functools.partial(jax.jit, static_argnums=2)
def _forward(x, qt: QuantizedTensor, impl: str, low_rank: wg.LowRank | None = None):
  """x [M, K] @ W_hat in x.dtype, plus `low_rank`'s term (inference only): inside the word GEMV's
  launch where the plan takes it, else added after in float32."""
  m, k = x.shape
  p = plan(qt, m, x.dtype, impl)
  if low_rank is not None and (p.gemv is None or not tuning().gemv_low_rank):
    y = _forward(x, qt, impl).astype(jnp.float32) + wg.low_rank_reference(low_rank)
    return y.astype(x.dtype)
  if p.gemv is None and p.mma is None:
    # the word kernels dequantize nothing in XLA: without the barrier the activations' float16
    # conversion fuses into their producer (one kernel fewer per matmul in a decode step)
    x, qt = _after(x, qt)
  if p.dense:  # channels x rows: one GEMM on W_hat^T [N, K]
    if p.permute == "output":
      y_t = jnp.dot(dequantize_buckets(qt, x.dtype), x.T)
      return _gather_rows(y_t, qt.inverse_perm(), p.gather, impl).T
    return jnp.dot(_weight_rows(qt, x.dtype, p, impl), x.T).T
  xp = jnp.pad(x, ((0, 0), (0, _round_up(k, qt.group_size) - k)))
  if p.gemv is not None:
    partial = wg.word_gemv(
      xp,
      qt.buckets,
      group=qt.group_size,
      tiles=p.gemv,
      columns=qt.perm,
      low_rank=low_rank,
      interpret=impl == "interpret",
    )
    return _sum_splits(partial, x.dtype)
  if p.mma is not None:
    partial = wm.word_mma(
      xp, qt.buckets, group=qt.group_size, tiles=p.mma, columns=qt.perm,
      interpret=impl == "interpret",
    )
    return _sum_splits(partial, x.dtype)
  if p.one_launch:
    partial = lm.lut_matmul_buckets(
      xp,
      qt.buckets,
      block_ks=tuple(t.block_k for t in p.buckets),
      group=qt.group_size,
      tiles=p.buckets[0],
      dtype=x.dtype if p.buckets[0].splits == 1 else jnp.float32,
      columns=qt.perm,
      interpret=impl == "interpret",
    )
    return _sum_splits(partial, x.dtype)
  cols = []
  for b, t in zip(qt.buckets, p.buckets, strict=True):
    if t is None:
      cols.append(jnp.dot(xp, _dense_t(b, qt.group_size, xp.shape[1], x.dtype).T))
      continue
    partial = lm.lut_matmul(
      xp,
      b,
      group=qt.group_size,
      tiles=t,
      dtype=x.dtype if t.splits == 1 else jnp.float32,
      interpret=impl == "interpret",
    )
    cols.append(_sum_splits(partial, x.dtype))
  return _unpermute(cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=1), qt)


def _keeps_weight(p: Plan) -> bool:
  """Whether a forward pass by `p` makes the whole transient W_hat^T [N, K] in channel order, the
  weight a kept-weight backward multiplies dY by."""
  return p.dense and p.permute != "output"


@functools.partial(jax.jit, static_argnums=2)
def _forward_keeping_weight(x, qt: QuantizedTensor, impl: str):
  """`_forward` by a plan that `_keeps_weight`: (y [M, N], its transient W_hat^T [N, K])."""
  p = plan(qt, x.shape[0], x.dtype, impl)
  x, qt = _after(x, qt)
  w_t = _weight_rows(qt, x.dtype, p, impl)
  return jnp.dot(w_t, x.T).T, w_t


def _unpermute(y, qt: QuantizedTensor):
  """Bucket-order columns [M, N] -> channel order; scattered by perm rather than gathered by its
  inverse, which costs three more launches."""
  if qt.perm is None:
    return y
  return jnp.zeros_like(y).at[:, qt.perm.astype(jnp.int32)].set(y, unique_indices=True)


@functools.partial(jax.jit, static_argnums=2)
def _backward(g, qt: QuantizedTensor, impl: str):
  m, _ = g.shape
  k = qt.shape[0]
  p = plan(qt, m, g.dtype, impl, backward=True)
  if p.dense:
    if p.permute == "output":  # dY's columns into bucket order
      return jnp.dot(g[:, qt.perm.astype(jnp.int32)], dequantize_buckets(qt, g.dtype))
    return jnp.dot(g, _weight_rows(qt, g.dtype, p, impl))  # channel order: dY needs no gather
  one = len(qt.buckets) == 1
  if qt.perm is not None:
    g = g[:, qt.perm.astype(jnp.int32)]
  parts, start = [], 0
  for b, t in zip(qt.buckets, p.buckets, strict=True):
    gb = g if one else g[:, start : start + b.num_channels]
    start += b.num_channels
    if t is None:
      parts.append(jnp.dot(gb, _dense_t(b, qt.group_size, k, g.dtype)))  # fp32 accumulation
      continue
    partial = lm.lut_matmul_t(
      gb,
      b,
      group=qt.group_size,
      tiles=t,
      dtype=g.dtype if one and t.splits == 1 else jnp.float32,
      interpret=impl == "interpret",
    )
    parts.append(_sum_splits(partial, g.dtype if one else jnp.float32)[:, :k])
  dx = parts[0] if one else sum(part.astype(jnp.float32) for part in parts)
  return dx.astype(g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _qmm(x, qt, impl, keep_weight):
  return _forward(x, qt, impl)


def _qmm_fwd(x, qt, impl, keep_weight):
  if keep_weight and _keeps_weight(plan(qt, x.shape[0], x.dtype, impl)):
    y, w_t = _forward_keeping_weight(x, qt, impl)
    return y, (qt, w_t)
  return _forward(x, qt, impl), (qt, None)


def _zero_cotangent(a):
  if jnp.issubdtype(a.dtype, jnp.inexact):
    return jnp.zeros_like(a)
  return np.zeros(a.shape, jax.dtypes.float0)


def _after(a, qt):
  """(a, qt), on GPUs through an optimization barrier: what is computed from qt then waits for
  the activation a. In the backward (a = dY) the dequantization is not merged with the forward's
  (common subexpressions), which would keep every layer's transient weight alive from forward to
  backward; in the forward (a = x) a layer's weight is not dequantized before its input exists,
  so the (re)computed forward holds one layer's transient weight at a time
  (docs/architecture.md). On CPU the barrier raises XLA's temporaries instead, so not there."""
  barrier = lambda a, qt: jax.lax.optimization_barrier((a, qt))  # noqa: E731
  return jax.lax.platform_dependent(a, qt, cuda=barrier, rocm=barrier, default=lambda *a: a)


def _qmm_bwd(impl, keep_weight, residuals, g):
  qt, w_t = residuals
  zeros = jax.tree_util.tree_map(_zero_cotangent, qt)
  if w_t is not None:
    return jnp.dot(g, w_t), zeros
  g, qt_b = _after(g, qt)
  return _backward(g, qt_b, impl), zeros


_qmm.defvjp(_qmm_fwd, _qmm_bwd)


def quantized_matmul(
  x: jax.Array, qt: QuantizedTensor, *, backend: str = "auto", keep_weight: bool = False
) -> jax.Array:
  """x [..., K] @ dequantize(qt) [K, N] -> [..., N] in x.dtype, accumulated in float32.

  Differentiable in x (the quantized base is frozen: its cotangent is zero).
  `backend`: 'auto' (Triton kernels on GPU, dequantize + XLA dot elsewhere), 'triton',
  'interpret' (the kernels in Pallas' interpreter, for tests) or 'xla'.
  `keep_weight`: where the forward makes the whole transient weight (a dense plan in channel
  order), keep it as the backward's residual rather than dequantizing again for dX. For calls
  inside `jax.checkpoint` (a remat'd layer): there the residuals of the first forward are dropped
  and the recomputed forward's live only through the layer's backward, so the backward reuses the
  recomputation's weight at the cost of one layer's transient weights at a time. Outside remat it
  would keep every layer's weight, in the compute dtype, from forward to backward.
  """
  impl, lead, x = _rows(x, qt, backend)
  axes = _row_axes(x.shape[0])
  if axes:
    row = P(axes, None)
    # check_vma=False: pallas_call's outputs carry no varying-axes annotation.
    local = jax.shard_map(
      lambda x, qt: _qmm(x, qt, impl, keep_weight),
      in_specs=(row, P()),
      out_specs=row,
      check_vma=False,
    )
    y = local(x, qt)
  else:
    y = _qmm(x, qt, impl, keep_weight)
  return y.reshape(*lead, qt.shape[1])


def _rows(x: jax.Array, qt: QuantizedTensor, backend: str):
  """(implementation, x's leading dims, x as rows [M, K]) after checking x's features."""
  if x.shape[-1] != qt.shape[0]:
    raise ValueError(
      f"x has {x.shape[-1]} features but the quantized kernel expects {qt.shape[0]} "
      f"(kernel shape {qt.shape})."
    )
  return backend_lib.resolve(backend), x.shape[:-1], x.reshape(-1, qt.shape[0])


def quantized_matmul_low_rank(
  x: jax.Array, qt: QuantizedTensor, low_rank: wg.LowRank, *, backend: str = "auto"
) -> jax.Array:
  """Inference only (no VJP): quantized_matmul(x, qt) plus `low_rank`'s term
  (`word_gemv.LowRank`: unmerged adapters, h = x @ A computed by the caller), x [..., K] and
  low_rank.h [..., S * r] -> [..., N] in x.dtype. Where the plan takes `word_gemv` (a tensor in
  the word layout, decode rows) the term is added inside its launch: no adapter kernels after it;
  elsewhere (and under a mesh) XLA adds it after."""
  if low_rank.b.shape[1] != qt.shape[1]:
    raise ValueError(
      f"the adapter's b {low_rank.b.shape} does not fit the quantized kernel's shape {qt.shape}."
    )
  impl, lead, x = _rows(x, qt, backend)
  low_rank = dataclasses.replace(low_rank, h=low_rank.h.reshape(x.shape[0], -1))
  if _row_axes(x.shape[0]):
    y = quantized_matmul(x, qt, backend=backend).astype(jnp.float32)
    y = (y + wg.low_rank_reference(low_rank)).astype(x.dtype)
  else:
    y = _forward(x, qt, impl, low_rank)
  return y.reshape(*lead, qt.shape[1])


def _row_axes(rows: int) -> tuple[str, ...]:
  """Batch axes of the context mesh to split `rows` over; () without a mesh or when they do not
  divide `rows` (XLA then partitions the call on its own: the `xla` path gathers dequantized
  weights, Pallas calls run whole on every device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes = tuple(
    a
    for a in BATCH_AXES
    if a in mesh.axis_names
    and mesh.shape[a] > 1
    and mesh.axis_types[mesh.axis_names.index(a)] != jax.sharding.AxisType.Manual
  )
  return axes if axes and rows % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def quantized_matmul_reference(x: jax.Array, qt: QuantizedTensor) -> jax.Array:
  """x @ dequantize(qt) in x.dtype with float32 accumulation, by plain jnp."""
  from lowra_jax.quantize import dequantize

  w = dequantize(qt, x.dtype)
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
