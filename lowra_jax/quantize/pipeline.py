"""Quantizing a params pytree: select kernels, fit tables, solve the budget, encode and pack.

  1. fit (device, per kernel):  absmax per group; Lloyd-Max tables and per-channel errors at every
     candidate precision (`mapping.fit_channels`), errors weighted by absmax^2 (and with
     `calibration`, by the kernel's input second moments per row); skipped for `nf`.
  2. solve (host, model-wide):  precision per channel under the budget (`precision.solve_budget`),
     then each tensor's channel count per precision rounded to a multiple (`bucket_multiple`),
     or one count per precision shared by the tensors of each shape (`bucket_sizes="shape"`, or
     of each shape and role: "role").
  3. encode (device, per kernel): channels permuted into precision buckets; scales double-quantized
     per bucket; codes = nearest level of w / scale; the exact squared error of the stored result.
  4. pack (host):  codes into uint8 planes per bucket (`packing.pack`).
Every jitted step has the kernel's own shape, so a model compiles once per distinct kernel shape;
data-dependent shapes (bucket sizes) are handled on the host.

`quantize_stream(source, config, sink=)` runs the stages over a source read once per pass, one
tensor at a time (LowRA: pass 1 = fit, keeping tables and per-channel errors; solve; pass 2 =
encode and pack; NF / lloyd: one pass); `quantize_params` is the same over a tree's leaves.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lowra_jax.quantize import codebooks, mapping, packing, precision, scaling
from lowra_jax.quantize.config import QuantConfig, QuantizationError
from lowra_jax.quantize.qtensor import Bucket, QuantizedTensor, dequantize, is_quantized

MAX_LEVELS = 16
FIT_CHUNK = 1 << 26
"""Most elements (channels x padded rows) fitted in one call: bounds the fit's device memory
(tens of bytes per element) whatever a kernel's size (LLaMA-2-70B's MLP kernels: 4 chunks)."""


@dataclasses.dataclass
class LayerReport:
  path: str
  shape: tuple[int, int]
  code_bits: float
  total_bits: float
  sq_error: float
  sq_norm: float
  channels_per_bits: dict[int, int]

  @property
  def rel_error(self) -> float:
    return float(np.sqrt(self.sq_error / self.sq_norm)) if self.sq_norm else 0.0


@dataclasses.dataclass
class QuantReport:
  """Per-layer and model-wide results of `quantize_params`; `seconds` per pipeline stage."""

  layers: list[LayerReport]
  seconds: dict[str, float]

  @property
  def num_params(self) -> int:
    return sum(l.shape[0] * l.shape[1] for l in self.layers)

  @property
  def code_bits(self) -> float:
    return sum(l.code_bits * l.shape[0] * l.shape[1] for l in self.layers) / self.num_params

  @property
  def total_bits(self) -> float:
    return sum(l.total_bits * l.shape[0] * l.shape[1] for l in self.layers) / self.num_params

  @property
  def rel_error(self) -> float:
    """||W - W_hat||_F / ||W||_F over all quantized layers together (0 for all-zero weights)."""
    norm = sum(l.sq_norm for l in self.layers)
    return float(np.sqrt(sum(l.sq_error for l in self.layers) / norm)) if norm else 0.0

  def summary(self) -> str:
    lines = [f"{'layer':48s} {'shape':>12s} {'code':>6s} {'total':>6s} {'rel.err':>8s}"]
    for l in self.layers:
      lines.append(
        f"{l.path[-48:]:48s} {str(l.shape):>12s} {l.code_bits:6.3f} "
        f"{l.total_bits:6.3f} {l.rel_error:8.4f}"
      )
    lines.append(
      f"{'all ' + str(len(self.layers)) + ' layers':48s} {self.num_params:>12d} "
      f"{self.code_bits:6.3f} {self.total_bits:6.3f} {self.rel_error:8.4f}"
    )
    return "\n".join(lines)


def path_str(path) -> str:
  """'/'-joined names of a pytree key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def nest(pairs) -> dict:
  """A nested dict from ``(path, leaf)`` pairs whose paths are ``/``-joined (`path_str`'s)."""
  tree: dict = {}
  for path, leaf in pairs:
    *parents, name = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = leaf
  return tree


def default_filter(config: QuantConfig) -> Callable[[str, jax.Array], bool]:
  """Every 2-D leaf whose path matches none of `config.skip_patterns` (embeddings, head, norms)."""
  skip = [re.compile(p) for p in config.skip_patterns]
  return lambda path, leaf: getattr(leaf, "ndim", 0) == 2 and not any(s.search(path) for s in skip)


