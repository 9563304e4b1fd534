"""Quantized base alone (no adapters) with and without LowRA's calibration, on pycode-llama-17m.

For every budget: LowRA with `calibration="none"` (weight-space error), "kernel" and "model" (error
weighted by the input second moments of `--sequences` blocks of networkx_train, normalised per
kernel or not: `QuantConfig.calibration`; "fisher": "model" with each output channel's errors
also weighted by its output gradients' second moment over `--gradient_sequences` of the blocks),
each with the `--rounding`s asked for ("gptq": codes by error feedback through the inputs'
covariances, `QuantConfig.rounding`; "gptq+refit": then each channel's levels refitted to those
codes, `QuantConfig.refit`), perplexity of the quantized base over networkx_eval; NF-k rows as
the reference. Each row is appended to `--out` (JSONL) as it is measured and printed as a table
at the end.

    python benchmarks/calibration.py --out=runs/calibration.jsonl            # 1.5, 2, 2.5, 3
    python benchmarks/calibration.py --calibrations=kernel --rounding=nearest,gptq --out=FILE
    python benchmarks/calibration.py --budgets=2.5 --nf= --eval_blocks=64 --out=/tmp/c.jsonl
    python benchmarks/calibration.py --bucket_sizes=tensor,shape --out=FILE   # QuantConfig's
    python benchmarks/calibration.py --calibrations=kernel,fisher --out=FILE
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import jax
import numpy as np

from lowra_jax import base, calibration, cli, data, lora, train_lib
from lowra_jax.models import llama
from lowra_jax.models.tokenizer import load_tokenizer
from lowra_jax.models.weights_source import CheckpointSource
from lowra_jax.quantize import QuantConfig, bits_per_param

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"


def measure(
  name: str, config: QuantConfig, path: str, moments: dict | None, covariances, eval_fn
) -> dict:
  """One row: quantize the checkpoint as train.py does (streamed), then the base's perplexity."""
  t0 = time.perf_counter()
  qparams, _ = base.quantize_checkpoint(
    path, config, progress=False, importance=moments, covariances=covariances
  )
  seconds = time.perf_counter() - t0
  bits = bits_per_param(qparams)
  loss, scored = eval_fn(qparams)
  return {
    "method": name,
    "budget": config.budget if config.method == "lowra" else config.bits,
    "calibration": config.calibration,
    "rounding": config.rounding + ("+refit" if config.refit else ""),
    "bucket_sizes": config.bucket_sizes,
    "precisions": list(config.precisions) if config.method == "lowra" else None,
    "code_bits": bits.code,
    "total_bits": bits.total,
    "ppl": float(np.exp(loss)),
    "tokens": scored,
    "quantize_s": seconds,
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default=str(DATA / "models" / "pycode-llama-17m"))
  p.add_argument("--data", default=str(DATA / "pycode"), help="train / eval splits (networkx)")
  p.add_argument("--budgets", default="1.5,2,2.5,3")
  p.add_argument("--nf", default="3,4", help="NF-k reference rows ('' for none)")
  p.add_argument("--calibrations", default="none,kernel,model")
  p.add_argument(
    "--rounding", default="nearest", help="nearest, gptq, gptq+refit (comma-separated)"
  )
  p.add_argument(
    "--precisions",
    default="124",
    help="LowRA's channel precisions, e.g. 124 or 1234 (3-bit too); comma-separated sets",
  )
  p.add_argument(
    "--bucket_sizes", default="shape", help="tensor, shape, role (comma-separated; QuantConfig's)"
  )
  p.add_argument("--sequences", type=int, default=256, help="calibration blocks")
  p.add_argument(
    "--gradient_sequences",
    type=int,
    default=calibration.CalibConfig.gradient_sequences,
    help="of those, the blocks whose output gradients 'fisher' weighs by",
  )
  p.add_argument("--seq_len", type=int, default=512)
  p.add_argument("--eval_blocks", type=int, default=0, help="0: every eval block")
  p.add_argument("--out", required=True, help="JSONL, appended")
  args = p.parse_args()
  roundings = args.rounding.split(",")
  rows = [("bf16", None)]
  nf_bits = [int(k) for k in args.nf.split(",") if k]
  rows += [(f"NF{k}", QuantConfig(method="nf", bits=k)) for k in nf_bits]
  sets = args.precisions.split(",")
  if not all(s.isdigit() for s in sets):
    raise cli.UserError(f"--precisions={args.precisions}: digits, e.g. 124 or 12,1234")
  for b, c, sizes, digits in itertools.product(
    map(float, args.budgets.split(",")),
    args.calibrations.split(","),
    args.bucket_sizes.split(","),
    sets,
  ):
    for r in roundings if c != "none" else ["nearest"]:
      with cli.user_errors("--precisions / --budgets / --bucket_sizes: "):
        rounding, _, refit = r.partition("+")
        if refit not in ("", "refit"):
          raise cli.UserError(f"--rounding={r}: use nearest, gptq or gptq+refit")
        cfg = QuantConfig(
          budget=b,
          calibration=c,
          rounding=rounding,
          refit=bool(refit),
          precisions=tuple(int(d) for d in digits),
          bucket_sizes=sizes,
        )
      rows.append(("LowRA", cfg))

  tokenizer = load_tokenizer(Path(args.model))
  cut = {"name": "text", "path": args.data, "seq_len": args.seq_len}
  train = data.load(data.DataConfig(split="train", **cut), tokenizer).blocks
  blocks = data.load(data.DataConfig(split="eval", **cut), tokenizer).blocks
  if args.eval_blocks:
    blocks = blocks[: args.eval_blocks]
  model, params = llama.load_pretrained(args.model)  # bf16 compute, as train.py's default
  t0 = time.perf_counter()
  calib = calibration.spread(train, args.sequences)
  source = CheckpointSource(args.model)
  fisher = "fisher" in args.calibrations.split(",")
  if fisher:
    moments = calibration.fisher_moments(model, source, calib, 8, args.gradient_sequences)
  else:
    moments = calibration.input_moments(model, source, calib, batch_size=8)
  calib_s = time.perf_counter() - t0
  some = len(calibration.spread(calib, args.gradient_sequences))
  what = f"input moments and output gradients of {some}" if fisher else "input moments"
  print(f"calibration: {what}, {len(calib)} x {args.seq_len} tokens in {calib_s:.1f} s", flush=True)
  covariances = calibration.LayerCovariances(model, source, calib, batch_size=8)  # gptq rows
  eval_step = train_lib.make_eval_step(model)

  def eval_fn(qparams):
    frozen, quant = lora.split_quantized(qparams)
    return train_lib.mean_loss(eval_step, {"params": frozen, "quant": quant}, None, blocks, 4)

  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  results = []
  for name, cfg in rows:
    if cfg is None:
      loss, scored = train_lib.mean_loss(eval_step, {"params": params}, None, blocks, 4)
      row = {"method": name, "ppl": float(np.exp(loss)), "tokens": scored}
    else:
      row = measure(name, cfg, args.model, moments, covariances, eval_fn)
    row.update(calibration_s=calib_s, sequences=len(calib), backend=jax.default_backend())
    if cfg is not None and cfg.calibration == "fisher":
      row.update(gradient_sequences=some)
    results.append(row)
    with out.open("a") as f:
      f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
  print(
    "\n| method | budget | calibration | rounding | bucket sizes | code bits | total bits "
    "| ppl base | quantize s |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for r in results:
    bits = ",".join(map(str, r.get("precisions") or []))
    method = r["method"] + (f" {{{bits}}}" if bits else "")
    print(
      f"| {method} | {r.get('budget', '')} | {r.get('calibration', '')} | "
      f"{r.get('rounding', '')} | {r.get('bucket_sizes', '')} | "
      f"{r.get('code_bits', 16):.3f} | {r.get('total_bits', 16):.3f} | {r['ppl']:.3f} | "
      f"{r.get('quantize_s', 0):.1f} |"
    )


if __name__ == "__main__":
  cli.guard(main)
