"""quantized_matmul at training sizes (M >= DENSE_FROM_M) against its version at an earlier commit.

The dense path (dequantize into a transient weight, XLA's dot) of the working tree is timed beside
the same op as it was at `--before` (its `pallas_kernels/quantized_ops.py` and `lut_matmul.py`,
taken from git into a temporary package; it runs on today's quantization format), and bf16
`jnp.dot`, in one process, forward and backward, as `benchmarks/kernels.py` times them.

    python benchmarks/dense_path.py --before=4d42c55        # H200: ~2 min

The `--before` version's 4-bit buckets are dequantized by a table gather (`take_along_axis`),
as the quantizer did at that commit.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import kernels as kb  # benchmarks/kernels.py: the same timing loop

from lowra_jax import quantize
from lowra_jax.quantize import packing
from lowra_jax.quantize.scaling import expand_groups
from pallas_kernels import quantized_ops as current

ROOT = Path(__file__).resolve().parents[1]
CASES = (
  ("4096x11008", ("2", "4", "mix1.5"), (512, 4096)),
  ("8192x28672", ("mix1.5",), (512, 4096)),
)


def load_before(rev: str, into: Path):
  """The `quantized_ops` module of commit `rev`, importing that commit's `lut_matmul`."""
  for name in ("quantized_ops", "lut_matmul"):
    src = subprocess.run(
      ["git", "show", f"{rev}:pallas_kernels/{name}.py"], cwd=ROOT, capture_output=True, text=True
    )
    if src.returncode:
      raise SystemExit(f"git show {rev}:pallas_kernels/{name}.py failed: {src.stderr.strip()}")
    text = src.stdout.replace(
      "from pallas_kernels import lut_matmul as lm", "import before_lut_matmul as lm"
    )
    (into / f"before_{name}.py").write_text(text)
  sys.path.insert(0, str(into))
  import before_quantized_ops as before

  if not hasattr(before, "_dense"):  # 4-bit gather patch only for commits that had `_dense`
    return before
  dense = before._dense

  def gather_dense(bucket, group, impl, dtype):
    if bucket.bits != 4:
      return dense(bucket, group, impl, dtype)
    codes = packing.unpack(bucket.planes, bucket.bits).astype(jnp.int32)
    values = jnp.take_along_axis(bucket.channel_tables().astype(jnp.float32).T, codes, axis=0)
    return (values * expand_groups(bucket.scales.dequantize(), group)).astype(dtype)

  before._dense = gather_dense
  return before


def op(module, impl: str, direction: str):
  """a [M, K] -> y (forward) or a [M, N] -> dX (backward, through the module's custom VJP)."""

  def fwd(a, qt):
    return module._qmm(a, qt, impl)

  def bwd(a, qt):
    x = jnp.zeros((a.shape[0], qt.shape[0]), a.dtype)
    return jax.vjp(lambda z: module._qmm(z, qt, impl), x)[1](a)[0]

  return fwd if direction == "fwd" else bwd


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--before", required=True, help="git revision to compare against")
  args = parser.parse_args()
  impl = "triton" if jax.default_backend() == "gpu" else "interpret"
  cases = CASES if impl == "triton" else (("256x512", ("2", "4", "mix1.5"), (512,)),)
  with tempfile.TemporaryDirectory() as tmp:
    before = load_before(args.before, Path(tmp))
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    rows = []
    for shape, precisions, ms in cases:
      k, n = (int(s) for s in shape.split("x"))
      key = jax.random.key(k * 7 + n)
      w = (0.02 * jax.random.t(key, 5.0, (k, n))).astype(jnp.bfloat16)
      w_copies = kb.rotate(lambda i: w + jnp.bfloat16(i * 1e-3), w.nbytes, most=4)
      for prec in precisions:
        qt = quantize.quantize_tensor(w, quantize.QuantConfig(**kb.PRECISIONS[prec]))
        qs = kb.quantized_copies(qt, most=4)
        for m in ms:
          for d in ("fwd", "bwd"):
            a = jax.random.normal(key, (m, k if d == "fwd" else n), jnp.bfloat16)
            tb = kb.bench(kb.forward if d == "fwd" else kb.backward, a, w_copies, 3, 3)
            to = kb.bench(op(before, impl, d), a, qs, 3, 3)
            tn = kb.bench(op(current, impl, d), a, qs, 3, 3)
            rows.append((shape, prec, m, d, tb, to, tn))
            print(
              f"{shape} {prec} M={m} {d}: bf16 {tb * 1e6:.1f} before {to * 1e6:.1f} "
              f"now {tn * 1e6:.1f} us",
              flush=True,
            )
  print(
    f"\n| K x N | bits | M | pass | bf16 µs | {args.before} µs | now µs | before / bf16 "
    "| now / bf16 |\n|---|---|---|---|---|---|---|---|---|"
  )
  for shape, prec, m, d, tb, to, tn in rows:
    print(
      f"| {shape} | {prec} | {m} | {d} | {tb * 1e6:.1f} | {to * 1e6:.1f} | {tn * 1e6:.1f} "
      f"| {to / tb:.2f}x | {tn / tb:.2f}x |"
    )


if __name__ == "__main__":
  main()
