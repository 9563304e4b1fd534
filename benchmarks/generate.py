"""Decode speed and memory of KV-cached generation: bf16 vs 4-bit NF vs 2- and 1.5-bit LowRA.

    python benchmarks/generate.py --shape=7b [--batches=1,8,32 --prompt=128 --new=64 --out=g.json]
    python benchmarks/generate.py --shape=pycode      # the bundled models: pycode, stories
    python benchmarks/generate.py --shape=tiny        # a few seconds on CPU (smoke test)

Every method runs the same code path, `lowra_jax.generate.decode`: one jitted `lax.while_loop` of
single-token steps over a preallocated KV cache, projections through `quantized_matmul` with
M = batch rows (dense `jnp.dot` for bf16). Methods (`--methods`): `bf16`, `nf4` (QLoRA's NF4),
`lowra2`, `lowra1.5` (LowRA budgets, channels at the LowRA configs' precisions {1, 2}),
`lowra1.5+lora` (1.5 bits plus rank-16 adapters on all projections applied unmerged, i.e. exact
fine-tuned inference). Each method runs in its own subprocess, so each peak memory is its own.

`--precisions=1,2,4` sets LowRA's channel precisions (default: the LowRA configs'
`quantize.recommended_precisions`, (1, 2)): the decode cost of the paper's 4-bit channels.
`--bucket_sizes=tensor` gives each tensor its own split (`QuantConfig.bucket_sizes`; the default
"shape" gives equal-shape tensors one split: one compiled kernel per weight shape).
`--tuning='{"field": value}'` overrides fields of the kernels' per-GPU `Tuning` (an A/B of a
dispatch setting in one call).

`--layouts` (default `auto`): the packed layout each quantized method decodes from. `auto` is what
generation does (`generate.decode_layout`, per batch): the fused word layout up to
`quantized_ops.word_rows()` prompts on the Pallas kernels, the stored planes above. `planes`,
`words` and `fused` force one for every batch: the stored bit planes, the word layout
(`quantize.to_word_layout`, converted on the device after quantizing: `word_gemv` at batch <= 4,
`word_mma` up to `word_rows()` (`--tuning='{"word_max_rows": 64}'`), XLA-dequantized weights
above) and, `fused`, with the q/k/v and gate/up kernels (and adapters) fused into one each
(`generate.word_form`). Rows say the layout they ran.

`--steps_per_sync=1,8` times each batch also with several decode steps between the host's checks
of the loop condition (`generate.decode`: a `while_loop` syncs with the host every iteration).

`--trace` adds, per method and batch, the GPU kernels of one decode step from a profiler trace
(launches and µs per step, grouped by kernel name without its numeric suffix; the top 20 by time
on stderr, all of them in the JSON row): what a step spends in the quantized matmuls' kernels and
in everything around them; and one iteration of the decode loop in order (its span, the time
kernels run, the idle time before its first kernel while the host checks the condition; its
kernels in the JSON row).

Weights: `7b` (LLaMA-2-7B shapes) and `tiny` are random (`synthetic.py`): every layer drawn and
quantized on its own, LowRA's budget solved over the whole model, so each layer's tensors have their
own bucket sizes and kernels, as a real checkpoint's do; `--tiled` quantizes one layer and copies it
into every layer instead (identical shapes: much shorter quantization and compilation, not what a
real checkpoint costs). Embeddings and head stay bf16. `pycode` / `stories`: the real bundled
model, quantized whole.

Timed: the decode of `--new` tokens after a `--prompt`-token context (the cache is filled as after
a prefill; its contents do not change the cost), median of `--repeat` runs after one warm-up
(compilation): tokens/s = batch * new / seconds, no EOS (every step runs). `--prefill` also times
the prefill of random prompts. Peak GB: the device's peak_bytes_in_use in the method's process
after its batch (batches run in increasing order and memory grows with the batch, so this is the
batch's own peak); n/a on CPU. Prints one markdown table last (after it, for a 7B run of all 32
layers, the decode issue's targets met or not: `TARGETS`); `--out` writes the rows as JSON,
rewritten after each method (a run stopped by a time limit keeps the methods it finished).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import synthetic
from kernels import add_tuning_flag, apply_tuning
from trace_kernels import check_gpu, grouped, iteration, per_call, print_kernels, trace_events
from lowra_jax import cli, lora
from lowra_jax import generate as gen
from lowra_jax.models import llama, shapes
from lowra_jax.quantize import (
  QuantConfig,
  bits_per_param,
  quantize_params,
  recommended_precisions,
)

SHAPES = shapes.SHAPES | {"tiny": llama.LlamaConfig(512, 256, 688, 4, 8, 4, 32)}  # tiny: CPU
BUNDLED = {
  "pycode": "../shared/data/models/pycode-llama-17m",
  "stories": "../shared/data/models/stories260K/stories260K.bin",
}
METHODS = {
  "bf16": None,
  "nf4": QuantConfig(method="nf", bits=4),
  "lowra2": QuantConfig(budget=2.0, precisions=recommended_precisions(2.0)),
  "lowra1.5": QuantConfig(budget=1.5, precisions=recommended_precisions(1.5)),
  "lowra1.5+lora": QuantConfig(budget=1.5, precisions=recommended_precisions(1.5)),
}
RANK = 16


def log(start: float, message: str) -> None:
  print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)


def build(
  shape: str,
  method: str,
  layers: int,
  tiled: bool,
  lowra_fields: dict | None = None,
) -> tuple[llama.Llama, dict]:
  """(bf16 model, variables) of `method` at `shape` (synthetic shapes: `layers` overrides
  num_layers, `tiled` copies one quantized layer; `lowra_fields` replace LowRA's `QuantConfig`
  fields)."""
  quant = METHODS[method]
  if quant is not None and quant.method == "lowra" and lowra_fields:
    quant = dataclasses.replace(quant, **lowra_fields)
  lcfg = lora.LoraConfig(rank=RANK) if method.endswith("+lora") else None
  if shape in BUNDLED:
    base, params = llama.load_pretrained(BUNDLED[shape])
    config = base.config
    params = jax.tree.map(jnp.asarray, params)
    if quant is not None:
      params, _ = quantize_params(params, quant, progress=False)
  else:
    config = SHAPES[shape]
    if layers:
      config = dataclasses.replace(config, num_layers=layers)
    params = synthetic.model_params(config, quant, tiled=tiled)
  model = llama.Llama(config, dtype=jnp.bfloat16, lora=lcfg)
  frozen, packed = lora.split_quantized(params)
  variables = {"params": frozen} | ({"quant": packed} if packed else {})
  if lcfg is not None:
    targets = lora.target_paths(lora.merge_trees(frozen, packed), lcfg)
    adapters = lora.random_adapters(targets, RANK, jax.random.key(1))
    variables["lora"] = jax.tree.map(lambda x: x + 1e-3, adapters)  # B != 0: real work
  return model, variables


def context_state(config, batch: int, prompt: int, max_len: int) -> gen.DecodeState:
  """A decode state as after prefilling `prompt` random tokens per row (zero keys/values)."""
  cache = llama.KVCache.create(config, batch, max_len, jnp.bfloat16)
  cache = cache.replace(
    mask=jnp.broadcast_to(jnp.arange(max_len) < prompt, (batch, max_len)),
    index=jnp.asarray(prompt, jnp.int32),
  )
  tokens = jax.random.randint(jax.random.key(2), (batch, max_len), 0, config.vocab_size)
  zeros = jnp.zeros((batch,), jnp.int32)
  return gen.DecodeState(cache, tokens.astype(jnp.int32), zeros, zeros.astype(bool))


def peak_gb() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return peak / 1e9 if peak else None


def median_seconds(setup, fn, repeat: int) -> float:
  """Median wall time of fn(setup()) (setup excluded) over `repeat` runs."""
  times = []
  for _ in range(repeat):
    arg = jax.block_until_ready(setup())
    t0 = time.perf_counter()
    jax.block_until_ready(fn(arg))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def step_kernels(decode, context, steps: int) -> tuple[list[dict], dict | None]:
  """Kernels of one decode step from a traced decode of `steps` steps: grouped by name and
  divided by `steps`, and one loop iteration in order (`trace_kernels.iteration`)."""
  events = trace_events(decode, lambda: (context(),), calls=1)
  return grouped(per_call(events, calls=1), per=steps), iteration(events)


def worker(args) -> None:
  """Measures one method at every batch size; prints one JSON row per batch on stdout."""
  start = time.perf_counter()
  model, stored = build(args.shape, args.worker, args.layers, args.tiled, args.lowra_fields)
  if args.worker_layout in ("words", "fused"):
    convert = functools.partial(gen.word_form, fuse=args.worker_layout == "fused")
    parts = {k: stored.pop(k) for k in ("quant", "lora") if k in stored}
    stored |= jax.jit(convert, donate_argnums=0)(parts)
  jax.block_until_ready(stored)
  bits = bits_per_param(stored["quant"]).code if "quant" in stored else 16.0
  log(start, f"{args.worker}: weights ready ({bits:.2f} code bits)")
  config, key, sampling = model.config, jax.random.key(0), gen.Sampling()
  slots = args.prompt + args.new + 1  # the context, `new` fed tokens and the last one sampled
  stop = jnp.asarray(args.prompt + args.new, jnp.int32)
  for batch, sync in itertools.product(args.batches, args.steps_per_sync):
    layout, variables = args.worker_layout, stored
    if layout == "auto":  # as generation converts: per batch (the planes are kept)
      variables = gen.decode_layout(stored, batch)
      layout = "planes" if variables is stored else "fused"
    weights_gb = sum(x.nbytes for x in jax.tree.leaves(variables)) / 1e9

    def context(batch=batch):
      return context_state(config, batch, args.prompt, slots)

    def decode(state, sync=sync):
      return gen.decode(
        model, variables, state, key, stop, sampling=sampling, eos_id=None, steps_per_sync=sync
      )

    t0 = time.perf_counter()
    out = jax.block_until_ready(decode(context()))
    compile_s = time.perf_counter() - t0
    assert int(out.cache.index) == args.prompt + args.new
    seconds = median_seconds(context, decode, args.repeat)
    row = {
      "method": args.worker + ("" if layout == "planes" else f" ({layout})"),
      "shape": args.shape,
      "batch": batch,
      "steps_per_sync": sync,
      "tokens_per_s": batch * args.new / seconds,
      "ms_per_step": 1e3 * seconds / args.new,
      "compile_s": compile_s,
      "code_bits": bits,
      "weights_gb": weights_gb,
      "tiled": args.tiled,
      "layers": config.num_layers,
      "packed_shapes": synthetic.distinct_packed_shapes(variables),
    }
    if args.prefill:
      prompts = jax.random.randint(key, (batch, args.prompt), 0, config.vocab_size)
      pad = jnp.zeros((batch,), jnp.int32)

      def prefill(prompts, pad=pad):
        return gen.prefill(
          model, variables, prompts, pad, key, max_len=slots, sampling=sampling, eos_id=None
        )

      jax.block_until_ready(prefill(prompts))
      row["prefill_ms"] = 1e3 * median_seconds(lambda p=prompts: p, prefill, args.repeat)
    if args.trace:
      row["step_kernels"], row["iteration"] = step_kernels(decode, context, args.new)
      print_kernels(f"{args.worker} batch {batch}, sync {sync}, one step", row["step_kernels"])
      if row["iteration"]:
        it = row["iteration"]
        log(
          start,
          f"one loop iteration ({sync} steps): {len(it['kernels'])} kernels, span "
          f"{it['span_us']:.0f} µs, busy {it['busy_us']:.0f}, idle before its first kernel "
          f"{it['first_gap_us']:.0f} (the JSON row lists its kernels in order)",
        )
    row["peak_gb"] = peak_gb()
    log(start, f"{args.worker} batch {batch}, sync {sync}: {row['tokens_per_s']:.1f} tokens/s")
    print(json.dumps(row), flush=True)


def save_rows(path: str, rows: list[dict]) -> None:
  """Writes `rows` as JSON to `path` through a temporary file (never a half-written file)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(rows, f, indent=1)
  os.replace(tmp, path)


