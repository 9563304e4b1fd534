"""Quantize a whole LLaMA-shaped model as it is read, on one device: time per pass and peak memory.

    python benchmarks/quant_stream.py --shape=70b                  # LowRA 1.5, synthetic weights
    python benchmarks/quant_stream.py --shape=70b --method=nf --bits=4
    python benchmarks/quant_stream.py --shape=7b --save=/tmp/base  # packed base written to disk
    python benchmarks/quant_stream.py --checkpoint=../shared/data/models/pycode-llama-17m
    python benchmarks/quant_stream.py --shape=tiny                 # seconds on CPU (smoke test)
    python benchmarks/quant_stream.py --shape=7b --loftq=5         # + LoftQ's rounds (rank 16)
    python benchmarks/quant_stream.py --shape=7b --calibrate=256 --gptq
    python benchmarks/quant_stream.py --shape=7b --calibrate=256 --gptq --fisher
    python benchmarks/quant_stream.py --shape=7b --calibrate=256 --gptq --sequential

Weights come from `weights_source.SyntheticSource` (deterministic random bf16 of the named shape,
drawn on the device one tensor at a time; nothing to download) or a checkpoint. They go through
`quantize_stream`, the path train.py takes: LowRA reads the source twice (pass 1: fit every
kernel, keep tables and per-channel errors; solve the model-wide budget; pass 2: draw or read
each kernel again, encode and pack it), NF once. The packed base is kept on the device, as
training keeps it, or with `--save` written tensor by tensor and dropped. Compilation is
included (one fresh process). Prints last a table: passes' seconds, host peak RSS
(ru_maxrss, the whole process), device peak (`memory_stats`, none on CPU), bits per parameter.
`--calibrate=N`: first the input second moments of N blocks of 512 random tokens
(`calibration.input_moments`, layer by layer from the same source; its seconds printed), then
LowRA with `calibration="kernel"`; with `--gptq`, `rounding="gptq"` (GPTQ's error feedback when
encoding) on the whole input covariances, computed one decoder layer at a time during pass 2
(`calibration.LayerCovariances`; their seconds printed, part of the quantization's); with
`--refit` as well, each channel's levels refitted to its GPTQ codes (`QuantConfig.refit`); with
`--sequential`, the covariances taken through the layers before as quantized
(`QuantConfig.gptq_sequential`: two forwards of each layer); with
`--fisher`, `calibration="fisher"`: the output gradients' second moments of
`--gradient_sequences` of those blocks too (`calibration.fisher_moments`: a forward and a backward
layer by layer, whose first forward sums the input moments as well when they are all the blocks;
its seconds the calibration's). LowRA's
channel precisions are the configs' (`quantize.recommended_precisions`: {1, 2} up to 2 bits).
`--loftq=T`: LoftQ initialisation as train.py streams it (`loftq.loftq_stream`, rank-16 adapters
on every projection; LowRA: two passes per round), with each round's seconds and error.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time
from pathlib import Path

import jax

import numpy as np

from lowra_jax import calibration, cli, loftq, lora
from lowra_jax.models import llama
from lowra_jax.models.shapes import SHAPES
from lowra_jax.models.weights_source import CheckpointSource, SyntheticSource
from lowra_jax.quantize import QuantConfig, is_quantized, recommended_precisions
from lowra_jax.quantize.pipeline import quantize_stream
from lowra_jax.quantize.serialize import Writer

CPU_SHAPES = {"tiny": llama.LlamaConfig(512, 128, 344, 2, 4, 2, 32)}


class TimedSource:
  """A source whose iterations (the quantizer's passes) are timed: `passes` [(start, end)]."""

  def __init__(self, source):
    self.source, self.passes = source, []

  def __len__(self) -> int:
    return len(self.source)

  def __iter__(self):
    start = time.perf_counter()
    yield from self.source
    self.passes.append((start, time.perf_counter()))


def device_peak_gb() -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 1e9


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="70b", choices=sorted(SHAPES | CPU_SHAPES))
  parser.add_argument("--layers", type=int, default=0, help="override the shape's layer count")
  parser.add_argument("--checkpoint", help="quantize this HF dir / llama2.c .bin instead")
  parser.add_argument("--method", default="lowra", choices=("lowra", "nf"))
  parser.add_argument("--budget", type=float, default=1.5, help="lowra: code bits per parameter")
  parser.add_argument("--bits", type=int, default=4, help="nf: bits per parameter")
  parser.add_argument("--save", help="write the packed base to this new directory")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--loftq", type=int, default=0, help="LoftQ rounds (0: none)")
  parser.add_argument("--calibrate", type=int, default=0, help="calibration blocks (0: none)")
  parser.add_argument("--gptq", action="store_true", help="with --calibrate: GPTQ rounding")
  parser.add_argument("--refit", action="store_true", help="with --gptq: refit the levels")
  parser.add_argument(
    "--sequential", action="store_true", help="with --gptq: covariances through quantized layers"
  )
  parser.add_argument("--fisher", action="store_true", help="with --calibrate: fisher weighting")
  parser.add_argument(
    "--gradient_sequences",
    type=int,
    default=calibration.CalibConfig.gradient_sequences,
    help="with --fisher: of the --calibrate blocks, those whose output gradients are taken",
  )
  parser.add_argument("--no_progress", action="store_true", help="no progress bars")
  args = parser.parse_args()
  if args.layers:
    cli.positive("--layers", args.layers)
  if args.calibrate:
    cli.positive("--calibrate", args.calibrate)
    if args.method != "lowra" or args.checkpoint:
      raise cli.UserError("--calibrate: synthetic shapes with --method=lowra only — drop it")
  if args.gptq and not args.calibrate:
    raise cli.UserError("--gptq feeds errors back through calibration covariances — add --calibrate=N")
  if args.fisher and not args.calibrate:
    raise cli.UserError("--fisher weighs by calibration gradients — add --calibrate=N")
  if args.refit and not args.gptq:
    raise cli.UserError("--refit refits the levels to GPTQ's codes — add --gptq")
  if args.sequential and not args.gptq:
    raise cli.UserError("--sequential orders GPTQ's covariances — add --gptq")
  if args.loftq:
    cli.positive("--loftq", args.loftq)
    if args.save:
      raise cli.UserError("--loftq keeps the base and adapters on the device — drop --save")
  if args.save and Path(args.save).exists():
    raise cli.UserError(f"--save: {args.save} exists — remove it or save elsewhere")
  return args


