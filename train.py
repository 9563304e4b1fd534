"""Fine-tune LoRA adapters over a LLaMA whose base is quantized below 2 bits.

    python train.py --config=configs/llama_1p5bit.py [--config.optim.total_steps=200 ...]
    python train.py --config=configs/llama_1p5bit.py --config.train.resume=True   # continue

Quantizes `config.model.path` (LowRA / NF), initialises adapters (QLoRA / LoftQ), trains them with
AdamW under jit and writes into `config.workdir`: checkpoints/ (Orbax: adapters, optimizer, step,
data position), base/ (the packed quantized base and initial adapters, reused by resume and
eval.py), metrics.jsonl, loss.png, config.json, summary.json (bits, eval losses of the quantized
base / initial adapters / final adapters, tokens/s, peak memory) and the exports
(`lowra_jax.export`): base-hf/ (the dequantized quantized base as an HF checkpoint) with
adapter-step{N}/ (PEFT, pointing at base-hf/), and with `train.export_merged` merged-step{N}/.

Bad input (config, model, tokenizer, data, LoRA targets, workdir) stops it with one line before
any weight is read (`lowra_jax.preflight`).

Runs on every visible device (`config.mesh`: data parallelism x FSDP); with
`--config.mesh.distributed=True` each host runs this same command (README: "Multiple GPUs / hosts")
and process 0 writes the files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags
from tqdm.auto import tqdm

from lowra_jax import (
  base,
  cli,
  data,
  export,
  lora,
  preflight,
  reporting,
  run_config,
  sharding,
  train_lib,
)
from lowra_jax.checkpoint import TrainCheckpoints

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.")
flags.mark_flags_as_required(["config"])


def plot_losses(records: list[dict], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  if train:
    ax.plot(*zip(*train), label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval loss")
  ax.set_xlabel("step")
  ax.set_ylabel("nats / token")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  s = run_config.settings(config)
  mesh = run_config.make_mesh(s)
  with cli.user_errors():
    sharding.check_batch_size(s.data.batch_size, mesh, "config.data.batch_size")
  inputs = preflight.check_model(config, s)
  preflight.check_data(
    ("data", s.data), ("eval_data", s.eval_data), *preflight.calibration_data(s)
  )
  preflight.check_train_workdir(config)
  train_blocks = preflight.load_blocks("data", s.data, inputs.tokenizer, full_batch=True)
  calib_blocks = preflight.load_calibration(s, inputs.tokenizer, train_blocks)
  eval_blocks = preflight.load_blocks("eval_data", s.eval_data, inputs.tokenizer)
  if config.train.eval_blocks:
    eval_blocks = eval_blocks[: config.train.eval_blocks]
  lead = jax.process_index() == 0  # writes the files; every process computes
  workdir = Path(config.workdir)
  base_dir = workdir / "base"
  prep = base.prepare(config, s, inputs.tokenizer, base_dir, calib_blocks)
  code, total_bits = reporting.bits_columns(reporting.base_bits(prep), config.model.dtype)
  if lead:
    correction = reporting.correction_bits(prep)
    frozen_correction = f" (+ {correction:.3f} of frozen LoftQ correction)" if correction else ""
    tqdm.write(
      f"base: {code} code bits, {total_bits} total bits per quantized weight{frozen_correction}"
    )

  tx = train_lib.make_optimizer(s.optim)
  state = train_lib.TrainState.create(prep.adapters, tx)
  state_sharding = sharding.tree_shardings(state, mesh, s.mesh)
  state = jax.device_put(state, state_sharding)
  frozen = jax.device_put(prep.frozen, sharding.tree_shardings(prep.frozen, mesh, s.mesh))
  if lead:
    workdir.mkdir(parents=True, exist_ok=True)
    if not base_dir.exists():
      base.save(config, prep, base_dir)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  ckpt = TrainCheckpoints(
    workdir / "checkpoints", every=config.train.checkpoint_every, keep=config.train.keep
  )
  if config.train.resume and ckpt.latest_step is not None:
    state, _ = ckpt.restore(state)  # onto this run's shardings, whatever the saving devices
    tqdm.write(f"resumed from step {int(state.step)}")
  step_fn = train_lib.make_train_step(prep.model, tx, mesh=mesh, state_sharding=state_sharding)
  eval_step = train_lib.make_eval_step(prep.model, mesh=mesh)

  def evaluate(adapters) -> float:
    return train_lib.mean_loss(
      eval_step, frozen, adapters, eval_blocks, s.eval_data.batch_size, mesh
    )[0]

  total = s.optim.total_steps * s.optim.accumulation
  start = int(state.step)
  metrics_path = workdir / "metrics.jsonl"
  records = []
  if metrics_path.exists():
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    records = train_lib.kept_records(records, start)
  if lead:
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))

  def log(record: dict) -> None:
    records.append(record)
    if lead:
      with metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")

  if start == 0:
    record = {"step": 0, "eval_loss": evaluate(state.adapters)}
    if s.lora.init == "loftq":  # the quantized base alone (zero adapters: no second compile)
      record["base_eval_loss"] = evaluate(jax.tree.map(jnp.zeros_like, state.adapters))
    log(record)
  rng = jax.random.key(config.train.seed)
  stream = data.batches(train_blocks, batch_size=s.data.batch_size, seed=s.data.seed, start=start)
  tokens_per_step = s.data.batch_size * s.data.seq_len
  bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not lead)
  t0, window = time.perf_counter(), []
  for step in range(start + 1, total + 1):
    state, metrics = step_fn(state, frozen, sharding.put_batch(next(stream), mesh), rng)
    window.append(metrics)
    ckpt.save(state, data_position=step)
    if step % config.train.log_every == 0 or step == total:
      loss = float(np.mean([float(m["loss"]) for m in window]))
      rate = len(window) * tokens_per_step / (time.perf_counter() - t0)
      log(
        {
          "step": step,
          "loss": loss,
          "grad_norm": float(window[-1]["grad_norm"]),
          "tokens_per_s": rate,
        }
      )
      bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}")
      t0, window = time.perf_counter(), []
    if config.train.eval_every and step % config.train.eval_every == 0 and step < total:
      log({"step": step, "eval_loss": evaluate(state.adapters)})
    bar.update(1)
  bar.close()
  ckpt.save(state, data_position=total, force=ckpt.latest_step != total)
  ckpt.close()
  done = [r["eval_loss"] for r in records if r["step"] == total and "eval_loss" in r]
  if done:  # a finished run started again: its final eval is on record
    final = done[-1]
  else:
    final = evaluate(state.adapters)
    log({"step": total, "eval_loss": final})
  adapters = sharding.to_host(state.adapters)  # a collective: every process takes part
  if not lead:
    return
  plot_losses(records, workdir / "loss.png")
  if config.train.export_peft or config.train.export_merged:
    export.export_run(
      workdir,
      total,
      lora.merge_trees(prep.frozen["params"], prep.frozen["quant"]),
      adapters,
      s.lora,
      inputs.hf_config,
      inputs.tokenizer,
      peft=config.train.export_peft,
      merged=config.train.export_merged,
    )
  first = next(r["eval_loss"] for r in records if "eval_loss" in r)
  rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
  summary = {
    "steps": total,
    "code_bits": float(code),
    "total_bits": float(total_bits),
    "base_eval_loss": next((r["base_eval_loss"] for r in records if "base_eval_loss" in r), first),
    "init_eval_loss": first,
    "final_eval_loss": final,
    "eval_tokens": int(eval_blocks.shape[0] * s.eval_data.seq_len),
    "tokens_per_s": float(np.median(rates)) if rates else None,
    "peak_memory_bytes": reporting.peak_memory_bytes(),
  }
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  print(
    f"eval loss {first:.4f} -> {final:.4f} (ppl {np.exp(first):.2f} -> {np.exp(final):.2f}); "
    f"peak device memory {reporting.peak_memory()}; outputs in {workdir}"
  )


if __name__ == "__main__":
  cli.run(main)
