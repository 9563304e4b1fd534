"""lowra-jax: LoRA fine-tuning over LLaMA weights quantized below 2 bits per parameter.

`from lowra_jax import quantize` gives the quantization transforms (NF-k, weighted Lloyd-Max,
mixed precision under a model-wide bit budget) and the packed `QuantizedTensor` format.
"""

from lowra_jax import quantize

__all__ = ["quantize"]
