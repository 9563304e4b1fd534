"""`quantized_matmul(x, qtensor)`: x @ dequantize(qtensor) without materialising the weight.

Forward: every precision bucket's columns come from `lut_matmul` (or, where the kernels do not
apply, from dequantize + XLA dot); the concatenated columns are put back in channel order. The
custom VJP returns only dX = dY @ W_hat^T through `lut_matmul_t` -- the base is frozen, so there is
no dW and nothing but the packed tensor itself is kept for the backward pass.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lowra_jax.quantize import QuantizedTensor
from pallas_kernels import backend as backend_lib
from pallas_kernels import lut_matmul as lm

# M above which a bucket is dequantized once into a transient buffer for XLA's dot (training-size
# batches are compute-bound; see docs/results.md).
DENSE_FROM_M = 1024


def tiles_for(m: int, kp: int) -> lm.Tiles | None:
  """Block sizes by shape class; None when the kernels do not apply (use dequantize + dot)."""
  bk = lm.max_block_k(kp)
  if not bk or m >= DENSE_FROM_M:
    return None
  if m <= 16:
    return lm.Tiles(block_m=16, block_n=64, block_k=bk, num_warps=4, num_stages=3)
  if m <= 64:
    return lm.Tiles(block_m=64, block_n=64, block_k=bk, num_warps=4, num_stages=3)
  return lm.Tiles(block_m=128, block_n=64, block_k=bk, num_warps=8, num_stages=3)


def _bucket_operands(bucket):
  """(plane, flat float32 tables, flat float32 scales) of a single-plane bucket."""
  return (bucket.planes[0], bucket.channel_tables().astype(jnp.float32).reshape(-1),
          bucket.scales.dequantize().reshape(-1))


def _kernel_tiles(bucket, m: int, impl: str):
  if impl == "xla" or len(bucket.planes) != 1:
    return None
  return tiles_for(m, bucket.planes[0].shape[0])


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def _forward(x, qt: QuantizedTensor, impl: str):
  m, k = x.shape
  k_pad = _round_up(k, qt.group_size)
  cols = []
  for b in qt.buckets:
    tiles = _kernel_tiles(b, m, impl)
    if tiles is None:
      w = b.dequantize(qt.group_size).astype(x.dtype)  # [K_pad, Nb], transient
      xp = jnp.pad(x, ((0, 0), (0, k_pad - k)))
      cols.append(jnp.dot(xp, w, preferred_element_type=jnp.float32).astype(x.dtype))
      continue
    m_pad = _round_up(m, tiles.block_m)
    xp = jnp.pad(x, ((0, m_pad - m), (0, k_pad - k)))
    y = lm.lut_matmul(xp, *_bucket_operands(b), bits=b.bits, group=qt.group_size, tiles=tiles,
                      interpret=impl == "interpret")
    cols.append(y[:m])
  y = jnp.concatenate(cols, axis=1)
  if qt.perm is not None:
    perm = qt.perm.astype(jnp.int32)
    y = y[:, jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=jnp.int32))]
  return y


def _backward(g, qt: QuantizedTensor, impl: str):
  m, _ = g.shape
  k = qt.shape[0]
  if qt.perm is not None:
    g = g[:, qt.perm.astype(jnp.int32)]
  dx, start = None, 0
  for b in qt.buckets:
    gb = g[:, start:start + b.num_channels]
    start += b.num_channels
    tiles = _kernel_tiles(b, m, impl)
    if tiles is None:
      w = b.dequantize(qt.group_size).astype(g.dtype)
      part = jnp.dot(gb, w.T, preferred_element_type=jnp.float32)
    else:
      m_pad = _round_up(m, tiles.block_m)
      part = lm.lut_matmul_t(jnp.pad(gb, ((0, m_pad - m), (0, 0))), *_bucket_operands(b),
                             bits=b.bits, group=qt.group_size, tiles=tiles,
                             interpret=impl == "interpret")[:m].astype(jnp.float32)
    dx = part if dx is None else dx + part
  return dx[:, :k].astype(g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _qmm(x, qt, impl):
  return _forward(x, qt, impl)


def _qmm_fwd(x, qt, impl):
  return _forward(x, qt, impl), qt


def _zero_cotangent(a):
  if jnp.issubdtype(a.dtype, jnp.inexact):
    return jnp.zeros_like(a)
  return np.zeros(a.shape, jax.dtypes.float0)


def _qmm_bwd(impl, qt, g):
  return _backward(g, qt, impl), jax.tree_util.tree_map(_zero_cotangent, qt)


_qmm.defvjp(_qmm_fwd, _qmm_bwd)


def quantized_matmul(x: jax.Array, qt: QuantizedTensor, *, backend: str = "auto") -> jax.Array:
  """x [..., K] @ dequantize(qt) [K, N] -> [..., N] in x.dtype, accumulated in float32.

  Differentiable in x (the quantized base is frozen: its cotangent is zero).
  `backend`: 'auto' (Triton kernels on GPU, dequantize + XLA dot elsewhere), 'triton',
  'interpret' (the kernels in Pallas' interpreter, for tests) or 'xla'.
  """
  k, n = qt.shape
  if x.shape[-1] != k:
    raise ValueError(f"x has {x.shape[-1]} features but the quantized kernel expects {k} "
                     f"(kernel shape {qt.shape}).")
  impl = backend_lib.resolve(backend)
  lead = x.shape[:-1]
  y = _qmm(x.reshape(-1, k), qt, impl)
  return y.reshape(*lead, n)


def quantized_matmul_reference(x: jax.Array, qt: QuantizedTensor) -> jax.Array:
  """x @ dequantize(qt) in x.dtype with float32 accumulation, by plain jnp."""
  from lowra_jax.quantize import dequantize
  w = dequantize(qt, x.dtype)
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
