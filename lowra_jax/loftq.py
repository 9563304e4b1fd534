"""LoftQ initialisation (Li et al., 2023) for any quantizer method.

For every adapted kernel W [in, out] (float32), starting from A B = 0, repeat T times:

    Q_t        = quantize(W - s A_{t-1} B_{t-1})          (all kernels together: a LowRA budget
                                                          is solved model-wide each time)
    A_t, B_t   = rank-r SVD of (W - dequantize(Q_t)) / s   (A = U sqrt(S), B = sqrt(S) V^T)

so that base + adapters, Q_T + s A_T B_T, start close to W instead of to the quantized W.
Kernels that are quantized but not adapted are quantized once per round like the rest.

`loftq` runs the rounds on an in-memory tree; `loftq_stream` on a weights source, holding one
kernel and the factors: for methods whose precision is fixed per kernel (nf, lloyd) in one pass,
each kernel's rounds back to back as it is read; for LowRA, whose budget is solved over all
kernels in every round, each round is one `quantize_stream` (two passes) of the shifted kernels
W - s A B, so T rounds read the source 2T times.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lowra_jax.quantize import (
  QuantConfig,
  QuantReport,
  default_filter,
  is_quantized,
  quantize_and_dequantize,
  quantize_stream,
)

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LoftQReport:
  """Relative Frobenius errors over the adapted kernels, sum ||W - W_hat||^2 / sum ||W||^2 (sqrt).

  quant_error: of the plain quantization (round 1's Q, no adapters) -- QLoRA's starting error.
  errors[t]: of Q_{t+1} + s A_{t+1} B_{t+1} after round t + 1.
  quant: the quantizer's report for the final round.
  """

  quant_error: float
  errors: tuple[float, ...]
  quant: QuantReport


def get_kernel(tree: dict, path: Path) -> Any:
  for part in path:
    tree = tree[part]
  return tree["kernel"]


def with_kernels(tree: dict, kernels: dict[Path, Any]) -> dict:
  """A copy of the nested dict `tree` with ``kernel`` leaves replaced at the given module paths."""
  out = dict(tree)
  for key, value in tree.items():
    inner = {p[1:]: k for p, k in kernels.items() if p[0] == key}
    if () in inner:
      out[key] = {**value, "kernel": inner.pop(())}
    if inner:
      out[key] = with_kernels(out[key], inner)
  return out


EXACT_SVD_MAX = 2048
"""`low_rank` takes the exact SVD of a kernel whose smaller side is at most this, else
`randomized_low_rank` (a full SVD of a 4096 x 11008 kernel costs seconds, of 8192 x 28672 far more,
and LoftQ needs one per kernel per round)."""


def low_rank(r: jax.Array, rank: int, weight=None) -> tuple[jax.Array, jax.Array]:
  """Rank-`rank` factors of r [K, N] float32: A [K, rank], B [rank, N] with A B the SVD truncation
  (exact up to `EXACT_SVD_MAX` on the smaller side, else `randomized_low_rank`'s).

  weight: None (A B minimises ||r - A B||_F), or the input second moments of the kernel's rows,
  [K] (h) or a covariance [K, K] (H): then A B minimises E||x (r - A B)||^2 = ||L^T (r - A B)||_F
  for L L^T = H + 1 % of its mean diagonal (h: L = diag(sqrt(h + 1 % mean h))), i.e.
  A = L^-T trunc(L^T r)'s left factor (`weighted_low_rank`)."""
  if weight is not None:
    return weighted_low_rank(r, rank, jnp.asarray(weight, jnp.float32))
  if min(r.shape) <= EXACT_SVD_MAX:
    return exact_low_rank(r, rank)
  return randomized_low_rank(r, rank)


LOW_RANK_DAMP = 0.01


def weighted_low_rank(r: jax.Array, rank: int, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`low_rank` of r weighted by its rows' input moments `weight` ([K] or [K, K]; see there)."""
  diag = weight if weight.ndim == 1 else jnp.diagonal(weight)
  mean = jnp.mean(diag)
  damp = jnp.where(mean > 0, LOW_RANK_DAMP * mean, 1.0)
  if weight.ndim == 1:
    d = jnp.sqrt(weight + damp)
    a, b = low_rank(d[:, None] * r, rank)
    return a / d[:, None], b
  lower = jnp.linalg.cholesky(weight + damp * jnp.eye(weight.shape[0], dtype=weight.dtype))
  dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  a, b = low_rank(dot(lower.T, r), rank)
  return jax.scipy.linalg.solve_triangular(lower.T, a, lower=False), b


def _row_weight(importance, covariances, path: str, weighted: bool):
  """The input moments weighting the residual of the kernel at `path` (None unless `weighted`):
  its covariance [K, K] when `covariances` are given (GPTQ rounding), else its h [K]."""
  if not weighted:
    return None
  if covariances is not None:
    return covariances[path]
  if importance is None or path not in importance:
    raise ValueError(
      "lora.loftq_weighting='inputs' weighs LoftQ's residual by the calibration's input moments "
      f"of {path!r} — set quant.calibration='kernel' (or 'model'), or lora.loftq_weighting='none'."
    )
  return importance[path]


@functools.partial(jax.jit, static_argnums=1)
def exact_low_rank(r: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """`low_rank` by a full SVD."""
  u, s, vt = jnp.linalg.svd(r, full_matrices=False)
  root = jnp.sqrt(s[:rank])
  return u[:, :rank] * root, root[:, None] * vt[:rank]


@functools.partial(jax.jit, static_argnums=(1, 2))
def randomized_low_rank(r: jax.Array, rank: int, iters: int = 8) -> tuple[jax.Array, jax.Array]:
  """`low_rank` by subspace iteration (Halko, Martinsson & Tropp 2011, alg. 4.4): a basis of
  2 * rank columns from r times a fixed Gaussian draw, `iters` rounds of Q <- qr(r qr(r^T Q)),
  then the exact SVD of Q^T r [2 rank, N]. Deterministic (key 0), float32 products at full
  precision. On LoftQ residuals of pycode-17m's kernels the squared error of the rank-16 truncation
  is within 0.1 % of the exact SVD's at iters = 8 (1 % at 2)."""
  dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  width = min(2 * rank, *r.shape)
  q = jnp.linalg.qr(dot(r, jax.random.normal(jax.random.key(0), (r.shape[1], width), r.dtype)))[0]

  def refine(_, q):
    return jnp.linalg.qr(dot(r, jnp.linalg.qr(dot(r.T, q))[0]))[0]

  q = jax.lax.fori_loop(0, iters, refine, q)
  u, s, vt = jnp.linalg.svd(dot(q.T, r), full_matrices=False)
  root = jnp.sqrt(s[:rank])
  return dot(q, u[:, :rank]) * root, root[:, None] * vt[:rank]


@jax.jit
def _sq_err(w, approx):
  return jnp.sum(jnp.square(w - approx))


def loftq(
  params: dict,
  quant_config: QuantConfig,
  *,
  targets: list[Path],
  rank: int,
  scale: float,
  iters: int,
  progress: bool = True,
  importance=None,
  covariances=None,
  weighted: bool = False,
) -> tuple[dict, dict[Path, tuple[jax.Array, jax.Array]], LoftQReport]:
  """Run LoftQ on the ``kernel`` leaves at the module paths `targets` (`importance`: input second
  moments for `quant_config.calibration` other than "none", `covariances`: input covariances for
  `rounding="gptq"`, as `quantize_params` takes them; `weighted`: the residual's factors weighted
  by them, `low_rank`'s `weight`: by the covariances when given, else by the second moments).

  Returns:
    (qparams, factors, report): the final quantized params, {path: (A [in, rank] f32,
    B [rank, out] f32)} for every target that the quantizer quantized (others get none), and a
    `LoftQReport`.
  """
  dense = {p: get_kernel(params, p) for p in targets}
  w32 = {p: jnp.asarray(w, jnp.float32) for p, w in dense.items()}
  norm = sum(float(jnp.sum(jnp.square(w))) for w in w32.values())
  factors: dict[Path, tuple[jax.Array, jax.Array]] = {}
  quant_error, errors = None, []
  for _ in tqdm(range(iters), desc="loftq", disable=not progress):
    shifted = {
      p: (w32[p] - scale * (factors[p][0] @ factors[p][1])).astype(dense[p].dtype)
      for p in factors
    }
    qparams, dense_q, report = quantize_and_dequantize(
      with_kernels(params, shifted), quant_config, progress=False, importance=importance,
      covariances=covariances,
    )
    base = {p: get_kernel(dense_q, p) for p in targets if is_quantized(get_kernel(qparams, p))}
    if quant_error is None:
      quant_error = np.sqrt(sum(float(_sq_err(w32[p], base[p])) for p in base) / norm)
    factors = {
      p: low_rank(
        (w32[p] - base[p]) / scale,
        rank,
        _row_weight(importance, covariances, "/".join(p) + "/kernel", weighted),
      )
      for p in base
    }
    err = sum(float(_sq_err(w32[p], base[p] + scale * (a @ b))) for p, (a, b) in factors.items())
    errors.append(np.sqrt(err / norm))
  return qparams, factors, LoftQReport(float(quant_error), tuple(map(float, errors)), report)


def loftq_stream(
  source,
  quant_config: QuantConfig,
  *,
  targets: set[Path],
  rank: int,
  scale: float,
  iters: int,
  sink,
  progress: bool = True,
  importance=None,
  covariances=None,
  weighted: bool = False,
) -> tuple[dict[Path, tuple[jax.Array, jax.Array]], LoftQReport]:
  """`loftq` over a weights source (`quantize_stream`'s), one tensor at a time: one pass for nf and
  lloyd, two per round for lowra (module docstring).

  Every leaf goes to ``sink(path, leaf)``: the final `QuantizedTensor` of each quantized kernel,
  other leaves as they are. Same tensors and factors as `loftq` on the tree of the same leaves.

  Returns:
    (factors, report) as `loftq`'s, for the ``kernel`` leaves of the modules in `targets`.
  """
  if quant_config.method == "lowra":
    return _rounds_stream(
      source, quant_config, targets, rank, scale, iters, sink, progress, importance,
      covariances, weighted,
    )
  selected = default_filter(quant_config)
  factors: dict[Path, tuple[jax.Array, jax.Array]] = {}
  layers, seconds = [], {}
  norm, quant_sq, round_sq = 0.0, 0.0, [0.0] * iters

  def quantize(path, w) -> tuple[Any, Any, QuantReport]:
    out = {}
    report = quantize_stream(
      [(path, w)], quant_config, sink=lambda _, q, d: out.update(q=q, d=d), dense=True,
      progress=False, importance=importance, covariances=covariances,
    )
    return out["q"], out["d"], report

  for path, leaf in tqdm(source, "loftq (one pass)", len(source), disable=not progress):
    module = tuple(path.split("/")[:-1])
    if not selected(path, leaf):
      sink(path, leaf)
      continue
    if not (path.endswith("/kernel") and module in targets):
      qt, _, report = quantize(path, leaf)
    else:
      w32 = jnp.asarray(leaf, jnp.float32)
      norm += float(jnp.sum(jnp.square(w32)))
      shifted = leaf
      for t in range(iters):
        qt, base, report = quantize(path, shifted)
        if t == 0:
          quant_sq += float(_sq_err(w32, base))
        weight = _row_weight(importance, covariances, path, weighted)
        a, b = low_rank((w32 - base) / scale, rank, weight)
        round_sq[t] += float(_sq_err(w32, base + scale * (a @ b)))
        shifted = (w32 - scale * (a @ b)).astype(leaf.dtype)
      factors[module] = (a, b)
      if quant_config.gptq_sequential:  # what the next layers' inputs go through
        covariances.quantized(path, base + scale * (a @ b))
    layers += report.layers
    seconds = {k: seconds.get(k, 0.0) + v for k, v in report.seconds.items()}
    sink(path, qt)
  quant = QuantReport(sorted(layers, key=lambda l: l.path.split("/")), seconds)
  errors = tuple(float(np.sqrt(e / norm)) for e in round_sq)
  return factors, LoftQReport(float(np.sqrt(quant_sq / norm)), errors, quant)


class _Shifted:
  """`source` with each target kernel W replaced by W - scale A B (its `factors`), computed as
  `loftq` computes it; `last` is the latest leaf read, as stored (the sink's W)."""

  def __init__(self, source, factors: dict[Path, tuple[jax.Array, jax.Array]], scale: float):
    self.source, self.factors, self.scale, self.last = source, factors, scale, None

  def __len__(self) -> int:
    return len(self.source)

  def __iter__(self):
    for path, leaf in self.source:
      self.last = leaf
      module = tuple(path.split("/")[:-1])
      if path.endswith("/kernel") and module in self.factors:
        a, b = self.factors[module]
        w32 = jnp.asarray(leaf, jnp.float32)
        leaf = (w32 - self.scale * (a @ b)).astype(leaf.dtype)
      yield path, leaf


def _rounds_stream(
  source, quant_config, targets, rank, scale, iters, sink, progress, importance, covariances,
  weighted,
):
  """`loftq_stream` for a model-wide budget: round t quantizes the source shifted by round t-1's
  factors (`quantize_stream`, dense reconstructions on) and takes each target's new factors from
  its sink; the last round's leaves go to `sink`."""
  factors: dict[Path, tuple[jax.Array, jax.Array]] = {}
  norm, quant_sq, round_sq = 0.0, 0.0, [0.0] * iters
  for t in tqdm(range(iters), desc="loftq rounds", disable=not progress):
    shifted, new = _Shifted(source, factors, scale), {}

    def round_sink(path, leaf, dense, t=t, shifted=shifted, new=new):
      nonlocal norm, quant_sq
      module = tuple(path.split("/")[:-1])
      if is_quantized(leaf) and path.endswith("/kernel") and module in targets:
        w32 = jnp.asarray(shifted.last, jnp.float32)
        if t == 0:
          norm += float(jnp.sum(jnp.square(w32)))
          quant_sq += float(_sq_err(w32, dense))
        weight = _row_weight(importance, covariances, path, weighted)
        a, b = low_rank((w32 - dense) / scale, rank, weight)
        round_sq[t] += float(_sq_err(w32, dense + scale * (a @ b)))
        new[module] = (a, b)
        if quant_config.gptq_sequential:  # what the next layers' inputs go through
          covariances.quantized(path, dense + scale * (a @ b))
      if t == iters - 1:
        sink(path, leaf)

    report = quantize_stream(
      shifted, quant_config, sink=round_sink, dense=True, progress=progress,
      importance=importance, covariances=covariances,
    )
    factors = new
  errors = tuple(float(np.sqrt(e / norm)) for e in round_sq)
  return factors, LoftQReport(float(np.sqrt(quant_sq / norm)), errors, report)