def _check_leaf(path: str, w) -> None:
  if w.ndim != 2:
    raise QuantizationError(
      f"parameter {path!r} has shape {tuple(w.shape)}: only 2-D kernels [in, out] can be "
      "quantized; exclude it with skip_patterns or a filter."
    )
  if w.size == 0:
    raise QuantizationError(
      f"parameter {path!r} is empty (shape {tuple(w.shape)}): nothing to "
      "quantize; exclude it with skip_patterns or a filter."
    )
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise QuantizationError(f"parameter {path!r} has dtype {w.dtype}: expected a float kernel.")
  if not bool(jnp.isfinite(w).all()):
    raise QuantizationError(
      f"parameter {path!r} contains NaN or Inf: repair the checkpoint (or "
      "exclude the parameter) before quantizing."
    )


@jax.jit
def _sq_norm(w):
  return jnp.sum(jnp.square(w.astype(jnp.float32)))


@functools.partial(jax.jit, static_argnames=("group_size", "weighting"))
def _normalise(w, h=None, *, group_size: int, weighting: str):
  """w [K, N] -> (x, fit_w, err_w) float32 [N, K_pad] with one channel per row, absmax [G, N].

  h: None, or float32 [K] row weights (input second moments E[x_k^2], `_moments`): both weights
  of input row k are multiplied by h_k (err_w = scale^2 * h_k). Padding rows weigh 0; h = 1
  gives the same bits as None."""
  wp = scaling.pad_rows(w.astype(jnp.float32), group_size)
  s = scaling.group_absmax(wp, group_size)
  se = scaling.expand_groups(s, group_size)
  x = jnp.where(se > 0, wp / jnp.where(se > 0, se, 1.0), 0.0)
  if h is None:
    row_w = (jnp.arange(wp.shape[0]) < w.shape[0]).astype(jnp.float32)
  else:
    row_w = jnp.pad(h.astype(jnp.float32), (0, wp.shape[0] - w.shape[0]))
  row_w = row_w[:, None]
  err_w = row_w * jnp.square(se)
  fit_w = {
    "absmax2": err_w,
    "absmax": row_w * se,
    "none": jnp.broadcast_to(row_w, se.shape),
  }[weighting]
  return x.T, fit_w.T, err_w.T, s


@functools.partial(jax.jit, static_argnames=("group_size",))
def _absmax(w, *, group_size: int):
  """w [K, N] -> float32 [G, N]: absmax per group of rows (`_normalise`'s, bit for bit)."""
  return scaling.group_absmax(scaling.pad_rows(w.astype(jnp.float32), group_size), group_size)


@functools.partial(
  jax.jit, static_argnames=("group_size", "dense", "refit_levels", "gptq_damp")
)
def _encode(
  w,
  perm,
  scale,
  tables,
  cov=None,
  *,
  group_size: int,
  dense: bool,
  refit_levels: int = 0,
  gptq_damp: float = 0.1,
):
  """Codes and exact errors of the stored format.

  Args:
    w: [K, N] kernel.
    perm: int32 [N], stored column j is channel perm[j].
    scale: float32 [G, N] dequantized group scales, permuted.
    tables: float32 [N, 16] each channel's levels (padded with +inf), permuted.
    cov: None (each weight's nearest level), or float32 [K, K] the input covariance for
      `QuantConfig.rounding="gptq"` (`_gptq_codes`).
    dense: also return the dequantized kernel.
    refit_levels: 0, or (with `cov`) the most levels a channel has: its tables are then refitted
      to the codes (`_refit_tables`, `QuantConfig.refit`).
    gptq_damp: `QuantConfig.gptq_damp` (with `cov`).

  Returns:
    codes uint8 [K_pad, N] (permuted), squared error float32 [N] (permuted), (`dense`) the
    dequantized kernel float32 [K, N] in the original channel order (what `dequantize` gives),
    else None, and the tables float32 [N, 16] the codes index (refitted, else `tables`).
  """
  wp = scaling.pad_rows(w.astype(jnp.float32), group_size)[:, perm]
  se = scaling.expand_groups(scale, group_size)
  if cov is None:
    codes = mapping.nearest_codes(_normalised(wp, se).T, tables)
  else:
    codes = _gptq_codes(wp, se, tables, cov, gptq_damp).T
    if refit_levels:
      tables, codes = _refit_tables(wp, se, codes, cov, tables, refit_levels)
  w_hat = mapping.lookup(tables, codes).T * se
  real = (jnp.arange(wp.shape[0]) < w.shape[0])[:, None]
  err = jnp.where(real, jnp.square(wp - w_hat), 0.0).sum(axis=0)
  if not dense:
    return codes.T, err, None, tables
  unpermuted = jnp.zeros_like(w_hat).at[:, perm].set(w_hat)
  return codes.T, err, unpermuted[: w.shape[0]], tables


REFIT_RIDGE = 1e-4  # of a channel's mean normal-matrix diagonal, pulling levels to their fit


