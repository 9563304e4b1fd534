"""Export a run for the PyTorch ecosystem (transformers, peft).

`export_run(workdir, step, ...)` leaves in a train.py workdir::

    base-hf/           the dequantized quantized base: what our quantized model computes with,
                       no adapters (HF LLaMA checkpoint: config.json, model.safetensors, tokenizer
                       files), a frozen LoftQ correction (init 'loftq_frozen') folded in; written
                       once per run.
    adapter-step{N}/   the adapters at step N in PEFT format (adapter_config.json,
                       adapter_model.safetensors); base_model_name_or_path is base-hf/ (absolute).
    merged-step{N}/    (optional) an HF LLaMA checkpoint of base + adapters merged.

Which is for what: merged-step{N}/ is one self-contained checkpoint for inference
(``AutoModelForCausalLM.from_pretrained(merged)``); base-hf/ + adapter-step{N}/ is for training on
or swapping adapters (``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
adapters)``; ``AutoPeftModelForCausalLM.from_pretrained(adapters)`` finds the base by its absolute
path, so it needs the workdir where it was written). Both reproduce our perplexity of the quantized
base + adapters. The adapters belong to the quantized base, not to the original checkpoint: LoftQ
adapters correct the quantization error, so on the bf16 original they make it worse (demo after 60
steps: 15.0 alone, 22.6 with them). The tokenizer of every HF checkpoint loads with
``AutoTokenizer.from_pretrained``.

Layouts: PEFT names ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``
[r, in] = Aᵀ and ``...lora_B.weight`` [out, r] = Bᵀ (float32); HF checkpoints hold every weight
under its ``LlamaForCausalLM`` name in the torch ``[out, in]`` layout, bf16 by default, the
projections being dequantize(Q) (+ (alpha/r)·A·B when merged).

Every directory is written into a temporary sibling and renamed into place, so a failure never
leaves a half-written export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from lowra_jax.lora import LoraConfig, merge_adapters
from lowra_jax.models.tokenizer import Tokenizer

BASE_DIR = "base-hf"


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, (*prefix, key)))
    else:
      out[(*prefix, key)] = value
  return out


def _write_atomically(directory: Path, write) -> Path:
  """Calls write(tmp_dir) and renames tmp_dir to `directory` (which must not exist)."""
  directory = Path(directory)
  if directory.exists():
    raise FileExistsError(f"{directory} exists; choose a new export directory or remove it.")
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
  try:
    write(tmp)
    os.replace(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return directory


def peft_state_dict(adapters: dict) -> dict[str, np.ndarray]:
  """{PEFT name: float32 array} for an adapter tree ``{...: {"a": [in, r], "b": [r, out]}}``."""
  out = {}
  for path, value in _flatten(adapters).items():
    module, leaf = ".".join(path[:-1]), path[-1]
    name = {"a": "lora_A", "b": "lora_B"}[leaf]
    out[f"base_model.model.{module}.{name}.weight"] = np.ascontiguousarray(
      np.asarray(value, np.float32).T
    )
  return out


def save_peft_adapters(
  directory: str | os.PathLike[str], adapters: dict, config: LoraConfig, base_model: str
) -> Path:
  """Writes a PEFT LoRA adapter directory for the HF checkpoint `base_model`; returns its path.

  ``target_modules`` lists the module names that have adapters in `adapters` (not every name of
  `config.targets`: some may match no module of the model)."""
  adapter_config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": str(base_model),
    "r": config.rank,
    "lora_alpha": config.alpha,
    "lora_dropout": config.dropout,
    "target_modules": sorted({path[-2] for path in _flatten(adapters)}),
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
  }

  def write(tmp: Path):
    save_file(peft_state_dict(adapters), tmp / "adapter_model.safetensors")
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")

  return _write_atomically(Path(directory), write)


def hf_state_dict(params: dict, dtype=ml_dtypes.bfloat16) -> dict[str, np.ndarray]:
  """{HF name: array in `dtype`} of a dense params tree (kernels [in, out] -> weights [out, in])."""
  out = {}
  for path, value in _flatten(params).items():
    module, leaf = path[:-1], path[-1]
    value = np.asarray(value, np.float32)
    if leaf == "kernel":
      name, value = "weight", value.T
    else:
      name = {"scale": "weight", "embedding": "weight", "bias": "bias"}[leaf]
    out[".".join((*module, name))] = np.ascontiguousarray(value.astype(dtype))
  return out


def save_hf_checkpoint(
  directory: str | os.PathLike[str],
  qparams: dict,
  adapters: dict,
  lora_config: LoraConfig,
  hf_config: dict,
  tokenizer: Tokenizer,
  dtype=ml_dtypes.bfloat16,
) -> Path:
  """Writes an HF LLaMA checkpoint of dequantize(Q) + (alpha/r)·A·B (``adapters={}``: the
  quantized base alone): config.json, model.safetensors in `dtype`, the tokenizer's files."""
  state = hf_state_dict(merge_adapters(qparams, adapters, lora_config), dtype)
  hf_config = {**hf_config, "dtype": np.dtype(dtype).name, "torch_dtype": np.dtype(dtype).name}

  def write(tmp: Path):
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    tokenizer.hf.save_pretrained(tmp)

  return _write_atomically(Path(directory), write)


def export_run(
  workdir: str | os.PathLike[str],
  step: int,
  qparams: dict,
  adapters: dict,
  lora_config: LoraConfig,
  hf_config: dict,
  tokenizer: Tokenizer,
  *,
  peft: bool = True,
  merged: bool = False,
  dtype=ml_dtypes.bfloat16,
) -> dict[str, Path]:
  """Writes the exports of a run's adapters at `step` into `workdir` (layout: module docstring).

  qparams: the quantized base (dense leaves + `QuantizedTensor` kernels); adapters: the LoRA tree
  {...: {"a": [in, r], "b": [r, out]}}; hf_config: the source checkpoint's config.json dict
  (`weights.inspect_checkpoint(path)[0]`: an HF directory's own, the one built for a llama2.c
  file). `peft`: base-hf/ + adapter-step{step}/; `merged`: merged-step{step}/.
  Directories already present are kept as they are (base-hf/ is the same for every step of a run).
  Returns {"base", "adapters", "merged": path} of the exports asked for.
  """
  workdir = Path(workdir)

  def hf_checkpoint(name: str, tree: dict) -> Path:
    directory = workdir / name
    if not directory.exists():
      save_hf_checkpoint(directory, qparams, tree, lora_config, hf_config, tokenizer, dtype)
    return directory

  out = {}
  if peft:
    out["base"] = hf_checkpoint(BASE_DIR, {})
    out["adapters"] = workdir / f"adapter-step{step}"
    if not out["adapters"].exists():
      save_peft_adapters(out["adapters"], adapters, lora_config, str(out["base"].resolve()))
  if merged:
    out["merged"] = hf_checkpoint(f"merged-step{step}", adapters)
  return out
