"""Compile time, step time and memory of a LoRA gradient step over a LLaMA-shaped model (GPU).

Random weights (std 0.02) at a real model's shape; the step is loss + gradient w.r.t. the adapters
(rank 16 on q,k,v,o,gate,up,down) -- what a training step costs before the optimizer update.
Compared in one run: the bf16 base (dense kernels) and the same base quantized (LowRA at
`--budget` code bits, or any QuantConfig through --method/--bits).

    python benchmarks/model_step.py --shape=7b --batch=4 --seq=512

Prints one table: quantize seconds, compile seconds (the decoder layers are unrolled: mixed
precision gives every layer different bucket shapes), median step ms, bytes of all frozen
weights (embeddings and head stay bf16) and XLA's temp bytes for the step.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowra_jax import lora
from lowra_jax.models import llama
from lowra_jax.quantize import QuantConfig, quantize_params

SHAPES = {
  "7b": llama.LlamaConfig(32000, 4096, 11008, 32, 32, 32, 128),
  "1b": llama.LlamaConfig(32000, 2048, 5632, 22, 32, 4, 64),  # TinyLlama-1.1B
}


def random_params(model: llama.Llama, tokens) -> dict:
  """bf16 params of the model's shape with std 0.02 kernels (unit norms)."""
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  return jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)


def step_fn(model, tokens, targets):
  def loss(adapters, variables):
    logits = model.apply({**variables, "lora": adapters}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  return jax.jit(jax.value_and_grad(loss))


def measure(name, model, variables, adapters, tokens, targets, repeat):
  fn = step_fn(model, tokens, targets)
  t0 = time.perf_counter()
  compiled = fn.lower(adapters, variables).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(adapters, variables))
  times = []
  for _ in range(repeat):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(adapters, variables))
    times.append(time.perf_counter() - t0)
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(variables))  # frozen: dense + packed
  mem = compiled.memory_analysis()
  return {
    "name": name,
    "compile_s": compile_s,
    "step_ms": 1e3 * float(np.median(times)),
    "base_gb": base_bytes / 1e9,
    "temp_gb": mem.temp_size_in_bytes / 1e9,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
  parser.add_argument("--layers", type=int, default=0, help="override the number of layers")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--method", default="lowra")
  parser.add_argument("--budget", type=float, default=1.5)
  parser.add_argument("--bits", type=int, default=2)
  parser.add_argument("--repeat", type=int, default=5)
  args = parser.parse_args()
  config = SHAPES[args.shape]
  if args.layers:
    config = llama.LlamaConfig(**{**config.__dict__, "num_layers": args.layers})
  lcfg = lora.LoraConfig(rank=16)
  model = llama.Llama(config, lora=lcfg)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (args.batch, args.seq)), jnp.int32)
  targets = jnp.roll(tokens, -1, axis=1)
  t_start = time.perf_counter()
  params = random_params(model, tokens)
  print(f"[{time.perf_counter() - t_start:.0f} s] random params", flush=True)
  adapters = lora.random_adapters(lora.target_paths(params, lcfg), lcfg.rank, jax.random.key(1))
  adapters = jax.tree.map(lambda x: x + 1e-3, adapters)
  rows = [measure("bf16 base", model, {"params": params}, adapters, tokens, targets, args.repeat)]
  print(f"[{time.perf_counter() - t_start:.0f} s] bf16 step measured", flush=True)
  qcfg = QuantConfig(method=args.method, bits=args.bits, budget=args.budget)
  t0 = time.perf_counter()
  qparams, report = quantize_params(params, qcfg)
  jax.block_until_ready(qparams)
  quant_s = time.perf_counter() - t0
  print(f"[{time.perf_counter() - t_start:.0f} s] quantized", flush=True)
  del params
  frozen, quant = lora.split_quantized(qparams)
  label = f"{args.method} {args.budget if args.method == 'lowra' else args.bits} bit"
  row = measure(
    label, model, {"params": frozen, "quant": quant}, adapters, tokens, targets, args.repeat
  )
  rows.append({**row, "quantize_s": quant_s})
  print(
    f"\n{args.shape} ({config.num_layers} layers), batch {args.batch} x {args.seq}, LoRA r=16; "
    f"jax {jax.__version__}, {jax.devices()[0].device_kind}; {report.total_bits:.3f} total bits"
  )
  print("| base | quantize s | compile s | step ms | base GB | step temp GB |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['name']} | {r.get('quantize_s', 0):.1f} | {r['compile_s']:.1f} | {r['step_ms']:.1f} | "
      f"{r['base_gb']:.2f} | {r['temp_gb']:.2f} |"
    )


if __name__ == "__main__":
  main()
