"""PTX, registers and SASS of the Pallas (Triton) kernels a function compiles, on the GPU.

`dump(fn, args, out_dir)` lowers jit(fn)(*args) with Pallas' Triton compiler call wrapped to keep
each kernel's PTX (jaxlib > 0.10.2 compiles Pallas kernels itself), then runs `ptxas -v` on each
(registers, spills) and `cuobjdump -sass`, writes `NAME.ptx` and `NAME.sass` under out_dir and
returns a summary per kernel: registers and the opcode counts of its SASS, most frequent first.
Used by `word_gemv.py --asm` to count instructions per weight without hardware counters.
"""

from __future__ import annotations

import collections
import contextlib
import re
import subprocess
from pathlib import Path

import jax


@contextlib.contextmanager
def captured_ptx():
  """Yields a list that fills with the PTX text of every Pallas Triton kernel compiled inside."""
  from jax._src.pallas.triton import pallas_call_registration as registration

  found, original = [], registration.triton.compile

  def compile_and_keep(*args, **kwargs):
    result = original(*args, **kwargs)
    found.append(result.asm if isinstance(result.asm, str) else result.asm.decode())
    return result

  registration.triton.compile = compile_and_keep
  try:
    yield found
  finally:
    registration.triton.compile = original


def opcodes(sass: str) -> collections.Counter:
  """Opcode counts (without modifiers) of a SASS listing."""
  ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
  return collections.Counter(ops)


def dump(fn, args, out_dir: str) -> list[dict]:
  """{name, registers, ptxas (its -v lines), opcodes} per kernel of jit(fn)(*args)."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  with captured_ptx() as ptxs:
    jax.jit(fn).lower(*args).compile()
  summaries = []
  for i, ptx in enumerate(ptxs):
    name = re.search(r"\.entry\s+(\w+)", ptx).group(1)
    stem = out / f"{i}_{name}"
    stem.with_suffix(".ptx").write_text(ptx)
    arch = "sm_" + jax.devices()[0].compute_capability.replace(".", "") + "a"
    cubin = stem.with_suffix(".cubin")
    info = subprocess.run(
      ["ptxas", f"-arch={arch}", "-v", "-o", str(cubin), str(stem.with_suffix(".ptx"))],
      capture_output=True, text=True, check=True,
    ).stderr  # fmt: skip
    sass = subprocess.run(
      ["cuobjdump", "-sass", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    stem.with_suffix(".sass").write_text(sass)
    regs = re.search(r"Used (\d+) registers", info)
    summaries.append(
      dict(
        name=name,
        registers=int(regs.group(1)) if regs else None,
        ptxas=[line.strip() for line in info.splitlines() if "Used" in line or "spill" in line],
        opcodes=opcodes(sass).most_common(),
      )
    )
  return summaries
