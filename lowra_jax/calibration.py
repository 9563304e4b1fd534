"""Calibration for LowRA's output-weighted objective: each projection's input second moments.

    source = CheckpointSource(path)                        # weights_source: one tensor per read
    h = input_moments(model, source, blocks, batch_size=8)   # {".../q_proj/kernel": float32 [in]}
    qparams, _ = base.quantize_checkpoint(path, QuantConfig(calibration="kernel"), importance=h)

A few hundred blocks of text go once through the dense model, one decoder layer at a time: the
embedding is read from the weights source and applied, then each `llama.DecoderLayer` is read
(its tensors only), applied to the hidden states of every block and dropped, and last (untied
head only) the final norm; the device holds one layer's weights and the blocks' hidden states,
so a model larger than the device calibrates from its checkpoint. For every `QLoRALinear` the
input it multiplies (after its cast to the compute dtype) is captured with
`nn.intercept_methods`, and h_k = E[x_k^2] (the diagonal of E[x x^T]) is averaged over every
position of every block. The quantizer then weighs the squared error of input row k of that
kernel by h_k, which makes it the expected squared error of the layer's output when inputs are
uncorrelated. The result is keyed by the kernel's '/'-joined params path (`quantize_stream`'s),
so it can come from any source that produces one vector per path. `save` / `load` cache it as
one safetensors file whose metadata is the calibration's identity.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from lowra_jax.lora import QLoRALinear
from lowra_jax.models import llama
from lowra_jax.quantize import pipeline


@dataclasses.dataclass(frozen=True)
class CalibConfig:
  """Calibration data for `QuantConfig.calibration` "kernel" / "model" (config section ``calib``).

  sequences: blocks of seq_len tokens run through the dense model, evenly spaced over the data
  (all of them when it has fewer). batch_size: blocks per forward pass. split: the split of
  ``config.data.path`` to read; None: the training split (``config.data.split``).
  """

  sequences: int = 256
  batch_size: int = 8
  split: str | None = None

  def __post_init__(self):
    if self.sequences < 1 or self.batch_size < 1:
      raise ValueError(
        f"sequences={self.sequences}, batch_size={self.batch_size} — use values >= 1, "
        "e.g. sequences=256, batch_size=8."
      )


def spread(blocks: np.ndarray, count: int) -> np.ndarray:
  """`count` of `blocks` [n, T + 1], evenly spaced from the first to the last (all if fewer)."""
  if len(blocks) <= count:
    return blocks
  return blocks[np.linspace(0, len(blocks) - 1, count).round().astype(np.int64)]


def _input_sums(x: jax.Array, dtype, full: bool) -> jax.Array:
  """float32 sums over rows of x cast to `dtype` as a `QLoRALinear` casts it: of x^2 ([in]), or
  with `full` of x^T x ([in, in], float32 accumulation)."""
  x = x.astype(dtype).astype(jnp.float32)
  if full:
    x = x.reshape(-1, x.shape[-1])
    return jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(jnp.square(x), axis=tuple(range(x.ndim - 1)))


def _recorder(sums: dict, full: bool):
  """An `nn.intercept_methods` interceptor adding each QLoRALinear call's `_input_sums` of its
  input to `sums` under its kernel's path (relative to the module applied)."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, QLoRALinear) and context.method_name == "__call__":
      sums["/".join(module.path) + "/kernel"] = _input_sums(args[0], module.dtype, full)
    return next_fun(*args, **kwargs)

  return interceptor


@partial(jax.jit, static_argnames=("config", "dtype"))
def _embed(embedding, tokens, *, config: llama.LlamaConfig, dtype):
  """The model's token embedding of `tokens` [..., T]: [..., T, d] in `dtype`."""
  embed = nn.Embed(config.vocab_size, config.hidden_size, dtype=dtype)
  return embed.apply({"params": {"embedding": embedding}}, tokens)


@partial(jax.jit, static_argnames=("config", "dtype", "full"), donate_argnums=1)
def _layer(params, hidden, *, config: llama.LlamaConfig, dtype, full: bool):
  """One plain `llama.DecoderLayer` (its params) on each batch of `hidden` [n, B, T, d] (donated:
  updated in place), with the rotary tables and causal mask `llama.Llama` uses for unpadded tokens
  at positions 0..T-1. Returns (its outputs [n, B, T, d], {path in the layer: float32 [n, in],
  each batch's `_input_sums` of that projection's input})."""
  n, b, t, _ = hidden.shape
  cos, sin = llama.rotary_tables(config, jnp.broadcast_to(jnp.arange(t), (b, t)))
  mask, _ = llama.attention_mask_of(jnp.ones((b, t), bool))
  layer = llama.DecoderLayer(config, dtype, lora=None, deterministic=True)

  def apply(x):
    sums: dict = {}
    with nn.intercept_methods(_recorder(sums, full)):
      y, _ = layer.apply({"params": params}, x, cos, sin, mask)
    return y, sums

  def body(i, carry):  # one batch after the other, as separate calls would run them
    hidden, sums = carry
    y, batch_sums = apply(hidden[i])
    return hidden.at[i].set(y), {k: v.at[i].set(batch_sums[k]) for k, v in sums.items()}

  shapes = jax.eval_shape(apply, hidden[0])[1]
  sums = {k: jnp.zeros((n, *v.shape), v.dtype) for k, v in shapes.items()}
  return jax.lax.fori_loop(0, n, body, (hidden, sums))


