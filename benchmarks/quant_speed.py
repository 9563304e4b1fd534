"""Wall time of the whole LowRA pipeline on a LLaMA-2-7B-shaped model (target: <= 120 s on an H200).

Random heavy-tailed (Student-t, 5 degrees of freedom) bf16 weights of the real shapes: per layer
q, k, v, o [4096, 4096], gate, up [4096, 11008], down [11008, 4096]; 32 layers (6.5B quantized
parameters). Runs Lloyd-Max at 1, 2 and 4 bits for every channel, the model-wide budget solver,
encoding and packing, and prints where the time goes. Compilation is included (one fresh process).

    python benchmarks/quant_speed.py                      # on the GPU
    python benchmarks/quant_speed.py --layers 1 --width 512   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from lowra_jax import cli, quantize


def llama_like(layers: int, hidden: int, intermediate: int, seed: int = 0):
  """{'layers': {i: {name: {'kernel': bf16 [in, out]}}}} with Student-t(5) entries."""
  shapes = {
    "q_proj": (hidden, hidden),
    "k_proj": (hidden, hidden),
    "v_proj": (hidden, hidden),
    "o_proj": (hidden, hidden),
    "gate_proj": (hidden, intermediate),
    "up_proj": (hidden, intermediate),
    "down_proj": (intermediate, hidden),
  }
  make = jax.jit(
    lambda key, shape: (0.02 * jax.random.t(key, 5.0, shape)).astype(jnp.bfloat16), static_argnums=1
  )
  key = jax.random.key(seed)
  params = {}
  for i in range(layers):
    params[str(i)] = {}
    for name, shape in shapes.items():
      key, sub = jax.random.split(key)
      params[str(i)][name] = {"kernel": make(sub, shape)}
  return {"layers": params}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=32)
  parser.add_argument(
    "--width", type=int, default=4096, help="hidden size (intermediate = 2.6875x)"
  )
  parser.add_argument("--budget", type=float, default=2.0)
  parser.add_argument("--repeat", type=int, default=2, help="runs; the first includes compilation")
  args = parser.parse_args()
  for flag in ("layers", "width", "repeat"):
    cli.positive(f"--{flag}", getattr(args, flag))
  with cli.user_errors("--budget: "):
    cfg = quantize.QuantConfig(method="lowra", budget=args.budget)
  params = llama_like(args.layers, args.width, int(args.width * 11008 / 4096))
  jax.block_until_ready(params)
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  print(
    f"{jax.devices()[0].device_kind}, jax {jax.__version__}: {n / 1e9:.2f}B parameters in "
    f"{args.layers} layers"
  )
  runs = []
  for _ in range(args.repeat):
    t0 = time.perf_counter()
    qparams, report = quantize.quantize_params(params, cfg, progress=False)
    jax.block_until_ready(qparams)
    runs.append((report, time.perf_counter() - t0))
    del qparams
  print("\n| stage | " + " | ".join(f"run {i + 1} (s)" for i in range(len(runs))) + " |")
  print("|---|" + "---|" * len(runs))
  for stage in runs[0][0].seconds:
    print(f"| {stage} | " + " | ".join(f"{r.seconds[stage]:.1f}" for r, _ in runs) + " |")
  print("| **total** | " + " | ".join(f"**{t:.1f}**" for _, t in runs) + " |")
  print("(run 1 includes compilation; totals include input checks and the report)")
  print(
    f"\nbudget {args.budget}: code bits {report.code_bits:.3f}, total bits "
    f"{report.total_bits:.3f}, rel. error {report.rel_error:.4f}"
  )


if __name__ == "__main__":
  cli.guard(main)
