"""Speed of `quantized_matmul` on the GPU against bf16 `jnp.dot` and plain XLA dequant + dot.

For each weight shape [K, N], precision and M: forward y = x @ W and backward dX = dY @ W^T,
timed side by side in one process: bf16 `jnp.dot` on the dequantized weight, the `xla` backend
(unpack + table lookup + dot, all XLA) and the Pallas kernels (`auto`: the Triton kernels below
DENSE_FROM_M rows, dequantize + dot above). Weights rotate over enough copies to exceed the L2
cache. Also: packed bytes / time against the measured device copy bandwidth.

    python benchmarks/kernels.py                                   # full table (H200: ~20 min)
    python benchmarks/kernels.py --shapes 4096x11008               # one shape: ~5 min
    python benchmarks/kernels.py --shapes 4096x11008 --ms 16,4096 --precisions 2

Most of the time is compilation (one jitted loop per row and backend), so split a run that must
fit a time limit by shape.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

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


def bench(fn, x, operands, iters: int = 10, reps: int = 5) -> float:
  """Median seconds per call of fn(x, op), rotating over `operands`, chained in one jitted loop.

  Each iteration's input depends on the previous result and every output is consumed, so XLA can
  neither hoist the calls out of the loop nor shrink them to the elements read. Operands are
  arguments of the jitted loop (not embedded constants).
  """

  def body(_, carry, ops):
    a = x + (carry * 0).astype(x.dtype)
    return carry + sum(jnp.sum(fn(a, op).astype(jnp.float32)) for op in ops)

  loop = jax.jit(lambda ops: jax.lax.fori_loop(0, iters, lambda i, c: body(i, c, ops), 0.0))
  jax.block_until_ready(loop(operands))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(operands))
    times.append((time.perf_counter() - t0) / iters / len(operands))
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
  """Copies of an operand (1 to `most`) that together exceed twice the L2 cache where possible."""
  return [make(i) for i in range(min(most, max(1, -(-2 * L2_BYTES // max(nbytes, 1)))))]


def quantized_copies(qt, most: int = 8):
  """`rotate`d copies of a QuantizedTensor in distinct buffers (floats scaled by 1 + i * 1e-3)."""
  return rotate(
    lambda i: jax.tree_util.tree_map(
      lambda a: a + 0 if jnp.issubdtype(a.dtype, jnp.integer) else a * (1 + i * 1e-3), qt
    ),
    packed_bytes(qt),
    most,
  )


def forward(a, w_or_qt, backend=None):
  """y = a @ W: bf16 `jnp.dot` on a dense W, else `quantized_matmul` with `backend`."""
  if backend is None:
    return jnp.dot(a, w_or_qt)
  return quantized_matmul(a, w_or_qt, backend=backend)


def backward(a, w_or_qt, backend=None):
  """dX = a @ W^T, through the VJP of `quantized_matmul` for a quantized W."""
  if backend is None:
    return jnp.dot(a, w_or_qt.T)
  k = w_or_qt.shape[0]
  x = jnp.zeros((a.shape[0], k), a.dtype)
  return jax.vjp(lambda z: quantized_matmul(z, w_or_qt, backend=backend), x)[1](a)[0]


def sweep():
  """Kernel-only times of tile settings on 4096x11008, 2 bits, M = 16 (pick `tiles_for` here)."""
  import dataclasses

  from pallas_kernels import lut_matmul as lm
  from pallas_kernels import quantized_ops as qmm

  k, n, m = 4096, 11008, 16
  w = (0.02 * jax.random.t(jax.random.key(0), 5.0, (k, n))).astype(jnp.bfloat16)
  qt = quantize.quantize_tensor(w, quantize.QuantConfig(method="lloyd", bits=2))
  copies = rotate(lambda i: jax.tree_util.tree_map(lambda a: a + 0, qt), packed_bytes(qt))
  ops = [q.buckets[0] for q in copies]  # distinct buffers: no L2 reuse
  kp = ops[0].planes[0].shape[0]
  for backward_pass, inp in ((False, (m, k)), (True, (m, n))):
    a = jax.random.normal(jax.random.key(1), inp, jnp.bfloat16)
    base = qmm.tiles_for(m, kp, n, 64, backward_pass)
    print(f"default {'bwd' if backward_pass else 'fwd'} tiles: {base}")
    for kw in (
      {},
      {"narrow": backward_pass},
      {"block_n": 32},
      {"block_n": 128},
      {"block_k": 32},
      {"num_warps": 8},
      {"num_stages": 2},
      {"num_stages": 4},
      {"splits": 1},
      {"splits": 2 * base.splits},
    ):
      t = dataclasses.replace(base, **kw)
      call = lm.lut_matmul_t if backward_pass else lm.lut_matmul
      sec = bench(lambda z, op: call(z, op, group=64, tiles=t).sum(0), a, ops)
      print(
        f"{'bwd' if backward_pass else 'fwd'} {kw or 'default'}: {sec * 1e6:.1f} us", flush=True
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
    f"{jax.devices()[0].device_kind}, jax {jax.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s",
    flush=True,
  )
  rows = []
  for shape in args.shapes.split(","):
    k, n = (int(s) for s in shape.split("x"))
    key = jax.random.key(k * 7 + n)
    w = (0.02 * jax.random.t(key, 5.0, (k, n))).astype(jnp.bfloat16)
    w_copies = rotate(lambda i: w + jnp.bfloat16(i * 1e-3), w.nbytes)
    q_copies = {}
    for prec in args.precisions.split(","):
      qt = quantize.quantize_tensor(w, quantize.QuantConfig(**PRECISIONS[prec]))
      q_copies[prec] = quantized_copies(qt)
    for m in (int(s) for s in args.ms.split(",")):
      iters, reps = (10, 5) if m <= 512 else (3, 3)
      for direction, op in (("fwd", forward), ("bwd", backward))[: 1 if args.no_backward else 2]:
        a = jax.random.normal(key, (m, k if direction == "fwd" else n), jnp.bfloat16)
        t_bf16 = bench(op, a, w_copies, iters, reps)
        for prec, qs in q_copies.items():
          t_xla = bench(functools.partial(op, backend="xla"), a, qs, iters, reps)
          t_ours = bench(functools.partial(op, backend="auto"), a, qs, iters, reps)
          frac = packed_bytes(qs[0]) / t_ours / bw
          rows.append((shape, prec, m, direction, t_bf16, t_xla, t_ours, frac))
          print(
            f"{shape:>11s} {prec:>6s} M={m:<5d} {direction}  bf16 {t_bf16 * 1e6:8.1f} us  "
            f"xla {t_xla * 1e6:8.1f} us  ours {t_ours * 1e6:8.1f} us  "
            f"x{t_bf16 / t_ours:5.2f} vs bf16  {100 * frac:5.1f}% of copy bw",
            flush=True,
          )
  print_table(rows)


def print_table(rows):
  """The markdown table, then forward + backward against bf16 per (shape, bits, M)."""
  print(
    "\n| K x N | bits | M | pass | bf16 dot (µs) | XLA dequant+dot (µs) | ours (µs) | "
    "speed-up vs bf16 | packed bytes/time vs copy bw |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for shape, prec, m, d, tb, tx, to, frac in rows:
    print(
      f"| {shape} | {prec} | {m} | {d} | {tb * 1e6:.1f} | {tx * 1e6:.1f} | {to * 1e6:.1f} | "
      f"{tb / to:.2f}x | {100 * frac:.0f}% |"
    )
  both = {}
  for shape, prec, m, _, tb, _, to, _ in rows:
    both.setdefault((shape, prec, m), []).append((tb, to))
  print("\n| K x N | bits | M | fwd+bwd ours / bf16 |\n|---|---|---|---|")
  for (shape, prec, m), t in both.items():
    if len(t) == 2:
      print(f"| {shape} | {prec} | {m} | {sum(o for _, o in t) / sum(b for b, _ in t):.2f}x |")


if __name__ == "__main__":
  main()
