"""Weighted Lloyd-Max (`mapping`) against a float64 numpy implementation written from the spec."""

import numpy as np
import pytest

from lowra_jax.quantize import codebooks, mapping


def lloyd_f64(x, w, levels, iters):
  """Direct per-channel weighted Lloyd-Max in float64: x, w [K]; levels [L]."""
  m = np.array(levels, np.float64)
  for _ in range(iters):
    t = (m[1:] + m[:-1]) / 2
    code = np.searchsorted(t, x, side="left")  # number of thresholds strictly below x
    for j in range(len(m)):
      sel = code == j
      if w[sel].sum() > 0:
        m[j] = (w[sel] * x[sel]).sum() / w[sel].sum()
  return m


def sq_err_f64(x, ew, levels):
  t = (levels[1:] + levels[:-1]) / 2
  return float((ew * (x - levels[np.searchsorted(t, x, side="left")]) ** 2).sum())


def init_f64(x, w, bits):
  if bits == 1:
    a = (w * np.abs(x)).sum() / w.sum()
    return np.array([-a, a])
  return codebooks.nf_levels(bits).astype(np.float64)


def channels(seed, n=6, k=192):
  rng = np.random.default_rng(seed)
  x = rng.standard_t(4, (n, k))
  x = x / np.abs(x).max(axis=1, keepdims=True)  # normalised like w / absmax
  w = rng.uniform(0.1, 2.0, (n, k)) ** 2
  return x.astype(np.float32), w.astype(np.float32)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_fit_matches_float64_lloyd_and_never_worse_than_init(bits, seed):
  x, w = channels(seed)
  tables, errors = mapping.fit_channels(x, w, w, bits=(bits,), iters=20)
  tables, errors = np.asarray(tables[0], np.float64), np.asarray(errors[:, 0], np.float64)
  for c in range(x.shape[0]):
    xc, wc = x[c].astype(np.float64), w[c].astype(np.float64)
    ref = lloyd_f64(xc, wc, init_f64(xc, wc, bits), 20)
    np.testing.assert_allclose(tables[c], ref, atol=2e-3)  # float16 tables
    np.testing.assert_allclose(errors[c], sq_err_f64(xc, wc, tables[c]), rtol=1e-4)
    assert errors[c] <= sq_err_f64(xc, wc, init_f64(xc, wc, bits)) * (1 + 1e-3)
    assert np.all(np.diff(tables[c]) >= 0)


def test_errors_fall_with_bits():
  x, w = channels(3)
  _, errors = mapping.fit_channels(x, w, w, bits=(1, 2, 4), iters=25)
  errors = np.asarray(errors)
  assert np.all(errors[:, 0] > errors[:, 1]) and np.all(errors[:, 1] > errors[:, 2])


def test_zero_weight_samples_are_ignored():
  x, w = channels(4, n=3)
  w[:, 100:] = 0.0
  t_masked, _ = mapping.fit_channels(x, w, w, bits=(2,), iters=15)
  t_cut, _ = mapping.fit_channels(x[:, :100], w[:, :100], w[:, :100], bits=(2,), iters=15)
  # Sums over 192 and 100 samples associate differently: a float32 centroid on a float16 rounding
  # boundary may round either way, one float16 ulp below 1 (2^-11).
  np.testing.assert_allclose(np.asarray(t_masked[0]), np.asarray(t_cut[0]), rtol=0, atol=2**-11)


def test_pooled_refit_matches_float64_lloyd_on_concatenated_channels():
  x, w = channels(5, n=5)
  segments = np.array([0, 1, 0, 2, 1], np.int32)  # channel 3 -> index S=2: not fitted
  init = np.stack([codebooks.nf_levels(2)] * 2).astype(np.float32)
  got = np.asarray(mapping.refit_shared(x, w, init, segments, iters=12), np.float64)
  for s in (0, 1):
    sel = segments == s
    ref = lloyd_f64(
      x[sel].ravel().astype(np.float64), w[sel].ravel().astype(np.float64), init[s], 12
    )
    np.testing.assert_allclose(got[s], ref, atol=2e-3)


def test_nearest_codes_with_padded_tables():
  levels = np.array([[-1.0, 0.5, np.inf, np.inf], [-0.5, 0.0, 0.25, 1.0]], np.float16)
  x = np.array([[-2.0, -0.26, 0.0, 0.9], [-0.3, 0.1, 0.2, 5.0]], np.float32)
  codes = np.asarray(mapping.nearest_codes(x, levels))
  np.testing.assert_array_equal(codes, [[0, 0, 1, 1], [0, 1, 2, 3]])


def test_kmeans_tables_is_deterministic_and_reduces_spread():
  rng = np.random.default_rng(0)
  centers = np.sort(rng.normal(size=(4, 4)), axis=1)
  tables = np.repeat(centers, 50, axis=0) + 0.01 * rng.normal(size=(200, 4))
  c1, l1 = mapping.kmeans_tables(tables, 4)
  c2, l2 = mapping.kmeans_tables(tables, 4)
  np.testing.assert_array_equal(c1, c2)
  np.testing.assert_array_equal(l1, l2)
  assert ((tables - c1[l1]) ** 2).sum(axis=1).max() < 0.01