def _run(row: dict) -> tuple[int, int]:
  """(batch, steps a sync) of a row: what its bf16 ratio is taken at."""
  return row["batch"], row.get("steps_per_sync", 1)


# The decode issue's targets: (method, batch) -> tokens/s at least this many times bf16's, for the
# 7B shape with all 32 layers quantized on their own (not --tiled), one step a sync.
TARGETS = {
  ("lowra2", 1): 3.5, ("lowra1.5", 1): 4.0, ("nf4", 1): 2.5,
  ("lowra2", 8): 3.0, ("lowra1.5", 8): 3.0,
  ("lowra2", 32): 1.5, ("lowra1.5", 32): 1.5,
}  # fmt: skip


def targets(rows: list[dict]) -> list[tuple[str, int, float, float, bool]]:
  """(method, batch, goal, ratio vs bf16, met) for each row of a 32-layer 7B run (untiled, one
  step a sync) that `TARGETS` names, a method's rows by its name without the layout."""
  bf16 = {_run(r): r["tokens_per_s"] for r in rows if r["method"] == "bf16"}
  out = []
  for r in rows:
    method = r["method"].split(" (")[0]
    goal = TARGETS.get((method, r["batch"]))
    whole = r["shape"] == "7b" and r.get("layers") == 32 and not r["tiled"]
    if goal is None or not whole or _run(r)[1] != 1 or _run(r) not in bf16:
      continue
    ratio = r["tokens_per_s"] / bf16[_run(r)]
    out.append((r["method"], r["batch"], goal, ratio, ratio >= goal))
  return out


