"""The model and its quantized base for a run (shared by train.py, eval.py and generate.py).

`prepare(config, s, tokenizer)` builds the model from the checkpoint's config, quantizes the base
as it streams from the checkpoint (`quantize_checkpoint`: one tensor read at a time; LoftQ with
nf / lloyd in one pass, `loftq_checkpoint`; LoftQ with LowRA, whose every round solves a
model-wide budget, reads the dense params whole) and initialises the adapters, or loads both
from the base `save` wrote into the workdir; `identity(config)` is what a saved base must
match to be reused; `load_dense` reads the dense params (eval.py's dense reference).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import pallas_kernels
from lowra_jax import loftq, lora
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
  path: str | os.PathLike[str], config: QuantConfig, *, progress: bool = True
) -> tuple[dict, QuantReport]:
  """(qparams, report) of the checkpoint at `path`, quantized as it is read: host memory holds
  one tensor and the fits (`quantize_stream`); equal, bit for bit, to `quantize_params` of
  `llama.load_pretrained(path)`'s params. Missing or truncated shards fail before any work."""
  leaves = []
  report = quantize_stream(
    CheckpointSource(path), config, sink=lambda p, leaf, _: leaves.append((p, leaf)),
    progress=progress,
  )
  return nest(leaves), report


def identity(config) -> dict:
  """What determines the quantized base and initial adapters (JSON-normalised)."""
  identity = {
    "model": str(config.model.path),
    "quant": config.quant.to_dict(),
    "lora": config.lora.to_dict(),
    "seed": config.train.seed,
  }
  return json.loads(json.dumps(identity))


def loftq_checkpoint(
  path: str | os.PathLike[str], quant: QuantConfig, config: lora.LoraConfig, rng: jax.Array
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
  )
  return nest(leaves), lora.loftq_adapters(shapes, factors, config, rng), report


def prepare(config, s: Settings, tokenizer: Tokenizer, base_dir: Path | None = None) -> Prepared:
  """Build the model; quantize its base and initialise adapters (deterministic in
  config.train.seed), or, when `base_dir` holds them (saved by `save` for this config, which
  `preflight` checks), load both from there."""
  model = load_model(s)
  key = jax.random.key(config.train.seed)
  if base_dir is not None and base_dir.exists():
    saved, _ = load_quantized(base_dir)
    qparams, adapters, report = saved["qparams"], saved["adapters"], None
  elif s.quant.method != "none" and s.lora.init == "qlora":
    qparams, report = quantize_checkpoint(s.model.path, s.quant)
    adapters = lora.qlora_adapters(qparams, s.lora, key)
  elif s.quant.method != "none":  # LoftQ, the checkpoint read one tensor at a time
    qparams, adapters, report = loftq_checkpoint(s.model.path, s.quant, s.lora, key)
  else:
    qparams, adapters, report = lora.init_lora(load_dense(s), s.quant, s.lora, key)
  frozen, quant = lora.split_quantized(qparams)
  return Prepared(model, tokenizer, {"params": frozen, "quant": quant}, adapters, report)


def save(config, prep: Prepared, base_dir: Path) -> None:
  """Saves the packed base and the initial adapters once, so resume and eval need no quantizer."""
  qparams = lora.merge_trees(prep.frozen["params"], prep.frozen["quant"])
  save_quantized(base_dir, {"qparams": qparams, "adapters": prep.adapters}, identity(config))
