"""Perplexity of the dense base (`model.dtype`), the quantized base and base + trained adapters.

    python eval.py --config=configs/llama_1p5bit.py            # adapters from config.workdir
    python eval.py --config=configs/demo.py --config.eval_data.split=train

Perplexity = exp(token-weighted mean next-token loss) over `config.eval_data` cut into
non-overlapping windows of seq_len + 1 tokens (stride seq_len, no sliding context: each window's
first token is predicted by nobody, every other token once); `config.train.eval_blocks` caps the
number of windows (0: all). `config.workdir` must hold a train.py run of this config: the quantized
base comes from its `base/`, the adapters from the newest checkpoint in its `checkpoints/` (the
row is left out if there is none yet), onto this run's devices (`config.mesh`) whatever devices
saved them. Prints one table: the dense base (unless `config.train.eval_dense` is False: it is
read one tensor at a time onto the devices, where it must fit), the quantized base, the quantized
base + LoftQ's initial adapters (init 'loftq') or + its frozen correction (init 'loftq_frozen'),
and + the trained adapters.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from lowra_jax import base, cli, lora, preflight, reporting, run_config, sharding, train_lib
from lowra_jax.checkpoint import latest_adapters

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.")
flags.mark_flags_as_required(["config"])


def perplexity(eval_step, variables, adapters, blocks, batch_size, mesh) -> tuple[float, int]:
  """(perplexity, tokens scored) of `blocks` [n, T + 1]."""
  loss, tokens = train_lib.mean_loss(eval_step, variables, adapters, blocks, batch_size, mesh)
  return float(np.exp(loss)), tokens


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  s = run_config.settings(config)
  mesh = run_config.make_mesh(s)
  inputs = preflight.check_model(config, s)
  preflight.check_data(("eval_data", s.eval_data))
  base_dir = preflight.check_saved_run(config, "eval.py")
  blocks = preflight.load_blocks("eval_data", s.eval_data, inputs.tokenizer)
  prep = base.prepare(config, s, inputs.tokenizer, base_dir)
  if config.train.eval_blocks:
    blocks = blocks[: config.train.eval_blocks]
  eval_step = train_lib.make_eval_step(prep.model, mesh=mesh)
  batch = s.eval_data.batch_size

  def place(tree):
    return jax.device_put(tree, sharding.tree_shardings(tree, mesh, s.mesh))

  rows, tokens = [], blocks[:, 1:].size
  if s.train.eval_dense:  # read one tensor at a time, each put on the devices
    preflight.check_dense_fits(s, prep.model.config, mesh.shape[sharding.FSDP])
    dense = {"params": base.load_dense(s, place=place)}
    ppl, tokens = perplexity(eval_step, dense, None, blocks, batch, mesh)
    del dense
    width = reporting.bits_columns(None, config.model.dtype)
    rows.append((f"{reporting.DTYPE_NAMES[config.model.dtype]} base", *width, ppl))
  bits = reporting.base_bits(prep)
  code, total = reporting.bits_columns(bits, config.model.dtype)
  frozen = place(prep.frozen)
  if bits is not None:  # without a frozen LoftQ correction, if the base has one
    alone = {**frozen, "params": lora.split_corrections(frozen["params"])[0]}
    ppl, _ = perplexity(eval_step, alone, None, blocks, batch, mesh)
    rows.append(("quantized base", code, total, ppl))
  if s.lora.init == "loftq":  # LoftQ's initial adapters already correct the base (QLoRA's: B = 0)
    ppl, _ = perplexity(eval_step, frozen, place(prep.adapters), blocks, batch, mesh)
    rows.append(("+ LoftQ adapters (step 0)", code, total, ppl))
  elif s.lora.init == "loftq_frozen":
    ppl, _ = perplexity(eval_step, frozen, None, blocks, batch, mesh)
    rows.append(("+ frozen LoftQ correction", code, total, ppl))
  tx = train_lib.make_optimizer(s.optim)
  trained = latest_adapters(Path(config.workdir) / "checkpoints", prep.adapters, tx, place=place)
  if trained is not None:
    adapters, step = trained
    ppl, _ = perplexity(eval_step, frozen, adapters, blocks, batch, mesh)
    rows.append((f"+ adapters (step {step})", code, total, ppl))
  n_quant = bits.num_params if bits is not None else 0
  n_adapter = sum(x.size for x in jax.tree.leaves(prep.adapters))
  if jax.process_index():
    return
  n_params = prep.model.config.num_params
  print(
    f"\n{config.model.path}: {n_params / 1e6:.1f}M parameters ({n_quant / 1e6:.1f}M "
    f"quantized), adapters {n_adapter / 1e6:.2f}M; {tokens} tokens of {s.eval_data.path} "
    f"({s.eval_data.split}); peak device memory {reporting.peak_memory()}"
  )
  print("| model | code bits | total bits | perplexity |")
  print("|---|---|---|---|")
  for name, code, total, ppl in rows:
    print(f"| {name} | {code} | {total} | {ppl:.3f} |")


if __name__ == "__main__":
  cli.run(main)
