"""Software-pipelined loops in Pallas' Triton kernels: Triton's `tt.num_stages` loop attribute.

Triton pipelines a loop's loads into shared memory (`cp.async`, issued `stages - 1` iterations
ahead, no registers held) for loads that feed a `dot`, and for every load of a loop that carries
the `tt.num_stages` attribute (what `tl.range(..., num_stages=)` sets in Triton's own language).
Pallas lowers `fori_loop` to a plain `scf.for` and has no way to set it, so a GEMV without `dot`
waits for each step's loads. `pipelined(name, stages)` (or `kernel_name`) marks the loops of the
kernels whose `pallas_call` is named `name`: the Triton lowering is wrapped once, and the module of
such a kernel gets the attribute on each `scf.for` before it is serialized. `cuda_modules` shows
the IR a function's kernels are compiled from.

The wrapper uses a private entry point of JAX's Pallas Triton lowering
(`lower_jaxpr_to_triton_module`); where that is missing, `pipelined` returns False and the
loops stay as they are (correct, not pipelined). Lowering for CUDA needs no GPU, so what a module
got (`marked_loops`) is tested on CPU.
"""

from __future__ import annotations

import functools
import logging

_stages: dict[str, int] = {}  # pallas_call name -> loop stages


def _lowering():
  try:
    from jax._src.pallas.triton import lowering
  except ImportError:
    return None
  return lowering if hasattr(lowering, "lower_jaxpr_to_triton_module") else None


def _mark(module, stages: int) -> int:
  """Sets `tt.num_stages` on every `scf.for` of `module`; returns how many."""
  from jax._src.lib.mlir import ir

  loops = []

  def visit(op):
    if op.name == "scf.for":
      loops.append(op)
    return ir.WalkResult.ADVANCE

  module.operation.walk(visit)
  with module.context:
    attr = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), stages)
    for op in loops:
      op.attributes["tt.num_stages"] = attr
  return len(loops)


def _stages_for(jaxpr) -> int:
  return _stages.get(getattr(getattr(jaxpr, "debug_info", None), "func_name", ""), 1)


def install() -> bool:
  """Wraps the lowering (once; again if someone replaced it since); False where it is missing."""
  lowering = _lowering()
  if lowering is None:
    return False
  plain = lowering.lower_jaxpr_to_triton_module
  if getattr(plain, "_marks_loops", False):
    return True

  @functools.wraps(plain)
  def lower(jaxpr, *args, **kwargs):
    result = plain(jaxpr, *args, **kwargs)
    stages = _stages_for(jaxpr)
    if stages > 1:
      _mark(result.module, stages)
    return result

  lower._marks_loops = True
  lowering.lower_jaxpr_to_triton_module = lower
  return True


def pipelined(name: str, stages: int) -> bool:
  """Kernels named `name` get their loops pipelined `stages` deep (1: not pipelined) when
  lowered from now on; False where this JAX's lowering cannot be wrapped."""
  if not install():
    logging.getLogger("lowra_jax").warning(
      "loop_stages: this JAX has no Pallas Triton lowering to wrap; loops are not pipelined."
    )
    return False
  _stages[name] = stages
  return True


def kernel_name(family: str, variant: str, stages: int, interpret: bool) -> str:
  """The `pallas_call` name of a kernel of `family` ("word_gemv") and `variant` ("2bit_1bit"):
  with stages > 1 (compiled, not interpreted) tagged "family_s{stages}_variant" and registered
  for pipelining (`pipelined`)."""
  if stages <= 1 or interpret:
    return f"{family}_{variant}"
  name = f"{family}_s{stages}_{variant}"
  pipelined(name, stages)
  return name


def cuda_modules(fn, *args) -> list[str]:
  """The Triton IR (text, no locations) of each Pallas kernel in `fn(*args)`, lowered for CUDA as
  it would be compiled (loops marked); needs no GPU."""
  import jax

  if not install():
    raise RuntimeError("this JAX has no Pallas Triton lowering to inspect.")
  lowering = _lowering()
  modules, plain = [], lowering.lower_jaxpr_to_triton_module

  def keep(*a, **k):
    result = plain(*a, **k)
    modules.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  lowering.lower_jaxpr_to_triton_module = keep
  try:
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    lowering.lower_jaxpr_to_triton_module = plain
  return modules


def marked_loops(ir_text: str) -> list[int]:
  """The `tt.num_stages` of each marked loop in a module's printed IR."""
  import re

  return [int(s) for s in re.findall(r"tt\.num_stages = (\d+) : i32", ir_text)]
