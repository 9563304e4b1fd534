"""Fused sibling projections for decoding: projections that read one input, as one launch.

At one token a step, q/k/v (and gate/up) are three (two) small launches that each read the same
activations; the decode kernels run every bucket of a tensor in one launch, so the kernels of
such siblings concatenated along their output channels (`quantize.concat_channels`) are one
launch over a wider weight: fewer, fuller launches, and one activation conversion and split sum
instead of one per projection. Their adapters fuse the same way: A = [A_1 | A_2 | ...] and
B = [B_1 | B_2 | ...] (ranks padded with zeros to the largest), so h = x @ A is one small matmul
for the group, and the GEMV adds each sibling's h_i @ B_i to its columns inside its launch
(`word_gemv.LowRank`, through `lora.fused_outputs`).

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


def _side_by_side_adapters(entries: list[dict]) -> dict:
  """{"a": [in, S r] the A's side by side, "b": [r, sum N_i] the B's side by side}, each sibling's
  rank padded with zeros to the largest r (exact: the padded products are zero)."""
  rank = max(e["a"].shape[1] for e in entries)
  a = [jnp.pad(e["a"], ((0, 0), (0, rank - e["a"].shape[1]))) for e in entries]
  b = [jnp.pad(e["b"], ((0, rank - e["b"].shape[0]), (0, 0))) for e in entries]
  return {"a": jnp.concatenate(a, axis=1), "b": jnp.concatenate(b, axis=1)}


def fuse_for_decoding(variables: dict, groups: Mapping[str, Sequence[str]]) -> dict:
  """`variables` with each sibling group's kernels in ``quant`` fused where they are all in the
  word layout with one input width and group size (`quantize.concat_channels`; the plane kernels
  are not measured on fused tensors), and the same groups' adapters in ``lora`` fused too (A's and
  B's side by side, `_side_by_side_adapters`: sibling i's term is x @ A[:, i r:(i+1) r] @ B_i).
  Traceable."""
  quant = fuse_siblings(variables["quant"], groups, ("kernel",), _concat_kernels)
  out = {**variables, "quant": quant}
  if "lora" in variables:
    at = fused_paths(quant, groups)
    out["lora"] = fuse_siblings(variables["lora"], groups, ("a", "b"), _side_by_side_adapters, at)
  return out
