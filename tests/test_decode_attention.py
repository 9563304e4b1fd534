"""`pallas_kernels.decode_attention` (interpreted) against float64 numpy, its Triton lowering, and
the model's decode step through it against the XLA attention."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import CONFIG, tiny_model
from tolerances import EPS32, assert_close_at_scale, f32_sum, llama_terms

from lowra_jax.models import llama
from pallas_kernels import backend, quantized_ops
from pallas_kernels import decode_attention as da

ON_GPU = jax.default_backend() == "gpu"  # there the kernels run compiled by Triton


def attention_float64(q, keys, values, mask):
  """[B, H, D] float64: softmax over the masked slots of q k / sqrt(D), times the values."""
  q, keys, values = (np.asarray(a, np.float64) for a in (q, keys, values))
  b, h, d = q.shape
  group = h // keys.shape[2]
  out = np.zeros((b, h, d))
  for row in range(b):
    for head in range(h):
      k, v = keys[row, :, head // group], values[row, :, head // group]
      scores = np.where(mask[row], k @ q[row, head] / math.sqrt(d), -np.inf)
      p = np.exp(scores - scores.max())
      out[row, head] = p @ v / p.sum()
  return out


def inputs(b, h, kv, d, s, n_valid, dtype, seed=0):
  """q, keys, values (NaN in slots from n_valid on: they must not be read) and a mask with left
  padding of 0, 3, 7, ... slots per row."""
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, h, d), dtype)
  keys, values = (jax.random.normal(k, (b, s, kv, d), dtype) for k in ks[1:])
  unread = (jnp.arange(s) >= n_valid)[None, :, None, None]
  keys, values = (jnp.where(unread, jnp.nan, a).astype(dtype) for a in (keys, values))
  slots = np.arange(s)
  mask = (slots[None] >= 3 * np.arange(b)[:, None] + np.arange(b)[:, None]) & (slots < n_valid)
  return q, keys, values, mask


@pytest.mark.parametrize(
  "b, h, kv, d, s, n_valid, range_s",
  [
    (1, 4, 4, 32, 37, 37, 512),  # one head per KV head, slots not a multiple of block_s
    (2, 8, 2, 16, 150, 121, 64),  # 4 query heads a KV head, 3 slot ranges (one past n_valid)
    (3, 4, 1, 64, 90, 70, 32),  # one KV head, ranges of one step
  ],
)
def test_decode_attention_matches_float64(b, h, kv, d, s, n_valid, range_s):
  """float32 in and out: the error is float32's, in the scores (D terms) and the two sums over
  slots, relative to max |v| and amplified by the scores' size through exp."""
  q, keys, values, mask = inputs(b, h, kv, d, s, n_valid, jnp.float32)
  tiles = da.AttentionTiles(block_s=16, range_s=range_s)
  parts = -(-s // range_s)
  poison = jnp.full((parts, b * h, d), jnp.nan, jnp.float32)
  got = da.decode_attention(
    q, keys, values, jnp.asarray(mask), jnp.int32(n_valid), tiles=tiles, interpret=not ON_GPU,
    out=poison,
  )
  want = attention_float64(q, keys[:, :n_valid], values[:, :n_valid], mask[:, :n_valid])
  v = np.abs(np.asarray(values[:, :n_valid], np.float64))
  k = np.abs(np.asarray(keys[:, :n_valid], np.float64))
  score_terms = np.einsum("bhd,bskd->bhs", np.abs(np.asarray(q, np.float64)),
                          np.repeat(k, h // kv, axis=2)).max() / math.sqrt(d)
  bound = (f32_sum(d) * score_terms * 2 + f32_sum(n_valid) + 8 * EPS32) * v.max()
  np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - want), bound)


def test_decode_attention_in_bfloat16_rounds_only_the_output():
  """bfloat16 queries, keys and values (exact in float64): the result's own rounding, 2^-8 of
  its scale, bounds the error."""
  q, keys, values, mask = inputs(2, 8, 4, 32, 70, 64, jnp.bfloat16, seed=1)
  got = da.decode_attention(
    q, keys, values, jnp.asarray(mask), jnp.int32(64), interpret=not ON_GPU
  )
  assert got.dtype == jnp.bfloat16
  want = attention_float64(q, keys[:, :64], values[:, :64], mask[:, :64])
  assert_close_at_scale(np.asarray(got, np.float64), want, 2.0**-8 + f32_sum(64 + 32))


def test_decode_attention_refuses_what_triton_cannot_tile():
  q, keys, values, mask = inputs(1, 6, 2, 16, 8, 8, jnp.float32)
  with pytest.raises(ValueError, match="power-of-two"):
    da.decode_attention(q, keys, values, jnp.asarray(mask), jnp.int32(8), interpret=True)


@pytest.mark.parametrize("h, kv, d, s", [(32, 32, 128, 161), (8, 2, 64, 1000)])
def test_decode_attention_lowers_for_triton(h, kv, d, s):
  """Lowered for CUDA (no GPU needed): a 7B step's shapes, and GQA over several slot ranges."""
  from pallas_kernels import loop_stages

  q = jnp.ones((1, h, d), jnp.bfloat16)
  keys = jnp.ones((1, s, kv, d), jnp.bfloat16)
  mask = jnp.ones((1, s), bool)
  modules = loop_stages.cuda_modules(
    lambda *a: da.decode_attention(*a), q, keys, keys, mask, jnp.int32(s)
  )
  assert len(modules) == 1 and "tt.func" in modules[0]


def test_model_decode_step_through_the_kernel_matches_xla(monkeypatch):
  """A cached one-token step of the tiny model (2 query heads a KV head) with its attention by
  the kernel (interpreted; compiled on a GPU) and by XLA: the same logits up to float32 sums
  along the forward pass, and the same cache."""
  model, _, _, variables, *_ = tiny_model()
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 9)), jnp.int32)
  cache = llama.KVCache.create(CONFIG, 2, 12, jnp.float32)
  _, cache = model.apply(variables, tokens[:, :8], cache=cache)
  kernel = "triton" if ON_GPU else "interpret"
  assert llama.decode_attention_impl(1, CONFIG.head_dim, 2) == ("triton" if ON_GPU else None)
  backend.set_default(kernel)  # the projections' kernels the same both ways
  try:
    assert llama.decode_attention_impl(1, CONFIG.head_dim, 2) == kernel
    assert llama.decode_attention_impl(2, CONFIG.head_dim, 2) is None  # prefill: XLA
    logits, new_cache = model.apply(variables, tokens[:, 8:], cache=cache)
    off = dataclasses.replace(quantized_ops.tuning(), decode_attention=False)
    monkeypatch.setattr(quantized_ops, "tuning", lambda: off)
    assert llama.decode_attention_impl(1, CONFIG.head_dim, 2) is None
    xla_logits, xla_cache = model.apply(variables, tokens[:, 8:], cache=cache)
  finally:
    backend.set_default("auto")
  bound = f32_sum(llama_terms(CONFIG, 12))
  assert_close_at_scale(np.asarray(logits), np.asarray(xla_logits), bound)
  for x, y in zip(new_cache.keys + new_cache.values, xla_cache.keys + xla_cache.values):
    assert_close_at_scale(np.asarray(x), np.asarray(y), bound)
