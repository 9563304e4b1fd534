"""`QuantizedTensor`: a packed low-bit kernel W[K, N] as a pytree, and its dequantization.

Output channels are grouped by precision into buckets (ascending bits; `concat_channels`' fused
tensors excepted). Bucket j holds Nb_j channels; concatenating the buckets' columns gives
W[:, perm] (perm: int [N], None when there is a single bucket). Per bucket:
  planes   uint8 [K_pad * w / 8, Nb] per plane width w (see `packing`), K_pad = K rounded up to the
           group size (padding rows are zero weights; they are stored and counted);
  tables   [T, 2**bits]: T = Nb float16 tables (one per channel), C float16 tables shared through
           `table_index` uint8 [Nb], or T = 1 float32 table for the whole bucket (NF-k);
  scales   `GroupScales` of absmax per (group of `group_size` inputs, channel), [K_pad/group_size, Nb].
Dequantized: W_hat[k, n] = tables[n][code[k, n]] * scale[k // group_size, n].
Static metadata (shape, group size, bits per bucket, dtype) is pytree aux data, so jit specialises
on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lowra_jax.quantize import packing
from lowra_jax.quantize.scaling import GroupScales, expand_groups


def select_levels(codes: jax.Array, levels: list, shift: int = 0) -> jax.Array:
  """levels[code]: the table level of each code, codes in bits [shift, shift + b) of `codes`.

  codes: integer [R, C]; levels: 2^b arrays broadcastable against it (per-channel levels as
  [1, C]). A depth-first binary tree of selects on the code bits, highest bit at the root, so at
  most b + 1 tiles are live (a breadth-first tree spilled registers at 4 bits in the Triton
  kernels). Used by XLA's dequantization (which fuses it; a gather is slower on the GPU) and
  inside the Pallas kernels.
  """
  if len(levels) == 1:
    return levels[0]
  half = len(levels) // 2
  top = (codes & (half << shift)) != 0
  return jnp.where(
    top, select_levels(codes, levels[half:], shift), select_levels(codes, levels[:half], shift)
  )


@flax.struct.dataclass
class Bucket:
  """Channels of one precision; see the module docstring."""

  planes: tuple[jax.Array, ...]
  tables: jax.Array
  scales: GroupScales
  table_index: jax.Array | None = None
  bits: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def num_channels(self) -> int:
    return self.planes[0].shape[1]

  def channel_tables(self) -> jax.Array:
    """[Nb, 2**bits]: each channel's table."""
    if self.table_index is not None:
      return self.tables[self.table_index.astype(jnp.int32)]
    return jnp.broadcast_to(self.tables, (self.num_channels, self.tables.shape[1]))

  def dequantize(self, group_size: int) -> jax.Array:
    """float32 [K_pad, Nb]."""
    codes = packing.unpack(self.planes, self.bits)  # uint8 [K_pad, Nb]
    tables = self.channel_tables().astype(jnp.float32)
    values = select_levels(codes, [tables[None, :, j] for j in range(tables.shape[1])])
    return values * expand_groups(self.scales.dequantize(), group_size)


@flax.struct.dataclass
class QuantizedTensor:
  """A packed kernel W[K, N]; see the module docstring."""

  buckets: tuple[Bucket, ...]
  perm: jax.Array | None
  shape: tuple[int, int] = flax.struct.field(pytree_node=False, default=(0, 0))
  group_size: int = flax.struct.field(pytree_node=False, default=64)
  dtype: str = flax.struct.field(pytree_node=False, default="bfloat16")

  @property
  def num_params(self) -> int:
    return self.shape[0] * self.shape[1]

  @property
  def code_bits(self) -> int:
    """Bits of the codes themselves: sum over channels of precision * K."""
    return sum(b.bits * b.num_channels for b in self.buckets) * self.shape[0]

  @property
  def stored_bits(self) -> int:
    """Everything stored: codes (with row padding), tables, indices, scales, permutation."""
    return sum(x.size * np.dtype(x.dtype).itemsize * 8 for x in jax.tree_util.tree_leaves(self))

  def inverse_perm(self) -> jax.Array | None:
    """int32 [N]: original channel j is bucket-order column inverse_perm()[j]; None: identity."""
    if self.perm is None:
      return None
    perm = self.perm.astype(jnp.int32)
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=jnp.int32))

  def channel_bits(self) -> np.ndarray:
    """int [N]: precision of each output channel in the original order (host)."""
    sorted_bits = np.concatenate([np.full(b.num_channels, b.bits) for b in self.buckets])
    if self.perm is None:
      return sorted_bits
    out = np.empty_like(sorted_bits)
    out[np.asarray(self.perm)] = sorted_bits
    return out


