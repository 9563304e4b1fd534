"""A model's weights one tensor at a time, in the layout `quantize_params` sees.

A weights source is a re-iterable, sized collection of ``(path, leaf)`` pairs: ``path`` is the
``/``-joined Flax path (``model/layers/0/self_attn/q_proj/kernel``) and ``leaf`` the array that
`weights.to_kernel_tree` (and `llama.load_pretrained`) would put there -- kernels [in, out] --,
so nesting every pair gives the params tree and nothing is converted twice. Each iteration reads
the tensors again, one at a time, and holds none of them (what the streamed quantizer needs).
``shapes()`` lists the paths without reading anything and ``read(path)`` reads one leaf (what the
layer-by-layer calibration, `calibration.input_moments`, needs).

    source = CheckpointSource("../shared/data/models/pycode-llama-17m")   # HF dir or llama2.c .bin
    source = SyntheticSource(SHAPES["70b"], seed=0)                      # no file at all
    for path, leaf in source: ...
    q = source.read("model/layers/0/self_attn/q_proj/kernel")
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from functools import partial
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from lowra_jax.models import weights
from lowra_jax.models.llama import LlamaConfig


def forward_order(path: str) -> tuple:
  """Sort key of leaf paths in the order a forward pass uses them: the embedding, the decoder
  layers by number (2 before 10, which a checkpoint's sorted names do not give), the final norm,
  the head, the rest by name."""
  parts = path.split("/")
  if parts[:2] == ["model", "layers"]:
    return (1, int(parts[2]), path)
  return ({"model/embed_tokens/embedding": 0, "model/norm/scale": 2}.get(path, 3), 0, path)


class CheckpointSource:
  """The leaves of an HF model directory (safetensors shards, index honoured) or a llama2.c file.

  Opening parses every header (`weights.open_checkpoint`), so a missing, truncated or corrupt
  shard, an unknown tensor name or an unsupported config raises here, before any weight is read.
  The tied head (``tie_word_embeddings``) is left out, as `llama.load_pretrained` does. Leaves
  come in `forward_order` (what `calibration.LayerCovariances` needs to run each layer once).

  Attributes:
    config: the checkpoint's `LlamaConfig`; hf_config: its ``config.json`` dict.
  """

  def __init__(self, path: str | os.PathLike[str]):
    self._checkpoint = weights.open_checkpoint(path)
    self.hf_config = self._checkpoint.config
    self.config = LlamaConfig.from_hf(self.hf_config)
    shapes = self._checkpoint.shapes
    if self.config.tie_word_embeddings:
      shapes = {n: s for n, s in shapes.items() if not n.startswith("lm_head.")}
    unknown = [f"{n} {s}" for n, s in shapes.items() if weights.flax_path(n, len(s)) is None]
    if unknown:
      raise ValueError(
        f"{path}: {len(unknown)} unrecognised tensor(s) {', '.join(unknown[:3])} — not a LLaMA "
        "checkpoint this reader knows"
      )
    names = {weights.flax_path(n, len(s)): n for n, s in shapes.items()}  # path: HF name
    self._names = {p: names[p] for p in sorted(names, key=forward_order)}

  def shapes(self) -> dict[str, tuple[int, ...]]:
    """{path: shape} of every leaf, in iteration order (kernels [in, out]); nothing is read."""
    out = {}
    for path, name in self._names.items():
      shape = self._checkpoint.shapes[name]
      out[path] = shape[::-1] if path.endswith("/kernel") else shape
    return out

  def read(self, path: str) -> np.ndarray:
    """The leaf at `path` (the array iteration yields there), reading that tensor only."""
    name = self._names[path]
    return weights.flax_leaf(name, self._checkpoint.read(name))[1]

  def __len__(self) -> int:
    return len(self._names)

  def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
    for name in self._names.values():
      yield weights.flax_leaf(name, self._checkpoint.read(name))


@partial(jax.jit, static_argnames=("shape", "kind", "spread"))
def _draw(key, *, shape: tuple[int, ...], kind: str, spread: float) -> jax.Array:
  if kind == "scale":
    return jnp.ones(shape, jnp.float32)
  if kind == "kernel":  # heavy-tailed, as trained weights are (Student-t's gamma draws would
    # hold tens of bytes per element); output channels scaled log-normally (mean square 1)
    w = 0.02 / np.sqrt(2.0) * jax.random.laplace(key, shape)
    if spread:
      z = jax.random.normal(jax.random.fold_in(key, 1), (1, shape[1]))
      w = w * jnp.exp(spread * z - spread**2)
    return w.astype(jnp.bfloat16)
  return (0.02 * jax.random.normal(key, shape)).astype(jnp.bfloat16)


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  """Deterministic random leaves of any LLaMA shape, drawn on the default device.

  Each leaf is a function of (seed, path) alone: kernels Laplace of std 0.02 bf16 (each output
  channel times exp(channel_spread * N(0, 1) - channel_spread^2): channels of unequal scale, as
  in trained models, so that a LowRA budget mixes precisions), embedding and head 0.02 x N(0, 1)
  bf16, norm scales ones (float32). Leaves come in an HF checkpoint's order
  (embedding, then per layer attention, MLP and norms, final norm, head).
  """

  config: LlamaConfig
  seed: int = 0
  channel_spread: float = 0.0

  def shapes(self) -> dict[str, tuple[int, ...]]:
    """{path: shape} of every leaf, in iteration order."""
    c = self.config
    d, f = c.hidden_size, c.intermediate_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out = {"model/embed_tokens/embedding": (c.vocab_size, d)}
    for i in range(c.num_layers):
      p = f"model/layers/{i}/"
      out |= {
        p + "self_attn/q_proj/kernel": (d, q),
        p + "self_attn/k_proj/kernel": (d, kv),
        p + "self_attn/v_proj/kernel": (d, kv),
        p + "self_attn/o_proj/kernel": (q, d),
        p + "mlp/gate_proj/kernel": (d, f),
        p + "mlp/up_proj/kernel": (d, f),
        p + "mlp/down_proj/kernel": (f, d),
        p + "input_layernorm/scale": (d,),
        p + "post_attention_layernorm/scale": (d,),
      }
    out["model/norm/scale"] = (d,)
    if not c.tie_word_embeddings:
      out["lm_head/kernel"] = (d, c.vocab_size)
    return out

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(s)) for s in self.shapes().values())

  def __len__(self) -> int:
    return len(self.shapes())

  def read(self, path: str) -> jax.Array:
    """The leaf at `path`, drawn on the default device."""
    shape = self.shapes()[path]
    kind = "head" if path == "lm_head/kernel" else path.rsplit("/", 1)[1]
    key = jax.random.fold_in(jax.random.key(self.seed), zlib.crc32(path.encode()))
    return _draw(key, shape=shape, kind=kind, spread=self.channel_spread)

  def __iter__(self) -> Iterator[tuple[str, jax.Array]]:
    for path in self.shapes():
      yield path, self.read(path)

