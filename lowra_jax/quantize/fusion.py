"""Fused projections for decoding: sibling kernels that read the same input as one tensor.

At one token a step, q/k/v (and gate/up) are three (two) small launches that each read the same
activations; the decode kernels run every bucket of a tensor in one launch, so the kernels of
such siblings concatenated along their output channels are one launch over a wider weight (fewer,
fuller launches, and one activation conversion and split sum instead of one per projection).

`concat_channels(tensors)` is that concatenation: the buckets of every tensor in turn, each with
its own levels and scales (no re-quantization: the codes and bits are the originals'), and a
permutation that puts every bucket column at its channel of the concatenated output. Its buckets
are therefore not sorted by precision; `quantized_matmul` runs it by whatever its plan says.

`fuse_siblings(tree, groups)` does it across a params-like tree: in every dict node named in
`groups` whose named children all hold a "kernel" `QuantizedTensor` of one input width, group
size and layout, the kernels move to one fused tensor under `fused_name(names)` in that node
(`QLoRALinear`s then take their slices of its output; the model says which siblings:
`llama.FUSED_PROJECTIONS`). Nodes that do not qualify stay as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from lowra_jax.quantize.qtensor import QuantizedTensor, is_quantized
from lowra_jax.quantize.words import is_word_layout


def fused_name(names: Sequence[str]) -> str:
  """The variable name of the fused kernel of projections `names` (e.g. "q_proj+k_proj")."""
  return "+".join(names)


def concat_channels(tensors: Sequence[QuantizedTensor]) -> QuantizedTensor:
  """[W_1 | W_2 | ...] as one `QuantizedTensor` [K, sum N_i] (traceable; module docstring).

  Every tensor must have the same K, group size and dtype; output channel c of tensor i is
  channel N_1 + ... + N_{i-1} + c of the result."""
  first = tensors[0]
  for t in tensors[1:]:
    if (t.shape[0], t.group_size, t.dtype) != (first.shape[0], first.group_size, first.dtype):
      raise ValueError(
        f"concat_channels needs one input width, group size and dtype, not {first.shape} "
        f"(group {first.group_size}, {first.dtype}) and {t.shape} (group {t.group_size}, "
        f"{t.dtype})."
      )
  widths = [t.shape[1] for t in tensors]
  offsets = np.cumsum([0, *widths[:-1]])
  perm = None
  if any(t.perm is not None for t in tensors):
    total = sum(widths)
    dtype = jnp.int16 if total <= np.iinfo(np.int16).max else jnp.int32
    parts = [
      (jnp.arange(n, dtype=jnp.int32) if t.perm is None else t.perm.astype(jnp.int32)) + int(o)
      for t, n, o in zip(tensors, widths, offsets, strict=True)
    ]
    perm = jnp.concatenate(parts).astype(dtype)
  buckets = tuple(b for t in tensors for b in t.buckets)
  shape = (first.shape[0], sum(widths))
  return QuantizedTensor(buckets, perm, shape, first.group_size, first.dtype)


def _fusible(kernels: list) -> bool:
  if not all(is_quantized(k) for k in kernels):
    return False
  first = kernels[0]
  same = {(k.shape[0], k.group_size, k.dtype, is_word_layout(k)) for k in kernels}
  return len(same) == 1 and first.shape[0] > 0


def fuse_siblings(tree, groups: Mapping[str, tuple[str, ...]]):
  """`tree` (nested dicts) with the kernels of each sibling group fused (module docstring).

  groups: node name -> the names of its children to fuse, in output order, e.g.
  {"self_attn": ("q_proj", "k_proj", "v_proj")}. Pure; returns new dicts, leaves shared."""

  def visit(node, name):
    if not isinstance(node, Mapping):
      return node
    out = {key: visit(child, key) for key, child in node.items()}
    names = groups.get(name)
    if not names or not all(isinstance(out.get(n), Mapping) for n in names):
      return out
    kernels = [out[n].get("kernel") for n in names]
    if not _fusible(kernels):
      return out
    for n in names:
      rest = {key: v for key, v in out[n].items() if key != "kernel"}
      if rest:
        out[n] = rest
      else:
        del out[n]
    out[fused_name(names)] = concat_channels(kernels)
    return out

  return visit(tree, None)
