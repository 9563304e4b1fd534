"""A tiny random LLaMA with a quantized base and non-zero adapters, shared by tests."""

import jax
import jax.numpy as jnp
import numpy as np

from lowra_jax import lora as lora_lib
from lowra_jax.models import llama
from lowra_jax.quantize import QuantConfig, quantize_params

CONFIG = llama.LlamaConfig(
  vocab_size=64,
  hidden_size=64,
  intermediate_size=128,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
  max_position_embeddings=64,
)
LORA = lora_lib.LoraConfig(rank=4, alpha=8.0)
NF2 = QuantConfig(method="nf", bits=2)


def tiny_model(seed: int = 0, quant: QuantConfig = NF2, config=CONFIG):
  """(model, params, qparams, frozen variables, adapters with B != 0, batch [4, 16])."""
  model = llama.Llama(config, dtype=jnp.float32, lora=LORA)
  tokens = np.random.default_rng(seed).integers(0, 64, size=(4, 17)).astype(np.int32)
  params = model.init(jax.random.key(seed), jnp.asarray(tokens[:, :-1]))["params"]
  params = jax.tree.map(lambda x: np.asarray(x) * 5.0 if x.ndim == 2 else np.asarray(x), params)
  qparams, _ = quantize_params(params, quant, progress=False)
  frozen, quant = lora_lib.split_quantized(qparams)
  shapes = lora_lib.target_paths(params, LORA)
  adapters = lora_lib.random_adapters(shapes, LORA.rank, jax.random.key(seed + 1))
  adapters = jax.tree.map(lambda x: x + 0.02, adapters)
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
  return model, params, qparams, {"params": frozen, "quant": quant}, adapters, batch
