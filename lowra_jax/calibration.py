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

`QuantConfig.calibration="fisher"` also weighs each projection's output channels by g_n =
E[(dL/dy_n)^2], the squared gradient of the blocks' next-token loss with respect to that output:
`output_gradients` streams a forward and a backward through the model the same way (each layer
read two or three times), keyed `pipeline.output_key(path)` beside the moments:

    h |= output_gradients(model, source, blocks, batch_size=8)

GPTQ rounding (`QuantConfig.rounding="gptq"`) needs each projection's whole input covariance
E[x x^T] as well: `input_moments(..., full=True)` returns all of them, `LayerCovariances` computes
them layer by layer while the quantizer's pass 2 reads the kernels (one layer's held at a time,
or, for models whose covariances take at most `KEEP_ALL_BYTES`, all of them once computed, whose
diagonals are then the moments: one forward for both):

    cov = LayerCovariances(model, source, blocks, batch_size=8)
    qparams, _ = base.quantize_checkpoint(path, config, importance=h, covariances=cov)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from functools import partial
from pathlib import Path
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from lowra_jax.lora import QLoRALinear
from lowra_jax.models import llama
from lowra_jax.quantize import QuantizationError, pipeline


@dataclasses.dataclass(frozen=True)
class CalibConfig:
  """Calibration data for `QuantConfig.calibration` other than "none" (config section ``calib``).

  sequences: blocks of seq_len tokens run through the dense model, evenly spaced over the data
  (all of them when it has fewer). gradient_sequences: with ``quant.calibration="fisher"``, how
  many of those blocks (evenly spaced) give the output gradients (`fisher_moments`; the
  backward's cost grows with them, the input moments still come from all). batch_size: blocks
  per forward pass. split: the split of ``config.data.path`` to read; None: the training split
  (``config.data.split``).
  """

  sequences: int = 256
  gradient_sequences: int = 16
  batch_size: int = 8
  split: str | None = None

  def __post_init__(self):
    if min(self.sequences, self.gradient_sequences, self.batch_size) < 1:
      raise ValueError(
        f"sequences={self.sequences}, gradient_sequences={self.gradient_sequences}, "
        f"batch_size={self.batch_size} — use values >= 1, e.g. 256, 16 and 8."
      )


def spread(blocks: np.ndarray, count: int) -> np.ndarray:
  """`count` of `blocks` [n, T + 1], evenly spaced from the first to the last (all if fewer)."""
  if len(blocks) <= count:
    return blocks
  return blocks[np.linspace(0, len(blocks) - 1, count).round().astype(np.int64)]


def _input_sums(x: jax.Array, dtype, full: bool) -> jax.Array:
  """float32 sums over rows of x cast to `dtype` as a `QLoRALinear` casts it: of x^2 ([in]), or
  with `full` of x^T x ([in, in], float32 accumulation; in bf16 the products of bf16 values are
  exact in float32, so the bf16 x float32-accumulating dot, a tensor-core one on GPUs, is as
  exact as a float32 one)."""
  x = x.astype(dtype)
  if full:
    x = x.reshape(-1, x.shape[-1])
    if x.dtype == jnp.bfloat16:
      return jnp.dot(x.T, x, preferred_element_type=jnp.float32)
    x = x.astype(jnp.float32)
    return jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST)
  x = x.astype(jnp.float32)
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