@partial(jax.jit, static_argnames=("config", "dtype", "full"))
def _head_input(scale, hidden, *, config: llama.LlamaConfig, dtype, full: bool):
  """float32 [n, in] (`full`: [n, in, in]): each batch's `_input_sums` of the head's input, the
  final norm (`scale`) of the last layer's outputs `hidden` [n, B, T, d]."""
  norm = llama.RMSNorm(config.rms_norm_eps, dtype)
  apply = lambda x: _input_sums(norm.apply({"params": {"scale": scale}}, x), dtype, full)  # noqa: E731
  return jax.vmap(apply)(hidden)


def input_moments(
  model: llama.Llama,
  source,
  blocks: np.ndarray,
  batch_size: int,
  *,
  progress: bool = False,
  full: bool = False,
) -> dict[str, np.ndarray]:
  """{kernel path: float32 [in]} mean of x_k^2 over every token of `blocks` for each projection,
  running the dense model one decoder layer at a time.

  The embedding is read and applied to every batch, then dropped; each decoder layer's tensors
  are read (nothing else), put on the default device, applied to every batch's hidden states
  (kept on the device, [n, T, d] in the compute dtype; one program per layer runs the batches
  one after the other), recording its projections' inputs, and dropped before the next layer is
  read; last, with an untied head, the final norm. Each tensor is read at most once and the
  head's kernel never; the device holds one layer's weights (or the embedding) and the hidden
  states.

  Args:
    model: a `llama.Llama` (its config and compute dtype; run without adapters or remat).
    source: its dense weights: `shapes()` and `read(path)` of a weights source
      (`weights_source.CheckpointSource`, `SyntheticSource`), leaves as `weights.to_kernel_tree`
      makes them (kernels [in, out]).
    blocks: int [n, T + 1] token blocks (`data.pack`'s); each block's first T tokens are the input.
    batch_size: blocks per forward pass (a last, smaller batch is a second program: one more
      compile).
    progress: a tqdm bar over the decoder layers.
    full: return the whole covariance E[x x^T] ([in, in]: 4 in^2 bytes per projection, e.g.
      0.87 GB per LLaMA-7B layer; for `QuantConfig.rounding="gptq"`), not only its diagonal.

  Returns:
    for every `QLoRALinear` (projections and an untied head), h = E[x x^T]'s diagonal (float32
    [in]; `full`: E[x x^T], [in, in]), summed in float64 over batches of float32 sums, of the
    input as the layer casts it (compute dtype).
  """
  config, dtype = model.config, model.dtype
  paths = list(source.shapes())
  tokens = np.asarray(blocks)[:, :-1].astype(np.int32)
  static = {"config": config, "dtype": dtype}
  whole = len(tokens) // batch_size * batch_size
  stacks = [  # [batches, batch_size, T], then the smaller last batch [1, r, T]
    part.reshape(-1, len(part) if len(part) < batch_size else batch_size, tokens.shape[1])
    for part in (tokens[:whole], tokens[whole:])
    if len(part)
  ]
  embedding = jax.device_put(source.read("model/embed_tokens/embedding"))
  hidden = [_embed(embedding, stack, **static) for stack in stacks]
  del embedding
  total: dict[str, np.ndarray] = {}

  def add(prefix: str, stacked_sums: list[dict]) -> None:
    """Adds each batch's float32 sums (in batch order) to `total` in float64."""
    for sums in stacked_sums:
      for path, s in sums.items():
        for row in np.asarray(s, np.float64):
          total[prefix + path] = total.get(prefix + path, 0.0) + row

  def forward(params: dict) -> list[dict]:
    """Applies the layer of `params` to every batch's hidden states (replaced); their sums."""
    stacked_sums = []
    for j, x in enumerate(hidden):
      hidden[j], sums = _layer(params, x, **static, full=full)
      stacked_sums.append(sums)
    return stacked_sums

  for i in tqdm(range(config.num_layers), "calibration", unit="layer", disable=not progress):
    prefix = f"model/layers/{i}/"
    leaves = [p for p in paths if p.startswith(prefix)]
    layer = pipeline.nest((p[len(prefix) :], jax.device_put(source.read(p))) for p in leaves)
    add(prefix, forward(layer))
    del layer  # before the next layer is read
  if not config.tie_word_embeddings:  # a tied head is `embed.attend`, not a QLoRALinear
    scale = jax.device_put(source.read("model/norm/scale"))
    add("", [{"lm_head/kernel": _head_input(scale, x, **static, full=full)} for x in hidden])
  return {path: (s / tokens.size).astype(np.float32) for path, s in total.items()}


def save(path: Path, moments: Mapping[str, np.ndarray], identity: dict) -> None:
  """Writes `moments` to the safetensors file `path` (via a temporary file renamed into place),
  with `identity` (what determined them) as its metadata."""
  tmp = path.with_name(path.name + ".tmp")
  save_file(
    {p: np.ascontiguousarray(h, np.float32) for p, h in moments.items()},
    str(tmp),
    metadata={"identity": json.dumps(identity, sort_keys=True)},
  )
  tmp.replace(path)


def load(path: Path, identity: dict) -> dict[str, np.ndarray] | None:
  """The moments `save` wrote to `path` if its identity equals `identity`, else None."""
  if not path.is_file():
    return None
  with safe_open(str(path), "np") as f:
    saved = (f.metadata() or {}).get("identity")
  if saved != json.dumps(identity, sort_keys=True):
    return None
  return load_file(str(path))
