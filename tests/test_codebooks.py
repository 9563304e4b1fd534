"""Tests for lowra_jax.quantize.codebooks: NormalFloat levels.

Oracles: bitsandbytes' published NF4 table (float32 values as printed by bitsandbytes), QLoRA's
NF2 values, and the documented construction re-derived here from explicit quantile lists with
scipy.stats.norm (NF3), and the 1-bit Lloyd-Max point E|z| = sqrt(2/pi) (NF1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lowra_jax.quantize.codebooks import nf_levels

# bitsandbytes.functional NF4 lookup table (QLoRA, Dettmers et al. 2023).
BNB_NF4 = [
  -1.0,
  -0.6961928009986877,
  -0.5250730514526367,
  -0.39491748809814453,
  -0.28444138169288635,
  -0.18477343022823334,
  -0.09105003625154495,
  0.0,
  0.07958029955625534,
  0.16093020141124725,
  0.24611230194568634,
  0.33791524171829224,
  0.44070982933044434,
  0.5626170039176941,
  0.7229568362236023,
  1.0,
]
OFFSET = 0.9677083  # QLoRA: (1 - 1/(2*15) + 1 - 1/(2*16)) / 2


def test_offset_constant():
  assert OFFSET == pytest.approx(0.5 * ((1 - 1 / 30) + (1 - 1 / 32)), abs=1e-7)


def test_nf4_matches_bitsandbytes():
  lv = nf_levels(4)
  assert lv.dtype == np.float32 and lv.shape == (16,)
  np.testing.assert_allclose(lv, BNB_NF4, rtol=0, atol=1e-6)


def test_nf2_values():
  lv = nf_levels(2)
  assert lv.dtype == np.float32 and lv.shape == (4,)
  np.testing.assert_allclose(lv, [-1.0, 0.0, 0.3379, 1.0], rtol=0, atol=1e-4)
  assert lv[1] == 0.0


def test_nf3_from_documented_construction():
  # 2^(k-1) = 4 positive quantiles at probabilities evenly spaced from OFFSET down to (not
  # including) 0.5 in 4 steps; 3 negative ones evenly spaced in 3 steps; an exact zero.
  step_pos = (OFFSET - 0.5) / 4
  step_neg = (OFFSET - 0.5) / 3
  pos = [stats.norm.ppf(OFFSET - i * step_pos) for i in range(4)]
  neg = [-stats.norm.ppf(OFFSET - i * step_neg) for i in range(3)]
  top = stats.norm.ppf(OFFSET)
  expect = sorted(v / top for v in pos + neg + [0.0])
  lv = nf_levels(3)
  assert lv.dtype == np.float32 and lv.shape == (8,)
  np.testing.assert_allclose(lv, expect, rtol=0, atol=1e-6)
  # Properties visible without the construction: sorted, in [-1, 1], both ends and 0 present,
  # 4 positive and 3 negative levels.
  assert np.all(np.diff(lv) > 0)
  assert lv[0] == -1.0 and lv[-1] == 1.0 and 0.0 in lv
  assert (lv > 0).sum() == 4 and (lv < 0).sum() == 3


def test_nf1_is_lloyd_max_point_normalised():
  a = math.sqrt(2 / math.pi) / stats.norm.ppf(OFFSET)
  lv = nf_levels(1)
  assert lv.dtype == np.float32 and lv.shape == (2,)
  np.testing.assert_allclose(lv, [-a, a], rtol=0, atol=1e-6)
  assert lv[1] == pytest.approx(0.4317, abs=1e-4)  # value quoted in the docstring
  # sqrt(2/pi) really is E|z| for z ~ N(0, 1) (the 1-bit Lloyd-Max centroid).
  e_abs = 2 * stats.norm.expect(lambda z: z, lb=0.0)
  assert e_abs == pytest.approx(math.sqrt(2 / math.pi), rel=1e-9)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_levels_sorted_bounded(bits):
  lv = nf_levels(bits)
  assert lv.shape == (2**bits,)
  assert np.all(np.diff(lv) > 0)
  assert np.all(np.abs(lv) <= 1.0)
  if bits > 1:
    assert lv[0] == -1.0 and lv[-1] == 1.0


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_levels_are_read_only(bits):
  lv = nf_levels(bits)
  assert not lv.flags.writeable
  with pytest.raises(ValueError):
    lv[0] = 0.5
  # The cached table was not altered by the attempt.
  assert nf_levels(bits)[0] == lv[0] and nf_levels(bits)[0] != 0.5
