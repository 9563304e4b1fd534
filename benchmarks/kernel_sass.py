"""What a compiled Pallas (Triton) kernel becomes: registers, spills and machine instructions.

    pip install triton     # Triton's package (ptxas and cuobjdump inside); not a project dependency
    python benchmarks/kernel_sass.py --shape=4096x11008 --precision=2 --m=1 [--out=DIR]
    python benchmarks/kernel_sass.py --tiles='{"block_n":64, "block_g":4, "warps":2, "per_sm":8}'

Needs no GPU: lowers one `word_gemv` call (`word_mma` above 4 rows: `--m=8`) of a quantized tensor
(`benchmarks/word_gemv.py`'s setup; `--tiles` as its `--tiles`) for CUDA with Pallas' Triton
lowering, keeps the kernel's Triton IR, compiles it for sm_90a with the installed Triton
(`triton.compile` of a .ttir file; jaxlib links its own Triton, so what jax runs may differ
slightly), and prints ptxas' resource line (registers, barriers, spills) and a histogram of the
SASS opcodes: loads, integer, float16x2 and conversion instructions, what the per-pair arithmetic
costs once compiled and where the assembler placed the loads. `--out` keeps the IR, PTX, cubin and
SASS.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from kernels import PRECISIONS, dims
from word_gemv import setup, tiles_for

from lowra_jax import cli
from lowra_jax.quantize.words import is_word_layout
from pallas_kernels import loop_stages
from pallas_kernels import word_gemv as wg
from pallas_kernels import word_mma as wm


def triton_ir(args) -> tuple[str, wg.GemvTiles]:
  """The Triton IR of the GEMV's kernel, as Pallas lowers it for CUDA (no location info; no GPU
  needed), and its tiles."""
  _, _, wqs = setup(args.shape, args.precision)
  wq = wqs[0]
  if not is_word_layout(wq):
    raise cli.UserError(f"--precision={args.precision}: channels the word layout does not hold "
                        "— give one of 1, 2, 3, 4, mix1.5, mix2.0, mix3.0")
  x = jax.random.normal(jax.random.key(1), (args.m, wq.shape[0]), jnp.bfloat16)
  tiles = tiles_for(wq, json.loads(args.tiles) if args.tiles else None, args.m)
  print(f"{args.shape} {args.precision} M={args.m}: {tiles}", flush=True)

  def gemv(a, wq):
    kernel = wm.word_mma if args.m > wg.MAX_ROWS else wg.word_gemv
    return kernel(a, wq.buckets, group=wq.group_size, tiles=tiles, columns=wq.perm)

  modules = loop_stages.cuda_modules(gemv, x, wq)
  if len(modules) != 1:
    sys.exit(f"kernel_sass.py: expected one Triton module, Pallas lowered {len(modules)}")
  return modules[0], tiles


def sass_opcodes(sass: str) -> list[str]:
  """The SASS opcodes (predicates, modifiers and operands dropped), in order."""
  found = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
  return [op for op in found if op != "NOP"]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="4096x11008")
  p.add_argument("--precision", default="2")
  p.add_argument("--m", type=int, default=1)
  p.add_argument("--tiles", default="", help="JSON tile setting (word_gemv.py --tiles' keys)")
  p.add_argument("--out", default="", help="keep the IR, PTX and SASS here")
  args = p.parse_args()
  dims(args.shape, "--shape")
  if args.precision not in PRECISIONS:
    raise cli.UserError(f"--precision: {args.precision!r} is not one of {', '.join(PRECISIONS)}")
  cli.positive("--m", args.m)
  if args.m > wm.MAX_ROWS:
    raise cli.UserError(f"--m: the word kernels multiply 1 to {wm.MAX_ROWS} rows, not {args.m}")
  cli.require_modules("kernel_sass.py", "triton")  # Triton's package: not a project dependency
  import triton
  from triton.backends.compiler import GPUTarget

  bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
  ir, tiles = triton_ir(args)
  with tempfile.TemporaryDirectory() as tmp:
    out = args.out or tmp
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "kernel.ttir")
    with open(path, "w") as f:
      f.write(ir)
    options = {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
    kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=options)
    for ext in ("ptx", "cubin"):
      with open(os.path.join(out, f"kernel.{ext}"), "w" if ext == "ptx" else "wb") as f:
        f.write(kernel.asm[ext])
    used = []
    for ptxas in ("ptxas-blackwell", "ptxas"):  # Triton's newer assembler first (its PTX version)
      if not used and os.path.exists(os.path.join(bin_dir, ptxas)):
        report = subprocess.run(
          [os.path.join(bin_dir, ptxas), "-v", "--gpu-name=sm_90a", os.path.join(out, "kernel.ptx"),
           "-o", os.path.join(tmp, "check.o")], capture_output=True, text=True,
        ).stderr  # fmt: skip
        used = [line.split(":", 1)[-1].strip() for line in report.splitlines() if "Used" in line]
    cubin = os.path.join(out, "kernel.cubin")
    sass = subprocess.run(
      [os.path.join(bin_dir, "cuobjdump"), "-sass", cubin], capture_output=True, text=True
    ).stdout
    with open(os.path.join(out, "kernel.sass"), "w") as f:
      f.write(sass)
    ops = sass_opcodes(sass)
    counts = collections.Counter(ops)
    print(f"triton {triton.__version__}: {'; '.join(used)}; {len(ops)} SASS instructions")
    print("by opcode: " + ", ".join(f"{op} {c}" for op, c in counts.most_common(40)))


if __name__ == "__main__":
  cli.guard(main)
