"""Per-channel mappings: weighted Lloyd-Max levels (lookup tables) and nearest-level codes.

Channels are rows here: x float32 [N, K] holds one output channel's K normalised weights
(w / absmax(group)) per row. Weighted Lloyd-Max alternates
  assign:  thresholds t_j = (m_j + m_{j+1}) / 2, x goes to the bin between thresholds;
  update:  m_j = sum_{i in bin j} omega_i x_i / sum_{i in bin j} omega_i   (empty bins keep m_j),
for all channels at once. Each channel's values are sorted once with prefix sums of omega and
omega*x, so an iteration costs O(N L log K): binary search for the thresholds, differences of the
prefix sums for the bin sums. The sort is shared by every precision.

Tables are stored in float16, so the final codes and errors are computed with the rounded levels.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowra_jax.quantize import codebooks

LUT_DTYPE = jnp.float16


class SortedChannels(NamedTuple):
  """Each channel's values sorted, with prefix sums (a leading 0) of the weights.

  xs: float32 [N, K]; cw, cwx: float32 [N, K + 1] prefix sums of omega and omega * x.
  """

  xs: jax.Array
  cw: jax.Array
  cwx: jax.Array


def sort_channels(x: jax.Array, omega: jax.Array) -> SortedChannels:
  """Sorts x [N, K] per row, carrying weights omega [N, K]."""
  xs, ws = jax.lax.sort((x, omega), dimension=1, num_keys=1)
  zero = jnp.zeros((x.shape[0], 1), jnp.float32)
  cw = jnp.concatenate([zero, jnp.cumsum(ws, axis=1)], axis=1)
  cwx = jnp.concatenate([zero, jnp.cumsum(ws * xs, axis=1)], axis=1)
  return SortedChannels(xs, cw, cwx)


def thresholds(levels: jax.Array) -> jax.Array:
  """Midpoints between sorted levels: [..., L] -> [..., L - 1]."""
  return (levels[..., 1:] + levels[..., :-1]) * 0.5


def _bin_sums(sc: SortedChannels, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel sums of omega and omega*x in each bin: t [N, L-1] -> two [N, L]."""
  k = sc.xs.shape[1]
  count_le = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="right", method="scan"))
  edges = count_le(sc.xs, t)  # [N, L-1]: values <= t_j go to bins <= j
  n = edges.shape[0]
  edges = jnp.concatenate(
    [jnp.zeros((n, 1), edges.dtype), edges, jnp.full((n, 1), k, edges.dtype)], axis=1
  )
  sw = jnp.diff(jnp.take_along_axis(sc.cw, edges, axis=1), axis=1)
  swx = jnp.diff(jnp.take_along_axis(sc.cwx, edges, axis=1), axis=1)
  return sw, swx


def lloyd_max(
  sc: SortedChannels, levels: jax.Array, iters: int, segments: jax.Array | None = None
) -> jax.Array:
  """Weighted Lloyd-Max from initial sorted levels.

  Args:
    sc: sorted channels (N rows).
    levels: float32 [S, L] initial levels; S = N (one table per channel) unless `segments` is set.
    iters: number of assign/update steps.
    segments: optional int32 [N] table index of each channel in [0, S]; channels sharing a table
      are pooled; index S means "not fitted" (the channel is ignored).

  Returns:
    float32 [S, L] levels.
  """
  num_tables = levels.shape[0]

  def step(_, m):
    per_channel = m if segments is None else jnp.concatenate([m, m[:1]])[segments]
    sw, swx = _bin_sums(sc, thresholds(per_channel))
    if segments is not None:
      sw = jax.ops.segment_sum(sw, segments, num_tables + 1)[:num_tables]
      swx = jax.ops.segment_sum(swx, segments, num_tables + 1)[:num_tables]
    return jnp.where(sw > 0, swx / jnp.where(sw > 0, sw, 1.0), m)

  return jax.lax.fori_loop(0, iters, step, levels.astype(jnp.float32))


