"""Blockwise absmax scaling along the input dimension, and double quantization of the scales.

A kernel W[K, N] (K = in_features, N = output channels) is cut into groups of `group_size`
consecutive input elements per channel; each group is divided by its absmax. Double quantization
(QLoRA) stores those fp32 scales as int8 around their mean, with one fp32 absmax per block of
`dq_block` consecutive channels in a group row: 8/64 + 32/(64*256) ~= 0.127 bits per parameter.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


def pad_rows(w: jax.Array, group_size: int) -> jax.Array:
  """Zero-pads W[K, N] to [ceil(K / group_size) * group_size, N]."""
  k = w.shape[0]
  k_pad = math.ceil(k / group_size) * group_size
  return jnp.pad(w, ((0, k_pad - k), (0, 0))) if k_pad != k else w


def group_absmax(w: jax.Array, group_size: int) -> jax.Array:
  """absmax per (group, channel): W[K_pad, N] -> float32 [K_pad / group_size, N]."""
  k, n = w.shape
  return jnp.abs(w.astype(jnp.float32)).reshape(k // group_size, group_size, n).max(axis=1)


def expand_groups(s: jax.Array, group_size: int) -> jax.Array:
  """[G, N] -> [G * group_size, N], each group row repeated."""
  return jnp.repeat(s, group_size, axis=0)


@flax.struct.dataclass
class GroupScales:
  """Scales of one precision bucket: `dequantize()` gives float32 [G, Nb].

  Plain: `values` float32 [G, Nb]. Double-quantized: `codes` int8 [G, Nb], `block_absmax`
  float32 [G, ceil(Nb / dq_block)], `offset` float32 [] with
  scale = offset + codes * block_absmax / 127.
  """

  values: jax.Array | None = None
  codes: jax.Array | None = None
  block_absmax: jax.Array | None = None
  offset: jax.Array | None = None
  dq_block: int = flax.struct.field(pytree_node=False, default=0)

  def dequantize(self, xp=jnp) -> jax.Array:
    """float32 [G, Nb]; `xp=numpy` evaluates on the host."""
    if not self.dq_block:
      return xp.asarray(self.values, xp.float32)
    n = self.codes.shape[1]
    step = xp.asarray(self.block_absmax, xp.float32) / xp.float32(127.0)
    step = xp.repeat(step, self.dq_block, axis=1)[:, :n]
    return xp.asarray(self.offset, xp.float32) + xp.asarray(self.codes, xp.float32) * step


def make_scales(s: np.ndarray, double_quant: bool, dq_block: int) -> GroupScales:
  """Stores absmax scales float32 [G, Nb] (host numpy), double-quantized or not."""
  s = np.asarray(s, np.float32)
  if not double_quant:
    return GroupScales(values=s)
  g, n = s.shape
  offset = np.float32(s.mean()) if s.size else np.float32(0)
  d = s - offset
  n_blocks = math.ceil(n / dq_block)
  d_pad = np.pad(d, ((0, 0), (0, n_blocks * dq_block - n)))
  block_absmax = np.abs(d_pad).reshape(g, n_blocks, dq_block).max(axis=2).astype(np.float32)
  step = np.repeat(block_absmax, dq_block, axis=1)[:, :n]
  safe = np.where(step > 0, step, 1.0)
  codes = np.where(step > 0, np.clip(np.rint(d / safe * 127.0), -127, 127), 0).astype(np.int8)
  return GroupScales(codes=codes, block_absmax=block_absmax, offset=offset, dq_block=dq_block)
