"""The model and its quantized base for a run (shared by train.py, eval.py and generate.py).

`prepare(config, s, tokenizer)` loads the model (whose inputs `preflight` has checked), quantizes
the base and initialises the adapters, or loads both from the base `save` wrote into the workdir;
`identity(config)` is what a saved base must match to be reused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax

import pallas_kernels
from lowra_jax import lora
from lowra_jax.models import llama
from lowra_jax.models.tokenizer import Tokenizer
from lowra_jax.quantize.serialize import load_quantized, save_quantized
from lowra_jax.run_config import DTYPES, Settings

@dataclasses.dataclass
class Prepared:
  """model: a `llama.Llama` with LoRA settings; params: dense numpy params (bf16 base);
  frozen: {"params", "quant"}; adapters: the initial LoRA tree; init_report: quantizer/LoftQ
  report."""

  model: llama.Llama
  tokenizer: Tokenizer
  params: dict
  frozen: dict
  adapters: dict
  init_report: Any


def load_model(s: Settings) -> tuple[llama.Llama, dict]:
  """The model (with LoRA settings) and its dense params (`preflight.check_model` has checked
  them against the config).

  Also makes `s.model.kernels` the default implementation of `quantized_matmul`."""
  pallas_kernels.set_default_backend(s.model.kernels)
  base, params = llama.load_pretrained(
    s.model.path, dtype=DTYPES[s.model.dtype], remat=s.model.remat
  )
  model = llama.Llama(base.config, dtype=base.dtype, lora=s.lora, remat=base.remat)
  return model, params


def identity(config) -> dict:
  """What determines the quantized base and initial adapters (JSON-normalised)."""
  identity = {
    "model": str(config.model.path),
    "quant": config.quant.to_dict(),
    "lora": config.lora.to_dict(),
    "seed": config.train.seed,
  }
  return json.loads(json.dumps(identity))


def prepare(config, s: Settings, tokenizer: Tokenizer, base_dir: Path | None = None) -> Prepared:
  """Load the model; quantize it and initialise adapters (deterministic in config.train.seed),
  or, when `base_dir` holds them (saved by `save` for this config, which `preflight` checks),
  load both from there."""
  model, params = load_model(s)
  if base_dir is not None and base_dir.exists():
    saved, _ = load_quantized(base_dir)
    qparams, adapters, report = saved["qparams"], saved["adapters"], None
  else:
    key = jax.random.key(config.train.seed)
    qparams, adapters, report = lora.init_lora(params, s.quant, s.lora, key)
  frozen, quant = lora.split_quantized(qparams)
  return Prepared(model, tokenizer, params, {"params": frozen, "quant": quant}, adapters, report)


def save(config, prep: Prepared, base_dir: Path) -> None:
  """Saves the packed base and the initial adapters once, so resume and eval need no quantizer."""
  qparams = lora.merge_trees(prep.frozen["params"], prep.frozen["quant"])
  save_quantized(base_dir, {"qparams": qparams, "adapters": prep.adapters}, identity(config))
