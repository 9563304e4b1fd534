"""The model and its quantized base for a run (shared by train.py, eval.py and generate.py).

`prepare(config, s, tokenizer)` builds the model from the checkpoint's config, quantizes the base
as it streams from the checkpoint (`quantize_checkpoint`: one tensor read at a time; LoftQ,
`loftq_checkpoint`: one pass with nf / lloyd, two per round with LowRA, whose every round solves a
model-wide budget) and initialises the adapters, or loads both
from the base `save` wrote into the workdir; `identity(config)` is what a saved base must
match to be reused; `load_dense` reads the dense params (eval.py's dense reference).

With `quant.calibration` "kernel", "model" or "fisher" the quantizer weighs errors by each
projection's input second moments (`calibration.input_moments` of `config.calib` blocks through
the dense model, read from the checkpoint one decoder layer at a time, so that a model larger than
the device calibrates as it quantizes; "fisher" also by its output gradients' second moments, from
a forward and a backward through the dense model, also one decoder layer at a time), computed once
and cached beside the saved base
(`workdir/calibration.safetensors`, reused while its identity matches); the calibration's identity
is part of the saved base's. With `quant.rounding="gptq"` each projection's whole input covariance
is computed again from the same blocks, one decoder layer at a time, as each quantizer pass reaches
that layer (`layer_covariances`; held one layer at a time, never cached), except for models whose
covariances all fit `calibration.KEEP_ALL_BYTES`: those are kept once computed, one forward serves
every LoftQ round, and the moments are their diagonals. With `quant.gptq_sequential` the blocks
reach each layer through the quantized ones before it (two forwards of each layer per pass).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

import pallas_kernels
from lowra_jax import calibration, loftq, lora
from lowra_jax.models import llama, weights
from lowra_jax.models.tokenizer import Tokenizer
from lowra_jax.models.weights_source import CheckpointSource
from lowra_jax.quantize import QuantConfig, QuantReport
from lowra_jax.quantize.pipeline import nest, quantize_stream
from lowra_jax.quantize.serialize import load_quantized, save_quantized
from lowra_jax.run_config import DTYPES, Settings


@dataclasses.dataclass
class Prepared:
  """model: a `llama.Llama` with LoRA settings; frozen: {"params": dense leftovers, "quant":
  QuantizedTensors}; adapters: the initial LoRA tree; init_report: quantizer/LoftQ report."""

  model: llama.Llama
  tokenizer: Tokenizer
  frozen: dict
  adapters: dict
  init_report: Any
  moments: dict | None = None
  """{kernel path: float32 [in]} input second moments the base was quantized with, or None."""


def load_model(s: Settings) -> llama.Llama:
  """The model (with LoRA settings) from the checkpoint's config; no weight is read
  (`preflight.check_model` has checked the checkpoint against the config).

  Also makes `s.model.kernels` the default implementation of `quantized_matmul`."""
  pallas_kernels.set_default_backend(s.model.kernels)
  hf_config, _ = weights.inspect_checkpoint(s.model.path)
  config = llama.LlamaConfig.from_hf(hf_config)
  return llama.Llama(
    config, dtype=DTYPES[s.model.dtype], lora=s.lora, remat=s.model.remat_for(config)
  )


def load_dense(s: Settings, place: Callable[[np.ndarray], Any] | None = None) -> dict:
  """The checkpoint's dense params tree, read one tensor at a time: each leaf (numpy, stored
  dtype) as it is, or as `place` returns it (e.g. put on the devices, so that the host holds one
  tensor). The same leaves as `llama.load_pretrained`'s."""
  place = place or (lambda leaf: leaf)
  return nest((path, place(leaf)) for path, leaf in CheckpointSource(s.model.path))


def quantize_checkpoint(
  path: str | os.PathLike[str],
  config: QuantConfig,
  *,
  progress: bool = True,
  importance: dict[str, np.ndarray] | None = None,
  covariances=None,
) -> tuple[dict, QuantReport]:
  """(qparams, report) of the checkpoint at `path`, quantized as it is read: host memory holds
  one tensor and the fits (`quantize_stream`); equal, bit for bit, to `quantize_params` of
  `llama.load_pretrained(path)`'s params. Missing or truncated shards fail before any work.
  `importance`: input second moments, for `config.calibration` other than "none";
  `covariances`: input covariances for `config.rounding="gptq"` (`layer_covariances`)."""
  leaves = []
  report = quantize_stream(
    CheckpointSource(path), config, sink=lambda p, leaf, _: leaves.append((p, leaf)),
    progress=progress, importance=importance, covariances=covariances,
  )
  return nest(leaves), report


