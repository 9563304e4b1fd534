"""`byte_lookup`: levels of packed 2-, 3- and 4-bit codes by byte permutation, against numpy.

The lookups run inside a Pallas kernel: interpreted on CPU (the instruction emulated), compiled
through Triton (inline PTX) when a GPU is present.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import byte_lookup

ON_GPU = jax.default_backend() == "gpu"


def prmt_numpy(a, b, s):
  """PTX prmt.b32 from its definition: byte j of the result is byte (s >> 4j) & 7 of b:a."""
  src = np.concatenate([a.astype("<u4").view(np.uint8), b.astype("<u4").view(np.uint8)])
  src = src.reshape(2, -1, 4).transpose(1, 0, 2).reshape(-1, 8)  # [n, 8]: a's bytes, then b's
  rows = np.arange(len(a))
  out = np.stack([src[rows, (s >> (4 * j)) & 7] for j in range(4)], axis=1)  # [n, 4] bytes
  return out.astype(np.uint8).view("<u4")[:, 0]


def test_prmt_reference_is_the_instruction():
  rng = np.random.default_rng(0)
  a, b = (rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32) for _ in range(2))
  s = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32) & 0xFFFF7777  # no sign mode
  as_i32 = lambda v: jnp.asarray(v.view(np.int32))  # noqa: E731
  got = byte_lookup.prmt_reference(as_i32(a), as_i32(b), as_i32(s))
  np.testing.assert_array_equal(np.asarray(got).view(np.uint32), prmt_numpy(a, b, s))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lookup_finds_every_codes_level(bits, dtype):
  """Every field of random packed bytes against numpy's levels[code, channel], bit for bit."""
  rng = np.random.default_rng(bits)
  rows, cols, fields = 16, 32, 8 // bits
  codes = rng.integers(0, 1 << bits, (fields, rows, cols))
  packed = sum(codes[f] << (f * bits) for f in range(fields)).astype(np.int32)
  levels = rng.normal(size=(1 << bits, cols)).astype(np.float32)
  levels = np.asarray(jnp.asarray(levels, dtype))  # each channel's levels, in dtype

  def kernel(p_ref, l_ref, o_ref):
    table = [l_ref[pl.ds(j, 1), :] for j in range(1 << bits)]
    for f in range(fields):
      o_ref[f, :, :] = byte_lookup.lookup(p_ref[...], f, bits, table, interpret=not ON_GPU)

  got = pl.pallas_call(
    kernel, out_shape=jax.ShapeDtypeStruct((fields, rows, cols), dtype), interpret=not ON_GPU
  )(jnp.asarray(packed), jnp.asarray(levels))
  want = levels[codes, np.arange(cols)]  # [fields, rows, cols]
  np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_split_3bit_codes_are_read_from_both_fields(dtype):
  """3-bit codes as the forward kernels hold them: the two low bits in 2-bit field f of the first
  plane's byte (bits 0-7), the third bit at bit 8 + 2f; the other bits random (another row's).
  Against numpy's levels[code, channel], bit for bit."""
  rng = np.random.default_rng(3)
  rows, cols = 16, 32
  codes = rng.integers(0, 8, (4, rows, cols))
  low = sum((codes[f] & 3) << (2 * f) for f in range(4))
  other = rng.integers(0, 2, (4, rows, cols))  # the second plane's bits of other rows
  high = sum(((codes[f] >> 2) << (8 + 2 * f)) | (other[f] << (9 + 2 * f)) for f in range(4))
  packed = (low | high | (rng.integers(0, 1 << 15, (rows, cols)) << 16)).astype(np.int32)
  levels = np.asarray(jnp.asarray(rng.normal(size=(8, cols)), dtype))

  def kernel(p_ref, l_ref, o_ref):
    table = [l_ref[pl.ds(j, 1), :] for j in range(8)]
    for f in range(4):
      o_ref[f, :, :] = byte_lookup.lookup(
        p_ref[...], f, 3, table, interpret=not ON_GPU, high=8 + 2 * f
      )

  got = pl.pallas_call(
    kernel, out_shape=jax.ShapeDtypeStruct((4, rows, cols), dtype), interpret=not ON_GPU
  )(jnp.asarray(packed), jnp.asarray(levels))
  want = levels[codes, np.arange(cols)]
  np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16))


def test_lookup_rejects_what_it_does_not_cover():
  levels = [jnp.zeros((1, 4), jnp.float32)] * 4
  with pytest.raises(ValueError, match=r"2- to 4-bit codes and 16-bit levels"):
    byte_lookup.lookup(jnp.zeros((2, 4), jnp.int32), 0, 2, levels, interpret=True)
  assert not byte_lookup.covers(1, jnp.bfloat16) and byte_lookup.covers(4, jnp.float16)
  bf16 = [jnp.zeros((1, 4), jnp.bfloat16)] * 4
  with pytest.raises(ValueError, match=r"must have 3 bits, not 2"):
    byte_lookup.lookup(jnp.zeros((2, 4), jnp.int32), 0, 2, bf16, interpret=True, high=9)
