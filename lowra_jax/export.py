"""Export trained adapters for the PyTorch ecosystem.

* `save_peft_adapters(directory, adapters, lora_config, base_model)`: a PEFT LoRA directory --
  ``adapter_config.json`` + ``adapter_model.safetensors`` with HF module names
  (``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` [r, in] = Aᵀ,
  ``...lora_B.weight`` [out, r] = Bᵀ), loadable with ``PeftModel.from_pretrained``.
* `save_merged(directory, qparams, adapters, lora_config, hf_config)`: an HF LLaMA checkpoint
  (``config.json`` + ``model.safetensors``) whose projections are dequantize(Q) + (alpha/r)·A·B,
  in the torch ``[out, in]`` layout, bf16 by default.

Both write into a temporary sibling directory and rename it into place, so a failure never
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
  """Writes a PEFT LoRA adapter directory; returns its path."""
  adapter_config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": str(base_model),
    "r": config.rank,
    "lora_alpha": config.alpha,
    "lora_dropout": config.dropout,
    "target_modules": sorted(config.targets),
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
  }

  def write(tmp: Path):
    save_file(peft_state_dict(adapters), tmp / "adapter_model.safetensors")
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")

  return _write_atomically(Path(directory), write)


def merged_state_dict(qparams: dict, adapters: dict, config: LoraConfig, dtype=ml_dtypes.bfloat16):
  """{HF name: array in `dtype`}: every weight of the model, adapters merged into projections."""
  out = {}
  for path, value in _flatten(merge_adapters(qparams, adapters, config)).items():
    module, leaf = path[:-1], path[-1]
    value = np.asarray(value, np.float32)
    if leaf == "kernel":
      name, value = "weight", value.T
    else:
      name = {"scale": "weight", "embedding": "weight", "bias": "bias"}[leaf]
    out[".".join((*module, name))] = np.ascontiguousarray(value.astype(dtype))
  return out


def save_merged(
  directory: str | os.PathLike[str],
  qparams: dict,
  adapters: dict,
  config: LoraConfig,
  hf_config: dict,
  dtype=ml_dtypes.bfloat16,
) -> Path:
  """Writes an HF LLaMA checkpoint with the adapters merged into the dequantized base."""
  state = merged_state_dict(qparams, adapters, config, dtype)
  hf_config = {**hf_config, "dtype": np.dtype(dtype).name, "torch_dtype": np.dtype(dtype).name}

  def write(tmp: Path):
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")

  return _write_atomically(Path(directory), write)