def calibration_identity(config) -> dict:
  """What determines the calibration moments: the model and dtype, the data blocks and their
  count, the batch size (float32 sums per batch)."""
  calib, data = config.calib, config.data
  identity = {
    "model": str(config.model.path),
    "dtype": config.model.dtype,
    "data": {
      "name": data.name,
      "path": str(data.path),
      "split": calib.split if calib.split is not None else data.split,
      "subset": data.subset,
      "separator": data.separator,
      "seq_len": data.seq_len,
    },
    "sequences": calib.sequences,
    "batch_size": calib.batch_size,
  }
  if config.quant.calibration == "fisher":
    identity["output_gradients"] = True
    identity["gradient_sequences"] = calib.gradient_sequences
  return identity


def identity(config) -> dict:
  """What determines the quantized base and initial adapters (JSON-normalised); with
  `quant.calibration` other than "none", the calibration's identity too."""
  identity = {
    "model": str(config.model.path),
    "quant": config.quant.to_dict(),
    "lora": config.lora.to_dict(),
    "seed": config.train.seed,
  }
  if config.quant.calibration != "none":
    identity["calibration"] = calibration_identity(config)
  return json.loads(json.dumps(identity))


def calibration_path(workdir: Path) -> Path:
  """Where a run caches its calibration moments (beside `workdir/base`)."""
  return Path(workdir) / "calibration.safetensors"


def saved_moments(config) -> dict[str, np.ndarray] | None:
  """The calibration moments a train.py run of this config cached beside its base (None with
  `quant.calibration="none"`)."""
  if config.quant.calibration == "none":
    return None
  wanted = json.loads(json.dumps(calibration_identity(config)))
  h = calibration.load(calibration_path(config.workdir), wanted)
  if h is None:
    raise FileNotFoundError(
      f"{calibration_path(config.workdir)} is missing or of other settings — run train.py with "
      "this config to calibrate"
    )
  return h


def moments(
  config, s: Settings, model: llama.Llama, blocks, covariances=None
) -> dict[str, np.ndarray]:
  """The calibration moments of this config: the workdir's cached ones when their identity
  matches, else `calibration.input_moments` of `calibration.spread(blocks, calib.sequences)`
  through the dense model read from the checkpoint one decoder layer at a time, with the cost
  printed; or the diagonals of `covariances` (`layer_covariances`' of the same blocks) when it
  keeps them all. With `quant.calibration="fisher"` also the output gradients' second moments
  of `calib.gradient_sequences` of the blocks (`calibration.fisher_moments`: forward and
  backward, one decoder layer at a time)."""
  wanted = json.loads(json.dumps(calibration_identity(config)))
  cached = calibration.load(calibration_path(config.workdir), wanted)
  if cached is not None:
    tqdm.write(f"calibration: reused {calibration_path(config.workdir)}")
    return cached
  blocks = _calibration_blocks(s, blocks)
  t0 = time.perf_counter()
  source = CheckpointSource(s.model.path)
  kept = covariances is not None and covariances.keeps_all
  if s.quant.calibration == "fisher":
    h = calibration.fisher_moments(
      model, source, blocks, s.calib.batch_size, s.calib.gradient_sequences, progress=True,
      moments=not kept,
    )
    some = len(calibration.spread(blocks, s.calib.gradient_sequences))
    what = "input moments and output gradients (forward and backward" + (
      ")" if some == len(blocks) else f" of {some})"
    )
  else:
    h = {} if kept else calibration.input_moments(
      model, source, blocks, s.calib.batch_size, progress=True
    )
    what = "input moments"
  if kept:
    h |= covariances.diagonals()
  tqdm.write(
    f"calibration: {what} of {len(blocks)} sequences x {blocks.shape[1] - 1} tokens through the "
    f"{s.model.dtype} model, layer by layer from the checkpoint, in "
    f"{time.perf_counter() - t0:.1f} s"
  )
  return h


def layer_covariances(s: Settings, model: llama.Llama, blocks):
  """For `quant.rounding="gptq"`: the input covariances of the calibration blocks, computed one
  decoder layer at a time from the checkpoint as the quantizer asks for them
  (`calibration.LayerCovariances`: one layer's covariances held, or all of them for a model whose
  covariances fit `calibration.KEEP_ALL_BYTES`); else None."""
  if s.quant.rounding != "gptq":
    return None
  return calibration.LayerCovariances(
    model, CheckpointSource(s.model.path), _calibration_blocks(s, blocks), s.calib.batch_size,
    sequential=s.quant.gptq_sequential,
  )


