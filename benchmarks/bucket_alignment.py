"""Ragged vs aligned precision buckets on a real-looking LLaMA-7B layer (GPU).

Quantizes one 7B-shaped decoder layer as `generate.py`'s lowra1.5 does (one budget over the
layer's seven matrices) with `bucket_multiple=1`, so the buckets keep the solver's ragged sizes,
then times `quantized_matmul` forward and backward at M = 1 on three of its mixed tensors as they
are ("ragged") and restricted to the first multiple of 16 / 64 channels of each bucket ("x16",
"x64": the same data, every bucket's rows 16-byte aligned). Weights rotate over copies that exceed
the L2 cache (`kernels.bench`). Prints a markdown table of µs per call.

    python benchmarks/bucket_alignment.py          # H200: ~2 min
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import kernels
import numpy as np

import generate
from lowra_jax.quantize import QuantizedTensor, quantize_params

TENSORS = ("down_proj", "gate_proj", "q_proj")


def keep_multiple(qt: QuantizedTensor, multiple: int) -> QuantizedTensor:
  """qt restricted to the first floor(Nb / multiple) * multiple channels of each bucket."""
  buckets, keep, start = [], [], 0
  for b in qt.buckets:
    nb = b.num_channels
    n = nb // multiple * multiple
    s = b.scales
    if s.dq_block:
      scales = s.replace(
        codes=s.codes[:, :n], block_absmax=s.block_absmax[:, : -(-n // s.dq_block)]
      )
    else:
      scales = s.replace(values=s.values[:, :n])
    buckets.append(
      b.replace(
        planes=tuple(p[:, :n] for p in b.planes),
        tables=b.tables[:n] if b.tables.shape[0] == nb else b.tables,
        scales=scales,
        table_index=None if b.table_index is None else b.table_index[:n],
      )
    )
    keep.append(np.arange(start, start + n))
    start += nb
  kept = np.asarray(qt.perm)[np.concatenate(keep)]
  perm = np.argsort(np.argsort(kept)).astype(np.asarray(qt.perm).dtype)  # ranks: 0..n-1
  return qt.replace(buckets=tuple(buckets), perm=jnp.asarray(perm), shape=(qt.shape[0], len(kept)))


def main():
  layer = generate.random_layer(generate.SHAPES["7b"], jax.random.split(jax.random.key(0), 3)[2])
  config = dataclasses.replace(generate.METHODS["lowra1.5"], bucket_multiple=1)
  q, _ = quantize_params(layer, config, progress=False)
  is_q = lambda x: isinstance(x, QuantizedTensor)  # noqa: E731
  rows = []
  for path, qt in jax.tree_util.tree_leaves_with_path(q, is_leaf=is_q):
    name = jax.tree_util.keystr(path).split("'")[-4]
    if not is_q(qt) or name not in TENSORS:
      continue
    res = {}
    for label, t in (
      ("ragged", qt),
      ("x16", keep_multiple(qt, 16)),
      ("x64", keep_multiple(qt, 64)),
    ):
      copies = kernels.quantized_copies(t)
      for d, op, width in (
        ("fwd", kernels.forward, t.shape[0]),
        ("bwd", kernels.backward, t.shape[1]),
      ):
        a = jax.random.normal(jax.random.key(1), (1, width), jnp.bfloat16)
        res[f"{d} {label}"] = 1e6 * kernels.bench(lambda z, w, op=op: op(z, w, "auto"), a, copies)
      print(name, label, t.shape, [b.num_channels for b in t.buckets], flush=True)
    rows.append((name, qt.shape, res))
  print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}: M = 1, µs per call, L2-cold")
  cols = list(rows[0][2])
  print("| tensor | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
  for name, shape, res in rows:
    print(f"| {name} {shape[0]}x{shape[1]} | " + " | ".join(f"{res[c]:.1f}" for c in cols) + " |")


if __name__ == "__main__":
  main()
