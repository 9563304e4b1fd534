"""Where the time of one `quantized_matmul` goes: the GPU kernels it launches, from a profiler trace.

For each case (precision, M, pass) the op is compiled and timed as in `benchmarks/kernels.py`,
then run `--calls` more times under `jax.profiler.trace`; the device events of that trace (the
Perfetto JSON jax writes) give each kernel's duration. Printed per case: the kernels of one call
in launch order with their mean µs, their sum, and the op's time per call in the timed loop.

    python benchmarks/op_breakdown.py --shape=4096x11008 --precisions=2,mix1.5 --ms=1,512

The op is the custom-VJP `quantized_matmul` itself (the backward through its VJP), on the Triton
kernels (a GPU: the trace's device kernels are what is broken down).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import kernels as kb  # benchmarks/kernels.py: the same timing loop and weights
from trace_kernels import check_gpu, kernels_of

from lowra_jax import cli, quantize


def breakdown(label: str, fn, a, qt, calls: int) -> tuple[float, float, float]:
  """Prints the kernels of one fn(a, qt); returns (timed-loop µs, kernels launched, kernel µs)."""
  sec = kb.bench(fn, a, [qt], iters=10, reps=5)
  ks = kernels_of(jax.jit(fn), lambda: (a, qt), calls=calls)
  total, count = sum(x.us for x in ks), sum(x.launches for x in ks)
  print(f"\n{label}: {sec * 1e6:.1f} µs per call (timed loop)")
  for x in ks:
    print(f"  {x.us:8.1f} µs  {x.launches:g}x {x.name[:110]}")
  print(f"  {total:8.1f} µs  sum of {count:g} kernels", flush=True)
  return sec * 1e6, count, total


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="4096x11008")
  parser.add_argument("--precisions", default="2,mix1.5")
  parser.add_argument("--ms", default="1,512")
  parser.add_argument("--passes", default="fwd,bwd")
  parser.add_argument("--calls", type=int, default=5)
  args = parser.parse_args()
  k, n = kb.dims(args.shape, "--shape")
  precisions = cli.parse_list(args.precisions, "--precisions", kb.PRECISIONS)
  ms = cli.parse_list(args.ms, "--ms", convert=int)
  cli.positive("--ms", *ms)
  passes = cli.parse_list(args.passes, "--passes", ("fwd", "bwd"))
  cli.positive("--calls", args.calls)
  check_gpu("op_breakdown.py")
  key = jax.random.key(k * 7 + n)
  w = (0.02 * jax.random.t(key, 5.0, (k, n))).astype(jnp.bfloat16)
  summary = []
  for prec in precisions:
    qt = quantize.quantize_tensor(w, quantize.QuantConfig(**kb.PRECISIONS[prec]))
    for m in ms:
      for d in passes:
        a = jax.random.normal(key, (m, k if d == "fwd" else n), jnp.bfloat16)
        fn = functools.partial(kb.forward if d == "fwd" else kb.backward, backend="triton")
        label = f"{args.shape} {prec} M={m} {d}"
        summary.append((prec, m, d, *breakdown(label, fn, a, qt, args.calls)))
  print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.shape}")
  print("| precision | M | pass | op µs (timed loop) | kernels | sum of kernel µs (trace) |")
  print("|---|---|---|---|---|---|")
  for prec, m, d, op_us, count, total in summary:
    print(f"| {prec} | {m} | {d} | {op_us:.1f} | {count:g} | {total:.1f} |")


if __name__ == "__main__":
  cli.guard(main)
