"""Read LLaMA checkpoints into numpy arrays: no torch, never unpickle.

Layout conventions
------------------
* **State dicts** returned by the readers are flat ``{name: np.ndarray}`` maps using Hugging Face
  ``LlamaForCausalLM`` names (``model.layers.{i}.self_attn.q_proj.weight``, ...) and the torch
  ``nn.Linear`` layout ``[out_features, in_features]`` for every projection matrix.
* **Rotary embeddings** follow the HF convention: within each head, dimension ``j`` is rotated with
  dimension ``j + head_dim/2`` (``rotate_half``).  Meta / llama2.c checkpoints rotate interleaved
  pairs ``(2j, 2j+1)`` instead, so :func:`read_llama2c_checkpoint` permutes the rows of ``wq`` and
  ``wk`` exactly like transformers' ``convert_llama_weights_to_hf.py``; q.k attention scores are
  unchanged by this permutation.
* **Configs** are returned as dicts in HF ``config.json`` form.
* **Kernel trees** (:func:`to_kernel_tree`) are nested dicts in Flax conventions: linear layers hold
  ``{"kernel": W.T}`` with shape ``[in_features, out_features]``, RMSNorms ``{"scale": w}``, the
  token embedding ``{"embedding": w}`` with shape ``[vocab, hidden]``.
* **dtypes** are kept as stored: fp32 stays ``np.float32``, bf16 comes back as ``ml_dtypes.bfloat16``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import ml_dtypes  # noqa: F401  (registers the "bfloat16" dtype name with numpy; see read_hf_checkpoint)
import numpy as np
from safetensors import SafetensorError, safe_open

from lowra_jax.quantize.pipeline import nest

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_LLAMA2C_MAGIC = 0x616B3432  # "ak42": header of llama2.c's version-1/2 exports


@contextlib.contextmanager
def _open_safetensors(path: Path):
  """``safe_open(path)`` (numpy), with a corrupt or truncated file named in a ValueError.

  Opening parses the header and checks that its tensors cover the file exactly, so a truncated
  shard fails here, before any tensor is read."""
  try:
    handle = safe_open(path, framework="np")
  except SafetensorError as e:
    raise ValueError(
      f"{path} is not a readable safetensors file ({e}) — it is truncated or corrupt; "
      "re-download or re-save it"
    ) from None
  with handle as f:
    yield f


def _hf_weight_files(root: Path) -> dict[Path, list[str] | None]:
  """{safetensors file: tensor names to read from it (None: all)} of an HF model directory.

  Raises:
      FileNotFoundError: missing directory, ``config.json``, weights, or a shard named by the index.
      ValueError: pickle-only checkpoint (``*.bin``/``*.pt``) or un-indexed shards.
  """
  if not root.is_dir():
    raise FileNotFoundError(
      f"checkpoint directory {root} does not exist — pass an HF model directory"
    )
  if not (root / "config.json").is_file():
    raise FileNotFoundError(
      f"{root} has no config.json — point at an HF model directory (config.json + safetensors) "
      "or a llama2.c .bin"
    )
  if (root / _INDEX).is_file():
    weight_map: dict[str, str] = _read_json(root / _INDEX)["weight_map"]
    by_shard: dict[Path, list[str]] = {}
    for name, shard in weight_map.items():
      by_shard.setdefault(root / shard, []).append(name)
    absent = sorted(s.name for s in by_shard if not s.is_file())
    if absent:
      raise FileNotFoundError(
        f"{_INDEX} in {root} names missing shard(s) {absent} — re-download them"
      )
    return dict(sorted(by_shard.items()))
  if (root / _SINGLE).is_file():
    return {root / _SINGLE: None}
  if any(root.glob("*.safetensors")):
    raise ValueError(
      f"{root} has *.safetensors shards but no {_SINGLE} or {_INDEX} — add the index file"
    )
  pickles = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES)
  if pickles:
    raise ValueError(
      f"{root} holds only pickle weights {pickles} — convert to safetensors "
      "(save_pretrained(..., safe_serialization=True)); lowra-jax never unpickles"
    )
  raise FileNotFoundError(
    f"{root} has no {_SINGLE} or {_INDEX}: no safetensors weights to read — point at a model "
    "directory that holds them"
  )


def _read_json(path: Path) -> dict:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}) — re-download or fix it") from None


def _tensor_names(f, path: Path, names: list[str] | None) -> list[str]:
  """``names`` (default: all of the open file `f`), checked to be stored in it."""
  stored = set(f.keys())
  wanted = sorted(stored) if names is None else names
  missing = sorted(set(wanted) - stored)
  if missing:
    raise ValueError(
      f"{path.name} lacks tensors {missing} that {_INDEX} maps to it — the checkpoint is "
      "inconsistent; re-save it"
    )
  return wanted


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A checkpoint opened for reading one tensor at a time: headers parsed, no weight read yet.

  config: the HF ``config.json`` dict. shapes: ``{HF name: stored shape}`` in reading order
  (projections ``[out_features, in_features]``). read(name): that tensor as a new numpy array in
  the stored dtype (HF rotary order: llama2.c q/k rows permuted), reading only its own bytes.
  """

  config: dict[str, Any]
  shapes: dict[str, tuple]
  read: Callable[[str], np.ndarray]


