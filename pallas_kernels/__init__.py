"""Pallas GPU kernels for matmuls over packed `QuantizedTensor` weights.

`quantized_matmul(x, qtensor)` is the one public op; `backend` names the implementation.
"""

from pallas_kernels.quantized_ops import quantized_matmul, quantized_matmul_reference

__all__ = ["quantized_matmul", "quantized_matmul_reference"]