def _stacks(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
  """`rows` [n, ...] as batches: [n // batch_size, batch_size, ...], then the smaller rest
  [1, n % batch_size, ...] (absent when it is empty)."""
  whole = len(rows) // batch_size * batch_size
  return [
    part.reshape(-1, len(part) if len(part) < batch_size else batch_size, *rows.shape[1:])
    for part in (rows[:whole], rows[whole:])
    if len(part)
  ]


@partial(jax.jit, static_argnames=("config", "dtype"))
def _embed(embedding, tokens, *, config: llama.LlamaConfig, dtype):
  """The model's token embedding of `tokens` [..., T]: [..., T, d] in `dtype`."""
  embed = nn.Embed(config.vocab_size, config.hidden_size, dtype=dtype)
  return embed.apply({"params": {"embedding": embedding}}, tokens)


@partial(jax.jit, static_argnames=("config", "dtype", "full", "advance"), donate_argnums=1)
def _layer(params, hidden, *, config: llama.LlamaConfig, dtype, full: bool, advance: bool = True):
  """One plain `llama.DecoderLayer` (its params) on each batch of `hidden` [n, B, T, d] (donated:
  updated in place), with the rotary tables and causal mask `llama.Llama` uses for unpadded tokens
  at positions 0..T-1. Returns (its outputs [n, B, T, d] (`advance=False`: `hidden` as it was),
  {path in the layer: float32 [in] (`full`: [in, in]), the `_input_sums` of that projection's
  input added over the batches in float32})."""
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
    hidden = hidden.at[i].set(y) if advance else hidden
    return hidden, {k: v + batch_sums[k] for k, v in sums.items()}

  shapes = jax.eval_shape(apply, hidden[0])[1]
  sums = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
  return jax.lax.fori_loop(0, n, body, (hidden, sums))


@partial(jax.jit, static_argnames=("config", "dtype", "full"))
def _head_input(scale, hidden, *, config: llama.LlamaConfig, dtype, full: bool):
  """float32 [in] (`full`: [in, in]): the `_input_sums` of the head's input, the final norm
  (`scale`) of the last layer's outputs `hidden` [n, B, T, d], added over the n batches."""
  norm = llama.RMSNorm(config.rms_norm_eps, dtype)
  apply = lambda x: _input_sums(norm.apply({"params": {"scale": scale}}, x), dtype, full)  # noqa: E731
  return jnp.sum(jax.vmap(apply)(hidden), axis=0)


class _LayerForward:
  """Calibration blocks' hidden states, advanced through the dense model one step at a time.

  Made with the embedding of the blocks' tokens (read from the source, applied, dropped); each
  `step()` reads the next decoder layer's tensors (nothing else), puts them on the default
  device, applies them to every batch's hidden states (kept on the device, [n, B, T, d] in the
  compute dtype; one program per layer runs the batches one after the other) and drops them;
  with an untied head, the step after the last layer is the final norm (the head's input).
  """

  def __init__(self, model: llama.Llama, source, blocks: np.ndarray, batch_size: int, full: bool):
    self.config, self.dtype, self.source, self.full = model.config, model.dtype, source, full
    self.paths = list(source.shapes())
    tokens = np.asarray(blocks)[:, :-1].astype(np.int32)
    self.tokens = tokens.size
    embedding = jax.device_put(source.read("model/embed_tokens/embedding"))
    static = {"config": self.config, "dtype": self.dtype}
    self.hidden = [_embed(embedding, stack, **static) for stack in _stacks(tokens, batch_size)]
    self.done = 0  # steps taken
    self.steps = self.config.num_layers + (0 if self.config.tie_word_embeddings else 1)

  def layer(self, i: int, kernels: Mapping[str, jax.Array] = {}) -> dict:  # noqa: B006
    """Decoder layer i's params tree (its tensors only), read from the source onto the device;
    those in `kernels` ({path: value}) instead of the source's."""
    prefix = f"model/layers/{i}/"
    leaves = [p for p in self.paths if p.startswith(prefix)]
    read = lambda p: kernels[p] if p in kernels else self.source.read(p)  # noqa: E731
    return pipeline.nest((p[len(prefix) :], jax.device_put(read(p))) for p in leaves)

  def snapshot(self) -> list[np.ndarray]:
    """Host copies of the hidden states (the next step's inputs)."""
    return [np.asarray(x) for x in self.hidden]

  def drop(self) -> None:
    """Frees the hidden states' device memory (a `resume` brings some back)."""
    self.hidden = []

  def resume(self, done: int, hidden: list[np.ndarray]) -> None:
    """Continues from `hidden` (a `snapshot` taken after `done` steps)."""
    self.done, self.hidden = done, [jax.device_put(x) for x in hidden]

  def step(self, advance: bool = True) -> dict[str, jax.Array]:
    """Takes the next step; {kernel path: float32 [in] (`full`: [in, in])} on the device, the
    `_input_sums` of each of its projections' inputs over every token of the blocks.
    `advance=False`: the sums only; the hidden states stay this step's inputs (`done` as it was)."""
    static = {"config": self.config, "dtype": self.dtype, "full": self.full}
    i = self.done
    self.done += advance
    if i == self.config.num_layers:  # an untied head (a tied one is `embed.attend`)
      scale = jax.device_put(self.source.read("model/norm/scale"))
      return {"lm_head/kernel": sum(_head_input(scale, x, **static) for x in self.hidden)}
    layer = self.layer(i)
    total: dict[str, jax.Array] = {}
    for j, x in enumerate(self.hidden):
      self.hidden[j], sums = _layer(layer, x, **static, advance=advance)
      total = {k: total[k] + v if k in total else v for k, v in sums.items()}
    return {f"model/layers/{i}/{k}": v for k, v in total.items()}

  def advance(self, kernels: Mapping[str, jax.Array]) -> None:
    """Moves the hidden states through the next decoder layer, without the sums; its kernels in
    `kernels` instead of the source's."""
    layer = self.layer(self.done, kernels)
    for j, x in enumerate(self.hidden):
      self.hidden[j], _ = _layer(layer, x, config=self.config, dtype=self.dtype, full=False)
    self.done += 1


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
  running the dense model one decoder layer at a time (`_LayerForward`): each tensor is read at
  most once and the head's kernel never; the device holds one layer's weights (or the embedding)
  and the hidden states.

  Args:
    model: a `llama.Llama` (its config and compute dtype; run without adapters or remat).
    source: its dense weights: `shapes()` and `read(path)` of a weights source
      (`weights_source.CheckpointSource`, `SyntheticSource`), leaves as `weights.to_kernel_tree`
      makes them (kernels [in, out]).
    blocks: int [n, T + 1] token blocks (`data.pack`'s); each block's first T tokens are the input.
    batch_size: blocks per forward pass (a last, smaller batch is a second program: one more
      compile).
    progress: a tqdm bar over the decoder layers.
    full: return the whole covariance E[x x^T] ([in, in]: 4 in^2 bytes per projection held on
      the host, e.g. 0.87 GB per LLaMA-7B layer; `LayerCovariances` holds one layer's), not only
      its diagonal.

  Returns:
    for every `QLoRALinear` (projections and an untied head), h = E[x x^T]'s diagonal (float32
    [in]; `full`: E[x x^T], [in, in]) of the input as the layer casts it (compute dtype), from
    float32 sums over the batches.
  """
  forward = _LayerForward(model, source, blocks, batch_size, full)
  total: dict[str, np.ndarray] = {}
  for _ in tqdm(range(forward.steps), "calibration", unit="layer", disable=not progress):
    for path, s in forward.step().items():
      total[path] = np.asarray(s / forward.tokens, np.float32)
  return total


def _perturber(perturbations: dict | None, shapes: dict):
  """An `nn.intercept_methods` interceptor recording each QLoRALinear call's output shape in
  `shapes` under its kernel's path (relative to the module applied) and, with `perturbations`,
  adding perturbations[path] (float32, that shape) to the output: zeros whose gradients are
  dL/dy, y the output in the compute dtype."""

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if isinstance(context.module, QLoRALinear) and context.method_name == "__call__":
      path = "/".join(context.module.path) + "/kernel"
      shapes[path] = y.shape
      if perturbations is not None:
        y = y + perturbations[path].astype(y.dtype)
    return y

  return interceptor


@partial(jax.jit, static_argnames=("config", "dtype"))
def _head_backward(head, hidden, targets, *, config: llama.LlamaConfig, dtype):
  """Where the backward pass starts: L = the summed next-token loss of the logits of `hidden`
  [n, B, T, d] (the last layer's outputs) against `targets` int [n, B, T], through the final
  norm (head["norm"]) and the untied head (head["lm_head"], a `QLoRALinear`'s params) or the
  tied embedding's `attend` (head["embed_tokens"]). Returns (dL/dhidden [n, B, T, d] in hidden's
  dtype, {"lm_head/kernel": float32 [vocab], the sum over the tokens of (dL/dy)^2, y the head's
  output in the compute dtype} or {} for a tied head)."""
  norm = llama.RMSNorm(config.rms_norm_eps, dtype)
  if "lm_head" in head:
    proj = QLoRALinear(config.vocab_size, dtype=dtype, lora=None)
    project = lambda h: proj.apply({"params": head["lm_head"]}, h)  # noqa: E731
  else:
    embed = nn.Embed(config.vocab_size, config.hidden_size, dtype=dtype)
    params = {"params": head["embed_tokens"]}
    project = lambda h: embed.apply(params, h, method="attend")  # noqa: E731

  def one(x, t):  # one batch
    y, to_input = jax.vjp(lambda x: project(norm.apply({"params": head["norm"]}, x)), x)
    loss = lambda y: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
      y.astype(jnp.float32), t
    ).sum()
    dy = jax.grad(loss)(y)
    return to_input(dy)[0], jnp.sum(jnp.square(dy.astype(jnp.float32)), axis=(0, 1))

  dx, g = jax.lax.map(lambda a: one(*a), (hidden, targets))
  return dx, ({"lm_head/kernel": jnp.sum(g, axis=0)} if "lm_head" in head else {})


@partial(jax.jit, static_argnames=("config", "dtype"), donate_argnums=2)
def _layer_backward(params, hidden, cotangent, *, config: llama.LlamaConfig, dtype):
  """One plain `llama.DecoderLayer` (its params) backward, batch by batch: `hidden` [n, B, T, d]
  its inputs, `cotangent` [n, B, T, d] dL/d(its outputs) (donated). Returns (dL/d(its inputs)
  [n, B, T, d], {path in the layer: float32 [out], the sum over the tokens of (dL/dy)^2, y that
  projection's output in the compute dtype})."""
  n, b, t, _ = hidden.shape
  cos, sin = llama.rotary_tables(config, jnp.broadcast_to(jnp.arange(t), (b, t)))
  mask, _ = llama.attention_mask_of(jnp.ones((b, t), bool))
  layer = llama.DecoderLayer(config, dtype, lora=None, deterministic=True)

  def apply(x, perturbations):
    with nn.intercept_methods(_perturber(perturbations, {})):
      return layer.apply({"params": params}, x, cos, sin, mask)[0]

  shapes: dict = {}
  with nn.intercept_methods(_perturber(None, shapes)):
    jax.eval_shape(lambda x: layer.apply({"params": params}, x, cos, sin, mask), hidden[0])

  def body(i, carry):
    cotangent, sums = carry
    zeros = {k: jnp.zeros(v, jnp.float32) for k, v in shapes.items()}
    _, to_inputs = jax.vjp(apply, hidden[i], zeros)
    dx, dy = to_inputs(cotangent[i])
    sums = {k: v + jnp.sum(jnp.square(dy[k]), axis=(0, 1)) for k, v in sums.items()}
    return cotangent.at[i].set(dx), sums

  sums = {k: jnp.zeros(v[-1], jnp.float32) for k, v in shapes.items()}
  return jax.lax.fori_loop(0, n, body, (cotangent, sums))


def output_gradients(
  model: llama.Llama,
  source,
  blocks: np.ndarray,
  batch_size: int,
  *,
  progress: bool = False,
  segment: int | None = None,
  moments: bool = False,
) -> dict[str, np.ndarray]:
  """{`pipeline.output_key(kernel path)`: float32 [out]}: for every projection (and an untied
  head), g_n = E[(dL/dy_n)^2] over every token of `blocks`, L the blocks' summed next-token loss
  through the dense model and y that projection's output in the compute dtype: the output-side
  weights of `QuantConfig.calibration="fisher"`; with `moments`, also `input_moments`' h of the
  same blocks under the kernel paths, summed by the first forward (no forward of its own).

  Streamed like `input_moments`, so a model larger than the device calibrates from its
  checkpoint: a forward one decoder layer at a time keeps the hidden states at the start of
  every `segment`-th layer on the host; the head starts the backward (dL/dhidden); then, segment
  by segment from the last, the forward is run again from the segment's start keeping each
  layer's inputs on the host, and the layers' backward runs from the segment's last to its first
  (`jax.vjp` of each layer on each batch, zero perturbations added to its projections' outputs).
  Each decoder layer's tensors are read two or three times, the head's once; the device holds
  one layer's weights, the hidden states and their gradients; the host ceil(L / segment) +
  segment copies of the hidden states (default segment ceil(sqrt(L))).

  Args:
    model, source, batch_size: as `input_moments`'.
    blocks: int [n, T + 1] token blocks; each block's first T tokens are the input, the last T
      the targets.
    progress: a tqdm bar over the layers' forward and backward steps.
    segment: decoder layers per stretch recomputed in the backward (1: every layer's inputs are
      kept from the first forward, none recomputed).
    moments: also return the input moments (as `input_moments(model, source, blocks,
      batch_size)` would).
  """
  config = model.config
  layers, static = config.num_layers, {"config": config, "dtype": model.dtype}
  segment = segment or max(1, math.isqrt(layers - 1) + 1)
  blocks = np.asarray(blocks).astype(np.int32)
  forward = _LayerForward(model, source, blocks, batch_size, full=False)
  starts = list(range(0, layers, segment))
  steps = 2 * layers + 1 + sum(min(segment, layers - a) - 1 for a in starts)
  bar = tqdm(total=steps, desc="calibration: output gradients", unit="layer", disable=not progress)
  saved, sums_in = {}, {}
  for i in range(layers):
    if i % segment == 0:
      saved[i] = forward.snapshot()
    sums_in |= forward.step()
    bar.update()
  if moments and forward.done < forward.steps:  # an untied head's input
    sums_in |= forward.step()
  h = {k: np.asarray(v / forward.tokens, np.float32) for k, v in sums_in.items()} if moments else {}
  del sums_in
  paths = [p for p in source.shapes() if p.startswith("lm_head/")] or [
    "model/embed_tokens/embedding"
  ]
  head = pipeline.nest(
    (p.removeprefix("model/"), jax.device_put(source.read(p))) for p in paths + ["model/norm/scale"]
  )
  total: dict[str, jax.Array] = {}
  cotangents = []
  for x, targets in zip(forward.hidden, _stacks(blocks[:, 1:], batch_size)):
    dx, sums = _head_backward(head, x, targets, **static)
    cotangents.append(dx)
    total = {k: total[k] + v if k in total else v for k, v in sums.items()}
  del head
  bar.update()
  for start in reversed(starts):
    inputs = [saved.pop(start)]
    forward.resume(start, inputs[0])
    for _ in range(start + 1, min(start + segment, layers)):
      forward.step()
      inputs.append(forward.snapshot())
      bar.update()
    forward.drop()  # the segment's last outputs: the next segment's saved inputs
    for i in reversed(range(start, start + len(inputs))):
      params, hidden = forward.layer(i), inputs.pop()
      for j, x in enumerate(hidden):
        cotangents[j], sums = _layer_backward(params, jax.device_put(x), cotangents[j], **static)
        for k, v in sums.items():
          k = f"model/layers/{i}/{k}"
          total[k] = total[k] + v if k in total else v
      del params  # before the next layer's are read
      bar.update()
  bar.close()
  return h | {
    pipeline.output_key(k): np.asarray(v / forward.tokens, np.float32) for k, v in total.items()
  }


def fisher_moments(
  model: llama.Llama,
  source,
  blocks: np.ndarray,
  batch_size: int,
  gradient_sequences: int,
  *,
  progress: bool = False,
  moments: bool = True,
) -> dict[str, np.ndarray]:
  """What `QuantConfig.calibration="fisher"` weighs by: `output_gradients` of
  `spread(blocks, gradient_sequences)` and, with `moments`, `input_moments` of all of `blocks`
  (from the gradients' first forward when those are all the blocks, else one forward of its
  own)."""
  some = spread(blocks, gradient_sequences)
  if len(some) == len(blocks):
    return output_gradients(model, source, blocks, batch_size, progress=progress, moments=moments)
  g = output_gradients(model, source, some, batch_size, progress=progress)
  if moments:
    g |= input_moments(model, source, blocks, batch_size, progress=progress)
  return g


# `LayerCovariances` keeps every layer's covariances when all of them take at most this many bytes
# (pycode-llama-17m: 62 MB; a LLaMA-7B's, 28 GB, are computed again in each LoftQ round).
KEEP_ALL_BYTES = 1 << 30


class LayerCovariances(Mapping[str, jax.Array]):
  """{kernel path: float32 [in, in] E[x x^T] on the device} for every `QLoRALinear` of the model,
  computed when asked for, one decoder layer at a time: what `QuantConfig.rounding="gptq"` reads
  in `quantize_stream`'s pass 2 (source order), holding one layer's covariances and the blocks'
  hidden states instead of every layer's (a 70B model's would need ~390 GB).

  Asking for a kernel of layer i runs the blocks (as `input_moments(..., full=True)` does, the same
  values) up to layer i and keeps that layer's covariances only; asking for an earlier layer's
  starts again from the embedding (each LoftQ round's pass 2 does: one forward per round). So
  ask in forward order, as a `CheckpointSource` iterates (`weights_source.forward_order`; a
  pytree's flattening puts layer 10 before layer 2, which costs a restart at each such step).
  When every covariance fits in `keep_bytes` (`keeps_all`), every layer's is kept once computed:
  one forward serves every round, and `diagonals()` the calibration moments.

  `sequential` (`QuantConfig.gptq_sequential`): the blocks reach layer i through layers 0..i-1 as
  quantized, as GPTQ's paper runs them, so that each layer's rounding answers the errors of the
  layers before it. The quantizer reports each kernel it has encoded (`quantized`); layer i's
  covariances are computed with its own dense kernels (nothing of it is quantized yet), and the
  blocks move on through layer i when layer i + 1 is asked for, with the kernels reported by then:
  two forwards of each layer per quantizer pass, and nothing kept across passes (`keeps_all` is
  False: each LoftQ round runs from the embedding again). A reported kernel is held on the device
  until the blocks have passed its layer, then dropped (one layer's at a time).
  """

  def __init__(
    self,
    model: llama.Llama,
    source,
    blocks: np.ndarray,
    batch_size: int,
    keep_bytes: int = KEEP_ALL_BYTES,
    sequential: bool = False,
  ):
    self._kernels: dict[str, jax.Array] = {}  # `quantized`'s, until the blocks pass their layer
    self._reported: set[int] = set()  # layers `quantized` reported since the blocks' start
    self._start = lambda: _LayerForward(model, source, blocks, batch_size, full=True)
    self._config = model.config
    shapes = source.shapes()
    self._keys = [p for p in shapes if self._step_of(p) is not None]
    self._key_set = set(self._keys)
    self.sequential = sequential
    self.keeps_all = not sequential and sum(4 * shapes[p][0] ** 2 for p in self._keys) <= keep_bytes
    self._forward: _LayerForward | None = None
    self._held: dict[str, jax.Array] = {}
    self.seconds = 0.0  # spent computing (the forwards included), for reports

  def _step_of(self, path: str) -> int | None:
    parts = path.split("/")
    if path == "lm_head/kernel" and not self._config.tie_word_embeddings:
      return self._config.num_layers
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[-1] == "kernel":
      return int(parts[2])
    return None

  def __getitem__(self, path: str) -> jax.Array:
    if path not in self._key_set:
      raise KeyError(path)
    if path in self._held:
      return self._held[path]
    step = self._step_of(path)
    start = time.perf_counter()
    if self.sequential:
      self._sequential_at(step)
      self.seconds += time.perf_counter() - start
      return self._held[path]
    if self._forward is None or self._forward.done > step + 1:
      self._forward, self._held = None, {}
      self._forward = self._start()
    while self._forward.done <= step:
      if not self.keeps_all:
        self._held = {}  # dropped before the next layer's are computed
      layer = {p: c / self._forward.tokens for p, c in self._forward.step().items()}
      self._held.update(jax.block_until_ready(layer))
    self.seconds += time.perf_counter() - start
    return self._held[path]

  def _sequential_at(self, step: int) -> None:
    """Holds step's covariances, the blocks having gone through every earlier layer with the
    kernels `quantized` reported; a step behind the blocks starts them from the embedding again
    (a new quantizer pass: what was reported before is dropped)."""
    if self._forward is None or self._forward.done > step:
      if early := sorted(i for i in self._reported if i < step):
        raise QuantizationError(
          f"gptq_sequential: layer {step}'s covariances asked for after layer "
          f"{self._forward.done}'s, behind quantized layer {early[-1]} — quantize a source in "
          "forward order (`weights_source.forward_order`, as `base.quantize_checkpoint` reads)."
        )
      self._forward, self._held, self._kernels, self._reported = self._start(), {}, {}, set()
    while self._forward.done < step:
      passed, self._held = f"model/layers/{self._forward.done}/", {}
      self._forward.advance(self._kernels)
      for p in [p for p in self._kernels if p.startswith(passed)]:
        del self._kernels[p]
    if not self._held:
      sums = self._forward.step(advance=False)
      self._held = jax.block_until_ready({p: c / self._forward.tokens for p, c in sums.items()})

  def quantized(self, path: str, kernel) -> None:
    """With `sequential`: from now on the model's kernel at `path` is `kernel` (float32 [in, out]:
    the quantized one's dequantization, plus LoftQ's scaled factors when it has them), the one the
    blocks go through to later layers. Nothing without `sequential`."""
    if self.sequential and path in self._key_set:
      self._kernels[path] = jnp.asarray(kernel, jnp.float32)
      self._reported.add(self._step_of(path))

  def diagonals(self) -> dict[str, np.ndarray]:
    """{kernel path: float32 [in]}: every covariance's diagonal, the moments `input_moments` gives
    for the same blocks (the same float32 sums of exact products, summed in another order); with
    `keeps_all`, the covariances are kept for the quantizer's passes."""
    return {p: np.asarray(jnp.diagonal(self[p]), np.float32) for p in self._keys}

  def __contains__(self, path) -> bool:
    return path in self._key_set

  def __iter__(self):
    return iter(self._keys)

  def __len__(self) -> int:
    return len(self._keys)


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