def targets_table(rows: list[dict]) -> str:
  """Markdown: the targets `targets` judges, or "" when the run judges none."""
  judged = targets(rows)
  if not judged:
    return ""
  lines = ["| method | batch | target vs bf16 | measured | met |", "|---|---|---|---|---|"]
  for method, batch, goal, ratio, met in judged:
    met = "yes" if met else "**no**"
    lines.append(f"| {method} | {batch} | >= {goal:g}x | {ratio:.2f}x | {met} |")
  return "\n".join(lines)


def table(rows: list[dict], prefill: bool) -> str:
  bf16 = {_run(r): r["tokens_per_s"] for r in rows if r["method"] == "bf16"}
  head = "| method | code bits | batch | steps a sync | tokens/s | ratio vs bf16 | ms/step |"
  head += " peak GB | weights GB | packed shapes | compile s |"
  head += " prefill ms |" if prefill else ""
  lines = [head, "|" + "---|" * head.count(" |")]
  for r in rows:
    ratio = f"{r['tokens_per_s'] / bf16[_run(r)]:.2f}x" if _run(r) in bf16 else "-"
    peak = "n/a" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
    line = (
      f"| {r['method']} | {r['code_bits']:.2f} | {r['batch']} | {_run(r)[1]} "
      f"| {r['tokens_per_s']:.1f} | {ratio} "
      f"| {r['ms_per_step']:.2f} | {peak} | {r['weights_gb']:.2f} | {r['packed_shapes']} "
      f"| {r['compile_s']:.1f} |"
    )
    lines.append(line + (f" {r['prefill_ms']:.1f} |" if prefill else ""))
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="7b", choices=sorted(SHAPES | BUNDLED))
  parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
  parser.add_argument("--batches", default="1,8,32", help="comma-separated")
  parser.add_argument("--layers", type=int, default=0, help="override num_layers (synthetic)")
  parser.add_argument(
    "--tiled", action="store_true", help="copies of one quantized layer (synthetic shapes)"
  )
  parser.add_argument(
    "--bucket_multiple", type=int, default=0, help="LowRA's bucket_multiple (0: its default)"
  )
  parser.add_argument(
    "--bucket_sizes",
    default="",
    choices=("", "tensor", "shape", "role"),
    help="LowRA's bucket_sizes (default: its default, shape)",
  )
  parser.add_argument(
    "--precisions",
    dest="precisions_text",
    default="",
    help="LowRA's channel precisions, e.g. 1,2,4 (default: the configs' 1,2)",
  )
  parser.add_argument("--prompt", type=int, default=128, help="context tokens before decoding")
  parser.add_argument("--new", type=int, default=64, help="decode steps timed")
  parser.add_argument("--repeat", type=int, default=3)
  parser.add_argument(
    "--steps_per_sync",
    default="1",
    help="comma-separated: decode steps between the host's loop checks (`generate.decode`)",
  )
  parser.add_argument("--prefill", action="store_true", help="also time the prefill")
  parser.add_argument("--trace", action="store_true", help="kernels of one step (profiler)")
  parser.add_argument("--out", default="", help="write the rows as JSON here")
  add_tuning_flag(parser)
  parser.add_argument(
    "--layouts",
    default="auto",
    help="auto,planes,words,fused: quantized methods in these layouts (auto: as generation does)",
  )
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  parser.add_argument("--worker_layout", default="auto", help=argparse.SUPPRESS)
  args = parser.parse_args()
  methods = cli.parse_list(args.methods, "--methods", METHODS)
  layouts = cli.parse_list(args.layouts, "--layouts", ("auto", "planes", "words", "fused"))
  args.batches = cli.parse_list(args.batches, "--batches", convert=int)
  cli.positive("--batches", *args.batches)
  args.steps_per_sync = cli.parse_list(args.steps_per_sync, "--steps_per_sync", convert=int)
  cli.positive("--steps_per_sync", *args.steps_per_sync)
  for flag in ("prompt", "new", "repeat"):
    cli.positive(f"--{flag}", getattr(args, flag))
  if args.layers:
    cli.positive("--layers", args.layers)
  if args.bucket_multiple:
    cli.positive("--bucket_multiple", args.bucket_multiple)
  args.lowra_fields = {}
  if args.bucket_multiple:
    args.lowra_fields["bucket_multiple"] = args.bucket_multiple
  if args.bucket_sizes:
    args.lowra_fields["bucket_sizes"] = args.bucket_sizes
  if args.precisions_text:
    precisions = tuple(cli.parse_list(args.precisions_text, "--precisions", convert=int))
    args.lowra_fields["precisions"] = precisions
    with cli.user_errors(f"--precisions={args.precisions_text}: "):
      for m in methods:
        if METHODS[m] is not None and METHODS[m].method == "lowra":
          dataclasses.replace(METHODS[m], precisions=precisions)
  if args.shape in BUNDLED:
    cli.existing("--shape", BUNDLED[args.shape], "run it from the project root")
  if args.out:
    cli.output_file("--out", args.out)
  if args.trace:
    check_gpu("--trace")
  apply_tuning(args.tuning)
  if args.worker:
    worker(args)
    return
  start, rows = time.perf_counter(), []
  runs = [(m, lay) for m in methods for lay in (layouts if METHODS[m] else ["auto"])]
  for method, layout in runs:
    cmd = [sys.executable, __file__, *sys.argv[1:], f"--worker={method}"]
    out = subprocess.run(
      [*cmd, f"--worker_layout={layout}"], check=False, stdout=subprocess.PIPE, text=True
    )
    rows += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode:
      log(start, f"{method} ({layout}) failed (exit {out.returncode}); see its stderr above")
    if args.out:  # after each method: a run cut short keeps the methods it finished
      save_rows(args.out, rows)
  layers = args.layers or (SHAPES[args.shape].num_layers if args.shape in SHAPES else 0)
  layers = f"{layers} layers{' (tiled)' if args.tiled else ''}, " if layers else ""
  print(
    f"\n{args.shape} ({layers}context {args.prompt}, {args.new} decode steps timed, median of "
    f"{args.repeat}); jax {jax.__version__}, {jax.devices()[0].device_kind}; "
    f"{time.perf_counter() - start:.0f} s in all"
  )
  print(table(rows, args.prefill))
  judged = targets_table(rows)
  if judged:
    print("\nThe decode targets (7B, 32 layers quantized on their own):\n" + judged)


if __name__ == "__main__":
  cli.guard(main)
