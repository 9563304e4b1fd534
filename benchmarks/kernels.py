"""Speed of `quantized_matmul` on the GPU against bf16 `jnp.dot` and plain XLA dequant + dot.

For each weight shape [K, N], precision and M: forward y = x @ W and backward dX = dY @ W^T,
timed side by side in one process: bf16 `jnp.dot` on the dequantized weight, the `xla` backend
(unpack + table lookup + dot, all XLA) and the Pallas kernels (`auto`: the Triton kernels below
DENSE_FROM_M rows, dequantize + dot above). Weights rotate over enough copies to exceed the L2
cache. Also: packed bytes / time against the measured device copy bandwidth.

    python benchmarks/kernels.py                                   # full table (H200: ~10 min)
    python benchmarks/kernels.py --shapes 4096x11008 --ms 16,4096 --precisions 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lowra_jax import quantize
from pallas_kernels import quantized_matmul

L2_BYTES = 60 * 2**20
PRECISIONS = {
  "1": dict(method="lloyd", bits=1),
  "2": dict(method="lloyd", bits=2),
  "4": dict(method="lloyd", bits=4),
  "mix1.5": dict(method="lowra", budget=1.5),
  "mix2.0": dict(method="lowra", budget=2.0),
}


def bench(fn, x, iters: int = 10, reps: int = 5) -> float:
  """Median seconds per call of fn(x), chained in one jitted loop (no dispatch gaps).

  Each iteration's input depends on the previous result and the whole output is consumed, so
  XLA can neither hoist the call out of the loop nor shrink it to the elements read.
  """

  def body(_, carry):
    out = fn(x + (carry * 0).astype(x.dtype))
    return carry + jnp.sum(out.astype(jnp.float32))

  loop = jax.jit(lambda: jax.lax.fori_loop(0, iters, body, jnp.float32(0)))
  jax.block_until_ready(loop())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(loop())
    times.append((time.perf_counter() - t0) / iters)
  return statistics.median(times)


def copy_bandwidth(iters: int = 20) -> float:
  """Bytes read + written per second by a large device copy (x <- x * c, 1 GiB)."""
  loop = jax.jit(lambda x: jax.lax.fori_loop(0, iters, lambda _, a: a * 1.0001, x))
  x = jnp.ones((2**28,), jnp.float32)
  jax.block_until_ready(loop(x))
  t0 = time.perf_counter()
  jax.block_until_ready(loop(x))
  return 2 * x.nbytes * iters / (time.perf_counter() - t0)


def packed_bytes(qt) -> int:
  return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(qt))


def rotate(make, nbytes: int, most: int = 8):
  """Copies of an operand (2 to `most`) that together exceed twice the L2 cache where possible."""
  return [make(i) for i in range(min(most, max(2, -(-2 * L2_BYTES // max(nbytes, 1)))))]


def sweep():
  """Forward/backward kernel time for several tile settings (pick `tiles_for` from this)."""
  import dataclasses
  from pallas_kernels import lut_matmul as lm
  from pallas_kernels import quantized_ops as qmm

  k, n, m = 4096, 11008, 16
  w = (0.02 * jax.random.t(jax.random.key(0), 5.0, (k, n))).astype(jnp.bfloat16)
  b = quantize.quantize_tensor(w, quantize.QuantConfig(method="lloyd", bits=2)).buckets[0]
  ops = qmm._bucket_operands(b)
  x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
  g = jax.random.normal(jax.random.key(2), (m, n), jnp.bfloat16)
  base = qmm.tiles_for(m, ops[0].shape[0], n, backward=False)
  print(f"default forward tiles: {base}")
  for bn, bk, warps, stages, splits in [
    (64, 64, 4, 3, None),
    (64, 64, 2, 3, None),
    (128, 64, 4, 3, None),
    (128, 64, 8, 3, None),
    (32, 64, 2, 3, None),
    (64, 32, 4, 4, None),
    (128, 32, 4, 4, None),
    (64, 64, 4, 3, 1),
    (64, 64, 4, 3, 8),
    (256, 64, 8, 3, None),
  ]:
    for backward in (False, True):
      t = qmm.tiles_for(m, ops[0].shape[0], n, backward)
      t = dataclasses.replace(
        t, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, splits=splits or t.splits
      )
      if backward:
        sec = bench(lambda a: lm.lut_matmul_t(a, *ops, bits=2, group=64, tiles=t).sum(0), g)
      else:
        sec = bench(lambda a: lm.lut_matmul(a, *ops, bits=2, group=64, tiles=t).sum(0), x)
      print(
        f"{'bwd' if backward else 'fwd'} bn={bn} bk={bk} warps={warps} stages={stages} "
        f"splits={t.splits}: {sec * 1e6:.1f} us",
        flush=True,
      )
  t_ref = bench(lambda a: b.dequantize(64).astype(jnp.bfloat16) + a[0, 0], x)
  print(f"XLA dequantize 4096x11008 2-bit -> bf16: {t_ref * 1e6:.1f} us")
  for bn, bk, warps in [(64, 64, 4), (128, 64, 4), (256, 64, 8), (128, 32, 4), (64, 16, 2)]:
    t = lm.Tiles(block_n=bn, block_k=bk, num_warps=warps, num_stages=1)
    t_dq = bench(lambda a: lm.lut_dequantize(*ops, bits=2, group=64, tiles=t) + a[0, 0], x)
    print(
      f"lut_dequantize bn={bn} bk={bk} warps={warps}: {t_dq * 1e6:.1f} us "
      f"(writes {k * n * 2 / t_dq / 1e12:.2f} TB/s)",
      flush=True,
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096,8192x28672")
  parser.add_argument("--ms", default="1,16,64,512,4096,8192")
  parser.add_argument("--precisions", default=",".join(PRECISIONS))
  parser.add_argument("--no-backward", action="store_true")
  parser.add_argument(
    "--sweep",
    action="store_true",
    help="time lut_matmul tile settings on 4096x11008, 2 bits, M=16, then exit",
  )
  args = parser.parse_args()
  if args.sweep:
    return sweep()
  bw = copy_bandwidth()
  print(
    f"{jax.devices()[0].device_kind}, jax {jax.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s"
  )
  rows = []
  for shape in args.shapes.split(","):
    k, n = (int(s) for s in shape.split("x"))
    key = jax.random.key(k * 7 + n)
    w = (0.02 * jax.random.t(key, 5.0, (k, n))).astype(jnp.bfloat16)
    w_copies = rotate(lambda i: w + jnp.bfloat16(i * 1e-3), w.nbytes)
    for prec in args.precisions.split(","):
      qt = quantize.quantize_tensor(w, quantize.QuantConfig(**PRECISIONS[prec]))
      nbytes = packed_bytes(qt)
      q_copies = rotate(
        lambda i: jax.tree_util.tree_map(
          lambda a: a + 0 if jnp.issubdtype(a.dtype, jnp.integer) else a * (1 + i * 1e-3), qt
        ),
        nbytes,
      )
      for m in (int(s) for s in args.ms.split(",")):
        x = jax.random.normal(key, (m, k), jnp.bfloat16)
        g = jax.random.normal(key, (m, n), jnp.bfloat16)
        dirs = [
          (
            "fwd",
            x,
            lambda a, b: jnp.dot(a, b),
            lambda a, q, be: quantized_matmul(a, q, backend=be),
          )
        ]
        if not args.no_backward:
          dirs.append(
            (
              "bwd",
              g,
              lambda a, b: jnp.dot(a, b.T),
              lambda a, q, be: jax.vjp(
                lambda z: quantized_matmul(z, q, backend=be), jnp.zeros((a.shape[0], k), a.dtype)
              )[1](a)[0],
            )
          )
        for direction, inp, dense, ours in dirs:
          t_bf16 = bench(lambda a: sum(dense(a, c) for c in w_copies), inp) / len(w_copies)
          t_xla = bench(lambda a: sum(ours(a, q, "xla") for q in q_copies), inp) / len(q_copies)
          t_ours = bench(lambda a: sum(ours(a, q, "auto") for q in q_copies), inp) / len(q_copies)
          rows.append((shape, prec, m, direction, t_bf16, t_xla, t_ours, nbytes / t_ours / bw))
          r = rows[-1]
          print(
            f"{shape:>11s} {prec:>6s} M={m:<5d} {direction}  bf16 {r[4] * 1e6:8.1f} us  "
            f"xla {r[5] * 1e6:8.1f} us  ours {r[6] * 1e6:8.1f} us  x{r[4] / r[6]:5.2f} vs bf16  "
            f"{100 * r[7]:5.1f}% of copy bw",
            flush=True,
          )
  print(
    "\n| K x N | bits | M | pass | bf16 dot (us) | XLA dequant+dot (us) | ours (us) | "
    "speed-up vs bf16 | packed bytes/time vs copy bw |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for shape, prec, m, d, tb, tx, to, frac in rows:
    print(
      f"| {shape} | {prec} | {m} | {d} | {tb * 1e6:.1f} | {tx * 1e6:.1f} | {to * 1e6:.1f} | "
      f"{tb / to:.2f}x | {100 * frac:.0f}% |"
    )


if __name__ == "__main__":
  main()
