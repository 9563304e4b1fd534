"""From a train/eval config to the objects a run needs (shared by train.py and eval.py).

`settings(config)` turns the ml_collections sections into their dataclasses (`Settings`: the
library's, plus `ModelConfig` and `TrainConfig` for the entry points), with one-line errors for bad
values; `make_mesh(s)` joins the other hosts and builds the device mesh;
`prepare(config, s, tokenizer)` loads the model (whose inputs `preflight` has checked), quantizes
the base and initialises the adapters, or loads both from a saved base.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import pallas_kernels
from lowra_jax import lora, sharding
from lowra_jax.cli import UserError
from lowra_jax.data import DataConfig
from lowra_jax.models import llama
from lowra_jax.models.tokenizer import Tokenizer
from lowra_jax.quantize import BitsPerParam, QuantConfig, bits_per_param
from lowra_jax.quantize.serialize import load_quantized, save_quantized
from lowra_jax.train_lib import OptimConfig
from pallas_kernels.backend import BACKENDS as KERNEL_BACKENDS

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The checkpoint to fine-tune and how to run it.

  path: HF checkpoint directory or llama2.c ``.bin``. dtype: compute and base dtype, one of
  `DTYPES`. remat: recompute each decoder layer in the backward pass (less memory, more compute).
  kernels: `quantized_matmul`'s implementation, "auto" (Pallas Triton on GPU, XLA on CPU), "xla"
  (dequantize + XLA dot: same numbers, much shorter compile with mixed precision), "triton".
  """

  path: str
  dtype: str = "bfloat16"
  remat: bool = False
  kernels: str = "auto"

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r} — use one of {sorted(DTYPES)}.")
    if self.kernels not in KERNEL_BACKENDS:
      raise ValueError(f"kernels={self.kernels!r} — use one of {sorted(KERNEL_BACKENDS)}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """train.py's loop (eval.py and generate.py read `seed` and `eval_blocks`).

  seed: adapter init and dropout. log_every: steps per metrics record. eval_every: steps between
  evaluations (0: only before and after training). eval_blocks: blocks of eval_data per evaluation
  (0: all). checkpoint_every, keep: steps between checkpoints, checkpoints kept. resume: continue
  the run in the workdir. export_peft, export_merged: write the PEFT adapters / the merged HF
  checkpoint at the end.
  """

  seed: int = 0
  log_every: int = 10
  eval_every: int = 0
  eval_blocks: int = 64
  checkpoint_every: int = 100
  keep: int = 3
  resume: bool = False
  export_peft: bool = True
  export_merged: bool = False

  def __post_init__(self):
    minimum = {"log_every": 1, "eval_every": 0, "eval_blocks": 0, "checkpoint_every": 1, "keep": 1}
    for field, low in minimum.items():
      if getattr(self, field) < low:
        raise ValueError(f"{field}={getattr(self, field)} — use a value >= {low}.")


@dataclasses.dataclass(frozen=True)
class Settings:
  """One dataclass per config section (the field names are the section names)."""

  model: ModelConfig
  quant: QuantConfig
  lora: lora.LoraConfig
  data: DataConfig
  eval_data: DataConfig
  optim: OptimConfig
  mesh: sharding.MeshConfig
  train: TrainConfig


def _tuples(value: Any) -> Any:
  """Lists (as the command line may give them) as tuples, nested ones too: the dataclasses' types."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def _build(cls, section: str, values: dict) -> Any:
  try:
    return cls(**{name: _tuples(value) for name, value in values.items()})
  except TypeError as e:  # unknown or missing field
    fields = ", ".join(f.name for f in dataclasses.fields(cls))
    raise UserError(f"config.{section}: {e} — valid fields: {fields}.") from None
  except ValueError as e:
    raise UserError(f"config.{section}: {e}") from None


def settings(config) -> Settings:
  """The config's sections as validated dataclasses (`UserError` naming the section)."""
  values = config.to_dict()
  sections = typing.get_type_hints(Settings)
  return Settings(**{name: _build(cls, name, values[name]) for name, cls in sections.items()})


def make_mesh(s: Settings) -> jax.sharding.Mesh:
  """Joins the other processes (``mesh.distributed``) and builds the ("data", "fsdp") mesh over
  every device (one-line error for axes that do not fit the devices)."""
  sharding.initialize(s.mesh)
  try:
    mesh = sharding.make_mesh(s.mesh)
  except ValueError as e:
    raise UserError(f"config.mesh: {e}") from None
  return mesh


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


def base_identity(config) -> dict:
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
  or, when `base_dir` holds them (saved by `save_base` for this config, which `preflight` checks),
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


def save_base(config, prep: Prepared, base_dir: Path) -> None:
  """Saves the packed base and the initial adapters once, so resume and eval need no quantizer."""
  qparams = lora.merge_trees(prep.frozen["params"], prep.frozen["quant"])
  save_quantized(base_dir, {"qparams": qparams, "adapters": prep.adapters}, base_identity(config))


def base_bits(prep: Prepared) -> BitsPerParam | None:
  """Code and total bits per quantized weight; None when the base is dense (method 'none')."""
  return bits_per_param(prep.frozen["quant"]) if prep.frozen["quant"] else None


def bits_columns(bits: BitsPerParam | None, dtype: str) -> tuple[str, str]:
  """(code bits, total bits) as table text; the dtype's width for a dense base."""
  if bits is None:
    width = str(jnp.dtype(DTYPES[dtype]).itemsize * 8)
    return width, width
  return f"{bits.code:.3f}", f"{bits.total:.3f}"


def peak_memory_bytes() -> int | None:
  """Peak bytes in use on this process's first device so far (None where the backend does not
  say)."""
  return (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def peak_memory() -> str:
  """`peak_memory_bytes` as text ('n/a' where the backend does not say)."""
  peak = peak_memory_bytes()
  return f"{peak / 1e9:.2f} GB" if peak else "n/a on this backend"
