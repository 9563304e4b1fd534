"""LoftQ initialisation (Li et al., 2023) for any quantizer method.

For every adapted kernel W [in, out] (float32), starting from A B = 0, repeat T times:

    Q_t        = quantize(W - s A_{t-1} B_{t-1})          (all kernels together: a LowRA budget
                                                          is solved model-wide each time)
    A_t, B_t   = rank-r SVD of (W - dequantize(Q_t)) / s   (A = U sqrt(S), B = sqrt(S) V^T)

so that base + adapters, Q_T + s A_T B_T, start close to W instead of to the quantized W.
Kernels that are quantized but not adapted are quantized once per round like the rest.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lowra_jax.quantize import QuantConfig, QuantReport, is_quantized, quantize_and_dequantize

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


@functools.partial(jax.jit, static_argnums=1)
def low_rank(r: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """Best rank-`rank` factors of r [K, N]: A [K, rank], B [rank, N] with A B = SVD truncation."""
  u, s, vt = jnp.linalg.svd(r, full_matrices=False)
  root = jnp.sqrt(s[:rank])
  return u[:, :rank] * root, root[:, None] * vt[:rank]


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
) -> tuple[dict, dict[Path, tuple[jax.Array, jax.Array]], LoftQReport]:
  """Run LoftQ on the ``kernel`` leaves at the module paths `targets`.

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
      p: np.asarray(w32[p] - scale * (factors[p][0] @ factors[p][1])).astype(dense[p].dtype)
      for p in factors
    }
    qparams, dense_q, report = quantize_and_dequantize(
      with_kernels(params, shifted), quant_config, progress=False
    )
    base = {p: get_kernel(dense_q, p) for p in targets if is_quantized(get_kernel(qparams, p))}
    if quant_error is None:
      quant_error = np.sqrt(sum(float(_sq_err(w32[p], base[p])) for p in base) / norm)
    factors = {p: low_rank((w32[p] - base[p]) / scale, rank) for p in base}
    err = sum(float(_sq_err(w32[p], base[p] + scale * (a @ b))) for p, (a, b) in factors.items())
    errors.append(np.sqrt(err / norm))
  return qparams, factors, LoftQReport(float(quant_error), tuple(map(float, errors)), report)