def main():
  args = parse_args()
  calibrated = ("fisher" if args.fisher else "kernel") if args.calibrate else "none"
  with cli.user_errors(f"--{'budget' if args.method == 'lowra' else 'bits'}: "):
    quant = QuantConfig(
      method=args.method,
      budget=args.budget,
      bits=args.bits,
      calibration=calibrated,
      rounding="gptq" if args.gptq else "nearest",
      refit=args.refit,
      gptq_sequential=args.sequential,
      **({"precisions": recommended_precisions(args.budget)} if args.method == "lowra" else {}),
    )
  if args.checkpoint:
    cli.existing("--checkpoint", args.checkpoint)
    with cli.user_errors("--checkpoint: "):
      source, name = CheckpointSource(args.checkpoint), args.checkpoint
  else:
    config = (SHAPES | CPU_SHAPES)[args.shape]
    if args.layers:
      config = dataclasses.replace(config, num_layers=args.layers)
    source, name = SyntheticSource(config, args.seed), f"{args.shape} ({config.num_layers} layers)"
  timed = TimedSource(source)
  label = f"lowra {args.budget:g}" if args.method == "lowra" else f"nf{args.bits}"
  label += " gptq" if args.gptq else ""
  label += " fisher" if args.fisher else ""
  label += " + refit" if args.refit else ""
  label += " sequential" if args.sequential else ""
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: {name}, {label}", flush=True)

  held, kept = [], {"packed": 0, "dense": 0}
  moments = None
  if args.calibrate:
    model = llama.Llama(config, dtype=jax.numpy.bfloat16)
    tokens = np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.calibrate, 513))
    begin = time.perf_counter()
    if args.fisher:
      moments = calibration.fisher_moments(
        model, source, tokens, 8, args.gradient_sequences, progress=not args.no_progress
      )
    else:
      moments = calibration.input_moments(model, source, tokens, 8, progress=not args.no_progress)
    calibrate_s = time.perf_counter() - begin
    some = len(calibration.spread(tokens, args.gradient_sequences))
  covariances = None
  if args.gptq:
    covariances = calibration.LayerCovariances(model, source, tokens, 8, sequential=args.sequential)

  def keep(path, leaf, _):
    """Holds every leaf, as training holds the base; counts its bytes."""
    kind = "packed" if is_quantized(leaf) else "dense"
    kept[kind] += sum(x.nbytes for x in jax.tree.leaves(leaf))
    held.append(leaf)

  progress = not args.no_progress
  start = time.perf_counter()
  if args.save:
    with Writer(args.save, {"source": name, "quant": dataclasses.asdict(quant)}) as out:
      report = quantize_stream(
        timed, quant, sink=lambda path, leaf, _: out.add(path, leaf), progress=progress,
        importance=moments, covariances=covariances,
      )
  elif args.loftq:
    adapters = lora.LoraConfig(init="loftq", loftq_iters=args.loftq)
    kernels = {tuple(p.split("/")[:-1]): s for p, s in source.shapes().items() if len(s) == 2}
    factors, lreport = loftq.loftq_stream(
      timed, quant, targets=set(lora.check_targets(kernels, adapters)), rank=adapters.rank,
      scale=adapters.scale, iters=args.loftq, sink=lambda path, leaf: keep(path, leaf, None),
      progress=progress, importance=moments, covariances=covariances,
    )
    report = lreport.quant
    jax.block_until_ready((held, factors))
  else:
    report = quantize_stream(
      timed, quant, sink=keep, progress=progress, importance=moments, covariances=covariances
    )
    jax.block_until_ready(held)
  total = time.perf_counter() - start
  if args.calibrate:
    print(
      f"calibration: {args.calibrate} x 512 tokens in {calibrate_s:.1f} s "
      f"({calibrate_s / total:.0%} of the quantization's {total:.1f} s)"
      + (f", input moments and output gradients of {some} blocks" if args.fisher else "")
    )
  if args.gptq:
    print(
      f"covariances: {covariances.seconds:.1f} s of the quantization, layer by layer as pass 2 "
      "asks for them" + (" (through the quantized layers)" if args.sequential else "")
    )
  if args.loftq:
    # LowRA: two passes per round; nf: every kernel's rounds within one pass
    per = len(timed.passes) // args.loftq
    seconds = "all in one pass"
    if per:
      spans = [timed.passes[i : i + per] for i in range(0, per * args.loftq, per)]
      seconds = [round(span[-1][1] - span[0][0], 1) for span in spans]
    print(
      f"loftq: {args.loftq} rounds, s per round {seconds}, relative error "
      f"{lreport.quant_error:.4f} (quantized) -> {[round(e, 4) for e in lreport.errors]}"
    )

  passes = [end - begin for begin, end in timed.passes]
  host_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
  device_gb = device_peak_gb()
  print("\nstages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()))
  if not args.save:
    print(f"held: packed base {kept['packed'] / 1e9:.2f} GB, dense {kept['dense'] / 1e9:.2f} GB")
  fit_s, solve_s = ("-", "-")  # NF: one pass, no solve
  if len(passes) > 1:
    fit_s, solve_s = f"{passes[0]:.1f}", f"{report.seconds['solve']:.1f}"
  device = "-" if device_gb is None else f"{device_gb:.1f}"
  print(
    "\n| model | method | pass 1 s | solve s | pass 2 s | total s | host peak GB "
    "| device peak GB | code bits | total bits |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  print(
    f"| {name} | {label} | {fit_s} | {solve_s} | {passes[-1]:.1f} | {total:.1f} | {host_gb:.1f} "
    f"| {device} | {report.code_bits:.3f} | {report.total_bits:.3f} |"
  )

if __name__ == "__main__":
  cli.guard(main)
