"""Loss of a quantized model at initialisation: QLoRA (B = 0) vs LoftQ adapters (CPU is enough).

    python benchmarks/lora_init.py [--model=../shared/data/models/pycode-llama-17m]
        [--text=../shared/data/pycode/networkx_eval.txt] [--rank=16] [--iters=5]

Next-token loss on the first 16 x 512 tokens of --text for the bf16 model and, per quantizer
config, for its quantized base with QLoRA adapters (= the base itself) and with LoftQ adapters
(--iters rounds), with LoftQ's relative weight error per round. Prints one table.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax

from lowra_jax import cli, lora
from lowra_jax.models import llama, weights
from lowra_jax.models.tokenizer import load_tokenizer
from lowra_jax.quantize import QuantConfig

TOKENS = 16 * 512 + 1  # 16 windows of 512 next-token predictions
CONFIGS = {
  "NF4": QuantConfig(method="nf", bits=4),
  "NF2": QuantConfig(method="nf", bits=2),
  "LowRA 2.0": QuantConfig(method="lowra", budget=2.0),
  "LowRA 1.5": QuantConfig(method="lowra", budget=1.5),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="../shared/data/models/pycode-llama-17m")
  parser.add_argument("--text", default="../shared/data/pycode/networkx_eval.txt")
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args()
  for flag in ("rank", "iters"):
    cli.positive(f"--{flag}", getattr(args, flag))
  with cli.user_errors("--model: "):
    weights.inspect_checkpoint(args.model)
    tok = load_tokenizer(args.model)
  with cli.existing("--text", args.text).open() as f:
    ids = np.asarray(tok.encode(f.read(200_000))[:TOKENS])
  if len(ids) < TOKENS:
    raise cli.UserError(
      f"--text: {args.text} gives {len(ids)} tokens in its first 200000 characters, fewer than "
      f"the {TOKENS} needed — pass a longer text"
    )
  base, params = llama.load_pretrained(args.model)
  inputs, targets = ids[:-1].reshape(16, 512), ids[1:].reshape(16, 512)
  model = llama.Llama(base.config, lora=lora.LoraConfig(rank=args.rank))

  @jax.jit
  def batch_loss(variables, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(variables, x), y).mean()

  def loss(variables) -> float:
    return float(
      np.mean(
        [batch_loss(variables, inputs[i : i + 4], targets[i : i + 4]) for i in range(0, 16, 4)]
      )
    )

  rows = [f"| bf16 (no quantization) | {loss({'params': params}):.3f} | | |"]
  for name, qcfg in CONFIGS.items():
    losses, errors = {}, ""
    for init in ("qlora", "loftq"):
      lcfg = lora.LoraConfig(rank=args.rank, init=init, loftq_iters=args.iters)
      qparams, adapters, report = lora.init_lora(
        params, qcfg, lcfg, jax.random.key(0), progress=False
      )
      frozen, quant = lora.split_quantized(qparams)
      losses[init] = loss({"params": frozen, "quant": quant, "lora": adapters})
      if init == "loftq":
        errors = " → ".join(f"{e:.3f}" for e in (report.quant_error, *report.errors))
    rows.append(f"| {name} | {losses['qlora']:.3f} | {losses['loftq']:.3f} | {errors} |")
  print(f"\nloss on {16 * 512} tokens of {args.text}; LoRA rank {args.rank}, LoftQ T={args.iters}")
  print("| base | loss, QLoRA init | loss, LoftQ init | ‖W−Q−sAB‖/‖W‖ per round (from QLoRA's) |")
  print("|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  cli.guard(main)