def init_levels(sc: SortedChannels, bits: int) -> jax.Array:
  """NF-`bits` levels for every channel; 1 bit starts from +-(weighted mean |x|). [N, 2**bits]."""
  n = sc.xs.shape[0]
  if bits == 1:
    total_w = sc.cw[:, -1]
    mean_abs = jnp.sum(jnp.abs(sc.xs) * jnp.diff(sc.cw, axis=1), axis=1)
    a = jnp.where(total_w > 0, mean_abs / jnp.where(total_w > 0, total_w, 1.0), 0.5)
    return jnp.stack([-a, a], axis=1)
  return jnp.broadcast_to(jnp.asarray(codebooks.nf_levels(bits)), (n, 2**bits))


def nearest_codes(x: jax.Array, levels: jax.Array) -> jax.Array:
  """Index of the nearest level (ties go down): x [N, K], levels [N, L] sorted -> uint8 [N, K].

  Levels may be padded with +inf at the top (tables of lower precision in a wider array).
  """
  t = thresholds(levels.astype(jnp.float32))
  codes = jnp.zeros(x.shape, jnp.uint8)
  for j in range(t.shape[1]):  # L - 1 <= 15 elementwise compares, fused into one pass over x
    codes = codes + (x > t[:, j : j + 1]).astype(jnp.uint8)
  return codes


def lookup(levels: jax.Array, codes: jax.Array) -> jax.Array:
  """levels [N, L], codes [N, K] -> float32 [N, K] values levels[n, codes[n, k]]."""
  return jnp.take_along_axis(levels.astype(jnp.float32), codes.astype(jnp.int32), axis=1)


@functools.partial(jax.jit, static_argnames=("bits", "iters"))
def fit_channels(
  x: jax.Array, fit_w: jax.Array, err_w: jax.Array, *, bits: tuple[int, ...], iters: int
) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """Lloyd-Max tables of every channel at each precision, and the resulting errors.

  Args:
    x: float32 [N, K] normalised weights, one channel per row.
    fit_w: float32 [N, K] Lloyd-Max sample weights (0 for padding).
    err_w: float32 [N, K] error weights: scale^2, so errors are squared errors in weight space.
    bits: precisions to fit.
    iters: Lloyd-Max iterations.

  Returns:
    (tables, errors): tables[i] float16 [N, 2**bits[i]]; errors float32 [N, len(bits)] with
    errors[n, i] = sum_k err_w (x - table[code])^2 under the float16 tables.
  """
  sc = sort_channels(x, fit_w)
  tables, errors = [], []
  for b in bits:
    levels = lloyd_max(sc, init_levels(sc, b), iters).astype(LUT_DTYPE)
    err = err_w * jnp.square(x - lookup(levels, nearest_codes(x, levels)))
    tables.append(levels)
    errors.append(err.sum(axis=1))
  return tuple(tables), jnp.stack(errors, axis=1)


@functools.partial(jax.jit, static_argnames=("iters",))
def refit_shared(
  x: jax.Array, fit_w: jax.Array, levels: jax.Array, segments: jax.Array, *, iters: int
) -> jax.Array:
  """Pooled Lloyd-Max of shared tables: levels float32 [S, L], segments int32 [N] in [0, S].

  Returns float16 [S, L].
  """
  sc = sort_channels(x, fit_w)
  return lloyd_max(sc, levels, iters, segments=segments).astype(LUT_DTYPE)


def kmeans_tables(
  tables: np.ndarray, num_clusters: int, iters: int = 25
) -> tuple[np.ndarray, np.ndarray]:
  """Clusters per-channel tables float32 [M, L] into C shared ones (plain k-means, host numpy).

  Deterministic: starts from the tables at evenly spaced ranks of their mean level.
  Returns (centroids float32 [C, L] sorted per row, labels int32 [M]).
  """
  tables = np.asarray(tables, np.float32)
  m = tables.shape[0]
  c = min(num_clusters, m)
  order = np.argsort(tables.mean(axis=1), kind="stable")
  centroids = tables[order[np.linspace(0, m - 1, c).round().astype(int)]].copy()
  labels = np.zeros(m, np.int32)
  for _ in range(iters):
    d = ((tables[:, None, :] - centroids[None]) ** 2).sum(-1)
    labels = d.argmin(axis=1).astype(np.int32)
    for j in range(c):
      members = tables[labels == j]
      if len(members):
        centroids[j] = members.mean(axis=0)
  return np.sort(centroids, axis=1), labels
