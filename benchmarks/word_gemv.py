"""Speed of the word-layout GEMV (`pallas_kernels.word_gemv`) against bf16 `jnp.dot` and today's
`quantized_matmul`, at decode sizes, on the GPU. Also checks its results against float64.

    python benchmarks/word_gemv.py --sweep                 # tile settings on 4096x11008, M = 1
    python benchmarks/word_gemv.py --ms 1,4 --tiles JSON   # the grid with given tiles

Per row: µs of bf16, of `quantized_matmul` (auto) and of the GEMV (kernel + split sum), the
GEMV's speed-up over bf16 and its packed bytes / time as a fraction of the copy bandwidth
measured in the same process.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
from kernels import PRECISIONS, bench, copy_bandwidth, dims, forward, quantized_copies, rotate

from lowra_jax import quantize
from pallas_kernels import word_gemv as wg

SHAPES = ("4096x4096", "4096x11008", "11008x4096", "8192x28672")


def gemv(x, qt, words, tiles):
  """x @ W through `word_gemv` (one launch, channel order), partial sums added."""
  interpret = jax.default_backend() != "gpu"  # a CPU smoke run
  out = wg.word_gemv(
    x, words, group=qt.group_size, tiles=tiles, columns=qt.perm, interpret=interpret
  )
  return out[0] if out.shape[0] == 1 else out.sum(axis=0)


def tiles_for(groups: int, channels: int, block_n: int, block_g: int, warps: int, per_sm: float):
  """`GemvTiles` with splits giving about `per_sm` programs per SM."""
  sms = getattr(jax.devices()[0], "core_count", 132) or 132
  blocks = -(-channels // block_n)
  steps = groups // block_g
  splits = max(1, min(steps, round(per_sm * sms / blocks)))
  return wg.GemvTiles(block_g=block_g, block_n=block_n, splits=splits, num_warps=warps)


def setup(shape: str, prec: str):
  k, n = dims(shape)
  w = (0.02 * jax.random.t(jax.random.key(k * 7 + n), 5.0, (k, n))).astype(jnp.bfloat16)
  qt = quantize.quantize_tensor(w, quantize.QuantConfig(**PRECISIONS[prec]))
  return w, quantized_copies(qt)


def reference(qt, m: int):
  """(x, x @ W in float64, |x| @ |W|) for a random x [m, K]."""
  x = jax.random.normal(jax.random.key(3), (m, qt.shape[0]), jnp.bfloat16)
  xd = np.asarray(x, np.float64)
  wd = np.asarray(quantize.dequantize(qt, jnp.float32), np.float64)
  return x, xd @ wd, np.abs(xd) @ np.abs(wd)


def check(qt, words, tiles, ref) -> float:
  """max |gemv - float64| / sum |terms| over the outputs."""
  x, want, terms = ref
  got = np.asarray(gemv(x, qt, words, tiles), np.float64)
  return float((np.abs(got - want) / terms).max())


def run(shapes, precs, ms, configs, bw):
  for shape, prec in itertools.product(shapes, precs):
    w, qs = setup(shape, prec)
    k = w.shape[0]
    w_copies = rotate(lambda i: w + jnp.bfloat16(i * 1e-3), w.nbytes)
    words = [
      list(quantize.to_word_layout(q).buckets) for q in qs
    ]  # converted once
    ops = list(zip(qs, words))
    nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(words[0]))
    nbytes += 0 if qs[0].perm is None else qs[0].perm.size * qs[0].perm.dtype.itemsize
    groups = qs[0].buckets[0].scales.dequantize().shape[0]
    for m in ms:
      x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
      t_bf16 = bench(forward, x, w_copies)
      t_ours = bench(functools.partial(forward, backend="auto"), x, qs)
      ref = reference(qs[0], m)
      for cfg in configs:
        tiles = tiles_for(groups, qs[0].shape[1], **cfg)
        if groups % tiles.block_g:
          continue
        err = check(qs[0], words[0], tiles, ref)
        t = bench(lambda a, op, t=tiles: gemv(a, op[0], op[1], t), x, ops)
        print(
          f"{shape:>11s} {prec:>6s} M={m} {json.dumps(cfg)} splits={tiles.splits}  "
          f"bf16 {t_bf16 * 1e6:7.1f}  today {t_ours * 1e6:7.1f}  gemv {t * 1e6:7.1f} us  "
          f"x{t_bf16 / t:5.2f} bf16  x{t_ours / t:5.2f} today  "
          f"{100 * nbytes / t / bw:5.1f}% bw  err {err:.1e}",
          flush=True,
        )


ABLATIONS = {
  "full": {},
  "no lookup": {"_lookup_pair": lambda word, *a: word},  # v = the word: no selector, no prmt
  "loads only": {"word_dots": lambda word, levels, xs, *a: [word.astype(jnp.float32)] * (
    len(xs) // len(wg.PAIR_BITS[a[0]]))},  # words and scales loaded, nothing computed
}


def trace(shapes, precs, tiles_cfg) -> None:
  """Kernel µs per call from a profiler trace (L2-cold copies in turn), today's op and the GEMV
  with parts left out (`ABLATIONS`, monkeypatched: probes of what bounds the kernel)."""
  from trace_kernels import grouped, kernels_of

  for shape, prec in itertools.product(shapes, precs):
    w, qs = setup(shape, prec)
    words = [list(quantize.to_word_layout(q).buckets) for q in qs]
    groups = qs[0].buckets[0].scales.dequantize().shape[0]
    tiles = tiles_for(groups, qs[0].shape[1], **tiles_cfg)
    x = jax.random.normal(jax.random.key(1), (1, w.shape[0]), jnp.bfloat16)
    turn = itertools.count()

    def report(label, fn):
      make = lambda: (x, next(turn) % len(qs))  # noqa: E731
      rows = grouped(kernels_of(lambda a, i: fn(a, i), make, calls=len(qs)))
      print(f"{shape:>11s} {prec:>6s} {label:>12s}: " + ", ".join(
        f"{r['kernel'][:28]} {r['us']:.1f}" for r in rows), flush=True)

    report("today", jax.jit(lambda a, i: jax.lax.switch(
      i, [functools.partial(forward, w_or_qt=q, backend="auto") for q in qs], a)))
    for name, patch in ABLATIONS.items():
      saved = {k: getattr(wg, k) for k in patch}
      for k, v in patch.items():
        setattr(wg, k, v)
      report(name, jax.jit(lambda a, i: jax.lax.switch(
        i, [functools.partial(gemv, qt=q, words=ws, tiles=tiles) for q, ws in zip(qs, words)],
        a)))
      for k, v in saved.items():
        setattr(wg, k, v)


def asm(shape: str, prec: str, tiles_cfg, out_dir: str) -> None:
  """Registers and SASS opcode counts of the GEMV kernel at M = 1 (`kernel_asm`)."""
  from kernel_asm import dump

  _, qs = setup(shape, prec)
  q = qs[0]
  words = list(quantize.to_word_layout(q).buckets)
  groups = q.buckets[0].scales.dequantize().shape[0]
  tiles = tiles_for(groups, q.shape[1], **tiles_cfg)
  x = jnp.zeros((1, q.shape[0]), jnp.bfloat16)
  for s in dump(lambda a, ws: gemv(a, q, ws, tiles), (x, words), out_dir):
    total = sum(n for _, n in s["opcodes"])
    print(f"{s['name']}: {s['registers']} registers, {total} SASS instructions; {s['ptxas']}")
    print("  " + ", ".join(f"{op} {n}" for op, n in s["opcodes"][:40]))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sweep", action="store_true")
  p.add_argument("--trace", action="store_true", help="kernel µs from a trace, with ablations")
  p.add_argument("--asm", default="", help="write PTX / SASS of the first shape's kernel here")
  p.add_argument("--shapes", default=",".join(SHAPES))
  p.add_argument("--precisions", default="2,mix1.5")
  p.add_argument("--ms", default="1")
  p.add_argument("--tiles", default='[{"block_n": 128, "block_g": 4, "warps": 4, "per_sm": 4}]')
  args = p.parse_args()
  bw = copy_bandwidth()
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; copy {bw / 1e12:.2f} TB/s")
  if args.sweep:
    configs = [
      dict(block_n=bn, block_g=bg, warps=nw, per_sm=ps)
      for bn, bg, nw, ps in itertools.product((64, 128, 256), (1, 4), (1, 2, 4), (4, 16))
      if bn * bg >= 32 * nw
    ]
    run(["4096x11008"], ["2"], [1], configs, bw)
    return
  configs = json.loads(args.tiles)
  if args.asm:
    asm(args.shapes.split(",")[0], args.precisions.split(",")[0], configs[0], args.asm)
    return
  if args.trace:
    trace(args.shapes.split(","), args.precisions.split(","), configs[0])
    return
  ms = [int(m) for m in args.ms.split(",")]
  run(args.shapes.split(","), args.precisions.split(","), ms, configs, bw)


if __name__ == "__main__":
  main()
