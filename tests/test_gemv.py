"""The decode GEMV kernel and its word layout against brute force and float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close_at_scale, f32_sum

from lowra_jax import quantize
from lowra_jax.quantize import packing
from pallas_kernels import gemv as gv

IMPLS = ["interpret"] + (["triton"] if jax.default_backend() == "gpu" else [])


@pytest.mark.parametrize("bits,group", [(1, 64), (2, 64), (4, 64), (2, 32), (4, 128)])
def test_pack_words_by_brute_force(bits, group):
  rng = np.random.default_rng(bits * group)
  k, n = 4 * group, 5
  codes = rng.integers(0, 1 << bits, (k, n), dtype=np.uint8)
  words = gv.pack_words(codes, bits, group)
  v = group * bits // 32
  assert words.shape == (n, k * bits // 32) and words.dtype == np.uint32
  for ch in range(n):
    for w in range(words.shape[1]):
      g, i = divmod(w, v)
      for j in range(32 // bits):
        got = (int(words[ch, w]) >> (j * bits)) & ((1 << bits) - 1)
        assert got == codes[g * group + j * v + i, ch]
  np.testing.assert_array_equal(np.asarray(gv.pack_words(jnp.asarray(codes), bits, group, jnp)), words)


def test_pack_words_rejects_partial_words():
  with pytest.raises(ValueError, match="whole 32-bit words"):
    gv.pack_words(np.zeros((16, 2), np.uint8), 1, 16)


CONFIGS = {
  "lloyd1": quantize.QuantConfig(method="lloyd", bits=1),
  "lloyd2_nodq": quantize.QuantConfig(method="lloyd", bits=2, double_quant=False),
  "nf4": quantize.QuantConfig(method="nf", bits=4),
  "lowra1.5": quantize.QuantConfig(budget=1.5),
  "lowra2_shared": quantize.QuantConfig(budget=2.0, lut_clusters=4),
}


def weights(seed, k, n):
  rng = np.random.default_rng(seed)
  return (0.02 * rng.standard_t(5, (k, n)) * rng.uniform(0.3, 3.0, (1, n))).astype(np.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_matches_float64(impl, name, m):
  k, n = 320, 75  # ragged channels; 5 groups of 64: a ragged last step at block_g = 2
  qt = quantize.quantize_tensor(weights(len(name), k, n), CONFIGS[name])
  words = tuple(gv.words_bucket(b, qt.group_size) for b in qt.buckets)
  rng = np.random.default_rng(m)
  x = rng.normal(size=(m, k)).astype(np.float32)
  w = np.asarray(quantize.dequantize(qt, jnp.float32), np.float64)
  ref = x.astype(np.float64) @ w
  tiles = gv.GemvTiles(block_n=16, block_g=2, splits=2)
  got = gv.gemv(jnp.asarray(x), qt, words, tiles=tiles, interpret=impl == "interpret")
  assert got.shape == (m, n) and np.all(np.isfinite(np.asarray(got)))
  # float32: K products summed, plus the level x scale and per-group roundings, relative to
  # sum |x_k w_k| <= K max|x| max|w|
  bound = f32_sum(k + 8) * k * np.abs(x).max() * np.abs(w).max() / np.abs(ref).max()
  assert_close_at_scale(got, ref, bound)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_output_written(impl):
  qt = quantize.quantize_tensor(weights(3, 256, 40), quantize.QuantConfig(budget=1.5))
  words = tuple(gv.words_bucket(b, qt.group_size) for b in qt.buckets)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 256)), jnp.float32)
  tiles = gv.GemvTiles(block_n=16, block_g=4, splits=1)
  poisoned = jnp.full((1, 40, 2), jnp.nan, jnp.float32)
  out = gv.gemv_buckets(
    x, words, group=qt.group_size, tiles=tiles, columns=qt.perm, interpret=impl == "interpret",
    out=poisoned,
  )
  assert np.all(np.isfinite(np.asarray(out)))


def test_rejects_too_many_rows():
  qt = quantize.quantize_tensor(weights(4, 64, 16), quantize.QuantConfig(method="lloyd", bits=2))
  words = tuple(gv.words_bucket(b, qt.group_size) for b in qt.buckets)
  with pytest.raises(ValueError, match="1 to 4 rows"):
    gv.gemv(jnp.zeros((5, 64)), qt, words, interpret=True)
