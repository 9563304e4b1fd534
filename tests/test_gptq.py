"""`QuantConfig.rounding="gptq"`: codes chosen by error feedback through the input covariance,
against a float64 numpy GPTQ over the same tables, scales and precisions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowra_jax import quantize
from lowra_jax.quantize import QuantConfig, QuantizationError, dequantize, packing, pipeline


def _problem(seed, k, n):
  """Weights [k, n] and the covariance of correlated inputs (what makes feedback pay)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(4 * k, k)) @ rng.normal(size=(k, k)) * 0.2 + rng.normal(size=(4 * k, k))
  cov = (x.T @ x / len(x)).astype(np.float32)
  w = (0.02 * rng.standard_t(5, (k, n)) * rng.uniform(0.5, 2.0, (1, n))).astype(np.float32)
  return w, cov


def _quantize(w, cov, rounding, **kw):
  cfg = QuantConfig(calibration="kernel", rounding=rounding, **kw)
  qp, report = quantize.quantize_params(
    {"l": {"kernel": w}}, cfg, progress=False, importance={"l/kernel": np.diagonal(cov).copy()},
    covariances={"l/kernel": cov},
  )
  return qp["l"]["kernel"], report


def _output_error(w, w_hat, cov):
  d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
  return float(np.trace(d.T @ cov.astype(np.float64) @ d))


