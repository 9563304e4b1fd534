"""A run's config sections as validated dataclasses, and the device mesh they ask for.

`settings(config)` turns the ml_collections sections into their dataclasses (`Settings`: the
library's, plus `ModelConfig` and `TrainConfig` for the entry points), with one-line errors for bad
values; `make_mesh(s)` joins the other hosts and builds the device mesh.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import jax
import jax.numpy as jnp

from lowra_jax import lora, sharding
from lowra_jax.calibration import CalibConfig
from lowra_jax.cli import UserError
from lowra_jax.data import DataConfig
from lowra_jax.models.llama import LlamaConfig
from lowra_jax.quantize import QuantConfig
from lowra_jax.train_lib import OptimConfig
from pallas_kernels.backend import BACKENDS as KERNEL_BACKENDS

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
# Models from this size rematerialise their layers by default: a LLaMA-2-7B-shaped LowRA 1.5 step
# (batch 1 x 512, rank 64) peaks at 6.35 GB with remat against 9.5 GB without, at 0.93x bf16's
# step time (H200, docs/results.md); below ~1B parameters the saved activations are small and the
# recomputation is pure cost.
REMAT_FROM_PARAMS = 1_000_000_000


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The checkpoint to fine-tune and how to run it.

  path: HF checkpoint directory or llama2.c ``.bin``. dtype: compute and base dtype, one of
  `DTYPES`. remat: recompute each decoder layer in the backward pass (less memory, more compute);
  None (default) turns it on for models of `REMAT_FROM_PARAMS` parameters or more (`remat_for`).
  kernels: `quantized_matmul`'s implementation, "auto" (Pallas Triton on GPU, XLA on CPU), "xla"
  (dequantize + XLA dot: same numbers, much shorter compile with mixed precision), "triton".
  """

  path: str
  dtype: str = "bfloat16"
  remat: bool | None = None
  kernels: str = "auto"

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r} — use one of {sorted(DTYPES)}.")
    if self.kernels not in KERNEL_BACKENDS:
      raise ValueError(f"kernels={self.kernels!r} — use one of {sorted(KERNEL_BACKENDS)}.")


  def remat_for(self, config: LlamaConfig) -> bool:
    """Whether the model of `config` rematerialises its decoder layers: `remat`, or when None
    whether it has at least `REMAT_FROM_PARAMS` parameters."""
    return self.remat if self.remat is not None else config.num_params >= REMAT_FROM_PARAMS


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """train.py's loop (eval.py and generate.py read `seed` and `eval_blocks`).

  seed: adapter init and dropout. log_every: steps per metrics record. eval_every: steps between
  evaluations (0: only before and after training). eval_blocks: blocks of eval_data per evaluation
  (0: all). checkpoint_every, keep: steps between checkpoints, checkpoints kept. resume: continue
  the run in the workdir. export_peft, export_merged: write the PEFT adapters / the merged HF
  checkpoint at the end. eval_dense: eval.py also scores the dense base (read one tensor at a
  time onto the devices, where it must fit).
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
  eval_dense: bool = True

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
  calib: CalibConfig
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


def _calibration_users(values: dict) -> str | None:
  """One line naming every setting that needs a calibration when the quant section has none (or
  a method with nothing to calibrate), so that switching a LowRA config to NF or to no
  calibration takes one corrected command, not one error per setting; None when consistent."""
  quant, lora_values = values["quant"], values["lora"]
  method, calibration = quant.get("method"), quant.get("calibration")
  if method == "none":
    return None
  fixes = []
  if quant.get("rounding") == "gptq":
    fixes.append("--config.quant.rounding=nearest")
  if quant.get("gptq_sequential"):
    fixes.append("--config.quant.gptq_sequential=False")
  if quant.get("refit"):
    fixes.append("--config.quant.refit=False")
  if lora_values.get("init") in lora.LOFTQ_INITS and lora_values.get("loftq_weighting") == "inputs":
    fixes.append("--config.lora.loftq_weighting=none")
  if method not in ("lowra", "lloyd") and calibration != "none":
    fixes.insert(0, "--config.quant.calibration=none")
    fit = f"config.quant: method {method!r} has no Lloyd-Max fit to calibrate"
    return f"{fit} — add {' '.join(fixes)}"
  if calibration == "none" and fixes:
    return (
      "config.quant: calibration is 'none', and GPTQ rounding and LoftQ's input-weighted fit need "
      f"it — add {' '.join(fixes)} (or calibrate)."
    )
  return None


def settings(config) -> Settings:
  """The config's sections as validated dataclasses (`UserError` naming the section)."""
  values = config.to_dict()
  conflict = _calibration_users(values)
  if conflict:
    raise UserError(conflict)
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
