"""Quantization error of QLoRA's NF-k against LowRA on the bundled real models.

For every quantized linear layer of ../shared/data/models/pycode-llama-17m (HF safetensors,
sharded, bf16) and ../shared/data/models/stories260K (llama2.c, fp32), prints per method and budget
the relative Frobenius error ||W - W_hat|| / ||W|| over all quantized layers together, the code bits
and total (stored) bits per parameter, and the wall time.

    python benchmarks/quant_error.py                 # both models, full table (a few minutes on CPU)
    python benchmarks/quant_error.py --models stories --budgets 1.5,2
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import jax

from lowra_jax import cli, quantize
from lowra_jax.models import weights

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "models"
MODELS = {
  "pycode": DATA / "pycode-llama-17m",
  "stories": DATA / "stories260K" / "stories260K.bin",
}
BUDGETS = (1.15, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 4.0)


def load(name: str):
  """Kernel tree of a bundled model (real loading paths)."""
  _, state = weights.read_checkpoint(MODELS[name])
  return weights.to_kernel_tree(state)


def configs(budgets, lut_clusters: int):
  for k in (1, 2, 3, 4):
    yield f"NF{k} (QLoRA)", quantize.QuantConfig(method="nf", bits=k)
  for b in budgets:
    yield f"LowRA @{b:g}", quantize.QuantConfig(method="lowra", budget=b)
  for b in budgets:
    yield (
      f"LowRA @{b:g} +3bit",
      quantize.QuantConfig(method="lowra", budget=b, precisions=(1, 2, 3, 4)),
    )
  for b in budgets:
    if lut_clusters:
      yield (
        f"LowRA @{b:g} shared{lut_clusters}",
        quantize.QuantConfig(method="lowra", budget=b, lut_clusters=lut_clusters),
      )
  for b in (1.5, 2.0):
    if b in budgets:
      yield (
        f"LowRA @{b:g} w=absmax",
        quantize.QuantConfig(method="lowra", budget=b, weighting="absmax"),
      )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="pycode,stories")
  parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
  parser.add_argument(
    "--lut-clusters",
    type=int,
    default=16,
    help="also run LowRA with this many shared tables per bucket (0: skip)",
  )
  args = parser.parse_args()
  models = cli.parse_list(args.models, "--models", MODELS)
  for model in models:
    cli.existing("--models", MODELS[model], "the bundled models belong in ../shared/data/models")
  budgets = tuple(cli.parse_list(args.budgets, "--budgets", convert=float))
  with cli.user_errors("--budgets / --lut-clusters: "):
    runs = list(configs(budgets, args.lut_clusters))
  rows = []
  for model in models:
    params = load(model)
    for label, cfg in runs:
      t0 = time.perf_counter()
      _, report = quantize.quantize_params(params, cfg, progress=False)
      seconds = time.perf_counter() - t0
      rows.append((model, label, report.code_bits, report.total_bits, report.rel_error, seconds))
      print(
        f"{model:8s} {label:26s} code {report.code_bits:5.3f}  total {report.total_bits:5.3f}"
        f"  rel.err {report.rel_error:.4f}  {seconds:6.1f}s",
        flush=True,
      )

  print(
    f"\n{datetime.date.today()}, {platform.node() or 'host'}: {platform.processor() or platform.machine()}"
    f", jax {jax.__version__} on {jax.devices()[0].platform}"
  )
  print("\n| model | method | code bits | total bits | rel. Frobenius error | time (s) |")
  print("|---|---|---|---|---|---|")
  for model, label, code, total, err, sec in rows:
    print(f"| {model} | {label} | {code:.3f} | {total:.3f} | {err:.4f} | {sec:.1f} |")
  print("\nLowRA vs NF at equal code bits (relative error):")
  for model in dict.fromkeys(r[0] for r in rows):
    by_label = {r[1]: r for r in rows if r[0] == model}
    for k in (2, 3, 4):
      nf = by_label.get(f"NF{k} (QLoRA)")
      for variant in ("", " +3bit"):
        lowra = by_label.get(f"LowRA @{k:g}{variant}")
        if nf and lowra:
          verdict = "lower" if lowra[4] < nf[4] else "NOT lower"
          print(f"  {model} {k} bits: NF {nf[4]:.4f}  LowRA{variant} {lowra[4]:.4f}  -> {verdict}")


if __name__ == "__main__":
  cli.guard(main)
