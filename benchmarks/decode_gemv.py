"""Decode matmuls (M <= 4) through the word-layout GEMV kernel against today's op and bf16 (GPU).

For each weight shape, precision and M: bf16 `jnp.dot`, `quantized_matmul` (the planar format's
LUT kernels, `auto`) and `gemv.gemv` over the same tensor converted to the word layout, each tile
setting of `--tiles` (best one reported), timed side by side in one process as
`benchmarks/kernels.py` times them (chained calls, weights rotated past the L2 cache). Also packed
bytes / time against the copy bandwidth measured in the same process.

    python benchmarks/decode_gemv.py --out=runs/gemv.jsonl          # H200: ~4 min
    python benchmarks/decode_gemv.py --shapes=256x512 --precisions=2 --ms=1  # CPU (interpret)

Prints one markdown table last; `--out` appends one JSON row per case.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import kernels as kb  # benchmarks/kernels.py: shapes, precisions, timing loop, copies

from lowra_jax import cli, quantize
from pallas_kernels import gemv as gv

TILES = (  # block_n, block_g, num_warps; splits chosen per case (`splits_for`)
  (64, 8, 4),
  (32, 8, 2),
  (128, 4, 4),
  (32, 16, 4),
  (64, 16, 4),
  (16, 16, 1),
)


def splits_for(blocks: int, steps: int, programs: int) -> int:
  """Reduction splits so that `blocks` channel blocks give about `programs` programs."""
  return max(1, min(steps, -(-programs // blocks)))


def case_tiles(qt, bn: int, bg: int, warps: int) -> gv.GemvTiles:
  blocks = sum(-(-b.num_channels // bn) for b in qt.buckets)
  groups = -(-qt.shape[0] // qt.group_size)
  steps = -(-groups // bg)
  sms = getattr(jax.devices()[0], "core_count", 132) or 132
  splits = splits_for(blocks, steps, 8 * sms)
  return gv.GemvTiles(block_n=bn, block_g=bg, splits=splits, num_warps=warps, num_stages=3)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=",".join(kb.SHAPES))
  parser.add_argument("--precisions", default="2,mix1.5,1,4")
  parser.add_argument("--ms", default="1,4")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  shapes, precisions, ms = kb.grid(args)
  if any(m > gv.MAX_M for m in ms):
    raise cli.UserError(f"--ms: the GEMV kernel takes at most {gv.MAX_M} rows")
  if args.out:
    cli.output_file("--out", args.out)
  impl = "triton" if jax.default_backend() == "gpu" else "interpret"
  backend = "auto" if impl == "triton" else "interpret"
  bw = kb.copy_bandwidth()
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; copy {bw / 1e12:.2f} TB/s")
  to_words = jax.jit(lambda qt: tuple(gv.words_bucket(b, qt.group_size) for b in qt.buckets))
  rows = []
  for shape in shapes:
    k, n = kb.dims(shape)
    key = jax.random.key(k * 7 + n)
    w = (0.02 * jax.random.t(key, 5.0, (k, n))).astype(jnp.bfloat16)
    w_copies = kb.rotate(lambda i: w + jnp.bfloat16(i * 1e-3), w.nbytes)
    for prec in precisions:
      qt = quantize.quantize_tensor(w, quantize.QuantConfig(**kb.PRECISIONS[prec]))
      qts = kb.quantized_copies(qt)
      pairs = [(q, to_words(q)) for q in qts]
      nbytes = kb.packed_bytes(qt)
      for m in ms:
        a = jax.random.normal(key, (m, k), jnp.bfloat16)
        t_bf16 = kb.bench(kb.forward, a, w_copies)
        t_op = kb.bench(functools.partial(kb.forward, backend=backend), a, qts)
        best = None
        for bn, bg, warps in TILES:
          tiles = case_tiles(qt, bn, bg, warps)

          def fn(x, pair, tiles=tiles):
            return gv.gemv(x, pair[0], pair[1], tiles=tiles, interpret=impl == "interpret")

          t = kb.bench(fn, a, pairs)
          print(f"  {shape} {prec} M={m} {tiles}: {t * 1e6:.1f} us", flush=True)
          if best is None or t < best[0]:
            best = (t, tiles)
        row = {
          "shape": shape,
          "precision": prec,
          "m": m,
          "bf16_us": t_bf16 * 1e6,
          "op_us": t_op * 1e6,
          "gemv_us": best[0] * 1e6,
          "tiles": str(best[1]),
          "packed_bytes": nbytes,
          "copy_bw": bw,
          "device": jax.devices()[0].device_kind,
          "jax": jax.__version__,
        }
        rows.append(row)
        if args.out:
          with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
  print(
    "\n| K x N | bits | M | bf16 µs | op µs | GEMV µs | GEMV vs bf16 | op vs bf16 "
    "| GEMV % copy bw |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    share = r["packed_bytes"] / (r["gemv_us"] * 1e-6) / r["copy_bw"]
    print(
      f"| {r['shape']} | {r['precision']} | {r['m']} | {r['bf16_us']:.1f} | {r['op_us']:.1f} "
      f"| {r['gemv_us']:.1f} | {r['bf16_us'] / r['gemv_us']:.2f}x "
      f"| {r['bf16_us'] / r['op_us']:.2f}x | {100 * share:.0f} % |"
    )


if __name__ == "__main__":
  cli.guard(main)
