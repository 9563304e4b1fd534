"""Shared defaults of the training configs: every config file starts from `base_config()`.

Each section holds every field of its dataclass (`from_dataclass`), so each is settable with
``--config.<section>.<field>``: ``model`` -> `run_config.ModelConfig`, ``quant`` -> `QuantConfig`,
``calib`` -> `calibration.CalibConfig` (read unless ``quant.calibration="none"``), ``lora`` ->
`LoraConfig`, ``data`` / ``eval_data`` -> `DataConfig`, ``optim`` -> `OptimConfig`,
``mesh`` -> `sharding.MeshConfig` (default: data parallel over every device, no FSDP), ``train``
-> `run_config.TrainConfig`; `run_config.settings` builds the dataclasses back. The defaults are
the dataclasses' but where `base_config` says otherwise; ``workdir`` is read by train.py / eval.py.
They point at the bundled pycode-llama-17m and its networkx fine-tuning task (paper setting:
batch 1 x 512 tokens).
"""

import dataclasses
import typing

import ml_collections
from ml_collections.config_dict import placeholder

from lowra_jax.calibration import CalibConfig
from lowra_jax.data import DataConfig
from lowra_jax.run_config import ModelConfig, TrainConfig
from lowra_jax.lora import LoraConfig
from lowra_jax.quantize import (
  QuantConfig,
  recommended_calibration,
  recommended_precisions,
  recommended_refit,
  recommended_rounding,
)
from lowra_jax.sharding import MeshConfig
from lowra_jax.train_lib import OptimConfig

PYCODE = "../shared/data/models/pycode-llama-17m"
NETWORKX = "../shared/data/pycode"


def from_dataclass(cls, **overrides) -> ml_collections.ConfigDict:
  """Every field of the dataclass `cls`, valued as `cls(**overrides)` (which checks them); a None
  becomes a placeholder of the field's type, so that the command line can still set it."""
  values = cls(**overrides)
  hints = typing.get_type_hints(cls)
  return ml_collections.ConfigDict(
    {f.name: _typed(getattr(values, f.name), hints[f.name]) for f in dataclasses.fields(cls)}
  )


def _typed(value, hint):
  """`value` as a config field of the annotated type `hint`."""
  if value is None:  # `X | None`: a placeholder of X
    return placeholder(next(t for t in typing.get_args(hint) if t is not type(None)))
  return float(value) if hint is float else value


def data_config(split: str, batch_size: int) -> ml_collections.ConfigDict:
  return from_dataclass(DataConfig, name="text", path=NETWORKX, split=split, batch_size=batch_size)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/default"
  c.model = from_dataclass(ModelConfig, path=PYCODE)
  c.quant = from_dataclass(QuantConfig)
  c.calib = from_dataclass(CalibConfig)
  # The paper's recipe: LoftQ-initialised adapters with QLoRA's dropout. The library's defaults
  # (QLoRA init, no dropout) are plain LoRA layers: no quantizer pass at init, no dropout RNG.
  c.lora = from_dataclass(LoraConfig, init="loftq", dropout=0.05)
  c.data = data_config("train", batch_size=1)
  c.eval_data = data_config("eval", batch_size=4)
  c.optim = from_dataclass(OptimConfig)
  # Devices: data x fsdp = all of them (-1: the rest); batch sizes must divide by data x fsdp.
  c.mesh = from_dataclass(MeshConfig)
  c.train = from_dataclass(TrainConfig)
  return c


def lowra_config(budget: float) -> ml_collections.ConfigDict:
  """`base_config` with a LowRA base at `budget` code bits per weight, calibrated: errors weighed
  per kernel by the inputs' second moments on the training data (``quant.calibration="kernel"``;
  below 2 bits and between 2 and 4 "fisher", `quantize.recommended_calibration`: the raw moments
  and each output channel's loss-gradient second moments, fine-tuned -0.03 to -0.10 ppl,
  "Output-gradient (Fisher) weighting"),
  codes rounded by GPTQ's error feedback through the inputs' covariances
  (``quant.rounding="gptq"``; below 4 bits, `quantize.recommended_rounding`: at 4 bits it fine-tunes
  worse than nearest rounding) and LoftQ's rank-r fit of the residual weighed by the same inputs
  (``lora.loftq_weighting="inputs"``). Each lowers the fine-tuned perplexity at every budget of the
  sweep's A/B but one (GPTQ ties at 1.5 bits; docs/results.md "Calibration: fine-tuned A/B"); GPTQ
  doubles the quantization time (7B shape: 73 s against 36 s, "LoftQ and calibration on the 7B
  shape"). Below 2 bits each channel's levels are then refitted to GPTQ's codes
  (``quant.refit``, `quantize.recommended_refit`: better below 2 bits, worse from 2 up, "Refitted
  levels"). Equal-shape tensors share one channel count per precision (``quant.bucket_sizes=
  "shape"``, `QuantConfig`'s default: one compiled kernel per weight shape, and a better base and
  fine-tuned model below 2 bits, "Bucket sizes per weight shape"). Channels at
  `quantize.recommended_precisions(budget)`: up to 2 bits {1, 2} (faster decode, about the same
  fine-tuned perplexity), above {2, 4} (no 1-bit channels: with fisher, better than the paper's
  {1, 2, 4})."""
  c = base_config()
  c.quant.budget = budget
  c.quant.precisions = recommended_precisions(budget)
  c.quant.calibration = recommended_calibration(budget)
  c.quant.rounding = recommended_rounding(budget)
  c.quant.refit = recommended_refit(budget)
  c.lora.loftq_weighting = "inputs"
  return c
