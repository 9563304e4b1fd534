"""LLaMA shapes by name, for synthetic models (benchmarks, the synthetic weights source).

    config = SHAPES["70b"]        # a `llama.LlamaConfig`; dataclasses.replace(config, num_layers=2)
"""

from __future__ import annotations

from lowra_jax.models.llama import LlamaConfig

SHAPES = {
  # vocab, hidden, intermediate, layers, heads, kv heads, head_dim
  "70b": LlamaConfig(32000, 8192, 28672, 80, 64, 8, 128, max_position_embeddings=4096),
  "13b": LlamaConfig(32000, 5120, 13824, 40, 40, 40, 128, max_position_embeddings=4096),
  "7b": LlamaConfig(32000, 4096, 11008, 32, 32, 32, 128, max_position_embeddings=4096),
  "1b": LlamaConfig(32000, 2048, 5632, 22, 32, 4, 64),  # TinyLlama-1.1B
}