def _refit_tables(wp, se, codes, cov, tables, levels: int):
  """Each channel's levels refitted to its codes through the input covariance H, rounded to the
  stored float16, sorted (codes renumbered to match).

  With the codes fixed, channel n's output error (w - Z L)^T H (w - Z L), Z[k, j] = s_k [c_k = j],
  is least at L = (Z^T H Z)^-1 Z^T H w; a ridge of `REFIT_RIDGE` times the mean diagonal of
  Z^T H Z (over the channel's 2^bits levels) pulls L towards the fitted levels, so that a level
  no code uses keeps its value.

  Args:
    wp, se: float32 [K_pad, N] permuted weights (padding rows 0) and their scales.
    codes: uint8 [N, K_pad]; cov: float32 [K, K]; tables: float32 [N, 16] (+inf padded).
    levels: the most levels a channel has (a static power of two <= 16).

  Returns:
    tables float32 [N, 16] and codes uint8 [N, K_pad].
  """
  k_pad, k = wp.shape[0], cov.shape[0]
  h = jnp.zeros((k_pad, k_pad), jnp.float32).at[:k, :k].set(cov.astype(jnp.float32))
  dot = functools.partial(jnp.dot, precision=jax.lax.Precision.HIGHEST)
  onehot = [jnp.where(codes.T == j, se, 0.0) for j in range(levels)]  # Z[:, :, j], [K_pad, N]
  hw = dot(h, wp)
  gram = [[None] * levels for _ in range(levels)]
  for j in range(levels):
    hz = dot(h, onehot[j])
    for i in range(j, levels):
      gram[i][j] = gram[j][i] = jnp.sum(onehot[i] * hz, axis=0)  # [N]
  a = jnp.stack([jnp.stack(row, axis=-1) for row in gram], axis=-2)  # [N, J, J]
  rhs = jnp.stack([jnp.sum(z * hw, axis=0) for z in onehot], axis=-1)  # [N, J]
  old = tables[:, :levels]
  used = jnp.isfinite(old)
  fitted = jnp.where(used, old, 0.0)
  ridge = REFIT_RIDGE * jnp.trace(a, axis1=1, axis2=2) / used.sum(axis=1)
  ridge = jnp.where(ridge > 0, ridge, 1.0)[:, None]
  eye = jnp.eye(levels, dtype=jnp.float32)
  a = jnp.where(used[:, :, None] & used[:, None, :], a, 0.0) + ridge[:, :, None] * eye
  new = jnp.linalg.solve(a, (jnp.where(used, rhs, 0.0) + ridge * fitted)[..., None])[..., 0]
  new = jnp.where(used, new.astype(jnp.float16).astype(jnp.float32), jnp.inf)
  order = jnp.argsort(new, axis=1)
  rank = jnp.argsort(order, axis=1).astype(jnp.uint8)
  codes = jnp.take_along_axis(rank, codes.astype(jnp.int32), axis=1)
  new = jnp.take_along_axis(new, order, axis=1)
  return tables.at[:, :levels].set(new), codes


def _normalised(w, se):
  """w / se where se != 0, else 0 (the value a zero scale's codes are chosen for)."""
  return jnp.where(se != 0, w / jnp.where(se != 0, se, 1.0), 0.0)


GPTQ_BLOCK = 128  # rows rounded between two whole-kernel updates (GPTQ's lazy batch updates)


