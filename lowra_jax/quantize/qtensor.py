"""`QuantizedTensor`: a packed low-bit kernel W[K, N] as a pytree, and its dequantization.

Output channels are grouped by precision into buckets (ascending bits). Bucket j holds Nb_j
channels; concatenating the buckets' columns gives W[:, perm] (perm: int [N], None when there is a
single bucket). Per bucket:
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

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lowra_jax.quantize import packing
from lowra_jax.quantize.scaling import GroupScales, expand_groups


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
    codes = packing.unpack(self.planes, self.bits).astype(jnp.int32)  # [K_pad, Nb]
    values = jnp.take_along_axis(self.channel_tables().astype(jnp.float32).T, codes, axis=0)
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

  def channel_bits(self) -> np.ndarray:
    """int [N]: precision of each output channel in the original order (host)."""
    sorted_bits = np.concatenate([np.full(b.num_channels, b.bits) for b in self.buckets])
    if self.perm is None:
      return sorted_bits
    out = np.empty_like(sorted_bits)
    out[np.asarray(self.perm)] = sorted_bits
    return out


def dequantize(qt: QuantizedTensor, dtype=None) -> jax.Array:
  """W_hat [K, N] in `dtype` (default: the original dtype). Traceable."""
  cols = jnp.concatenate([b.dequantize(qt.group_size) for b in qt.buckets], axis=1)
  if qt.perm is not None:
    cols = jnp.zeros_like(cols).at[:, qt.perm.astype(jnp.int32)].set(cols)
  return cols[: qt.shape[0]].astype(dtype or qt.dtype)


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
