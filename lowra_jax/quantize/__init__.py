"""Quantization transforms: params pytree -> packed low-bit `QuantizedTensor` pytrees.

from lowra_jax import quantize
qparams, report = quantize.quantize_params(params, quantize.QuantConfig(method="lowra",
                                                                         budget=1.5))
print(report.summary(), quantize.bits_per_param(qparams))
dense = quantize.dequantize_params(qparams)

report = quantize.quantize_stream(source, config, sink=lambda path, leaf, dense: ...)  # streamed
decoding = quantize.to_word_layout(qparams)  # for `word_gemv` at batch <= 4 (decoding only)
"""

from lowra_jax.quantize.codebooks import nf_levels
from lowra_jax.quantize.config import (
  DECODE_PRECISIONS,
  QuantConfig,
  WIDE_PRECISIONS,
  QuantizationError,
  recommended_calibration,
  recommended_precisions,
  recommended_refit,
  recommended_rounding,
)
from lowra_jax.quantize.pipeline import (
  LayerReport,
  QuantReport,
  default_filter,
  dequantize_params,
  quantize_and_dequantize,
  quantize_params,
  quantize_stream,
  quantize_tensor,
)
from lowra_jax.quantize.precision import solve_budget
from lowra_jax.quantize.qtensor import (
  BitsPerParam,
  Bucket,
  QuantizedTensor,
  bits_per_param,
  concat_channels,
  dequantize,
  dequantize_buckets,
  dequantize_channels,
  is_quantized,
)
from lowra_jax.quantize.scaling import GroupScales
from lowra_jax.quantize.words import WordBucket, to_word_layout

__all__ = [
  "BitsPerParam",
  "DECODE_PRECISIONS",
  "Bucket",
  "GroupScales",
  "LayerReport",
  "QuantConfig",
  "QuantReport",
  "QuantizationError",
  "QuantizedTensor",
  "WIDE_PRECISIONS",
  "WordBucket",
  "bits_per_param",
  "concat_channels",
  "default_filter",
  "dequantize",
  "dequantize_buckets",
  "dequantize_channels",
  "dequantize_params",
  "is_quantized",
  "nf_levels",
  "quantize_and_dequantize",
  "quantize_params",
  "quantize_stream",
  "quantize_tensor",
  "recommended_calibration",
  "recommended_precisions",
  "recommended_refit",
  "recommended_rounding",
  "solve_budget",
  "to_word_layout",
]
