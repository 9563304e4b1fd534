"""Cost of one LoRA training step over a LLaMA-shaped model with random weights (GPU).

    python benchmarks/model_step.py --shape=7b --batch=1 --seq=512 --rank=64 \
        --methods=bf16,nf4,lowra2,lowra1.5 --memory_grid --out=results.json

For every method, in its own subprocess (so each peak is its own): random bf16 weights at the
shape (`synthetic.py`: every layer drawn and quantized on its own, the budget solved over the whole
model, as for a real checkpoint; `--tiled`: copies of one quantized layer, identical shapes, much
shorter compilation), the base quantized as the method says, rank-`--rank` adapters on all seven
projections, and `train_lib.make_train_step` -- loss, gradient w.r.t. the adapters and the AdamW
update, the path train.py runs. Quality needs no real weights here.

Prints one table: compile s, median step ms (each step waited for: the host's dispatch included),
chained step ms (`--repeat` steps dispatched back to back, as train.py runs them: the host prepares
the next step while the device runs this one), peak device memory, bytes of the frozen base; a
memory breakdown per method (packed base, bf16 embeddings/head/norms, adapters, optimizer state,
XLA's temporaries -- activations kept for the backward and transients -- and the peak); with
`--memory_grid` also the frozen-base bytes of the whole model at every method of the quality sweep
(from one quantized layer, times the number of layers, plus the bf16 embeddings and head).
`--trace` adds each method's GPU kernels of one step from a profiler trace (grouped by name
without numeric suffixes, top 20 on stderr, all of them in the JSON) and the device's idle time
between them (with the kernels it precedes): where the step's time goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import synthetic
from trace_kernels import check_gpu, grouped, idle, per_call, print_kernels, trace_events

from lowra_jax import cli, lora, train_lib
from lowra_jax.models import llama, shapes
from lowra_jax.quantize import QuantConfig, bits_per_param, recommended_precisions
from lowra_jax.run_config import ModelConfig

SHAPES = shapes.SHAPES | {"tiny": llama.LlamaConfig(512, 128, 384, 2, 4, 2, 32)}  # tiny: CPU
METHODS = {
  "bf16": QuantConfig(method="none"),
  "nf4": QuantConfig(method="nf", bits=4),
  "nf3": QuantConfig(method="nf", bits=3),
  "nf2": QuantConfig(method="nf", bits=2),
  **{
    f"lowra{b:g}": QuantConfig(budget=b, precisions=recommended_precisions(b))
    for b in (4, 3, 2.5, 2.25, 2, 1.75, 1.5, 1.25, 1.15)
  },
}


REMAT = {"auto": None, "on": True, "off": False}


def remat_of(args) -> bool:
  """--remat as the model's setting (auto: `ModelConfig.remat_for`, train.py's default)."""
  return ModelConfig(path=args.shape, remat=REMAT[args.remat]).remat_for(SHAPES[args.shape])


def measure(args, name: str) -> dict:
  """Compile and run the training step of one method; peak memory of this process."""
  config = SHAPES[args.shape]
  t0 = time.perf_counter()
  quant = METHODS[name]
  if args.bucket_sizes and quant.method == "lowra":
    quant = dataclasses.replace(quant, bucket_sizes=args.bucket_sizes)
  qparams = jax.block_until_ready(synthetic.model_params(config, quant, tiled=args.tiled))
  quantize_s = time.perf_counter() - t0
  lcfg = lora.LoraConfig(rank=args.rank, alpha=float(args.rank))
  frozen, quant = lora.split_quantized(qparams)
  del qparams
  adapters = lora.random_adapters(
    lora.target_paths(frozen | quant, lcfg), lcfg.rank, jax.random.key(1)
  )
  model = llama.Llama(config, lora=lcfg, remat=remat_of(args))
  tx = train_lib.make_optimizer(train_lib.OptimConfig(warmup_steps=0, total_steps=10**6))
  state = train_lib.TrainState.create(adapters, tx)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (args.batch, args.seq + 1)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  variables = {"params": frozen, "quant": quant}
  step = train_lib.make_train_step(model, tx)
  key = jax.random.key(0)
  held = {  # before the step donates the state
    "packed_gb": _gb(quant),
    "dense_gb": _gb(frozen),
    "adapters_gb": _gb(state.adapters),
    "optimizer_gb": _gb(state.opt_state),
  }
  t0 = time.perf_counter()
  compiled = step.lower(state, variables, batch, key).compile()
  compile_s = time.perf_counter() - t0
  analysis = compiled.memory_analysis()  # XLA's plan: temporaries beside arguments and outputs
  for _ in range(2):
    state, metrics = compiled(state, variables, batch, key)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.repeat):
    t0 = time.perf_counter()
    state, metrics = compiled(state, variables, batch, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  t0 = time.perf_counter()  # chained: the host dispatches the next step while the GPU runs this one
  for _ in range(args.repeat):
    state, metrics = compiled(state, variables, batch, key)
  jax.block_until_ready(metrics)
  chained_s = (time.perf_counter() - t0) / args.repeat
  stats = jax.devices()[0].memory_stats() or {}
  bits = bits_per_param(quant) if quant else None
  kernels = {}
  if args.trace:
    fresh = lambda: (jax.tree.map(jnp.copy, state), variables, batch, key)  # noqa: E731
    events = trace_events(compiled, fresh, calls=3)
    idle_us, before = idle(events, calls=3)
    kernels["step_kernels"] = grouped(per_call(events, calls=3))
    kernels["idle_us"] = idle_us
    kernels["idle_before"] = [dataclasses.asdict(k) for k in before[:20]]
  return {
    "method": name,
    "code_bits": bits.code if bits else 16.0,
    "total_bits": bits.total if bits else 16.0,
    "build_s": quantize_s,
    "packed_shapes": synthetic.distinct_packed_shapes(quant),
    "compile_s": compile_s,
    "step_ms": 1e3 * float(np.median(times)),
    "chained_step_ms": 1e3 * chained_s,
    "peak_gb": stats.get("peak_bytes_in_use", 0) / 1e9,
    "temp_gb": getattr(analysis, "temp_size_in_bytes", 0) / 1e9,
    "base_gb": _gb(variables),
    **held,
    "loss": float(metrics["loss"]),
    **kernels,
  }


def _gb(tree) -> float:
  return sum(x.nbytes for x in jax.tree.leaves(tree)) / 1e9


def memory_grid(args) -> list[dict]:
  """Frozen-base GB of the whole model per method, from one quantized layer."""
  config = SHAPES[args.shape]
  out = []
  for name, qcfg in METHODS.items():
    params = synthetic.model_params(dataclasses.replace(config, num_layers=1), qcfg)
    layer = sum(x.nbytes for x in jax.tree.leaves(params["model"]["layers"]))
    rest = sum(x.nbytes for x in jax.tree.leaves(params)) - layer
    _, quant = lora.split_quantized(params)
    bits = bits_per_param(quant) if quant else None
    out.append(
      {
        "method": name,
        "code_bits": bits.code if bits else 16.0,
        "total_bits": bits.total if bits else 16.0,
        "base_gb": (layer * config.num_layers + rest) / 1e9,
      }
    )
    print(f"memory grid: {name} {out[-1]['base_gb']:.2f} GB", flush=True)
  return out


def plot_memory(results: list[dict], path: str) -> None:
  """Frozen-base GB vs total bits (memory grid) and each measured step's peak GB, one PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for label, marker, key in (("NF-k (QLoRA / LoftQ)", "s", "nf"), ("LowRA", "o", "lowra")):
    grid = sorted(
      (g["total_bits"], g["base_gb"])
      for r in results
      for g in r["memory_grid"]
      if g["method"].startswith(key)
    )
    if grid:
      ax.plot(*zip(*grid, strict=True), marker=marker, label=f"{label}: frozen base")
  for r in results:
    for g in r["memory_grid"]:
      if g["method"] == "bf16":
        ax.axhline(g["base_gb"], color="k", ls="--", lw=1, label="bf16: frozen base")
    steps = [(s["total_bits"], s["peak_gb"], s["method"]) for s in r["steps"]]
    for bits, peak, name in steps:
      ax.scatter([min(bits, 5.5)], [peak], marker="*", s=120, color="tab:red", zorder=3)
      ax.annotate(
        f"{name} step peak",
        (min(bits, 5.5), peak),
        fontsize=7,
        xytext=(4, 4),
        textcoords="offset points",
      )
  ax.set_xlabel("total bits per quantized weight (bf16 step drawn at 5.5)")
  ax.set_ylabel("GB")
  ax.set_title("LLaMA-2-7B shapes: frozen base and training-step peak memory")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--rank", type=int, default=64)
  parser.add_argument(
    "--remat",
    default="auto",
    choices=sorted(REMAT),
    help="rematerialise each decoder layer (auto: as train.py's default, by model size)",
  )
  parser.add_argument("--tiled", action="store_true", help="copies of one quantized layer")
  parser.add_argument(
    "--bucket_sizes",
    default="",
    choices=("", "tensor", "shape", "role"),
    help="LowRA's bucket_sizes (default: its default, shape: one split per weight shape)",
  )
  parser.add_argument("--methods", default="bf16,nf4,lowra2,lowra1.5")
  parser.add_argument("--repeat", type=int, default=10)
  parser.add_argument("--memory_grid", action="store_true")
  parser.add_argument("--trace", action="store_true", help="kernels of one step (profiler)")
  parser.add_argument("--out", help="write the results here as JSON")
  parser.add_argument("--child", help=argparse.SUPPRESS)  # one method, JSON to stdout
  parser.add_argument("--plot", help="PNG of memory vs bits from the JSON files in --plot_from")
  parser.add_argument("--plot_from", default="", help="comma-separated --out files")
  args = parser.parse_args()
  if args.plot:
    cli.output_file("--plot", args.plot)
    results = []
    fix = "pass the --out files of earlier runs"
    for name in cli.parse_list(args.plot_from, "--plot_from"):
      path = cli.input_file("--plot_from", name, fix)
      try:
        result = json.loads(path.read_text())
      except ValueError:
        raise cli.UserError(f"--plot_from: {name} is not JSON — {fix}") from None
      if not isinstance(result, dict) or not {"steps", "memory_grid"} & set(result):
        raise cli.UserError(f"--plot_from: {name} holds no model_step.py results — {fix}")
      results.append(result)
    plot_memory(results, args.plot)
    return
  methods = cli.parse_list(args.methods, "--methods", METHODS) if args.methods else []
  for flag in ("batch", "seq", "rank", "repeat"):
    cli.positive(f"--{flag}", getattr(args, flag))
  if args.out:
    cli.output_file("--out", args.out)
  if args.trace:
    check_gpu("--trace")
  if args.child:
    print("RESULT " + json.dumps(measure(args, args.child)), flush=True)
    return
  rows = []
  for name in methods:
    cmd = [sys.executable, *sys.argv, f"--child={name}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
      print(f"{name} failed:\n{done.stderr[-3000:]}", flush=True)
      continue
    rows.append(json.loads(lines[-1][7:]))
    keys = ("step_kernels", "idle_us", "idle_before")
    traced = {k: rows[-1].pop(k) for k in keys if k in rows[-1]}
    print(f"{name}: {rows[-1]}", flush=True)
    if traced:
      print_kernels(f"{name}, one training step", traced["step_kernels"])
      print(f"{name}: device idle {traced['idle_us']:.0f} µs a step, before:", file=sys.stderr)
      for k in traced["idle_before"][:10]:
        print(f"  {k['us']:8.1f} µs {k['launches']:6.0f}x  {k['name'][:100]}", file=sys.stderr)
      rows[-1].update(traced)
  grid = memory_grid(args) if args.memory_grid else []
  config = SHAPES[args.shape]
  header = {
    "shape": args.shape,
    "layers": config.num_layers,
    "batch": args.batch,
    "seq": args.seq,
    "rank": args.rank,
    "remat": remat_of(args),
    "tiled": args.tiled,
    "jax": jax.__version__,
    "device": jax.devices()[0].device_kind,
  }
  if args.out:
    with open(args.out, "w") as f:
      json.dump({**header, "steps": rows, "memory_grid": grid}, f, indent=2)
  print(f"\n{header}")
  base = next((r for r in rows if r["method"] == "bf16"), None)
  print(
    "| base | code bits | total bits | packed shapes | compile s | step ms | vs bf16 "
    "| chained step ms | vs bf16 | peak GB | XLA temp GB | base GB |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    ratios = [f"{r[k] / base[k]:.2f}x" if base else "-" for k in ("step_ms", "chained_step_ms")]
    print(
      f"| {r['method']} | {r['code_bits']:.3f} | {r['total_bits']:.3f} | {r['packed_shapes']} "
      f"| {r['compile_s']:.1f} | {r['step_ms']:.1f} | {ratios[0]} | {r['chained_step_ms']:.1f} "
      f"| {ratios[1]} | {r['peak_gb']:.2f} | {r.get('temp_gb', 0):.2f} | {r['base_gb']:.2f} |"
    )
  print(
    "\nmemory (GB): held arrays, and XLA's temporaries (the activations kept for the backward and "
    "the step's transients, from its compiled memory plan); peak = the device's measured peak"
  )
  print(
    "| base | packed base | dense leaves (embeddings, head, norms; all of bf16) | adapters "
    "| optimizer state | activations + XLA temporaries | peak |"
  )
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['method']} | {r['packed_gb']:.3f} | {r['dense_gb']:.3f} | {r['adapters_gb']:.3f} "
      f"| {r['optimizer_gb']:.3f} | {r['temp_gb']:.3f} | {r['peak_gb']:.3f} |"
    )


if __name__ == "__main__":
  cli.guard(main)
