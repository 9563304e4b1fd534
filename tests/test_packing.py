"""Tests for lowra_jax.quantize.packing: planar bit packing of codes along K.

The layout oracle is written from the packing.py docstring with plain Python integers: a b-bit
code is split into planes of widths (1,), (2,), (2, 1), (4,) holding bits [shift, shift + w);
a plane of width w packs p = 8 / w codes per byte, planar along K with Kp = K / p:
bit (i*w + j) of packed[r, n] is bit j of (code[r + i*Kp, n] >> shift).
"""

from __future__ import annotations

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowra_jax.quantize.packing import pack, plane_widths, unpack

EXPECTED_WIDTHS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,)}  # from the module docstring


@st.composite
def codes_strategy(draw):
  bits = draw(st.sampled_from([1, 2, 3, 4]))
  k = 8 * draw(st.integers(1, 64))
  n = draw(st.integers(1, 40))
  codes = draw(hnp.arrays(np.uint8, (k, n), elements=st.integers(0, 2**bits - 1)))
  return bits, codes


@settings(max_examples=60, deadline=None)
@given(codes_strategy())
def test_round_trip(args):
  bits, codes = args
  planes = pack(codes, bits)
  assert len(planes) == len(EXPECTED_WIDTHS[bits])
  for w, plane in zip(EXPECTED_WIDTHS[bits], planes):
    assert isinstance(plane, np.ndarray)
    assert plane.dtype == np.uint8
    assert plane.shape == (codes.shape[0] * w // 8, codes.shape[1])
  out = unpack(tuple(jnp.asarray(p) for p in planes), bits)
  chex.assert_shape(out, codes.shape)
  chex.assert_type(out, jnp.uint8)
  np.testing.assert_array_equal(np.asarray(out), codes)


def _oracle_check(codes, planes, bits):
  """Bit-by-bit check of the documented layout with Python ints; returns #bits checked."""
  k, n = codes.shape
  checked, shift = 0, 0
  for w, plane in zip(EXPECTED_WIDTHS[bits], planes):
    per = 8 // w
    kp = k // per
    assert plane.shape == (kp, n)
    for r in range(kp):
      for col in range(n):
        byte = int(plane[r, col])
        for i in range(per):
          code = int(codes[r + i * kp, col]) >> shift
          for j in range(w):
            assert (byte >> (i * w + j)) & 1 == (code >> j) & 1, (bits, w, r, col, i, j)
            checked += 1
    shift += w
  return checked


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("k,n", [(8, 1), (16, 3), (64, 5), (40, 2)])
def test_layout_matches_docstring(bits, k, n):
  rng = np.random.default_rng(bits * 1000 + k + n)
  codes = rng.integers(0, 2**bits, (k, n)).astype(np.uint8)
  planes = pack(codes, bits)
  assert _oracle_check(codes, planes, bits) == k * n * bits  # every code bit stored once


def test_layout_hand_example():
  # 2-bit, K=8, N=1: Kp=2, packed[r] = c[r] | c[r+2] << 2 | c[r+4] << 4 | c[r+6] << 6.
  codes = np.array([1, 2, 3, 0, 2, 1, 3, 3], np.uint8)[:, None]
  (plane,) = pack(codes, 2)
  assert plane[:, 0].tolist() == [1 | 3 << 2 | 2 << 4 | 3 << 6, 2 | 0 << 2 | 1 << 4 | 3 << 6]
  # 3-bit code 5 = 0b101: low plane (w=2) holds 0b01, high plane (w=1) holds 1.
  codes3 = np.zeros((8, 1), np.uint8)
  codes3[3, 0] = 5  # K=8: low plane Kp=2 -> row 1, slab 1; high plane Kp=1 -> row 0, slab 3
  low, high = pack(codes3, 3)
  assert low[:, 0].tolist() == [0, 0b01 << 2]
  assert high[:, 0].tolist() == [1 << 3]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_unpack_is_traceable(bits):
  rng = np.random.default_rng(bits)
  codes = rng.integers(0, 2**bits, (64, 7)).astype(np.uint8)
  planes = tuple(jnp.asarray(p) for p in pack(codes, bits))
  out = jax.jit(lambda ps: unpack(ps, bits))(planes)
  np.testing.assert_array_equal(np.asarray(out), codes)


def test_tile_of_packed_rows_unpacks_to_contiguous_slabs():
  # The docstring's kernel contract: packed rows [r0, r1) hold code rows [r0 + i*Kp, r1 + i*Kp).
  rng = np.random.default_rng(3)
  k, n, bits = 64, 4, 2
  codes = rng.integers(0, 4, (k, n)).astype(np.uint8)
  (plane,) = pack(codes, bits)
  kp, r0, r1 = k // 4, 5, 11
  tile = np.asarray(unpack((jnp.asarray(plane[r0:r1]),), bits))
  expect = np.concatenate([codes[r0 + i * kp : r1 + i * kp] for i in range(4)])
  np.testing.assert_array_equal(tile, expect)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_plane_widths(bits):
  widths = plane_widths(bits)
  assert tuple(widths) == EXPECTED_WIDTHS[bits]
  assert sum(widths) == bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [1, 4, 12, 20, 63])
def test_k_not_multiple_of_8_raises(bits, k):
  codes = np.zeros((k, 3), np.uint8)
  with pytest.raises(ValueError, match="multiple of 8"):
    pack(codes, bits)


@pytest.mark.parametrize("bits", [0, 5, 8])
def test_unsupported_bits_raise(bits):
  with pytest.raises(ValueError, match=f"bits={bits}"):
    plane_widths(bits)
  with pytest.raises(ValueError):
    pack(np.zeros((8, 2), np.uint8), bits)
  with pytest.raises(ValueError):
    unpack((jnp.zeros((1, 2), jnp.uint8),), bits)
