"""Fused sibling projections for decoding: projections that read one input, as one launch.

At one token a step, q/k/v (and gate/up) are three (two) small launches that each read the same
activations; the decode kernels run every bucket of a tensor in one launch, so the kernels of
such siblings concatenated along their output channels (`quantize.concat_channels`) are one
launch over a wider weight: fewer, fuller launches, and one activation conversion and split sum
instead of one per projection. Their adapters fuse the same way: A = [A_1 | A_2 | ...] and B
block-diagonal, so x @ A @ B is two small matmuls for the group instead of two per projection.

`fuse_siblings(tree, groups, keys, combine)` rewrites a params-like tree: in every dict node
named in `groups` whose named children all hold `keys`, those entries move into one
``combine([child entries, ...])`` under `fused_name(names)` in that node (children left empty
are dropped); nodes that do not qualify (a sibling missing, `combine` returning None) stay as
they are. `fuse_for_decoding` applies it to a model's ``quant`` and ``lora`` trees;
`QLoRALinear`s read the fused output through `lora.fused_outputs`, the model says which
siblings (`llama.FUSED_PROJECTIONS`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp

from lowra_jax.quantize import concat_channels, is_quantized
from lowra_jax.quantize.words import is_word_layout


def fused_name(names: Sequence[str]) -> str:
  """The name of the fused variables of projections `names` (e.g. "q_proj+k_proj")."""
  return "+".join(names)


def fuse_siblings(
  tree,
  groups: Mapping[str, Sequence[str]],
  keys: Sequence[str],
  combine: Callable,
  at: set[tuple[str, ...]] | None = None,
):
  """`tree` (nested dicts) with each sibling group's `keys` fused (module docstring).

  groups: node name -> the names of its children to fuse, in output order, e.g.
  {"self_attn": ("q_proj", "k_proj", "v_proj")}; at: if given, only the nodes at these paths
  (tuples of keys from the root). Pure; returns new dicts, leaves shared."""

  def visit(node, path):
    if not isinstance(node, Mapping):
      return node
    out = {key: visit(child, (*path, key)) for key, child in node.items()}
    names = groups.get(path[-1]) if path and (at is None or path in at) else None
    children = [out.get(n) for n in names or ()]
    if not names or not all(isinstance(c, Mapping) and set(keys) <= set(c) for c in children):
      return out
    fused = combine([{k: c[k] for k in keys} for c in children])
    if fused is None:
      return out
    for n, child in zip(names, children, strict=True):
      rest = {k: v for k, v in child.items() if k not in keys}
      if rest:
        out[n] = rest
      else:
        del out[n]
    out[fused_name(names)] = fused
    return out

  return visit(tree, ())


def fused_paths(tree, groups: Mapping[str, Sequence[str]]) -> set[tuple[str, ...]]:
  """The paths of the nodes of `tree` that hold a fused group's variables."""
  found = set()

  def visit(node, path):
    if not isinstance(node, Mapping):
      return
    if path and path[-1] in groups and fused_name(groups[path[-1]]) in node:
      found.add(path)
    for key, child in node.items():
      visit(child, (*path, key))

  visit(tree, ())
  return found


def _concat_kernels(entries: list[dict]):
  """One `QuantizedTensor` of the siblings' kernels, or None unless all are in the word layout
  with one input width, group size and dtype."""
  kernels = [e["kernel"] for e in entries]
  if not all(is_quantized(k) and is_word_layout(k) for k in kernels):
    return None
  if len({(k.shape[0], k.group_size, k.dtype) for k in kernels}) > 1:
    return None
  return concat_channels(kernels)


def _block_adapters(entries: list[dict]) -> dict:
  """{"a": [in, sum r_i] the A's side by side, "b": [sum r_i, sum N_i] the B's on the diagonal}."""
  a = jnp.concatenate([e["a"] for e in entries], axis=1)
  rows, cols = sum(e["b"].shape[0] for e in entries), sum(e["b"].shape[1] for e in entries)
  b = jnp.zeros((rows, cols), entries[0]["b"].dtype)
  r0 = c0 = 0
  for e in entries:
    r, c = e["b"].shape
    b = b.at[r0 : r0 + r, c0 : c0 + c].set(e["b"])
    r0, c0 = r0 + r, c0 + c
  return {"a": a, "b": b}


def fuse_for_decoding(variables: dict, groups: Mapping[str, Sequence[str]]) -> dict:
  """`variables` with each sibling group's kernels in ``quant`` fused where they are all in the
  word layout with one input width and group size (`quantize.concat_channels`; the plane kernels
  are not measured on fused tensors), and the same groups' adapters in ``lora`` fused too (A side
  by side, B block-diagonal: x @ A @ B gives the siblings' adapter terms side by side, exactly).
  Traceable."""
  quant = fuse_siblings(variables["quant"], groups, ("kernel",), _concat_kernels)
  out = {**variables, "quant": quant}
  if "lora" in variables:
    at = fused_paths(quant, groups)
    out["lora"] = fuse_siblings(variables["lora"], groups, ("a", "b"), _block_adapters, at)
  return out
