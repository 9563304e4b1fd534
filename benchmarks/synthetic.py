"""Random LLaMA-shaped params for the speed benchmarks (`generate.py`, `model_step.py`).

By default every decoder layer is drawn on its own and the whole model is quantized at once (the
LowRA budget solved model-wide), as a real checkpoint is: each layer's mixed-precision tensors then
have their own bucket sizes and compile their own kernels, which is what users pay. `tiled=True`
draws and quantizes one layer and gives every layer its own copy of it (separate buffers, identical
shapes): far shorter quantization and compilation, but not what a real checkpoint costs.

Kernels are bf16 [in, out]: Student-t(5) entries times a log-normal factor per output channel
(std 0.02 overall), so channels differ in scale and LowRA's precision split varies by tensor as it
does on real weights; norms are ones; embeddings and head are bf16 normal(0.02).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lowra_jax.models import llama
from lowra_jax.quantize import QuantConfig, is_quantized, quantize_params


@functools.partial(jax.jit, static_argnums=1)
def _kernel(key, shape: tuple[int, int]):
  """bf16 [in, out]: t(5) entries (unit variance) x 0.02 x a per-channel log-normal scale (mean
  square 1)."""
  k_entries, k_scale = jax.random.split(key)
  entries = jax.random.t(k_entries, 5.0, shape) * (0.02 / jnp.sqrt(5.0 / 3.0))
  scale = jnp.exp(0.3 * jax.random.normal(k_scale, (1, shape[1])) - 0.09)
  return (entries * scale).astype(jnp.bfloat16)


def _projection(key, shape) -> dict:
  return {"kernel": _kernel(key, shape)}


def random_layer(config: llama.LlamaConfig, key) -> dict:
  """One decoder layer's params: bf16 kernels [in, out] (see the module docstring), unit norms."""
  d, f = config.hidden_size, config.intermediate_size
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  shapes = {
    "self_attn": {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)},
    "mlp": {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)},
  }
  keys = iter(jax.random.split(key, 7))
  layer = {
    block: {name: _projection(next(keys), shape) for name, shape in projs.items()}
    for block, projs in shapes.items()
  }
  ones = {"scale": jnp.ones((d,), jnp.float32)}
  return {**layer, "input_layernorm": ones, "post_attention_layernorm": dict(ones)}


def model_params(
  config: llama.LlamaConfig, quant: QuantConfig | None, *, tiled: bool = False, seed: int = 0
) -> dict:
  """The whole model's params tree (`llama.Llama`'s names), kernels quantized by `quant` (None or
  method "none": dense bf16). `tiled`: copies of one quantized layer (module docstring)."""
  k_embed, k_head, k_layers = jax.random.split(jax.random.key(seed), 3)
  quantize = quant is not None and quant.method != "none"
  if tiled:
    layer = random_layer(config, k_layers)
    if quantize:
      layer, _ = quantize_params(layer, quant, progress=False)
    layers = {str(i): jax.tree.map(jnp.copy, layer) for i in range(config.num_layers)}
  else:
    layers = {
      str(i): random_layer(config, jax.random.fold_in(k_layers, i))
      for i in range(config.num_layers)
    }
    if quantize:
      layers, _ = quantize_params(layers, quant, progress=False)
  d, v = config.hidden_size, config.vocab_size

  def normal(key, shape):
    return (0.02 * jax.random.normal(key, shape)).astype(jnp.bfloat16)

  params = {
    "model": {
      "embed_tokens": {"embedding": normal(k_embed, (v, d))},
      "layers": layers,
      "norm": {"scale": jnp.ones((d,), jnp.float32)},
    }
  }
  if not config.tie_word_embeddings:
    params["lm_head"] = {"kernel": normal(k_head, (d, v))}
  return params


def distinct_packed_shapes(variables) -> int:
  """How many distinct `QuantizedTensor` layouts (tree structure and leaf shapes: what the kernels
  compile for) the variables hold."""
  qts = [x for x in jax.tree.leaves(variables, is_leaf=is_quantized) if is_quantized(x)]
  return len({(jax.tree.structure(q), tuple(x.shape for x in jax.tree.leaves(q))) for q in qts})