def concat_channels(tensors: Sequence[QuantizedTensor]) -> QuantizedTensor:
  """[W_1 | W_2 | ...] as one `QuantizedTensor` [K, sum N_i] (traceable): the buckets of every
  tensor in turn, each with its own levels and scales (codes and bits unchanged; the buckets are
  then not sorted by precision), and a permutation that puts every bucket column at its channel
  of the concatenation. Every tensor must have the same K, group size and dtype; output channel
  c of tensor i is channel N_1 + ... + N_{i-1} + c of the result. For decoding sibling
  projections in one launch (`lowra_jax.fusion`)."""
  first = tensors[0]
  for t in tensors[1:]:
    if (t.shape[0], t.group_size, t.dtype) != (first.shape[0], first.group_size, first.dtype):
      raise ValueError(
        f"concat_channels needs one input width, group size and dtype, not {first.shape} "
        f"(group {first.group_size}, {first.dtype}) and {t.shape} (group {t.group_size}, "
        f"{t.dtype})."
      )
  widths = [t.shape[1] for t in tensors]
  offsets = np.cumsum([0, *widths[:-1]])
  perm = None
  if any(t.perm is not None for t in tensors):
    total = sum(widths)
    dtype = jnp.int16 if total <= np.iinfo(np.int16).max else jnp.int32
    parts = [
      (jnp.arange(n, dtype=jnp.int32) if t.perm is None else t.perm.astype(jnp.int32)) + int(o)
      for t, n, o in zip(tensors, widths, offsets, strict=True)
    ]
    perm = jnp.concatenate(parts).astype(dtype)
  buckets = tuple(b for t in tensors for b in t.buckets)
  shape = (first.shape[0], sum(widths))
  return QuantizedTensor(buckets, perm, shape, first.group_size, first.dtype)


def dequantize_buckets(qt: QuantizedTensor, dtype=None) -> jax.Array:
  """W_hat^T [N, K] in `dtype` (default: the original dtype) with rows in bucket order (row i is
  channel perm[i]). Traceable."""
  k = qt.shape[0]
  rows = [b.dequantize(qt.group_size).T[:, :k].astype(dtype or qt.dtype) for b in qt.buckets]
  return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=0)


def dequantize_channels(qt: QuantizedTensor, dtype=None) -> jax.Array:
  """W_hat^T [N, K] in `dtype` (default: the original dtype): row n holds output channel n.

  Traceable. Buckets are dequantized in bucket order and put in channel order by a gather of
  whole rows of that materialised buffer (an optimization barrier keeps XLA from fusing the
  dequantization into the gather, which then reads the packed columns strided: several times
  slower on GPUs).
  """
  rows = dequantize_buckets(qt, dtype)
  if qt.perm is None:
    return rows
  return jax.lax.optimization_barrier(rows)[qt.inverse_perm()]


def dequantize(qt: QuantizedTensor, dtype=None) -> jax.Array:
  """W_hat [K, N] in `dtype` (default: the original dtype). Traceable."""
  return dequantize_channels(qt, dtype).T


def is_quantized(x) -> bool:
  return isinstance(x, QuantizedTensor)


@dataclasses.dataclass(frozen=True)
class BitsPerParam:
  """code: precision bits per parameter; total: every stored bit per parameter."""

  code: float
  total: float
  num_params: int


def bits_per_param(tree) -> BitsPerParam:
  """Bits per parameter over every `QuantizedTensor` in a pytree (or one tensor)."""
  qts = [x for x in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized) if is_quantized(x)]
  n = sum(q.num_params for q in qts)
  if not n:
    raise ValueError("the tree holds no QuantizedTensor; quantize it with quantize_params first.")
  return BitsPerParam(
    code=sum(q.code_bits for q in qts) / n, total=sum(q.stored_bits for q in qts) / n, num_params=n
  )
