"""Pallas GPU kernels for matmuls over packed `QuantizedTensor` weights (see docs/architecture.md)."""
