"""The word-layout GEMV (`pallas_kernels.word_gemv`) against bf16 `jnp.dot` and the plane kernels,
at decode sizes, on the GPU; its results checked against float64.

    python benchmarks/word_gemv.py --ms 1,4                # the grid, the Tuning's tiles
    python benchmarks/word_gemv.py --ms 8,16,64            # M > 4: the tensor-core `word_mma`
    python benchmarks/word_gemv.py --sweep                 # tile settings on 4096x11008, M = 1
    python benchmarks/word_gemv.py --tiles JSON            # given tiles, e.g.
        '[{"block_n": 128, "block_g": 4, "warps": 4, "per_sm": 16}]'
    python benchmarks/word_gemv.py --trace --ms 1          # kernel µs from a profiler trace
    python benchmarks/word_gemv.py --trace --tiles JSON    # ... also of further tile settings

A grid row: µs per call (median of chained calls over L2-cold copies, `kernels.bench`) of bf16,
of `quantized_matmul` on the stored planes and of `quantized_matmul` on the word layout (the
GEMV, its activation conversion and split sum), speed-ups, the word tensor's bytes / time against
the copy bandwidth measured in the same process, and the GEMV's max error against float64
relative to |x| @ |W|. `--trace` lists the kernels of one call of each and of the GEMV with
parts left out (`ABLATIONS`: probes of what bounds it).
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
from pallas_kernels import quantized_ops
from pallas_kernels import word_gemv as wg
from pallas_kernels import word_mma as wm

SHAPES = ("4096x4096", "4096x11008", "11008x4096", "8192x28672")


def gemv(x, wq, tiles):
  """x @ W of a word-layout tensor through one `word_gemv` launch (`word_mma` for `MmaTiles`),
  partial sums added."""
  interpret = jax.default_backend() != "gpu"  # a CPU smoke run
  kernel = wm.word_mma if isinstance(tiles, wm.MmaTiles) else wg.word_gemv
  out = kernel(
    x, wq.buckets, group=wq.group_size, tiles=tiles, columns=wq.perm, interpret=interpret
  )
  return out[0] if out.shape[0] == 1 else out.sum(axis=0)


def tiles_for(wq, cfg: dict | None, m: int = 1):
  """The Tuning's tiles for m rows (`word_gemv`'s up to 4, `quantized_ops.gemv_tiles`; then
  `word_mma`'s, `quantized_ops.mma_tiles`), or `cfg`'s: block_n, block_g (unused above 4 rows),
  warps, per_sm (the programs per SM that set the splits), optionally stages (default 1)."""
  if cfg is None:
    return quantized_ops.gemv_tiles(wq) if m <= wg.MAX_ROWS else quantized_ops.mma_tiles(wq, m)
  sms = getattr(jax.devices()[0], "core_count", 132) or 132
  groups = wq.buckets[0].words.shape[0]
  blocks = sum(-(-b.num_channels // cfg["block_n"]) for b in wq.buckets)
  steps = groups // (cfg["block_g"] if m <= wg.MAX_ROWS else 1)
  splits = max(1, min(steps, round(cfg["per_sm"] * sms / blocks)))
  if m > wg.MAX_ROWS:
    return wm.MmaTiles(block_n=cfg["block_n"], splits=splits, num_warps=cfg["warps"],
                       num_stages=cfg.get("stages", 1))
  return wg.GemvTiles(
    block_g=cfg["block_g"], block_n=cfg["block_n"], splits=splits, num_warps=cfg["warps"],
    num_stages=cfg.get("stages", 1),
  )


def setup(shape: str, prec: str):
  """(bf16 weight, plane copies, word-layout copies), the copies L2-cold in turn."""
  k, n = dims(shape)
  w = (0.02 * jax.random.t(jax.random.key(k * 7 + n), 5.0, (k, n))).astype(jnp.bfloat16)
  qs = quantized_copies(quantize.quantize_tensor(w, quantize.QuantConfig(**PRECISIONS[prec])))
  return w, qs, [quantize.to_word_layout(q) for q in qs]


def error(wq, tiles, m: int) -> float:
  """max |gemv - float64| / (|x| @ |W|) for a random x [m, K]."""
  x = jax.random.normal(jax.random.key(3), (m, wq.shape[0]), jnp.bfloat16)
  xd = np.asarray(x, np.float64)
  wd = np.asarray(quantize.dequantize(wq, jnp.float32), np.float64)
  got = np.asarray(gemv(x, wq, tiles), np.float64)
  return float((np.abs(got - xd @ wd) / (np.abs(xd) @ np.abs(wd))).max())


def run(shapes, precs, ms, configs, bw) -> None:
  for shape, prec in itertools.product(shapes, precs):
    w, qs, wqs = setup(shape, prec)
    w_copies = rotate(lambda i: w + jnp.bfloat16(i * 1e-3), w.nbytes)
    nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(wqs[0]))
    for m in ms:
      x = jax.random.normal(jax.random.key(1), (m, w.shape[0]), jnp.bfloat16)
      t_bf16 = bench(forward, x, w_copies)
      t_planes = bench(functools.partial(forward, backend="auto"), x, qs)
      for cfg in configs:
        tiles = tiles_for(wqs[0], cfg, m)
        if wqs[0].buckets[0].words.shape[0] % getattr(tiles, "block_g", 1):
          continue
        err = error(wqs[0], tiles, m)
        t = bench(lambda a, wq, t=tiles: gemv(a, wq, t), x, wqs)
        print(
          f"{shape:>11s} {prec:>6s} M={m} {json.dumps(cfg or 'tuned')} splits={tiles.splits}  "
          f"bf16 {t_bf16 * 1e6:7.1f}  planes {t_planes * 1e6:7.1f}  words {t * 1e6:7.1f} us  "
          f"x{t_bf16 / t:5.2f} bf16  x{t_planes / t:5.2f} planes  "
          f"{100 * nbytes / t / bw:5.1f}% bw  err {err:.1e}",
          flush=True,
        )


def _loads_only(word, levels, xs, bits, interpret):
  return [word.astype(jnp.float32)] * (len(xs) // len(wg.PAIR_BITS[wg.field_bits(bits)]))


def _plain_loads(view, n_ok, volatile):
  return wg.plgpu.load(view) if n_ok is None else wg.plgpu.load(view, mask=n_ok, other=0)


ABLATIONS = {  # word_gemv functions replaced: what is left of the kernel's time
  "words": {},
  "plain loads": {"_stream": _plain_loads},  # not volatile: the assembler may sink each word load
  # the word as its pairs: no selector, no prmt
  "no lookup": {"lookup_pairs": lambda word, *a: [word, word]},
  "loads only": {"word_dots": _loads_only},  # words and scales loaded, nothing computed
}


def trace(shapes, precs, ms, configs) -> None:
  """Kernel µs of one call from a profiler trace (copies in turn), on the planes and on words:
  whole and with parts left out (`ABLATIONS`) at the first tile setting, whole at the others."""
  from trace_kernels import check_gpu, grouped, kernels_of

  check_gpu("--trace")
  for shape, prec, m in itertools.product(shapes, precs, ms):
    w, qs, wqs = setup(shape, prec)
    x = jax.random.normal(jax.random.key(1), (m, w.shape[0]), jnp.bfloat16)
    turn = itertools.count()

    def report(label, fns):
      fn = jax.jit(lambda a, i: jax.lax.switch(i, fns, a))
      rows = grouped(kernels_of(fn, lambda: (x, next(turn) % len(fns)), calls=len(fns)))
      kernels = ", ".join(f"{r['kernel'][:28]} {r['us']:.1f}" for r in rows)
      print(f"{shape:>11s} {prec:>6s} M={m} {label:>10s}: {kernels}", flush=True)

    report("planes", [functools.partial(forward, w_or_qt=q, backend="auto") for q in qs])
    tiles = tiles_for(wqs[0], configs[0], m)
    if m > wg.MAX_ROWS:  # word_mma: whole only
      report("mma", [functools.partial(gemv, wq=wq, tiles=tiles) for wq in wqs])
      continue
    for name, patch in ABLATIONS.items():
      saved = {k: getattr(wg, k) for k in patch}
      try:
        for k, v in patch.items():
          setattr(wg, k, v)
        report(name, [functools.partial(gemv, wq=wq, tiles=tiles) for wq in wqs])
      finally:
        for k, v in saved.items():
          setattr(wg, k, v)
    for cfg in configs[1:]:
      tiles = tiles_for(wqs[0], cfg, m)
      label = f"{json.dumps(cfg)} splits={tiles.splits}"
      report(label, [functools.partial(gemv, wq=wq, tiles=tiles) for wq in wqs])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sweep", action="store_true", help="tile settings on 4096x11008, 2 bits")
  p.add_argument("--trace", action="store_true", help="kernel µs from a trace, with ablations")
  p.add_argument("--shapes", default=",".join(SHAPES))
  p.add_argument("--precisions", default="2,mix1.5")
  p.add_argument("--ms", default="1")
  p.add_argument("--tiles", default="", help="JSON list of tile settings (default: the Tuning's)")
  args = p.parse_args()
  shapes, precs = args.shapes.split(","), args.precisions.split(",")
  ms = [int(m) for m in args.ms.split(",")]
  configs = json.loads(args.tiles) if args.tiles else [None]
  if args.trace:
    trace(shapes, precs, ms, configs)
    return
  bw = copy_bandwidth()
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; copy {bw / 1e12:.2f} TB/s")
  if args.sweep:
    configs = [
      dict(block_n=bn, block_g=bg, warps=nw, per_sm=ps)
      for bn, bg, nw, ps in itertools.product((64, 128, 256), (1, 4, 8), (2, 4, 8), (4, 16))
    ]
    shapes, precs, ms = ["4096x11008"], ["2"], [1]
  run(shapes, precs, ms, configs, bw)


if __name__ == "__main__":
  main()