def _calibration_blocks(s: Settings, blocks) -> np.ndarray:
  if blocks is None:
    raise ValueError("quant.calibration needs calibration blocks: pass calib_blocks to prepare")
  return calibration.spread(blocks, s.calib.sequences)


def loftq_checkpoint(
  path: str | os.PathLike[str],
  quant: QuantConfig,
  config: lora.LoraConfig,
  rng: jax.Array,
  importance: dict[str, np.ndarray] | None = None,
  covariances=None,
) -> tuple[dict, dict, loftq.LoftQReport]:
  """(qparams, adapters, report) of LoftQ on the checkpoint at `path`, read one tensor at a time
  (`loftq.loftq_stream`: one pass for nf / lloyd, two per round for lowra); equal to
  `lora.init_lora` on the dense params."""
  source = CheckpointSource(path)
  kernels = {
    tuple(p.split("/")[:-1]): s for p, s in source.shapes().items() if p.endswith("/kernel")
  }
  shapes = lora.check_targets(kernels, config)
  leaves = []
  factors, report = loftq.loftq_stream(
    source, quant, targets=set(shapes), rank=config.rank, scale=config.scale,
    iters=config.loftq_iters, sink=lambda p, leaf: leaves.append((p, leaf)),
    importance=importance, covariances=covariances, weighted=config.loftq_weighting == "inputs",
  )
  return lora.loftq_start(nest(leaves), shapes, factors, config, rng) + (report,)


def prepare(
  config,
  s: Settings,
  tokenizer: Tokenizer,
  base_dir: Path | None = None,
  calib_blocks: np.ndarray | None = None,
) -> Prepared:
  """Build the model; quantize its base and initialise adapters (deterministic in
  config.train.seed), or, when `base_dir` holds them (saved by `save` for this config, which
  `preflight` checks), load both from there. `calib_blocks` [n, T + 1]: the calibration data
  (`preflight.load_calibration`) when the base is quantized with `quant.calibration`."""
  model = load_model(s)
  key = jax.random.key(config.train.seed)
  h = cov = None
  if base_dir is not None and base_dir.exists():
    saved, _ = load_quantized(base_dir)
    qparams, adapters, report = saved["qparams"], saved["adapters"], None
  elif s.quant.method != "none" and s.lora.init == "qlora":
    cov = layer_covariances(s, model, calib_blocks)
    if s.quant.calibration != "none":
      h = moments(config, s, model, calib_blocks, cov)
    qparams, report = quantize_checkpoint(s.model.path, s.quant, importance=h, covariances=cov)
    adapters = lora.qlora_adapters(qparams, s.lora, key)
  elif s.quant.method != "none":  # LoftQ, the checkpoint read one tensor at a time
    cov = layer_covariances(s, model, calib_blocks)
    if s.quant.calibration != "none":
      h = moments(config, s, model, calib_blocks, cov)
    qparams, adapters, report = loftq_checkpoint(s.model.path, s.quant, s.lora, key, h, cov)
  else:  # quant.method "none" (which takes no calibration): the dense base
    qparams, adapters, report = lora.init_lora(load_dense(s), s.quant, s.lora, key)
  if cov is not None:
    how = (
      "one forward, all kept" if cov.keeps_all
      else "through the quantized layers, two forwards of each per pass" if cov.sequential
      else "layer by layer as the quantizer asked"
    )
    tqdm.write(f"gptq: input covariances, {how}: {cov.seconds:.1f} s")
  frozen, quant = lora.split_quantized(qparams)
  return Prepared(model, tokenizer, {"params": frozen, "quant": quant}, adapters, report, h)


def save(config, prep: Prepared, base_dir: Path) -> None:
  """Saves the packed base and the initial adapters once, so resume and eval need no quantizer;
  the calibration moments (if any) beside it."""
  if prep.moments is not None:
    wanted = json.loads(json.dumps(calibration_identity(config)))
    calibration.save(calibration_path(config.workdir), prep.moments, wanted)
  qparams = lora.merge_trees(prep.frozen["params"], prep.frozen["quant"])
  save_quantized(base_dir, {"qparams": qparams, "adapters": prep.adapters}, identity(config))
