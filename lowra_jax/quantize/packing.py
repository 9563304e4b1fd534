"""Bit packing of codes along the input dimension K, in uint8 planes.

A b-bit code is split into planes of power-of-two widths (1 -> (1,), 2 -> (2,), 3 -> (2, 1),
4 -> (4,)); plane i holds bits [shift_i, shift_i + w_i) of every code. A plane of width w packs
p = 8 / w codes per byte *planar* along K: for codes C[K, N] and Kp = K / p,

    packed[r, n] = sum_{i < p} C[r + i * Kp, n] << (i * w),   packed: uint8 [Kp, N].

So a tile of packed rows [r0, r1) unpacks, with one shift and mask per slab i, into the
contiguous row ranges [r0 + i*Kp, r1 + i*Kp): matmul kernels multiply each slab by the matching
slice of the activations without any interleaving. K must be a multiple of 8 (the quantizer pads
K to a multiple of the group size).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,)}


def plane_widths(bits: int) -> tuple[int, ...]:
  """Widths of the planes storing `bits`-bit codes."""
  if bits not in _PLANES:
    raise ValueError(f"bits={bits} cannot be packed: use one of {tuple(_PLANES)}.")
  return _PLANES[bits]


def pack(codes: np.ndarray, bits: int) -> tuple[np.ndarray, ...]:
  """Packs codes uint8 [K, N] (values < 2**bits, K % 8 == 0) into planes uint8 [K*w/8, N] (host)."""
  codes = np.asarray(codes, np.uint8)
  k, n = codes.shape
  if k % 8:
    raise ValueError(f"K={k} must be a multiple of 8 to pack; pad the rows first.")
  planes, shift = [], 0
  for w in plane_widths(bits):
    per = 8 // w
    part = ((codes >> shift) & ((1 << w) - 1)).reshape(per, k // per, n)
    packed = np.zeros((k // per, n), np.uint8)
    for i in range(per):
      packed |= part[i] << np.uint8(i * w)
    planes.append(packed)
    shift += w
  return tuple(planes)


def unpack(planes: tuple[jax.Array, ...], bits: int) -> jax.Array:
  """Inverse of `pack` (traceable): planes -> uint8 [K, N]."""
  codes, shift = None, 0
  for w, packed in zip(plane_widths(bits), planes):
    per = 8 // w
    mask = jnp.uint8((1 << w) - 1)
    part = jnp.concatenate([(packed >> jnp.uint8(i * w)) & mask for i in range(per)], axis=0)
    part = part << jnp.uint8(shift)
    codes = part if codes is None else codes | part
    shift += w
  return codes
