"""Tests for lowra_jax.quantize.scaling: group absmax, row padding, double-quantized scales.

Oracles: float64 numpy loops for group absmax / padding / group expansion; for double
quantization, the documented error bound (scale = offset + code * block_absmax / 127, so rounding
to the nearest code is within half a step block_absmax / 127 / 2 of the true scale) checked
against the true scales in float64, and the stored-bit count 8 + 32 * ceil(Nb / dq_block) / Nb
+ 32 / (G * Nb) bits per scale counted from the stored arrays.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lowra_jax.quantize.scaling import (
  GroupScales,
  expand_groups,
  group_absmax,
  make_scales,
  pad_rows,
)

EPS32 = float(np.finfo(np.float32).eps)


def absmax_loop(w, group_size):
  k, n = w.shape
  out = np.zeros((k // group_size, n))
  for g in range(k // group_size):
    for c in range(n):
      out[g, c] = max(abs(float(w[g * group_size + i, c])) for i in range(group_size))
  return out


@pytest.mark.parametrize("k,n,group", [(64, 3, 64), (128, 5, 32), (96, 1, 8), (24, 7, 8)])
def test_group_absmax_float32(k, n, group):
  rng = np.random.default_rng(k + n + group)
  w = rng.standard_normal((k, n)).astype(np.float32) * rng.uniform(0.01, 10, n).astype(np.float32)
  out = group_absmax(jnp.asarray(w), group)
  chex.assert_shape(out, (k // group, n))
  chex.assert_type(out, jnp.float32)
  np.testing.assert_array_equal(np.asarray(out, np.float64), absmax_loop(w, group))


def test_group_absmax_bfloat16_and_negative_extremes():
  w = np.zeros((16, 2), np.float32)
  w[3, 0], w[5, 0] = -7.5, 7.25  # absmax is the magnitude of the negative entry
  w[12, 1], w[9, 1] = 0.125, -0.0625
  wb = w.astype(ml_dtypes.bfloat16)
  out = group_absmax(jnp.asarray(wb), 8)
  chex.assert_type(out, jnp.float32)
  np.testing.assert_array_equal(np.asarray(out), [[7.5, 0.0], [0.0, 0.125]])
  rng = np.random.default_rng(0)
  wb = (rng.standard_normal((64, 9)) * 3).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(
    np.asarray(group_absmax(jnp.asarray(wb), 16), np.float64),
    absmax_loop(wb.astype(np.float64), 16),
  )


@pytest.mark.parametrize(
  "k,group,k_pad", [(130, 64, 192), (64, 64, 64), (1, 8, 8), (8, 8, 8), (65, 8, 72)]
)
def test_pad_rows(k, group, k_pad):
  rng = np.random.default_rng(k)
  w = rng.standard_normal((k, 3)).astype(np.float32)
  out = np.asarray(pad_rows(jnp.asarray(w), group))
  assert out.shape == (k_pad, 3)
  np.testing.assert_array_equal(out[:k], w)
  assert np.all(out[k:] == 0)


def test_expand_groups():
  s = np.arange(6, dtype=np.float32).reshape(3, 2)
  out = np.asarray(expand_groups(jnp.asarray(s), 4))
  assert out.shape == (12, 2)
  for r in range(12):
    np.testing.assert_array_equal(out[r], s[r // 4])


@pytest.mark.parametrize("xp", [np, jnp], ids=["np", "jnp"])
def test_make_scales_plain(xp):
  s = np.random.default_rng(0).uniform(0.01, 2.0, (4, 37)).astype(np.float32)
  gs = make_scales(s, double_quant=False, dq_block=256)
  assert gs.dq_block == 0 and gs.codes is None
  out = gs.dequantize(xp=xp)
  assert out.dtype == np.float32 and out.shape == s.shape
  np.testing.assert_array_equal(np.asarray(out), s)


DQ_CASES = [(1, 300, 256), (4, 513, 64), (3, 7, 256), (2, 1000, 100), (5, 129, 128), (8, 64, 64)]


@pytest.mark.parametrize("xp", [np, jnp], ids=["np", "jnp"])
@pytest.mark.parametrize("g,nb,dq", DQ_CASES)
def test_double_quant_within_half_step(g, nb, dq, xp):
  rng = np.random.default_rng(g * 10_000 + nb + dq)
  # Positive absmax-like scales over two decades, so blocks differ in spread.
  s = (rng.lognormal(-3.0, 1.0, (g, nb)) * rng.uniform(0.1, 10, (g, 1))).astype(np.float32)
  gs = make_scales(s, double_quant=True, dq_block=dq)
  assert gs.dq_block == dq and gs.values is None
  codes = np.asarray(gs.codes)
  assert codes.dtype == np.int8 and codes.shape == (g, nb)
  assert codes.min() >= -127 and codes.max() <= 127
  n_blocks = math.ceil(nb / dq)
  block_absmax = np.asarray(gs.block_absmax)
  assert block_absmax.dtype == np.float32 and block_absmax.shape == (g, n_blocks)
  offset = float(np.asarray(gs.offset))
  assert np.asarray(gs.offset).dtype == np.float32 and np.asarray(gs.offset).shape == ()

  out = gs.dequantize(xp=xp)
  assert out.dtype == np.float32 and out.shape == (g, nb)
  out = np.asarray(out, np.float64)
  truth = s.astype(np.float64)
  for r in range(g):
    for c in range(nb):
      m = float(block_absmax[r, c // dq])
      tol = m / 127 / 2 + 4 * EPS32 * (abs(offset) + m + abs(truth[r, c]))
      assert abs(out[r, c] - truth[r, c]) <= tol, (r, c, out[r, c], truth[r, c], m)
  # The block absmax bounds every deviation from the offset in its block (up to fp32 rounding).
  for r in range(g):
    for b in range(n_blocks):
      dev = np.abs(truth[r, b * dq : (b + 1) * dq] - offset).max()
      assert dev == pytest.approx(float(block_absmax[r, b]), rel=1e-6, abs=1e-30)


@pytest.mark.parametrize("g,nb,dq", DQ_CASES + [(64, 4096, 256)])
def test_double_quant_stored_bits(g, nb, dq):
  s = np.random.default_rng(1).uniform(0.01, 1.0, (g, nb)).astype(np.float32)
  gs = make_scales(s, double_quant=True, dq_block=dq)
  stored = sum(
    np.asarray(x).size * np.asarray(x).dtype.itemsize * 8 for x in jax.tree_util.tree_leaves(gs)
  )
  count = g * nb
  expect = 8 * count + 32 * g * math.ceil(nb / dq) + 32
  assert stored == expect
  per_scale = stored / count
  assert per_scale == pytest.approx(8 + 32 / dq + 32 / count, abs=32 / nb)
  if nb % dq == 0:
    assert per_scale == pytest.approx(8 + 32 / dq + 32 / count, rel=1e-12)


def test_double_quant_bits_per_param_matches_qlora_figure():
  # Module docstring: 8/64 + 32/(64*256) ~= 0.127 bits per parameter (group 64, dq block 256).
  g, nb, group = 4, 1024, 64
  gs = make_scales(np.ones((g, nb), np.float32), double_quant=True, dq_block=256)
  stored = sum(
    np.asarray(x).size * np.asarray(x).dtype.itemsize * 8 for x in jax.tree_util.tree_leaves(gs)
  )
  assert stored / (g * group * nb) == pytest.approx(0.127, abs=5e-4)


@pytest.mark.parametrize("xp", [np, jnp], ids=["np", "jnp"])
def test_double_quant_degenerate_scales(xp):
  zeros = make_scales(np.zeros((3, 300), np.float32), double_quant=True, dq_block=256)
  out = np.asarray(zeros.dequantize(xp=xp))
  assert np.all(np.isfinite(out)) and np.all(out == 0)
  # Constant scales: every deviation from the mean is 0 -> exact reconstruction, no NaN.
  const = make_scales(np.full((2, 70), 0.375, np.float32), double_quant=True, dq_block=32)
  out = np.asarray(const.dequantize(xp=xp))
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out, 0.375)
  # One block constant, another varying: the constant block stays finite.
  s = np.full((1, 20), 0.5, np.float32)
  s[0, 10:] = np.linspace(0.1, 0.9, 10)
  s[0, :10] = s.mean()
  mixed = make_scales(s, double_quant=True, dq_block=10)
  out = np.asarray(mixed.dequantize(xp=xp), np.float64)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, s, atol=0.4 / 127 / 2 + 1e-6)


def test_dequantize_is_jittable():
  s = np.random.default_rng(2).uniform(0.01, 1.0, (2, 300)).astype(np.float32)
  gs = make_scales(s, double_quant=True, dq_block=256)
  out = jax.jit(lambda x: x.dequantize())(gs)
  assert isinstance(gs, GroupScales)
  np.testing.assert_allclose(np.asarray(out), s, atol=float(np.max(gs.block_absmax)) / 254 + 1e-6)
