"""Random LLaMA-shaped params for the speed benchmarks (`generate.py`, `model_step.py`).

Weights come from `weights_source.SyntheticSource` (Laplace entries, output channels scaled
log-normally with `CHANNEL_SPREAD`). By default the whole model is quantized as it is drawn
(`quantize_stream`: LowRA's budget solved over every layer, no layer's dense weights kept), as a
real checkpoint is: each layer's mixed-precision tensors then have their own bucket sizes and
compile their own kernels, which is what users pay. `tiled=True` draws and quantizes one layer
and gives every layer its own copy of it (separate buffers, identical shapes): far shorter
quantization and compilation, but not what a real checkpoint costs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lowra_jax.models import llama
from lowra_jax.models.weights_source import SyntheticSource
from lowra_jax.quantize import QuantConfig, is_quantized, quantize_stream
from lowra_jax.quantize.pipeline import nest

# Log-std of the output channels' scales: at LowRA budget 2 (hidden 1024, 4 layers) 16 % of the
# channels get 1 bit, 77 % 2 bits and 8 % 4 bits (pycode-llama-17m's channels spread 0.04-0.15
# and get 1.3 / 97.4 / 0.5 %): a deliberately mixed split, LowRA's hard case for the kernels.
CHANNEL_SPREAD = 0.3


def _params(config: llama.LlamaConfig, quant: QuantConfig | None, seed: int) -> dict:
  source = SyntheticSource(config, seed, channel_spread=CHANNEL_SPREAD)
  if quant is None or quant.method == "none":
    return nest(source)
  leaves = []
  quantize_stream(source, quant, sink=lambda p, leaf, _: leaves.append((p, leaf)), progress=False)
  return nest(leaves)


def model_params(
  config: llama.LlamaConfig, quant: QuantConfig | None, *, tiled: bool = False, seed: int = 0
) -> dict:
  """The whole model's params tree (`llama.Llama`'s names), kernels quantized by `quant` (None or
  method "none": dense bf16). `tiled`: copies of one quantized layer (module docstring)."""
  if not tiled:
    return _params(config, quant, seed)
  params = _params(dataclasses.replace(config, num_layers=1), quant, seed)
  layer = params["model"]["layers"]["0"]
  layers = {str(i): jax.tree.map(jnp.copy, layer) for i in range(config.num_layers)}
  return {**params, "model": {**params["model"], "layers": layers}}


def distinct_packed_shapes(variables) -> int:
  """How many distinct `QuantizedTensor` layouts (tree structure and leaf shapes: what the kernels
  compile for) the variables hold."""
  qts = [x for x in jax.tree.leaves(variables, is_leaf=is_quantized) if is_quantized(x)]
  return len({(jax.tree.structure(q), tuple(x.shape for x in jax.tree.leaves(q))) for q in qts})
