"""Pallas GPU kernels for matmuls over packed `QuantizedTensor` weights.

`quantized_matmul(x, qtensor)` is the one public op; `backend` names the implementation and
`set_default_backend` what its default ('auto') picks.
"""

from pallas_kernels.backend import set_default as set_default_backend
from pallas_kernels.quantized_ops import quantized_matmul, quantized_matmul_reference

__all__ = ["quantized_matmul", "quantized_matmul_reference", "set_default_backend"]
