"""Calibration for LowRA's output-weighted objective: each projection's input second moments.

    h = input_moments(model, params, blocks, batch_size=8)   # {".../q_proj/kernel": float32 [in]}
    quantize_params(params, QuantConfig(calibration="kernel"), importance=h)

A few hundred blocks of text go once through the dense model; for every `QLoRALinear` the input it
multiplies (after its cast to the compute dtype) is captured with `nn.intercept_methods`, and
h_k = E[x_k^2] (the diagonal of E[x x^T]) is averaged over every position of every block. The
quantizer then weighs the squared error of input row k of that kernel by h_k, which makes it the
expected squared error of the layer's output when inputs are uncorrelated. The result is keyed by
the kernel's '/'-joined params path (`quantize_stream`'s), so it can come from any source that
produces one vector per path. `save` / `load` cache it as one safetensors file whose metadata is
the calibration's identity.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from lowra_jax.lora import QLoRALinear


@dataclasses.dataclass(frozen=True)
class CalibConfig:
  """Calibration data for `QuantConfig.calibration` "kernel" / "model" (config section ``calib``).

  sequences: blocks of seq_len tokens run through the dense model, evenly spaced over the data
  (all of them when it has fewer). batch_size: blocks per forward pass. split: the split of
  ``config.data.path`` to read; None: the training split (``config.data.split``).
  """

  sequences: int = 256
  batch_size: int = 8
  split: str | None = None

  def __post_init__(self):
    if self.sequences < 1 or self.batch_size < 1:
      raise ValueError(
        f"sequences={self.sequences}, batch_size={self.batch_size} — use values >= 1, "
        "e.g. sequences=256, batch_size=8."
      )


def spread(blocks: np.ndarray, count: int) -> np.ndarray:
  """`count` of `blocks` [n, T + 1], evenly spaced from the first to the last (all if fewer)."""
  if len(blocks) <= count:
    return blocks
  return blocks[np.linspace(0, len(blocks) - 1, count).round().astype(np.int64)]


def _recorder(sums: dict):
  """An `nn.intercept_methods` interceptor adding each QLoRALinear call's sum over rows of x^2
  (float32 [in], x as the layer casts it) to `sums` under its kernel's path."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, QLoRALinear) and context.method_name == "__call__":
      x = args[0].astype(module.dtype).astype(jnp.float32)
      rows = tuple(range(x.ndim - 1))
      sums["/".join(module.path) + "/kernel"] = jnp.sum(jnp.square(x), axis=rows)
    return next_fun(*args, **kwargs)

  return interceptor


def input_moments(model, params, blocks: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
  """{kernel path: float32 [in]} mean of x_k^2 over every token of `blocks` for each projection.

  Args:
    model: a `llama.Llama`; run without adapters or remat in its compute dtype.
    params: its dense params tree (kernels [in, out]).
    blocks: int [n, T + 1] token blocks (`data.pack`'s); each block's first T tokens are the input.
    batch_size: blocks per forward pass (the last batch may be smaller: one more compile).

  Returns:
    for every `QLoRALinear` (projections and an untied head), h = E[x x^T]'s diagonal, summed in
    float64 over batches of float32 sums.
  """
  plain = model.clone(lora=None, remat=False)

  @jax.jit
  def batch_sums(params, tokens):
    sums: dict = {}
    with nn.intercept_methods(_recorder(sums)):
      plain.apply({"params": params}, tokens)
    return sums

  tokens = np.asarray(blocks)[:, :-1].astype(np.int32)
  params = jax.device_put(params)
  total: dict[str, np.ndarray] = {}
  for lo in range(0, len(tokens), batch_size):
    for path, s in batch_sums(params, tokens[lo : lo + batch_size]).items():
      total[path] = total.get(path, 0.0) + np.asarray(s, np.float64)
  return {path: (s / tokens.size).astype(np.float32) for path, s in total.items()}


def save(path: Path, moments: Mapping[str, np.ndarray], identity: dict) -> None:
  """Writes `moments` to the safetensors file `path` (via a temporary file renamed into place),
  with `identity` (what determined them) as its metadata."""
  tmp = path.with_name(path.name + ".tmp")
  save_file(
    {p: np.ascontiguousarray(h, np.float32) for p, h in moments.items()},
    str(tmp),
    metadata={"identity": json.dumps(identity, sort_keys=True)},
  )
  tmp.replace(path)


def load(path: Path, identity: dict) -> dict[str, np.ndarray] | None:
  """The moments `save` wrote to `path` if its identity equals `identity`, else None."""
  if not path.is_file():
    return None
  with safe_open(str(path), "np") as f:
    saved = (f.metadata() or {}).get("identity")
  if saved != json.dumps(identity, sort_keys=True):
    return None
  return load_file(str(path))