def _gptq_codes(wp, se, tables, cov, damp: float):
  """uint8 [K_pad, N] codes chosen by GPTQ's row-by-row error feedback.

  wp: float32 [K_pad, N] weights (padding rows 0), se: float32 [K_pad, N] their scales, tables:
  float32 [N, 16]; cov: float32 [K, K] input covariance H; damp: the multiple of H's mean
  diagonal added to its diagonal. Rows are rounded in order of
  decreasing H_kk; with U the upper Cholesky factor of (H + damp I)^-1 in that order, rounding
  row i to q_i feeds e = (w_i - q_i) / U_ii into the remaining rows as w_j -= U_ij e. Rows with
  H_kk = 0 (inputs never seen) and padding rows get H_kk = 1 and no coupling: nearest levels.
  The feedback is applied at once within a block of `GPTQ_BLOCK` rows and, for the rows after
  it, as one [K_pad, B] x [B, N] product per block (the same sums, in another order)."""
  k_pad, k = wp.shape[0], cov.shape[0]
  h = jnp.zeros((k_pad, k_pad), jnp.float32).at[:k, :k].set(cov.astype(jnp.float32))
  diag = jnp.diagonal(h)
  live = diag > 0
  h = jnp.where(live[:, None] & live[None, :], h, 0.0)
  h = h + jnp.diag(jnp.where(live, damp * jnp.sum(diag) / jnp.maximum(live.sum(), 1), 1.0))
  order = jnp.argsort(-jnp.where(live, diag, -1.0), stable=True)
  h = h[order][:, order]
  # H = V V^T with V upper (the Cholesky factor of H with rows and columns reversed, reversed
  # back), so H^-1 = V^-T V^-1 and U = V^-1 is the upper factor with U^T U = H^-1: one Cholesky
  # and one triangular solve instead of an explicit inverse and its Cholesky.
  v = jnp.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
  u = jax.scipy.linalg.solve_triangular(v, jnp.eye(k_pad, dtype=jnp.float32), lower=False)
  w, s = wp[order], se[order]
  size = math.gcd(k_pad, GPTQ_BLOCK)
  rows = jnp.arange(k_pad)

  def block(b, carry):
    w, codes = carry
    lo = b * size
    ub = jax.lax.dynamic_slice_in_dim(u, lo, size, 0)  # [B, K_pad]
    sb = jax.lax.dynamic_slice_in_dim(s, lo, size, 0)

    def row(i, carry):
      wb, cb, eb = carry
      c = mapping.nearest_codes(_normalised(wb[i], sb[i])[:, None], tables)[:, 0]
      q = mapping.lookup(tables, c[:, None])[:, 0] * sb[i]
      e = (wb[i] - q) / ub[i, lo + i]
      coupling = jax.lax.dynamic_slice_in_dim(ub[i], lo, size)  # U[lo + i, block rows]
      return wb - coupling[:, None] * e[None, :], cb.at[i].set(c), eb.at[i].set(e)

    start = (jax.lax.dynamic_slice_in_dim(w, lo, size, 0), jnp.zeros((size, w.shape[1]), jnp.uint8))
    _, cb, eb = jax.lax.fori_loop(0, size, row, (*start, jnp.zeros((size, w.shape[1]))))
    later = jnp.dot(ub.T, eb, precision=jax.lax.Precision.HIGHEST)  # [K_pad, N]
    w = w - jnp.where((rows >= lo + size)[:, None], later, 0.0)
    return w, jax.lax.dynamic_update_slice_in_dim(codes, cb, lo, 0)

  _, codes = jax.lax.fori_loop(
    0, k_pad // size, block, (w, jnp.zeros(wp.shape, jnp.uint8))
  )
  return codes[jnp.argsort(order)]


def _pad_tables(t: np.ndarray) -> np.ndarray:
  t = np.asarray(t, np.float32)
  return np.pad(t, ((0, 0), (0, MAX_LEVELS - t.shape[1])), constant_values=np.inf)


@dataclasses.dataclass
class _Fitted:
  """Host results of the fit stage for one kernel: all that is kept between the two passes (the
  group scales are recomputed from the kernel when it is encoded)."""

  tables: dict[int, np.ndarray]  # bits -> float16 [N, 2**bits]; empty for nf
  errors: np.ndarray | None  # float32 [N, P] for the solver; None for nf/lloyd


