"""Probe: the decode GEMV (`lut_gemv`) on the GPU -- correctness against XLA's dequantize + dot,
then kernel + split-sum times of tile settings against bf16 `jnp.dot` and today's decode path.

    python benchmarks/gemv_sweep.py [--shapes 4096x11008] [--m 1]
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import bench, copy_bandwidth, dims, forward, quantized_copies, rotate
from lowra_jax import quantize
from pallas_kernels import lut_gemv as lg
from pallas_kernels import quantized_matmul_reference


def qtensors(k, n):
  key = jax.random.key(k * 7 + n)
  w = (0.02 * jax.random.t(key, 5.0, (k, n))).astype(jnp.bfloat16)
  out = {
    "2": quantize.quantize_tensor(w, quantize.QuantConfig(method="lloyd", bits=2)),
    "mix1.5": quantize.quantize_tensor(w, quantize.QuantConfig(budget=1.5, precisions=(1, 2))),
  }
  return w, out


def gemv(x, qt, tiles):
  xp = jnp.pad(x, ((0, 0), (0, qt.buckets[0].planes[0].shape[0] * 8 // qt.buckets[0].bits - x.shape[1])))
  part = lg.lut_gemv(xp, qt.buckets, group=qt.group_size, tiles=tiles, columns=qt.perm)
  return part.sum(0).astype(x.dtype)


def chunk_for(kp, splits, unroll):
  """The largest chunk (dividing gcd(Kp, 64), a multiple of 4 * unroll) giving >= splits chunks."""
  g = lg.chunk_rows(kp, 64)
  for d in range(g, 0, -4 * unroll):
    if g % d == 0 and d % (4 * unroll) == 0 and kp // d >= splits:
      return d
  return 4 * unroll


def splits_for(qt):
  """Splits giving ~8 one-warp programs per SM."""
  blocks = sum(-(-b.num_channels // 128) for b in qt.buckets)
  return max(1, min(64, -(-8 * 132 // blocks)))


def check():
  for k, n, m, dtype in [(4096, 4096, 1, jnp.bfloat16), (11008, 1024, 4, jnp.bfloat16), (4096, 2048, 2, jnp.float16)]:
    _, qts = qtensors(k, n)
    x = jax.random.normal(jax.random.key(3), (m, k), dtype)
    for name, qt in qts.items():
      ref = np.asarray(quantized_matmul_reference(x.astype(jnp.float32), qt), np.float64)
      got = np.asarray(gemv(x, qt, lg.GemvTiles(quads=64, splits=3, num_warps=2)).astype(jnp.float32), np.float64)
      xq = np.asarray(x.astype(jnp.float32), np.float64)
      err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
      print(f"check {k}x{n} M={m} {jnp.dtype(dtype).name} {name}: rel err {err:.2e}", flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096,8192x28672")
  parser.add_argument("--m", type=int, default=1)
  parser.add_argument("--full", default="4096x11008", help="shape swept over every setting")
  parser.add_argument("--no-check", action="store_true")
  parser.add_argument("--quick", action="store_true", help="one setting per shape and precision")
  args = parser.parse_args()
  print(jax.devices()[0].device_kind, jax.__version__)
  if not args.no_check:
    check()
  bw = copy_bandwidth()
  print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
  table = []
  for shape in args.shapes.split(","):
    k, n = dims(shape)
    w, qts = qtensors(k, n)
    x = jax.random.normal(jax.random.key(1), (args.m, k), jnp.bfloat16)
    t_bf16 = bench(forward, x, rotate(lambda i: w + jnp.bfloat16(i * 1e-3), w.nbytes))
    for name, qt in qts.items():
      ops = quantized_copies(qt)
      t_now = bench(lambda a, q: forward(a, q, "auto"), x, ops)
      nbytes = sum(b.planes[0].size for b in qt.buckets)
      kp = qt.buckets[-1].planes[0].shape[0]
      if args.quick:
        grid = [(1, splits_for(qt), 2)]
      elif shape == args.full and name == "2":
        grid = itertools.product((1, 2, 4), (8, 16, 32), (1, 2, 4))
      else:
        grid = itertools.product((1, 2), (splits_for(qt),), (2, 4))
      settings = [
        lg.GemvTiles(quads=32 * wp, splits=sp, num_warps=wp, unroll=u, chunk=chunk_for(kp, sp, u))
        for wp, sp, u in grid
      ]
      best = None
      for t in settings:
        try:
          sec = bench(lambda a, q: gemv(a, q, t), x, ops, iters=10, reps=3)
        except Exception as e:  # noqa: BLE001  (a probe: report and go on)
          print(f"{shape} {name} {t}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
          continue
        print(f"{shape} {name} {t}: {sec * 1e6:.1f} us", flush=True)
        if best is None or sec < best[0]:
          best = (sec, t)
      table.append((shape, name, t_bf16, t_now, best, nbytes))
  print("\nshape        bits    bf16 us  now us  gemv us  vs bf16  vs now  %copy  best tiles")
  for shape, name, tb, tn, (tg, t), nbytes in table:
    print(f"{shape:12s} {name:6s} {tb*1e6:8.1f} {tn*1e6:7.1f} {tg*1e6:8.1f} {tb/tg:7.2f}x {tn/tg:6.2f}x {100*nbytes/tg/bw:5.1f}  {t}")


if __name__ == "__main__":
  main()
