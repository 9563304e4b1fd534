"""Save and load params trees holding `QuantizedTensor`s: safetensors for arrays, JSON for the rest.

    save_quantized("runs/x/base", qparams, extra={"quant": {...}})
    qparams, extra = load_quantized("runs/x/base")

    with Writer("runs/x/base", extra) as out:      # leaf by leaf, e.g. as a quantizer makes them
      out.add("qparams/model/layers/0/mlp/up_proj/kernel", qt)

A directory holds ``arrays-NNNNN.safetensors`` shards (every array, keyed ``<path>`` for dense
leaves and ``<path>#<field>`` for the parts of a quantized one; a shard is written once it holds
`SHARD_BYTES`, so writing holds about one shard) and ``tree.json`` (for each leaf of the nested
dict: its path, and for a `QuantizedTensor` its static metadata -- shape, group size, dtype,
buckets' bits, which optional arrays exist, the scales' dq_block -- plus the caller's ``extra``).
Nothing is unpickled; writing goes to a temporary directory renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lowra_jax.quantize.pipeline import nest
from lowra_jax.quantize.qtensor import Bucket, QuantizedTensor, is_quantized
from lowra_jax.quantize.scaling import GroupScales

_SCALE_FIELDS = ("values", "codes", "block_absmax", "offset")
SHARD_BYTES = 1 << 30


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
    if not isinstance(b, Bucket):
      raise ValueError(
        f"{path} is in the word layout, which is for decoding only: save the tensors as "
        "quantized, before `to_word_layout`."
      )
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


class Writer:
  """Writes a nested dict to a new `directory` leaf by leaf (`add`), holding at most one shard.

  Used as a context manager: on a clean exit the directory is completed (tree.json) and renamed
  into place; on an exception nothing is left behind."""

  def __init__(
    self,
    directory: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
    shard_bytes: int = SHARD_BYTES,
  ):
    self.directory = Path(directory)
    if self.directory.exists():
      raise FileExistsError(f"{self.directory} exists; remove it or save elsewhere.")
    self.extra, self.shard_bytes = extra or {}, shard_bytes
    self.directory.parent.mkdir(parents=True, exist_ok=True)
    self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}.", dir=self.directory.parent))
    self._arrays: dict[str, np.ndarray] = {}
    self._leaves: list[dict] = []
    self._shards = 0

  def add(self, path: str, leaf) -> None:
    """Adds one leaf (an array or a `QuantizedTensor`) at the ``/``-joined `path`."""
    if is_quantized(leaf):
      self._leaves.append({"kind": "quantized", **_encode(path, leaf, self._arrays)})
    else:
      self._arrays[path] = np.asarray(leaf)
      self._leaves.append({"kind": "array", "path": path})
    if sum(a.nbytes for a in self._arrays.values()) >= self.shard_bytes:
      self._flush()

  def _flush(self) -> None:
    if self._arrays or not self._shards:
      save_file(self._arrays, self._tmp / f"arrays-{self._shards:05d}.safetensors")
      self._arrays, self._shards = {}, self._shards + 1

  def __enter__(self) -> Writer:
    return self

  def __exit__(self, error, *_) -> None:
    try:
      if error is None:
        self._flush()
        spec = {"leaves": self._leaves, "extra": self.extra}
        (self._tmp / "tree.json").write_text(json.dumps(spec, indent=1))
        os.replace(self._tmp, self.directory)
    finally:
      shutil.rmtree(self._tmp, ignore_errors=True)


def save_quantized(
  directory: str | os.PathLike[str], qparams: dict, extra: dict[str, Any] | None = None
) -> Path:
  """Writes the nested dict `qparams` (arrays and QuantizedTensors) to a new `directory`."""
  with Writer(directory, extra) as out:
    for path, leaf in _leaves(qparams):
      out.add(path, leaf)
  return Path(directory)


def _spec(directory: Path) -> dict[str, Any]:
  if not (directory / "tree.json").exists():
    raise FileNotFoundError(f"{directory} holds no saved quantized params (tree.json missing).")
  return json.loads((directory / "tree.json").read_text())


def load_extra(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """The `extra` dict given to `save_quantized`, without reading any array."""
  return _spec(Path(directory))["extra"]


class _Arrays(Mapping):
  """The arrays of a saved directory's shards by key, each read from its shard when asked for."""

  def __init__(self, directory: Path):
    self._where = {}
    for shard in sorted(directory.glob("arrays*.safetensors")):
      with safe_open(shard, framework="np") as f:
        self._where |= dict.fromkeys(f.keys(), shard)

  def __getitem__(self, key: str) -> np.ndarray:
    with safe_open(self._where[key], framework="np") as f:
      return f.get_tensor(key)

  def __iter__(self):
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


def load_quantized(directory: str | os.PathLike[str]) -> tuple[dict, dict[str, Any]]:
  """(qparams, extra) as given to `save_quantized`. Arrays are read leaf by leaf and each
  `QuantizedTensor` is put on the default device as it is read, so the host holds dense leaves
  and one packed tensor at a time."""
  directory = Path(directory)
  spec = _spec(directory)
  arrays = _Arrays(directory)
  leaves = (
    (meta["path"], _decode(meta, arrays) if meta["kind"] == "quantized" else arrays[meta["path"]])
    for meta in spec["leaves"]
  )
  return nest(leaves), spec["extra"]
