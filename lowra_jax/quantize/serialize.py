"""Save and load params trees holding `QuantizedTensor`s: safetensors for arrays, JSON for the rest.

    save_quantized("runs/x/base", qparams, extra={"quant": {...}})
    qparams, extra = load_quantized("runs/x/base")

A directory holds ``arrays.safetensors`` (every array, keyed ``<path>`` for dense leaves and
``<path>#<field>`` for the parts of a quantized one) and ``tree.json`` (for each leaf of the nested
dict: its path, and for a `QuantizedTensor` its static metadata -- shape, group size, dtype,
buckets' bits, which optional arrays exist, the scales' dq_block -- plus the caller's ``extra``).
Nothing is unpickled; writing goes to a temporary directory renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from lowra_jax.quantize.qtensor import Bucket, QuantizedTensor, is_quantized
from lowra_jax.quantize.scaling import GroupScales

_SCALE_FIELDS = ("values", "codes", "block_absmax", "offset")


def _leaves(tree: dict, prefix: str = ""):
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, dict):
      yield from _leaves(value, path)
    else:
      yield path, value


def _encode(path: str, qt: QuantizedTensor, arrays: dict) -> dict:
  buckets = []
  for i, b in enumerate(qt.buckets):
    key = f"{path}#b{i}"
    for j, plane in enumerate(b.planes):
      arrays[f"{key}.plane{j}"] = np.asarray(plane)
    arrays[f"{key}.tables"] = np.asarray(b.tables)
    if b.table_index is not None:
      arrays[f"{key}.table_index"] = np.asarray(b.table_index)
    present = [f for f in _SCALE_FIELDS if getattr(b.scales, f) is not None]
    for f in present:
      arrays[f"{key}.scales.{f}"] = np.asarray(getattr(b.scales, f))
    buckets.append(
      {
        "bits": b.bits,
        "planes": len(b.planes),
        "table_index": b.table_index is not None,
        "scales": present,
        "dq_block": b.scales.dq_block,
      }
    )
  if qt.perm is not None:
    arrays[f"{path}#perm"] = np.asarray(qt.perm)
  return {
    "path": path,
    "shape": list(qt.shape),
    "group_size": qt.group_size,
    "dtype": qt.dtype,
    "perm": qt.perm is not None,
    "buckets": buckets,
  }


def _decode(meta: dict, arrays: dict) -> QuantizedTensor:
  path, buckets = meta["path"], []
  for i, b in enumerate(meta["buckets"]):
    key = f"{path}#b{i}"
    scales = GroupScales(
      **{f: arrays[f"{key}.scales.{f}"] for f in b["scales"]}, dq_block=b["dq_block"]
    )
    buckets.append(
      Bucket(
        planes=tuple(arrays[f"{key}.plane{j}"] for j in range(b["planes"])),
        tables=arrays[f"{key}.tables"],
        scales=scales,
        table_index=arrays[f"{key}.table_index"] if b["table_index"] else None,
        bits=b["bits"],
      )
    )
  qt = QuantizedTensor(
    buckets=tuple(buckets),
    perm=arrays[f"{path}#perm"] if meta["perm"] else None,
    shape=tuple(meta["shape"]),
    group_size=meta["group_size"],
    dtype=meta["dtype"],
  )
  return jax.device_put(qt)


def save_quantized(
  directory: str | os.PathLike[str], qparams: dict, extra: dict[str, Any] | None = None
) -> Path:
  """Writes the nested dict `qparams` (arrays and QuantizedTensors) to a new `directory`."""
  directory = Path(directory)
  if directory.exists():
    raise FileExistsError(f"{directory} exists; remove it or save elsewhere.")
  arrays, leaves = {}, []
  for path, leaf in _leaves(qparams):
    if is_quantized(leaf):
      leaves.append({"kind": "quantized", **_encode(path, leaf, arrays)})
    else:
      arrays[path] = np.asarray(leaf)
      leaves.append({"kind": "array", "path": path})
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
  try:
    save_file(arrays, tmp / "arrays.safetensors")
    (tmp / "tree.json").write_text(json.dumps({"leaves": leaves, "extra": extra or {}}, indent=1))
    os.replace(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return directory


def _spec(directory: Path) -> dict[str, Any]:
  if not (directory / "tree.json").exists():
    raise FileNotFoundError(f"{directory} holds no saved quantized params (tree.json missing).")
  return json.loads((directory / "tree.json").read_text())


def load_extra(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """The `extra` dict given to `save_quantized`, without reading any array."""
  return _spec(Path(directory))["extra"]


def load_quantized(directory: str | os.PathLike[str]) -> tuple[dict, dict[str, Any]]:
  """(qparams, extra) as given to `save_quantized`."""
  directory = Path(directory)
  spec = _spec(directory)
  arrays = load_file(directory / "arrays.safetensors")
  tree: dict = {}
  for meta in spec["leaves"]:
    *parents, name = meta["path"].split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = _decode(meta, arrays) if meta["kind"] == "quantized" else arrays[meta["path"]]
  return tree, spec["extra"]