def _fit(w, cfg: QuantConfig, path: str, h=None) -> _Fitted:
  """Tables (and for lowra errors) of every channel of w [K, N], fitted FIT_CHUNK elements at a
  time: channels are independent, so chunks of equal width give each channel's own result.
  h: None or float32 [K], the kernel's input second moments (`_normalise`)."""
  if cfg.method == "nf":
    return _Fitted({}, None)
  bits = cfg.candidate_bits if cfg.method == "lowra" else (cfg.bits_for(path),)
  k_pad = -(-w.shape[0] // cfg.group_size) * cfg.group_size
  n = w.shape[1]
  chunks = -(-n // max(1, FIT_CHUNK // k_pad))
  width = -(-n // chunks)
  parts = []
  for lo in range(0, n, width):
    x, fit_w, err_w, _ = _normalise(
      w[:, lo : lo + width], h, group_size=cfg.group_size, weighting=cfg.weighting
    )
    tables, errors = mapping.fit_channels(x, fit_w, err_w, bits=bits, iters=cfg.lloyd_iters)
    parts.append(([np.asarray(t) for t in tables], np.asarray(errors)))
  return _Fitted(
    {b: np.concatenate([p[0][i] for p in parts]) for i, b in enumerate(bits)},
    np.concatenate([p[1] for p in parts]) if cfg.method == "lowra" else None,
  )


def _bucket_tables(w, cfg: QuantConfig, fitted: _Fitted, b: int, cols: np.ndarray, h):
  """(tables [T, 2**b], table_index [Nb] or None) for the channels `cols` of precision b."""
  if cfg.method == "nf":
    return codebooks.nf_levels(b)[None], None  # one float32 table, exactly bitsandbytes' values
  own = fitted.tables[b][cols]
  if not cfg.lut_clusters or len(cols) <= cfg.lut_clusters:
    return own, None
  centroids, labels = mapping.kmeans_tables(own, cfg.lut_clusters)
  segments = np.full(w.shape[1], len(centroids), np.int32)
  segments[cols] = labels
  x, fit_w, _, _ = _normalise(w, h, group_size=cfg.group_size, weighting=cfg.weighting)
  shared = mapping.refit_shared(
    x, fit_w, jnp.asarray(centroids), jnp.asarray(segments), iters=cfg.lloyd_iters
  )
  return np.asarray(shared), labels.astype(np.uint8)


def _encode_and_pack(
  w, cfg: QuantConfig, fitted: _Fitted, channel_bits: np.ndarray, seconds: dict, dense: bool, h,
  cov=None,
) -> tuple[QuantizedTensor, np.ndarray, jax.Array | None]:
  """Builds the QuantizedTensor of one kernel; also returns its squared error per channel (in
  weight space, whatever `h`) and (`dense`) its dequantization (float32 [K, N]). cov: the input
  covariance [K, K] for `rounding="gptq"`, else None."""
  t0 = time.perf_counter()
  k, n = w.shape
  absmax = np.asarray(_absmax(w, group_size=cfg.group_size))
  present = sorted(set(channel_bits.tolist()))
  order = np.argsort(channel_bits, kind="stable") if len(present) > 1 else np.arange(n)
  bounds = np.cumsum([0] + [int((channel_bits == b).sum()) for b in present])
  parts = []
  for b, lo, hi in zip(present, bounds[:-1], bounds[1:]):
    cols = order[lo:hi]
    scales = scaling.make_scales(absmax[:, cols], cfg.double_quant, cfg.dq_block)
    tables, index = _bucket_tables(w, cfg, fitted, b, cols, h)
    per_channel = tables[index] if index is not None else np.broadcast_to(tables, (hi - lo, 2**b))
    parts.append((b, scales, tables, index, scales.dequantize(np), _pad_tables(per_channel)))
  refit = cfg.refit and cov is not None
  codes, err, w_hat, refitted = _encode(
    w,
    jnp.asarray(order, jnp.int32),
    jnp.asarray(np.concatenate([p[4] for p in parts], axis=1)),
    jnp.asarray(np.concatenate([p[5] for p in parts], axis=0)),
    cov,
    group_size=cfg.group_size,
    dense=dense,
    refit_levels=2 ** max(present) if refit else 0,
    gptq_damp=cfg.gptq_damp,
  )
  codes, err = np.asarray(codes), np.asarray(err)
  if refit:  # per-channel tables (`validate`: no shared ones), float16 values
    refitted = np.asarray(refitted)
    parts = [
      (b, scales, refitted[lo:hi, : 2**b].astype(np.float16), index, *rest)
      for (b, scales, _, index, *rest), lo, hi in zip(parts, bounds[:-1], bounds[1:])
    ]
  t1 = time.perf_counter()
  buckets = tuple(
    Bucket(
      planes=packing.pack(codes[:, lo:hi], b),
      tables=tables,
      scales=scales,
      table_index=index,
      bits=b,
    )
    for (b, scales, tables, index, _, _), lo, hi in zip(parts, bounds[:-1], bounds[1:])
  )
  perm = None
  if len(present) > 1:
    perm = order.astype(np.int16 if n <= np.iinfo(np.int16).max else np.int32)
  qt = QuantizedTensor(
    buckets=buckets,
    perm=perm,
    shape=(k, n),
    group_size=cfg.group_size,
    dtype=jnp.dtype(w.dtype).name,
  )
  qt = jax.device_put(qt)
  seconds["encode"] += t1 - t0
  seconds["pack"] += time.perf_counter() - t1
  return qt, err, w_hat


def _align_buckets(choices, errors, ks, config: QuantConfig, slack: float):
  """Each tensor's bucket sizes rounded to multiples of its `precision.count_multiple`
  (`precision.align_counts`), the upgrades paid from the budget's `slack` (code bits), tensors in
  order."""
  out = dict(choices)
  for i, choice in choices.items():
    m = precision.count_multiple(len(choice), config.bucket_multiple)
    if m > 1:
      out[i], added = precision.align_counts(
        errors[i], choice, config.candidate_bits, ks[i], m, slack
      )
      slack -= added
  return out


def _share_counts(choices, errors, ks, config: QuantConfig, capacity: float):
  """`bucket_sizes="shape"` / "role": the tensors of each class ([K, N] shape; for "role" also
  the path with its numeric components dropped) re-assigned to one shared channel count per
  precision (`precision.shared_counts`, within the code-bit `capacity`), each keeping its
  least-error channels at each precision (`precision.assign_counts`)."""
  classes: dict[tuple, list[str]] = {}
  for path, choice in choices.items():
    role = tuple(c for c in path.split("/") if not c.isdigit())
    key = (ks[path], len(choice)) + (role if config.bucket_sizes == "role" else ())
    classes.setdefault(key, []).append(path)
  counts = precision.shared_counts(
    [
      ([choices[p] for p in paths], k, precision.count_multiple(n, config.bucket_multiple))
      for (k, n, *_), paths in classes.items()
    ],
    config.candidate_bits,
    capacity,
  )
  return {
    p: precision.assign_counts(errors[p], c)
    for paths, c in zip(classes.values(), counts)
    for p in paths
  }


def _solve(fits: dict[str, _Fitted], ks: dict[str, int], config: QuantConfig):
  """{path: precision [N] per channel} of LowRA's model-wide budget over the fitted kernels
  (`ks`: their in_features), tensors taken in the order of their path components (a params
  tree's flattening order), so that the result does not depend on the order they were read."""
  paths = sorted(fits, key=lambda p: p.split("/"))
  cand = np.asarray(config.candidate_bits)
  errors = np.concatenate([fits[p].errors for p in paths]).astype(np.float64)
  costs = np.concatenate([np.full(len(fits[p].errors), ks[p]) for p in paths])
  choice = precision.solve_budget(
    errors, costs, cand, config.budget, config.solver, config.milp_max_channels
  )
  splits = np.cumsum([len(fits[p].errors) for p in paths])[:-1]
  choices = dict(zip(paths, np.split(choice, splits)))
  per_path = dict(zip(paths, np.split(errors, splits)))
  if config.bucket_sizes != "tensor":
    choices = _share_counts(choices, per_path, ks, config, config.budget * float(costs.sum()))
  else:
    slack = config.budget * float(costs.sum()) - float((costs * cand[choice]).sum())
    choices = _align_buckets(choices, per_path, ks, config, slack)
  return {p: cand[c] for p, c in choices.items()}


def _fit_pass(
  source, config, filter_fn, progress, importance
) -> tuple[dict[str, _Fitted], dict[str, int]]:
  """Pass 1 of LowRA: the fits (tables, per-channel errors) of every selected kernel; with
  `calibration="fisher"` each channel's errors times its output importance g_n."""
  fits, ks = {}, {}
  for path, leaf in tqdm(source, "pass 1/2: fit", len(source), disable=not progress):
    if filter_fn(path, leaf):
      _check_leaf(path, leaf)
      h = _moments(importance, config, path, leaf.shape[0])
      fitted = _fit(leaf, config, path, h)
      if config.calibration == "fisher":
        g = _output_importance(importance, path, leaf.shape[1])
        fitted = _Fitted(fitted.tables, fitted.errors * g[:, None])
      fits[path], ks[path] = fitted, leaf.shape[0]
  return fits, ks


def output_key(path: str) -> str:
  """The importance key of the output gradients' second moments of the kernel at `path`."""
  return path + ":output"


def _output_importance(importance, path: str, n: int) -> np.ndarray:
  """importance[output_key(path)] as float32 [n], checked: present, finite, >= 0."""
  key = output_key(path)
  g = None if importance is None else importance.get(key)
  if g is None:
    raise QuantizationError(
      f"calibration='fisher' needs the output gradients' second moments of {path!r} "
      f"(importance[{key!r}], `calibration.output_gradients`) — compute them or use "
      "calibration='model'."
    )
  g = np.asarray(g, np.float32)
  if g.shape != (n,) or not np.isfinite(g).all() or (g < 0).any():
    raise QuantizationError(
      f"output importance of {path!r}: expected {n} finite values >= 0, got {g.shape} — "
      "recompute them for this model (`calibration.output_gradients`)."
    )
  return g


def _moments(importance, config: QuantConfig, path: str, k: int) -> jax.Array | None:
  """The row weights of the kernel at `path`, float32 [k] on the device: its input second
  moments (checked: present, shape [k], finite, >= 0), divided by their mean for
  `calibration="kernel"` (all ones if they are all 0); None for "none"."""
  if config.calibration == "none":
    return None
  h = _importance(importance, config, path, k)
  if (h < 0).any():
    raise QuantizationError(
      f"input second moments of {path!r}: expected {k} finite values >= 0, got negative ones — "
      "recompute them for this model (`calibration.input_moments`)."
    )
  if config.calibration == "kernel":
    mean = h.astype(np.float64).mean()
    h = (h / mean).astype(np.float32) if mean > 0 else np.ones_like(h)
  return jax.device_put(np.ascontiguousarray(h))


def _covariance(covariances, config: QuantConfig, path: str, k: int) -> jax.Array | None:
  """The input covariance float32 [k, k] of the kernel at `path` on the device for
  `rounding="gptq"` (checked: present, shape, finite), else None."""
  if config.rounding != "gptq":
    return None
  if covariances is None or path not in covariances:
    raise QuantizationError(
      f"rounding='gptq' needs the input covariance of {path!r} — pass covariances={{path: "
      "E[x x^T]}} (`calibration.input_moments(full=True)`, or `calibration.LayerCovariances` "
      "for a model read from its checkpoint) or use rounding='nearest'."
    )
  if config.gptq_sequential and not getattr(covariances, "sequential", False):
    raise QuantizationError(
      "gptq_sequential=True needs covariances that follow the quantized layers — pass "
      "`calibration.LayerCovariances(..., sequential=True)`, or set gptq_sequential=False."
    )
  cov = jnp.asarray(covariances[path], jnp.float32)
  if cov.shape != (k, k) or not bool(jnp.isfinite(cov).all()):
    raise QuantizationError(
      f"input covariance of {path!r}: expected [{k}, {k}] finite values, got shape "
      f"{cov.shape} — recompute it for this model (`calibration.input_moments(full=True)`)."
    )
  return cov


def _importance(importance, config: QuantConfig, path: str, k: int) -> np.ndarray:
  """importance[path] as float32, checked: present, [k], finite."""
  if importance is None or path not in importance:
    raise QuantizationError(
      f"calibration={config.calibration!r} needs the input second moments of {path!r} — pass "
      "importance={path: h} (`calibration.input_moments`) or use calibration='none'."
    )
  h = np.asarray(importance[path], np.float32)
  if h.shape != (k,) or not np.isfinite(h).all():
    raise QuantizationError(
      f"input second moments of {path!r}: expected {k} finite values >= 0, got shape "
      f"{h.shape} — recompute them for this model (`calibration.input_moments`; a covariance "
      "[in, in] goes in `covariances`)."
    )
  return h


def _no_selection() -> QuantizationError:
  return QuantizationError(
    "no parameter was selected for quantization: pass 2-D kernels, or "
    "loosen skip_patterns / the filter."
  )


def quantize_stream(
  source,
  config: QuantConfig = QuantConfig(),
  *,
  sink: Callable,
  filter_fn: Callable[[str, jax.Array], bool] | None = None,
  dense: bool = False,
  progress: bool = True,
  importance: Mapping[str, np.ndarray] | None = None,
  covariances: Mapping[str, np.ndarray | jax.Array] | None = None,
) -> QuantReport:
  """Quantizes the selected kernels of `source`, holding one kernel (and what is kept) at a time.

  `lowra` reads the source twice: pass 1 fits every selected kernel and keeps only its tables and
  per-channel errors; the model-wide budget is solved; pass 2 reads each kernel again, encodes
  and packs it. `nf` and `lloyd` need one pass (fit, encode and pack per kernel). Each pass shows
  a progress bar with its ETA. Same results, bit for bit, as `quantize_params` on the tree of the
  same leaves, whatever order the source gives them in.

  Args:
    source: a re-iterable, sized collection of (path, leaf) pairs, paths ``/``-joined
      (`models.weights_source`; a list of a tree's leaves), kernels [in, out].
    config: as for `quantize_params`.
    sink: called as sink(path, leaf, dense) for every pair of the last pass, in source order:
      selected leaves as their `QuantizedTensor` (on the default device) and, with `dense`, their
      float32 [K, N] dequantization (else None); other leaves as they are (dense = the leaf).
    filter_fn: (path, leaf) -> bool choosing leaves; default `default_filter(config)`.
    dense: compute each quantized kernel's dequantization for the sink.
    progress: show progress bars.
    importance: unless `config.calibration` is "none", {path: float32 [in]} input second moments
      of every selected kernel (`calibration.input_moments`); for "fisher" also
      {`output_key(path)`: float32 [out]}, its outputs' squared loss gradients
      (`calibration.output_gradients`); not read otherwise.
    covariances: for `rounding="gptq"`, {path: float32 [in, in]} input covariances E[x x^T] of
      every selected kernel, read in pass 2 in source order, one at a time
      (`calibration.input_moments(full=True)`, or `calibration.LayerCovariances`, which computes
      them one decoder layer at a time); not read otherwise. With `gptq_sequential`, a
      `LayerCovariances(sequential=True)`, told each kernel's dequantization once it is encoded
      (`quantized(path, w_hat)`, before the sink sees it).

  Returns:
    the `QuantReport`, layers in the order of their path components.
  """
  if config.method == "none":
    raise QuantizationError("method='none' quantizes nothing: keep the params as they are.")
  filter_fn = filter_fn or default_filter(config)
  seconds = {"fit": 0.0, "solve": 0.0, "encode": 0.0, "pack": 0.0}
  lowra = config.method == "lowra"
  if lowra:
    t0 = time.perf_counter()
    fits, ks = _fit_pass(source, config, filter_fn, progress, importance)
    if not fits:
      raise _no_selection()
    seconds["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    channel_bits = _solve(fits, ks, config)
    seconds["solve"] = time.perf_counter() - t0
  desc = "pass 2/2: encode+pack" if lowra else "fit+encode+pack"
  layers = []
  for path, w in tqdm(source, desc, len(source), disable=not progress):
    if not filter_fn(path, w):
      sink(path, w, w)
      continue
    if lowra:
      fitted, bits = fits.pop(path), channel_bits.pop(path)
      h = _moments(importance, config, path, w.shape[0]) if config.lut_clusters else None
    else:
      _check_leaf(path, w)
      t0 = time.perf_counter()
      h = _moments(importance, config, path, w.shape[0])
      fitted, bits = _fit(w, config, path, h), np.full(w.shape[1], config.bits_for(path))
      seconds["fit"] += time.perf_counter() - t0
    cov = _covariance(covariances, config, path, w.shape[0])
    qt, err, w_hat = _encode_and_pack(
      w, config, fitted, bits, seconds, dense or config.gptq_sequential, h, cov
    )
    if config.gptq_sequential:  # the sink may replace it (LoftQ: with its factors)
      covariances.quantized(path, w_hat)
    values, counts = np.unique(bits, return_counts=True)
    layers.append(
      LayerReport(
        path=path,
        shape=tuple(w.shape),
        code_bits=qt.code_bits / qt.num_params,
        total_bits=qt.stored_bits / qt.num_params,
        sq_error=float(err.astype(np.float64).sum()),
        sq_norm=float(_sq_norm(w)),
        channels_per_bits=dict(zip(values.tolist(), counts.tolist())),
      )
    )
    sink(path, qt, w_hat if dense else None)
  if not layers:
    raise _no_selection()
  return QuantReport(sorted(layers, key=lambda l: l.path.split("/")), seconds)


def quantize_params(
  params,
  config: QuantConfig = QuantConfig(),
  *,
  filter_fn: Callable[[str, jax.Array], bool] | None = None,
  progress: bool = True,
  importance: Mapping[str, np.ndarray] | None = None,
  covariances: Mapping[str, np.ndarray] | None = None,
):
  """Quantizes the selected 2-D kernels [in, out] of a params pytree.

  Args:
    params: any pytree of arrays.
    config: the method and its settings; `lowra`'s budget applies to all selected kernels together.
    filter_fn: (path, leaf) -> bool choosing leaves; default `default_filter(config)`.
    progress: show progress bars.
    importance: {'/'-joined path: float32 [in]} input second moments, read unless
      `config.calibration` is "none" (`quantize_stream`).
    covariances: {'/'-joined path: float32 [in, in]} input covariances, read with
      `config.rounding="gptq"` (`quantize_stream`).

  Returns:
    (qparams, report): params with each selected leaf replaced by a `QuantizedTensor`, and a
    `QuantReport` of errors and bits.
  """
  qparams, _, report = _quantize_tree(
    params, config, filter_fn, progress, importance, covariances, dense=False
  )
  return qparams, report


def quantize_and_dequantize(
  params,
  config: QuantConfig = QuantConfig(),
  *,
  filter_fn: Callable[[str, jax.Array], bool] | None = None,
  progress: bool = True,
  importance: Mapping[str, np.ndarray] | None = None,
  covariances: Mapping[str, np.ndarray] | None = None,
):
  """`quantize_params`, plus each quantized kernel's dequantization at no extra cost.

  The dense values come out of the fixed-shape encode step, so unlike `dequantize_params` nothing
  is compiled per bucket layout (what iterative schemes such as LoftQ need every round).
  Arguments as for `quantize_params`.

  Returns:
    (qparams, dequantized, report): as `quantize_params`, and `params` with each selected leaf
    replaced by float32 [K, N] equal to `dequantize(qparams leaf, float32)` up to float32
    rounding (host and device compute the double-quantized scales apart).
  """
  return _quantize_tree(params, config, filter_fn, progress, importance, covariances, dense=True)


def _quantize_tree(params, config, filter_fn, progress, importance, covariances, dense: bool):
  """(qparams, dequantized or None, report): `quantize_stream` over the leaves of a pytree."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  source = [(path_str(p), leaf) for p, leaf in flat]
  index = {path: i for i, (path, _) in enumerate(source)}
  leaves, dequantized = [None] * len(source), [None] * len(source)

  def sink(path, leaf, w_hat):
    leaves[index[path]], dequantized[index[path]] = leaf, w_hat

  report = quantize_stream(
    source, config, sink=sink, filter_fn=filter_fn, dense=dense, progress=progress,
    importance=importance, covariances=covariances,
  )
  qparams = jax.tree_util.tree_unflatten(treedef, leaves)
  return qparams, jax.tree_util.tree_unflatten(treedef, dequantized) if dense else None, report


def quantize_tensor(w, config: QuantConfig = QuantConfig()) -> QuantizedTensor:
  """Quantizes one kernel W[K, N] (for `lowra`, the budget applies to this kernel alone)."""
  qparams, _ = quantize_params(
    {"kernel": w}, config, filter_fn=lambda p, leaf: True, progress=False
  )
  return qparams["kernel"]


@functools.partial(jax.jit, static_argnums=1)
def _dequantize_tree(qparams, dtype):
  return jax.tree_util.tree_map(
    lambda x: dequantize(x, dtype) if is_quantized(x) else x, qparams, is_leaf=is_quantized
  )


def dequantize_params(qparams, dtype=None):
  """Replaces every `QuantizedTensor` by its dense kernel (in `dtype`, default the original).

  One compiled function for the whole tree (eagerly, every primitive would compile anew for each
  tensor's bucket sizes: ~1 min instead of seconds for a 17M model on CPU).
  """
  return _dequantize_tree(qparams, dtype)