def _gptq_reference(w, cov, qt, damp):
  """float64 numpy GPTQ with the tensor's own tables, scales and bucket order: rows by
  decreasing H_kk, U = upper Cholesky factor of (H + damp mean(diag H) I)^-1, nearest level of
  each channel's table, w_j -= U_ij (w_i - q_i) / U_ii. Returns the codes per bucket [K, Nb]."""
  k, n = w.shape
  perm = np.arange(n) if qt.perm is None else np.asarray(qt.perm, np.int64)
  wb = np.asarray(w, np.float64)[:, perm]
  h = cov.astype(np.float64) + damp * np.mean(np.diag(cov)) * np.eye(k)
  order = np.argsort(-np.diag(cov), kind="stable")
  u = np.linalg.cholesky(np.linalg.inv(h[np.ix_(order, order)])).T
  wb = wb[order]
  specs, start = [], 0
  for b in qt.buckets:
    tables = np.asarray(b.channel_tables(), np.float64)
    scales = np.asarray(b.scales.dequantize(), np.float64)
    specs.append((start, b.num_channels, tables, scales))
    start += b.num_channels
  codes = [np.zeros((k, nb), np.uint8) for _, nb, _, _ in specs]
  for i, row in enumerate(order):
    q = np.empty(n)
    for j, (c0, nb, tables, scales) in enumerate(specs):
      s = scales[row // qt.group_size]
      c = np.abs(wb[i, c0 : c0 + nb, None] / s[:, None] - tables).argmin(axis=1)
      codes[j][row], q[c0 : c0 + nb] = c, tables[np.arange(nb), c] * s
    wb[i + 1 :] -= np.outer(u[i, i + 1 :], (wb[i] - q) / u[i, i])
  return codes


@pytest.mark.parametrize(
  "kw,k",
  [
    (dict(method="lloyd", bits=2), 128),
    (dict(budget=1.5), 100),
    (dict(budget=2.0, gptq_damp=0.01), 320),
  ],
  ids=["lloyd2", "lowra1.5", "lowra2-blocks-damp0.01"],
)
def test_gptq_codes_match_float64_numpy_and_cut_the_output_error(kw, k):
  """Same tables, scales and buckets as nearest rounding; codes as float64 GPTQ picks them (a
  float32 run may round a near-tie the other way and carry it on: at most 1 % of codes, and its
  output error within 1 % of the reference's); the output error E||x (W - W_hat)||^2 at least
  10 % below nearest rounding's. k = 100 pads 28 rows (group 64), which must not take part;
  k = 320 feeds the errors back in 5 blocks of 64 rows (`GPTQ_BLOCK`'s largest divisor of 320)."""
  w, cov = _problem(k, k, 48)
  near, _ = _quantize(w, cov, "nearest", **kw)
  qt, report = _quantize(w, cov, "gptq", **kw)
  assert [b.num_channels for b in qt.buckets] == [b.num_channels for b in near.buckets]
  for b, c in zip(qt.buckets, near.buckets, strict=True):
    np.testing.assert_array_equal(np.asarray(b.tables), np.asarray(c.tables))
    np.testing.assert_array_equal(np.asarray(b.scales.dequantize()), np.asarray(c.scales.dequantize()))
  ref_codes = _gptq_reference(w, cov, qt, kw.get("gptq_damp", QuantConfig().gptq_damp))
  got = [np.asarray(packing.unpack(b.planes, b.bits))[:k] for b in qt.buckets]
  agree = np.mean(np.concatenate([(g == r).ravel() for g, r in zip(got, ref_codes, strict=True)]))
  assert agree >= 0.99, agree
  w_hat = np.asarray(dequantize(qt, jnp.float32), np.float64)
  ref_hat = np.zeros_like(w_hat)
  perm = np.arange(w.shape[1]) if qt.perm is None else np.asarray(qt.perm, np.int64)
  start = 0
  for b, c in zip(qt.buckets, ref_codes, strict=True):
    t, s = np.asarray(b.channel_tables(), np.float64), np.asarray(b.scales.dequantize(), np.float64)
    cols = perm[start : start + b.num_channels]
    ref_hat[:, cols] = t[np.arange(b.num_channels), c] * np.repeat(s, qt.group_size, 0)[:k]
    start += b.num_channels
  ours, ref = _output_error(w, w_hat, cov), _output_error(w, ref_hat, cov)
  assert abs(ours - ref) <= 0.01 * ref, (ours, ref)
  assert ours <= 0.9 * _output_error(w, dequantize(near, jnp.float32), cov)
  sq = float(((np.asarray(w, np.float64) - w_hat) ** 2).sum())
  assert report.layers[0].sq_error == pytest.approx(sq, rel=1e-5)  # the stored result's error


def _refit_reference(w, cov, qt):
  """float64 numpy least squares of each channel's levels given the codes, scales and tables of
  `qt`: L = (Z^T H Z + r I)^-1 (Z^T H w + r L_fit), r = REFIT_RIDGE x mean diag(Z^T H Z). Returns
  the dequantized kernel [K, N] with those levels."""
  k, n = w.shape
  h = cov.astype(np.float64)
  perm = np.arange(n) if qt.perm is None else np.asarray(qt.perm, np.int64)
  out, start = np.zeros((k, n)), 0
  for b in qt.buckets:
    codes = np.asarray(packing.unpack(b.planes, b.bits))[:k].astype(np.int64)
    s = np.repeat(np.asarray(b.scales.dequantize(), np.float64), qt.group_size, 0)[:k]
    fitted = np.asarray(b.channel_tables(), np.float64)
    for j in range(b.num_channels):
      col = perm[start + j]
      z = (codes[:, j, None] == np.arange(2**b.bits)) * s[:, j, None]  # [K, 2^b]
      a = z.T @ h @ z
      r = pipeline.REFIT_RIDGE * np.trace(a) / 2**b.bits
      levels = np.linalg.solve(a + r * np.eye(2**b.bits), z.T @ h @ w[:, col] + r * fitted[j])
      out[:, col] = z @ levels
    start += b.num_channels
  return out


@pytest.mark.parametrize("kw", [dict(budget=1.5), dict(budget=2.5)], ids=["lowra1.5", "lowra2.5"])
def test_refit_levels_are_the_least_squares_levels_of_the_gptq_codes(kw):
  """`refit=True`: the same buckets, scales and code partition as GPTQ's (codes renumbered so
  that levels stay sorted), the levels a float64 least squares through H gives for those codes
  (to float16 rounding: the kernels agree within 1 % of the output error), the output error below
  GPTQ's."""
  k = 128
  w, cov = _problem(7, k, 48)
  gptq, _ = _quantize(w, cov, "gptq", **kw)
  qt, report = _quantize(w, cov, "gptq", refit=True, **kw)
  assert [b.bits for b in qt.buckets] == [b.bits for b in gptq.buckets]
  for b, g in zip(qt.buckets, gptq.buckets, strict=True):
    scales = (np.asarray(x.scales.dequantize()) for x in (b, g))
    np.testing.assert_array_equal(*scales)
    tables = np.asarray(b.tables, np.float64)
    assert b.tables.dtype == jnp.float16 and (np.diff(tables, axis=1) >= 0).all()
    ours, theirs = (np.asarray(packing.unpack(x.planes, x.bits))[:k] for x in (b, g))
    for j in range(b.num_channels):  # one refitted code per GPTQ code: the same partition
      pairs = np.unique(np.stack([ours[:, j], theirs[:, j]]), axis=1)
      assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
  ref = _refit_reference(w, cov, gptq)
  w_hat = np.asarray(dequantize(qt, jnp.float32), np.float64)
  err, ref_err = _output_error(w, w_hat, cov), _output_error(w, ref, cov)
  assert abs(err - ref_err) <= 0.01 * ref_err, (err, ref_err)
  assert err < 0.98 * _output_error(w, dequantize(gptq, jnp.float32), cov)
  sq = float(((np.asarray(w, np.float64) - w_hat) ** 2).sum())
  assert report.layers[0].sq_error == pytest.approx(sq, rel=1e-5)


def test_gptq_needs_calibration_and_covariances():
  with pytest.raises(QuantizationError, match="rounding='gptq' feeds errors back"):
    QuantConfig(rounding="gptq")
  with pytest.raises(QuantizationError, match="unknown rounding"):
    QuantConfig(calibration="kernel", rounding="exact")
  with pytest.raises(QuantizationError, match="refit=True refits per-channel tables"):
    QuantConfig(calibration="kernel", refit=True)
  w, cov = _problem(0, 64, 16)
  h = np.diagonal(cov).copy()
  cfg = QuantConfig(calibration="kernel", rounding="gptq", budget=2.0)
  cases = [
    (dict(importance={"l/kernel": h}), "needs the input covariance of 'l/kernel'"),
    (dict(importance={"l/kernel": h}, covariances={"l/kernel": cov[:32]}), "expected [64, 64]"),
    (dict(importance={"l/kernel": cov}, covariances={"l/kernel": cov}), "goes in `covariances`"),
  ]
  for kw, message in cases:
    with pytest.raises(QuantizationError) as e:
      quantize.quantize_params({"l": {"kernel": w}}, cfg, progress=False, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)