def open_hf_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
  """An HF model directory opened as a `Checkpoint`.

  Every shard's header is parsed here, so a missing, truncated or inconsistent shard raises (the
  errors of `read_hf_checkpoint`) before any weight is read. Each `read` opens the tensor's shard
  (``safe_open``, numpy framework; bf16 through ``ml_dtypes``) and copies out that tensor only."""
  root = Path(path)
  files = _hf_weight_files(root)
  config = _read_json(root / "config.json")
  shapes, where = {}, {}
  for file, names in files.items():
    with _open_safetensors(file) as f:
      for name in _tensor_names(f, file, names):
        shapes[name] = tuple(f.get_slice(name).get_shape())
        where[name] = file

  def read(name: str) -> np.ndarray:
    with _open_safetensors(where[name]) as f:
      return f.get_tensor(name)

  return Checkpoint(config, shapes, read)


def inspect_hf_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, tuple]]:
  """``(config, {HF name: shape})`` of an HF model directory, reading only file headers
  (`open_hf_checkpoint`'s errors)."""
  ckpt = open_hf_checkpoint(path)
  return ckpt.config, ckpt.shapes


def read_hf_checkpoint(
  path: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Read an HF model directory: ``config.json`` plus single-file or sharded safetensors weights.

  Weights come from ``model.safetensors`` or, when ``model.safetensors.index.json`` is present,
  from the shards its ``weight_map`` names (only the mapped tensors are read from each shard).

  bf16 route: ``safetensors``' own numpy API (``safe_open(..., framework="np")``) builds arrays by
  numpy dtype *name*; plain numpy has no ``"bfloat16"``, but importing ``ml_dtypes`` (a jax
  dependency) registers it, so bf16 tensors load natively as ``ml_dtypes.bfloat16`` arrays with no
  upcast and no hand-parsing of the file format.

  Returns:
      ``(config, state)``: the parsed ``config.json`` dict and ``{HF name: array}`` with stored
      shapes (projections ``[out_features, in_features]``) and stored dtypes.

  Raises:
      FileNotFoundError: missing directory, ``config.json``, weights, or a shard named by the index.
      ValueError: pickle-only checkpoint (``*.bin``/``*.pt``), un-indexed shards, a truncated or
          corrupt shard, or an index mapping a tensor to a shard that does not contain it.
  """
  ckpt = open_hf_checkpoint(path)
  return ckpt.config, {name: ckpt.read(name) for name in ckpt.shapes}


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
  """`open_hf_checkpoint` of a directory, `open_llama2c_checkpoint` of a ``.bin`` file."""
  return _reader(Path(path))[0](path)


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """`read_hf_checkpoint` of a directory, `read_llama2c_checkpoint` of a ``.bin`` file."""
  return _reader(Path(path))[1](path)


def inspect_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, tuple]]:
  """``(config, {HF name: shape})`` of a checkpoint `read_checkpoint` reads, with its errors, from
  headers only."""
  ckpt = open_checkpoint(path)
  return ckpt.config, ckpt.shapes


def _reader(path: Path):
  if path.is_dir():
    return open_hf_checkpoint, read_hf_checkpoint
  if path.suffix == ".bin":
    return open_llama2c_checkpoint, read_llama2c_checkpoint
  raise FileNotFoundError(
    f"{path}{'' if path.exists() else ' does not exist'}: expected an HF model directory (config.json + *.safetensors) or a llama2.c .bin — "
    "point at one of them"
  )


def kernel_shapes(shapes: dict[str, tuple]) -> dict[tuple[str, ...], tuple[int, int]]:
  """``{module path: (in, out)}`` of the kernels `to_kernel_tree` makes from tensors of these HF
  names and torch shapes (``model.layers.0.self_attn.q_proj.weight`` [out, in] ->
  ``("model", "layers", "0", "self_attn", "q_proj"): (in, out)``)."""
  out = {}
  for name, shape in shapes.items():
    *path, leaf = name.split(".")
    if path and _leaf_kind(path[-1], leaf, len(shape)) == "kernel":
      out[tuple(path)] = (shape[1], shape[0])
  return out


def _leaf_kind(module: str, leaf: str, ndim: int) -> str | None:
  """The Flax leaf name for an HF ``{module}.{leaf}`` tensor of rank `ndim`, None if unknown."""
  if leaf == "weight" and ndim == 2 and (module.endswith("_proj") or module == "lm_head"):
    return "kernel"
  if leaf == "bias" and ndim == 1 and module.endswith("_proj"):
    return "bias"
  if leaf == "weight" and ndim == 1 and module.endswith("norm"):
    return "scale"
  if leaf == "weight" and ndim == 2 and module == "embed_tokens":
    return "embedding"
  return None


def _permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Reorder the rows of ``w`` [n_heads*head_dim, in] from interleaved-pair to half-split rotary."""
  out_features, in_features = w.shape
  head_dim = out_features // n_heads
  return (
    w.reshape(n_heads, head_dim // 2, 2, in_features)
    .transpose(0, 2, 1, 3)
    .reshape(out_features, in_features)
  )


def open_llama2c_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
  """A llama2.c legacy (version-0) ``.bin`` checkpoint opened as an HF-convention `Checkpoint`.

  File layout: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size -- negative
  when unshared classifier weights follow -- and seq_len), then fp32 arrays in torch
  ``[out, in]`` layout: token_embedding [vocab, dim], rms_att [L, dim], wq [L, dim, dim],
  wk/wv [L, kv_dim, dim], wo [L, dim, dim], rms_ffn [L, dim], w1 [L, hidden, dim],
  w2 [L, dim, hidden], w3 [L, hidden, dim], rms_final [dim], freq_cis_real/imag
  [seq, head_size/2] (skipped), optional wcls [vocab, dim].

  Names: w1 -> gate_proj, w3 -> up_proj, w2 -> down_proj; ``lm_head.weight`` reads the embedding
  when shared. ``q_proj``/``k_proj`` rows are permuted to HF half-split rotary order. The header
  and the file size are checked here; each `read` reads that tensor's bytes only (float32).

  Raises:
      FileNotFoundError: no such file.
      ValueError: version-1/2 export, implausible header, or file size not matching the header.
  """
  file = Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"llama2.c checkpoint {file} does not exist — check the path")
  size = file.stat().st_size
  if size < 28:
    raise ValueError(
      f"{file} is {size} bytes, shorter than the 28-byte llama2.c header — it is truncated; "
      "re-download it"
    )
  header = np.fromfile(file, dtype="<i4", count=7)
  if int(header[0]) == _LLAMA2C_MAGIC:
    raise ValueError(
      f"{file} is a llama2.c version-1/2 export — re-export it in legacy version-0 format"
    )
  dim, hidden, n_layers, n_heads, n_kv_heads, signed_vocab, seq_len = (int(v) for v in header)
  vocab, shared = abs(signed_vocab), signed_vocab > 0
  if (
    min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0
    or dim % n_heads
    or n_heads % n_kv_heads
    or (dim // n_heads) % 2
  ):
    raise ValueError(
      f"{file} has an implausible header {header.tolist()} — it is not a llama2.c version-0 "
      "file; pass an HF model directory or a llama2.c .bin"
    )
  head_size = dim // n_heads
  kv_dim = n_kv_heads * head_size
  L = n_layers
  blocks = {
    "emb": (vocab, dim),
    "rms_att": (L, dim),
    "wq": (L, dim, dim),
    "wk": (L, kv_dim, dim),
    "wv": (L, kv_dim, dim),
    "wo": (L, dim, dim),
    "rms_ffn": (L, dim),
    "w1": (L, hidden, dim),
    "w2": (L, dim, hidden),
    "w3": (L, hidden, dim),
    "rms_final": (dim,),
    "freq_real": (seq_len, head_size // 2),
    "freq_imag": (seq_len, head_size // 2),
  }
  if not shared:
    blocks["wcls"] = (vocab, dim)
  offsets, offset = {}, 28
  for name, shape in blocks.items():
    offsets[name] = offset
    offset += 4 * int(np.prod(shape))
  if size != offset:
    raise ValueError(
      f"{file} is {size} bytes but its header {header.tolist()} implies {offset} — the file "
      "is truncated or corrupt; re-download it"
    )

  # HF name -> (block, layer or None, rotary heads to permute or None)
  entries = {
    "model.embed_tokens.weight": ("emb", None, None),
    "model.norm.weight": ("rms_final", None, None),
    "lm_head.weight": ("emb" if shared else "wcls", None, None),
  }
  for i in range(n_layers):
    p = f"model.layers.{i}."
    entries |= {
      p + "input_layernorm.weight": ("rms_att", i, None),
      p + "post_attention_layernorm.weight": ("rms_ffn", i, None),
      p + "self_attn.q_proj.weight": ("wq", i, n_heads),
      p + "self_attn.k_proj.weight": ("wk", i, n_kv_heads),
      p + "self_attn.v_proj.weight": ("wv", i, None),
      p + "self_attn.o_proj.weight": ("wo", i, None),
      p + "mlp.gate_proj.weight": ("w1", i, None),
      p + "mlp.up_proj.weight": ("w3", i, None),
      p + "mlp.down_proj.weight": ("w2", i, None),
    }

  def shape_of(name: str) -> tuple:
    block, layer, _ = entries[name]
    return blocks[block] if layer is None else blocks[block][1:]

  def read(name: str) -> np.ndarray:
    block, layer, heads = entries[name]
    shape = shape_of(name)
    count = int(np.prod(shape))
    start = offsets[block] + 4 * count * (layer or 0)
    w = np.fromfile(file, dtype="<f4", count=count, offset=start).reshape(shape)
    return _permute_rotary(w, heads) if heads else w

  config = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "hidden_size": dim,
    "intermediate_size": hidden,
    "num_hidden_layers": n_layers,
    "num_attention_heads": n_heads,
    "num_key_value_heads": n_kv_heads,
    "head_dim": head_size,
    "vocab_size": vocab,
    "max_position_embeddings": seq_len,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": shared,
    "bos_token_id": 1,
    "eos_token_id": 2,
  }
  return Checkpoint(config, {name: shape_of(name) for name in entries}, read)


def read_llama2c_checkpoint(
  path: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Read a llama2.c legacy (version-0) ``.bin`` checkpoint into an HF-convention state dict
  (layout, names and errors: `open_llama2c_checkpoint`).

  Returns:
      ``(config, state)``: an HF ``config.json``-style dict and ``{HF name: float32 array}``;
      ``lm_head.weight`` is the embedding array itself when shared.
  """
  ckpt = open_llama2c_checkpoint(path)
  state = {name: ckpt.read(name) for name in ckpt.shapes if name != "lm_head.weight"}
  tied = ckpt.config["tie_word_embeddings"]
  state["lm_head.weight"] = (
    state["model.embed_tokens.weight"] if tied else ckpt.read("lm_head.weight")
  )
  return ckpt.config, state


def flax_leaf(name: str, value: np.ndarray) -> tuple[str, np.ndarray] | None:
  """The `to_kernel_tree` leaf of one HF tensor: (``/``-joined Flax path, C-contiguous array in
  the input dtype), e.g. ``model.layers.0.self_attn.q_proj.weight`` [out, in] ->
  ``("model/layers/0/self_attn/q_proj/kernel", W.T [in, out])``; None for an unknown name."""
  path = flax_path(name, value.ndim)
  if path is None:
    return None
  return path, np.ascontiguousarray(value.T if path.endswith("/kernel") else value)


def flax_path(name: str, ndim: int) -> str | None:
  """The ``/``-joined Flax path of the HF tensor `name` of rank `ndim` (see `flax_leaf`)."""
  parts = name.split(".")
  parents, (module, leaf) = parts[:-2], (parts[-2:] if len(parts) >= 2 else ("", ""))
  new_leaf = _leaf_kind(module, leaf, ndim)
  return None if new_leaf is None else "/".join((*parents, module, new_leaf))


def to_kernel_tree(state: dict[str, np.ndarray]) -> dict[str, Any]:
  """Convert a flat HF-named state dict into a nested Flax params dict.

  ``*_proj.weight`` / ``lm_head.weight`` [out, in] -> ``{"kernel": W.T}`` [in, out];
  ``*_proj.bias`` [out] -> ``{"bias": b}``; ``*norm.weight`` [d] -> ``{"scale": w}``; ``embed_tokens.weight`` [vocab, d] -> ``{"embedding": w}``.
  Names are nested by splitting on ``"."`` (``model.layers.0.self_attn.q_proj.weight`` ->
  ``tree["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]``).  Leaves are C-contiguous
  arrays with the input dtype (`flax_leaf`).

  Raises:
      ValueError: listing every key that matches none of the patterns (or has the wrong rank).
  """
  leaves = {key: flax_leaf(key, value) for key, value in state.items()}
  unknown = [f"{key} {tuple(state[key].shape)}" for key, leaf in leaves.items() if leaf is None]
  if unknown:
    raise ValueError(f"to_kernel_tree: {len(unknown)} unrecognised key(s): {', '.join(unknown)}")
  return nest(leaves.values())
