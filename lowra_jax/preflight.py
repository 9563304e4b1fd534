"""Checks of a run's inputs that read no weights, so bad input fails in seconds, before anything
is loaded, quantized, compiled or written.

    inputs = preflight.check_model(config, s)              # headers, tokenizer, targets, seq_len
    preflight.check_data(s.data, s.eval_data)              # data paths and splits
    preflight.check_train_workdir(config)                  # or check_saved_run(config)
    blocks = preflight.load_blocks("data", s.data, inputs.tokenizer)
    calib = preflight.load_calibration(s, inputs.tokenizer, blocks)   # quant.calibration's data

Every failure is a `cli.UserError` naming the config field and the fix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from lowra_jax import data, lora
from lowra_jax.cli import UserError, user_errors
from lowra_jax.base import identity as base_identity
from lowra_jax.run_config import Settings
from lowra_jax.models import llama, weights
from lowra_jax.models.tokenizer import Tokenizer, load_tokenizer
from lowra_jax.quantize.serialize import load_extra


@dataclasses.dataclass(frozen=True)
class ModelInputs:
  """What `check_model` read: the checkpoint's HF config (``config.json`` form) and tokenizer."""

  hf_config: dict
  tokenizer: Tokenizer


def check_model(config, s: Settings) -> ModelInputs:
  """config.model.path's shard headers, config and tokenizer; seq_len against its positions and
  LoRA targets against its modules."""
  path = Path(config.model.path)
  with user_errors("config.model.path: "):
    hf_config, shapes = weights.inspect_checkpoint(path)
    model_config = llama.LlamaConfig.from_hf(hf_config)
    tokenizer = load_tokenizer(path if path.is_dir() else path.parent)
  if tokenizer.vocab_size > model_config.vocab_size:
    raise UserError(
      f"config.model.path: the tokenizer of {path} has {tokenizer.vocab_size} tokens but the model "
      f"only {model_config.vocab_size} — they do not belong together; use the model's own tokenizer"
    )
  for name, cfg in (("data", s.data), ("eval_data", s.eval_data)):
    if cfg.seq_len > model_config.max_position_embeddings:
      raise UserError(
        f"config.{name}.seq_len={cfg.seq_len} exceeds the model's max_position_embeddings="
        f"{model_config.max_position_embeddings} — lower it"
      )
  kernels = weights.kernel_shapes(shapes)
  if model_config.tie_word_embeddings:  # the head is the embedding, not a kernel
    kernels.pop(("lm_head",), None)
  with user_errors("config.lora.targets: "):
    lora.check_targets(kernels, s.lora)
  return ModelInputs(hf_config, tokenizer)


def check_data(*configs: tuple[str, data.DataConfig]) -> None:
  """Each (config section, DataConfig)'s local files exist and hold its split."""
  for name, cfg in configs:
    with user_errors(f"config.{name}: "):
      data.check_source(cfg)


def calibration_data(s: Settings) -> Sequence[tuple[str, data.DataConfig]]:
  """[("calib", DataConfig)] of the calibration data (``config.data`` with ``calib.split``) for
  `check_data`, or [] when ``quant.calibration`` is "none"."""
  if s.quant.calibration == "none":
    return []
  split = s.data.split if s.calib.split is None else s.calib.split
  return [("calib", dataclasses.replace(s.data, split=split))]


def load_calibration(
  s: Settings, tokenizer: Tokenizer, train_blocks: np.ndarray
) -> np.ndarray | None:
  """The calibration blocks [n, seq_len + 1] (the training blocks unless ``calib.split`` names
  another split), or None when ``quant.calibration`` is "none"."""
  for name, cfg in calibration_data(s):
    blocks = train_blocks if cfg == s.data else load_blocks(name, cfg, tokenizer)
    if not len(blocks):
      raise UserError(
        f"config.{name}: {cfg.path} ({cfg.split}) gives no block of seq_len + 1 = "
        f"{cfg.seq_len + 1} tokens — point calib.split at more data or lower seq_len"
      )
    return blocks
  return None


def load_blocks(
  name: str, cfg: data.DataConfig, tokenizer: Tokenizer, *, full_batch: bool = False
) -> np.ndarray:
  """`data.load(cfg, tokenizer).blocks` [n, seq_len + 1], its input errors as `UserError`s naming
  `name`; `full_batch`: at least one batch of cfg.batch_size blocks (training)."""
  with user_errors(f"config.{name}: ", (ValueError, FileNotFoundError, ConnectionError)):
    blocks = data.load(cfg, tokenizer).blocks
  if full_batch and data.batches_per_epoch(blocks, cfg.batch_size) == 0:
    raise UserError(
      f"config.{name}: {cfg.path} gives {len(blocks)} blocks of seq_len + 1 = {cfg.seq_len + 1} "
      f"tokens, fewer than batch_size={cfg.batch_size} — lower batch_size or seq_len, or add data"
    )
  return blocks


def _check_identity(config, base_dir: Path) -> None:
  if load_extra(base_dir) != base_identity(config):
    raise UserError(
      f"{base_dir} was quantized with other model/quant/calib/lora/seed settings than this config — "
      "use the run's own config or another --config.workdir"
    )


def check_train_workdir(config) -> None:
  """config.workdir is new, or (config.train.resume) holds a run of this very config."""
  workdir = Path(config.workdir)
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"config.workdir {workdir} is a file — choose a directory")
  ckpt = workdir / "checkpoints"
  if ckpt.is_dir() and any(ckpt.iterdir()) and not config.train.resume:
    raise UserError(
      f"{workdir} holds checkpoints of an earlier run — pass --config.train.resume=True to "
      "continue it or choose another --config.workdir"
    )
  if (workdir / "base" / "tree.json").is_file():
    _check_identity(config, workdir / "base")


def check_dense_fits(s: Settings, config: llama.LlamaConfig, fsdp: int) -> None:
  """eval.py's dense row: one line when even 2 bytes a parameter (its share over `fsdp` devices)
  exceed a device's memory; devices that report no limit (the CPU) are not checked."""
  limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
  need = 2 * config.num_params / fsdp
  if limit and need > limit:
    raise UserError(
      f"the dense base of {s.model.path} needs at least {need / 1e9:.1f} GB per device, more than "
      f"its {limit / 1e9:.1f} GB — pass --config.train.eval_dense=False to skip its row, or shard "
      "it over more devices with --config.mesh.fsdp"
    )


def check_saved_run(config, tool: str) -> Path:
  """config.workdir holds a train.py run of this config (its saved base); returns base/."""
  base_dir = Path(config.workdir) / "base"
  if not (base_dir / "tree.json").is_file():
    raise UserError(
      f"config.workdir {config.workdir} holds no train.py run (no {base_dir / 'tree.json'}) — "
      f"point --config.workdir at a run, or run train.py with this config before {tool}"
    )
  _check_identity(config, base_dir)
  return base_dir
