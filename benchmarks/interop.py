"""Perplexity of a finished run's exports under transformers / peft, next to our own numbers.

    python benchmarks/interop.py --workdir=runs/demo [--device=cuda]

Scores the eval windows that train.py scored (the workdir's config.json: `eval_data`,
`train.eval_blocks`; blocks built by `lowra_jax.data` with the tokenizer of base-hf/) with
  (a) merged-step{N}/ loaded by AutoModelForCausalLM,
  (b) base-hf/ + PeftModel.from_pretrained(adapter-step{N}/),
  (c) base-hf/ alone,
  (d) the checkpoint that was quantized (an HF dir) + the adapters: not their base,
N being the run's last step, and prints a markdown table beside the JAX losses of summary.json
(final_eval_loss for (a) and (b), base_eval_loss for (c)). Run it from the directory train.py ran
in (config paths are relative to it). Needs torch, transformers and peft (not in
requirements.txt; imported once the arguments are checked).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from lowra_jax import cli, data, export
from lowra_jax.models.tokenizer import load_tokenizer


def check_workdir(workdir: Path) -> tuple[dict, dict]:
  """(summary.json, config.json) of a finished train.py run whose exports and eval data exist."""
  fix = "point --workdir at a finished train.py run, from the directory it ran in"
  summary = json.loads(cli.existing("--workdir", workdir / "summary.json", fix).read_text())
  config = json.loads(cli.existing("--workdir", workdir / "config.json", fix).read_text())
  step = summary["steps"]
  exports = {
    export.BASE_DIR: "export_peft",
    f"adapter-step{step}": "export_peft",
    f"merged-step{step}": "export_merged",
  }
  for name, flag in exports.items():
    cli.existing("--workdir", workdir / name, f"rerun train.py with --config.train.{flag}=True")
  with cli.user_errors("config.json eval_data: "):
    data.check_source(data.DataConfig(**config["eval_data"]))
  return summary, config


def eval_blocks(config: dict, tokenizer) -> tuple[np.ndarray, int]:
  """(int32 [n, T + 1] eval windows, batch size) as train.py built them for the run's config."""
  data_config = data.DataConfig(**config["eval_data"])
  blocks = data.load(data_config, tokenizer).blocks
  if config["train"]["eval_blocks"]:
    blocks = blocks[: config["train"]["eval_blocks"]]
  return blocks, data_config.batch_size


def mean_loss(model, blocks: np.ndarray, batch_size: int, device: str) -> float:
  """Token-weighted mean next-token loss (nats) of `blocks` [n, T + 1]."""
  import torch
  import torch.nn.functional as F

  total = count = 0.0
  with torch.no_grad():
    for batch in data.eval_batches(blocks, batch_size):
      inputs, targets = (torch.tensor(batch[k], dtype=torch.long, device=device) for k in batch)
      logits = model(input_ids=inputs).logits.float()
      total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
      count += targets.numel()
  return total / count


def load(directory: Path, device: str):
  from transformers import AutoModelForCausalLM

  return AutoModelForCausalLM.from_pretrained(directory, dtype="auto").to(device).eval()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", type=Path, required=True)
  parser.add_argument("--device", help="torch device (default: cuda if there is one, else cpu)")
  args = parser.parse_args()
  cli.require_modules("interop.py", "torch", "transformers", "peft")
  summary, config = check_workdir(args.workdir)
  import torch
  from peft import PeftModel

  args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
  step, base_dir = summary["steps"], args.workdir / export.BASE_DIR
  blocks, batch_size = eval_blocks(config, load_tokenizer(base_dir))

  def score(model) -> float:
    return mean_loss(model, blocks, batch_size, args.device)

  base = load(base_dir, args.device)
  base_loss = score(base)  # before PeftModel wraps `base` in place
  peft_loss = score(PeftModel.from_pretrained(base, args.workdir / f"adapter-step{step}").eval())
  rows = [
    (f"(a) merged-step{step}", score(load(args.workdir / f"merged-step{step}", args.device))),
    (f"(b) base-hf + adapter-step{step} (peft)", peft_loss),
    ("(c) base-hf alone", base_loss),
  ]
  ours = [summary["final_eval_loss"], summary["final_eval_loss"], summary["base_eval_loss"]]
  source = Path(config["model"]["path"])
  if source.is_dir():  # the adapters on the checkpoint that was quantized: not their base
    wrong = PeftModel.from_pretrained(
      load(source, args.device), args.workdir / f"adapter-step{step}"
    )
    rows.append((f"(d) {source.name} (unquantized) + adapter-step{step}", score(wrong.eval())))
    ours.append(None)
  print(f"\n{args.workdir}, step {step}: {blocks[:, 1:].size} eval tokens, {args.device}")
  print("| export | perplexity (torch) | perplexity (ours, JAX) | rel. diff |")
  print("|---|---|---|---|")
  for (name, theirs), mine in zip(rows, ours):
    if mine is None:
      print(f"| {name} | {math.exp(theirs):.3f} | — | — |")
      continue
    theirs, mine = math.exp(theirs), math.exp(mine)
    print(f"| {name} | {theirs:.3f} | {mine:.3f} | {theirs / mine - 1:+.2e} |")


if __name__ == "__main__":
  cli.guard(main)
