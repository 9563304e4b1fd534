"""`quantized_matmul` and the LUT kernels against float64 numpy dequant-then-matmul.

Kernels run in Pallas' interpreter on CPU (and compiled through Triton when a GPU is present).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_close_at_scale, f32_sum

from lowra_jax import quantize
from lowra_jax.quantize import packing, scaling
from lowra_jax.quantize.qtensor import Bucket
from pallas_kernels import lut_dequantize as ld
from pallas_kernels import lut_matmul as lm
from pallas_kernels import quantized_matmul, quantized_matmul_reference, quantized_ops
from pallas_kernels import row_gather as rg

BACKENDS = ["interpret", "xla"] + (["triton"] if jax.default_backend() == "gpu" else [])
TOL = {jnp.float32: 1e-3, jnp.bfloat16: 2e-2}  # relative to ||ref||: tf32 / bf16 operands
# float32 level * (offset + code * absmax / 127) against float64: 4 roundings, terms below 2 max|w|
DEQUANT = f32_sum(8)


def rel_err(got, ref):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert np.all(np.isfinite(got)), "non-finite output (unwritten tile?)"
  return np.linalg.norm(got - ref) / np.linalg.norm(ref)


def weights(seed, k, n):
  rng = np.random.default_rng(seed)
  return (0.02 * rng.standard_t(5, (k, n)) * rng.uniform(0.3, 3.0, (1, n))).astype(np.float32)


QT_CONFIGS = {
  "lloyd1": quantize.QuantConfig(method="lloyd", bits=1),
  "lloyd2": quantize.QuantConfig(method="lloyd", bits=2),
  "nf4_nodq": quantize.QuantConfig(method="nf", bits=4, double_quant=False),
  "lowra1.5": quantize.QuantConfig(budget=1.5),
  "lowra2_shared": quantize.QuantConfig(budget=2.0, lut_clusters=4),
  "lowra3_with_3bit": quantize.QuantConfig(budget=3.0, precisions=(1, 2, 3, 4)),
}


@pytest.fixture(scope="module", params=list(QT_CONFIGS))
def qtensor(request):
  k, n = 320, 75  # ragged N; 1-bit Kp = 40 has no block_k >= 16: that bucket takes the XLA path
  w = weights(hash(request.param) % 1000, k, n)
  return quantize.quantize_tensor(w, QT_CONFIGS[request.param])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
  "m,dtype", [(1, jnp.float32), (17, jnp.bfloat16), (40, jnp.float32), (300, jnp.bfloat16)]
)
def test_forward_matches_float64(qtensor, backend, m, dtype):
  rng = np.random.default_rng(m)
  x = rng.normal(size=(m, qtensor.shape[0])).astype(np.float32)
  w = np.asarray(quantize.dequantize(qtensor, jnp.float32), np.float64)
  ref = x.astype(np.float64) @ w
  got = quantized_matmul(jnp.asarray(x, dtype), qtensor, backend=backend)
  assert got.dtype == dtype and got.shape == (m, qtensor.shape[1])
  assert rel_err(got, ref) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_dims_and_ragged_k(backend):
  w = weights(1, 100, 48)  # K = 100: padded to 128 inside the format
  qt = quantize.quantize_tensor(w, quantize.QuantConfig(budget=2.0))
  x = np.random.default_rng(2).normal(size=(2, 3, 100)).astype(np.float32)
  ref = x.astype(np.float64) @ np.asarray(quantize.dequantize(qt, jnp.float32), np.float64)
  got = quantized_matmul(jnp.asarray(x), qt, backend=backend)
  assert got.shape == (2, 3, 48) and rel_err(got, ref) < TOL[jnp.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_input_gradient_matches_float64(qtensor, backend, dtype):
  rng = np.random.default_rng(3)
  m, (k, n) = 9, qtensor.shape
  x = rng.normal(size=(m, k)).astype(np.float32)
  c = rng.normal(size=(m, n)).astype(np.float32)
  w = np.asarray(quantize.dequantize(qtensor, jnp.float32), np.float64)
  loss = lambda x: jnp.sum(quantized_matmul(x, qtensor, backend=backend).astype(jnp.float32) * c)
  gx = jax.grad(loss)(jnp.asarray(x, dtype))
  assert gx.dtype == dtype
  assert rel_err(gx, c.astype(np.float64) @ w.T) < TOL[dtype]
  # Same as differentiating the jnp reference.
  ref_loss = lambda x: jnp.sum(quantized_matmul_reference(x, qtensor).astype(jnp.float32) * c)
  assert rel_err(gx, jax.grad(ref_loss)(jnp.asarray(x, dtype))) < TOL[dtype]


def test_no_gradient_flows_into_the_frozen_base(qtensor):
  x = jnp.ones((2, qtensor.shape[0]))
  g = jax.grad(lambda q: jnp.sum(quantized_matmul(x, q, backend="xla")), allow_int=True)(qtensor)
  for leaf in jax.tree_util.tree_leaves(g):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      assert not np.any(np.asarray(leaf))


def test_both_passes_tie_the_base_to_their_activation_on_gpus(qtensor):
  """On GPUs the forward passes (x, qt) and the backward (dY, qt) through an optimization barrier,
  so no layer's weight is dequantized before its activation exists (docs/architecture.md); on
  CPUs neither does. Checked in the step lowered for each platform (no GPU needed to lower)."""
  x = jnp.ones((4, qtensor.shape[0]), jnp.bfloat16)

  def loss(x, q):
    return jnp.sum(quantized_matmul(x, q, backend="xla").astype(jnp.float32) ** 2)

  step = jax.jit(jax.value_and_grad(loss))
  for platform, barriers in (("cuda", 2), ("cpu", 0)):
    text = step.trace(x, qtensor).lower(lowering_platforms=(platform,)).as_text()
    assert text.count("stablehlo.optimization_barrier") == barriers, platform


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_weight_serves_the_backward_and_lives_only_inside_remat(qtensor, backend):
  """keep_weight: a forward whose plan makes the whole weight in channel order keeps it as the
  residual for dX (still float64's gradient); under jax.checkpoint the first forward's residuals
  are dropped, so at most the checkpoint's input is kept."""
  m, (k, n) = 300, qtensor.shape
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(m, k)).astype(np.float32))
  c = rng.normal(size=(m, n)).astype(np.float32)
  w = np.asarray(quantize.dequantize(qtensor, jnp.float32), np.float64)
  kept = quantized_ops._keeps_weight(quantized_ops.plan(qtensor, m, jnp.float32, backend))
  assert kept or qtensor.perm is not None  # single-bucket tensors are dense at 300 rows

  def residual_shapes(f):
    y, vjp = jax.vjp(f, x)
    floats = [a for a in jax.tree_util.tree_leaves(vjp) if jnp.issubdtype(a.dtype, jnp.floating)]
    return y, vjp, {a.shape for a in floats if a.size >= k * n}

  def f(x):
    return quantized_matmul(x, qtensor, backend=backend, keep_weight=True)

  y, vjp, shapes = residual_shapes(f)
  assert shapes == ({(n, k)} if kept else set())
  assert rel_err(y, np.asarray(x, np.float64) @ w) < TOL[jnp.float32]
  assert rel_err(vjp(jnp.asarray(c))[0], c.astype(np.float64) @ w.T) < TOL[jnp.float32]
  _, vjp, shapes = residual_shapes(jax.checkpoint(f))
  assert shapes <= {(m, k)}  # at most x, to recompute from
  assert rel_err(vjp(jnp.asarray(c))[0], c.astype(np.float64) @ w.T) < TOL[jnp.float32]


def stored_bucket(rng, bits, k, n, tables, dq_block):
  """A random `Bucket` as the quantizer stores it, and its weights in float64 [k, n] (computed
  here from the stored fields). tables: 'channel' (float16 [n, 2^b]), 'indexed' (3 float16 tables
  and an index) or 'shared' (one float32 table); dq_block 0: float32 scales, else int8 codes."""
  codes = rng.integers(0, 1 << bits, (k, n)).astype(np.uint8)
  levels = 1 << bits
  index = None
  if tables == "channel":
    t = rng.normal(size=(n, levels)).astype(np.float16)
    per_channel = t
  elif tables == "indexed":
    t = rng.normal(size=(3, levels)).astype(np.float16)
    index = rng.integers(0, 3, n).astype(np.uint8)
    per_channel = t[index]
  else:
    t = rng.normal(size=(1, levels)).astype(np.float32)
    per_channel = np.repeat(t, n, axis=0)
  s = rng.uniform(0.5, 2.0, (k // 64, n)).astype(np.float32)
  scales = scaling.make_scales(s, bool(dq_block), dq_block or 256)
  if dq_block:
    step = np.repeat(scales.block_absmax.astype(np.float64) / 127, dq_block, axis=1)[:, :n]
    s = float(scales.offset) + scales.codes.astype(np.float64) * step
  w = per_channel.astype(np.float64)[np.arange(n)[None, :], codes] * np.repeat(s, 64, axis=0)
  bucket = Bucket(packing.pack(codes, bits), t, scales, index, bits)
  return jax.tree_util.tree_map(jnp.asarray, bucket), w


# (bits, K, N, M, splits, tables, dq_block): ragged N and M, every table layout, scales as float32,
# double-quantized with blocks that hold whole programs' channels (64) and ones that do not (48).
KERNEL_CASES = [
  (1, 1024, 40, 16, 1, "channel", 0),
  (2, 512, 130, 5, 3, "indexed", 64),
  (4, 256, 64, 16, 2, "shared", 48),
  (2, 192, 9, 48, 1, "channel", 256),
  (3, 512, 70, 3, 2, "indexed", 48),
]


@pytest.mark.parametrize(
  "narrow,dtype", [(False, jnp.float32), (True, jnp.float32), (True, jnp.bfloat16)]
)
@pytest.mark.parametrize("bits,k,n,m,splits,tables,dq", KERNEL_CASES)
def test_kernels_write_every_output_tile(bits, k, n, m, splits, tables, dq, narrow, dtype):
  """Outputs start NaN-poisoned; every element must be written and correct. Narrow lookups in
  bf16 take `byte_lookup` (2, 3 and 4 bits), the others the select tree. 3-bit buckets (two
  planes) have the forward kernel only."""
  rng = np.random.default_rng(bits * k + n)
  bucket, w = stored_bucket(rng, bits, k, n, tables, dq)
  assert_close_at_scale(bucket.dequantize(64), w, DEQUANT)  # the oracle
  bk = lm.max_block_k(lm.block_rows(bucket), 64)
  tiles = lm.Tiles(block_m=16, block_n=32, block_k=bk, splits=splits, narrow=narrow)
  assert tiles.block_k >= 16
  kw = dict(group=64, tiles=tiles, interpret=jax.default_backend() != "gpu")
  tol = 1e-3 if dtype == jnp.float32 else 1e-2
  x = np.asarray(jnp.asarray(rng.normal(size=(m, k)), dtype), np.float64)
  y = lm.lut_matmul(jnp.asarray(x, dtype), bucket, out=jnp.full((splits, m, n), jnp.nan), **kw)
  assert rel_err(y.sum(axis=0), x @ w) < tol
  g = np.asarray(jnp.asarray(rng.normal(size=(m, n)), dtype), np.float64)
  if bits == 3:
    with pytest.raises(NotImplementedError, match=r"bits=3: the backward LUT kernel"):
      lm.lut_matmul_t(jnp.asarray(g, dtype), bucket, **kw)
    return
  dx = lm.lut_matmul_t(jnp.asarray(g, dtype), bucket, out=jnp.full((splits, m, k), jnp.nan), **kw)
  assert rel_err(dx.sum(axis=0), g @ w.T) < tol


@pytest.mark.parametrize("splits,permuted", [(1, False), (3, True)])
def test_one_launch_for_all_buckets_writes_every_tile(splits, permuted):
  """`lut_matmul_buckets` over a 1-bit and a 2-bit bucket with ragged channel counts and different
  table and scale layouts, its output NaN-poisoned: every column written, each bucket's block
  equal to its float64 product (at the columns a permutation sends it to, if given)."""
  rng = np.random.default_rng(splits)
  k, m = 256, 5
  one, w1 = stored_bucket(rng, 1, k, 40, "shared", 0)
  two, w2 = stored_bucket(rng, 2, k, 70, "indexed", 48)
  x = rng.normal(size=(m, k)).astype(np.float32)
  perm = rng.permutation(110).astype(np.int16) if permuted else None
  y = lm.lut_matmul_buckets(
    jnp.asarray(x),
    (one, two),
    block_ks=(16, 32),
    group=64,
    tiles=lm.Tiles(block_m=16, block_n=32, splits=splits, narrow=True),
    columns=None if perm is None else jnp.asarray(perm),
    interpret=jax.default_backend() != "gpu",
    out=jnp.full((splits, m, 110), jnp.nan),
  )
  want = x.astype(np.float64) @ np.concatenate([w1, w2], axis=1)
  if permuted:
    want = np.zeros_like(want)
    want[:, perm] = x.astype(np.float64) @ np.concatenate([w1, w2], axis=1)
  assert rel_err(y.sum(axis=0), want) < 1e-2


@pytest.mark.parametrize(
  "permuted,k,dtype",
  [(False, 256, jnp.float32), (True, 256, jnp.float32), (True, 200, jnp.bfloat16)],
)
def test_dequantize_kernel_writes_every_row_in_channel_order(permuted, k, dtype):
  """`lut_dequantize_t` over 1-, 2-, 3- and 4-bit buckets (ragged channel counts, every table
  and scale layout; 3 bits in two planes), output NaN-poisoned: W^T in channel order, equal to
  the float64 weights (to bf16's rounding in bf16, where 2 to 4 bits take `byte_lookup`); K below
  the padded rows (200 of 256) drops the padding."""
  rng = np.random.default_rng(k + permuted)
  kp = 256
  parts = [
    stored_bucket(rng, 1, kp, 40, "shared", 0),
    stored_bucket(rng, 2, kp, 200, "indexed", 48),  # a full block of 128 channels, a ragged one
    stored_bucket(rng, 3, kp, 24, "channel", 0),
    stored_bucket(rng, 4, kp, 64, "channel", 64),
  ]
  w = np.concatenate([wb for _, wb in parts], axis=1)[:k]  # [K, N] in bucket order
  n = w.shape[1]
  perm = rng.permutation(n).astype(np.int16) if permuted else None
  qt = quantize.QuantizedTensor(
    tuple(b for b, _ in parts), None if perm is None else jnp.asarray(perm), (k, n), 64, "float32"
  )
  # Packed rows per program (3 bits: dividing the second plane's 32 rows); the programs of row
  # blocks past a bucket's packed rows idle (1 bit: block 1 of 2, 3 bits: none).
  assert ld.block_ks(qt) == (32, 64, 32, 64)
  got = ld.lut_dequantize_t(
    qt, dtype, interpret=jax.default_backend() != "gpu", out=jnp.full((n, k), jnp.nan, dtype)
  )
  want = np.empty((n, k))
  want[perm if permuted else np.arange(n)] = w.T
  assert rel_err(got, want) < (1e-6 if dtype == jnp.float32 else 3e-3)
  assert_close_at_scale(ld.lut_dequantize_t_reference(qt, jnp.float32), want, DEQUANT)


@pytest.mark.parametrize("m", [1, 17, 40])
def test_mixed_tensor_forward_up_to_64_rows_takes_one_launch(m):
  """Decode and mid-M tiles of the one-launch forward; from 65 rows (and from 32 in the backward)
  the mixed tensor takes the dense path."""
  qt = quantize.quantize_tensor(weights(7, 256, 96), quantize.QuantConfig(budget=1.5))
  plan = functools.partial(quantized_ops.plan, qt, dtype=jnp.float32, impl="interpret")
  p = plan(m)
  assert len(qt.buckets) > 1 and p.one_launch and all(p.buckets)
  assert len({dataclasses.replace(t, block_k=0) for t in p.buckets}) == 1  # shared but block_k
  assert not plan(64).dense and plan(65).dense
  assert plan(m, backward=True).dense == (m >= 32) and not plan(31, backward=True).dense
  x = np.random.default_rng(m).normal(size=(m, 256)).astype(np.float32)
  w = np.asarray(quantize.dequantize(qt, jnp.float32), np.float64)
  got = quantized_matmul(jnp.asarray(x), qt, backend="interpret")
  assert rel_err(got, x.astype(np.float64) @ w) < TOL[jnp.float32]


@pytest.mark.parametrize("m", [1, 17])
def test_tensor_with_3bit_channels_takes_the_kernels_at_decode_sizes(m):
  """A {1, 2, 3, 4}-bit tensor: up to M = 16 all its buckets, 3-bit (two planes) included, run in
  the one-launch forward; above, its 3- and 4-bit buckets are dequantized for XLA's dot; the
  input gradient's 3-bit bucket always is. Both against float64."""
  config = quantize.QuantConfig(budget=3.0, precisions=(1, 2, 3, 4))
  qt = quantize.quantize_tensor(weights(11, 256, 96), config)
  bits = [b.bits for b in qt.buckets]
  assert bits == [1, 2, 3, 4]
  p = quantized_ops.plan(qt, m, jnp.float32, "interpret")
  wide = [t is None for t, b in zip(p.buckets, bits, strict=True) if b >= 3]
  assert not p.dense and p.one_launch == (m <= 16) and all(wide) == (m > 16)
  back = quantized_ops.plan(qt, m, jnp.float32, "interpret", backward=True)
  assert back.dense or back.buckets[bits.index(3)] is None
  rng = np.random.default_rng(m)
  x = rng.normal(size=(m, 256)).astype(np.float32)
  c = rng.normal(size=(m, 96)).astype(np.float32)
  w = np.asarray(quantize.dequantize(qt, jnp.float32), np.float64)
  y, vjp = jax.vjp(lambda x: quantized_matmul(x, qt, backend="interpret"), jnp.asarray(x))
  assert rel_err(y, x.astype(np.float64) @ w) < TOL[jnp.float32]
  assert rel_err(vjp(jnp.asarray(c))[0], c.astype(np.float64) @ w.T) < TOL[jnp.float32]


@pytest.mark.parametrize("rows,cols,dtype", [(48, 4096, jnp.bfloat16), (16, 48, jnp.float32)])
def test_row_gather_copies_whole_rows(rows, cols, dtype):
  rng = np.random.default_rng(rows)
  src = rng.normal(size=(rows + 5, cols)).astype(np.float32)
  idx = rng.integers(0, rows + 5, rows).astype(np.int32)
  interpret = jax.default_backend() != "gpu"
  got = rg.row_gather(jnp.asarray(src, dtype), jnp.asarray(idx), interpret=interpret)
  np.testing.assert_array_equal(
    np.asarray(got, np.float32), np.asarray(jnp.asarray(src, dtype)[idx], np.float32)
  )
  assert rg.block_shape(rows, 40) is None and rg.block_shape(15, 64) is None


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "xla"])
@pytest.mark.parametrize(
  "budget,k,m",
  [
    (1.5, 256, 256),
    (3.0, 256, 256),
    (3.0, 192, 256),
    (3.0, 192, quantized_ops.H200.permute_weight_from_m),
  ],
)
def test_dense_path_of_a_mixed_tensor_matches_float64(budget, k, m, backend):
  """Forward and input gradient of the dense path: a {1, 2, 4}- or {1, 2, 3, 4}-bit tensor's
  weight written in channel order by `lut_dequantize_t`; with K = 192 (a 1-bit plane of 24 rows,
  which no block of 16 rows divides: the kernel does not cover it) dequantized by XLA and restored
  to channel order by the row-gather kernel, of output rows below `permute_weight_from_m`, weight
  rows from it."""
  precisions = (1, 2, 4) if budget == 1.5 else (1, 2, 3, 4)
  config = quantize.QuantConfig(budget=budget, precisions=precisions)
  qt = quantize.quantize_tensor(weights(7, k, 96), config)
  assert qt.perm is not None and rg.block_shape(96, m) and rg.block_shape(96, k)
  assert budget == 1.5 or 3 in {b.bits for b in qt.buckets}
  fwd, bwd = (quantized_ops.plan(qt, m, jnp.float32, backend, d) for d in (False, True))
  if k == 256:
    assert fwd == bwd == quantized_ops.Plan(dense=True, weight="lut_dequantize")
  else:
    at = "weight" if m >= quantized_ops.H200.permute_weight_from_m else "output"
    assert fwd == quantized_ops.Plan(dense=True, weight="xla", permute=at, gather="row_gather")
    assert bwd.permute == at and bwd.gather == ("row_gather" if at == "weight" else "xla")
  rng = np.random.default_rng(m)
  x = rng.normal(size=(m, k)).astype(np.float32)
  c = rng.normal(size=(m, 96)).astype(np.float32)
  w = np.asarray(quantize.dequantize(qt, jnp.float32), np.float64)
  y, vjp = jax.vjp(lambda x: quantized_matmul(x, qt, backend=backend), jnp.asarray(x))
  assert rel_err(y, x.astype(np.float64) @ w) < TOL[jnp.float32]
  assert rel_err(vjp(jnp.asarray(c))[0], c.astype(np.float64) @ w.T) < TOL[jnp.float32]


def test_bad_inputs_raise_clear_errors(qtensor):
  with pytest.raises(ValueError, match=r"x has 7 features but the quantized kernel expects 320"):
    quantized_matmul(jnp.ones((2, 7)), qtensor)
  with pytest.raises(ValueError, match=r"unknown backend 'cuda'"):
    quantized_matmul(jnp.ones((2, 320)), qtensor, backend="cuda")
  three = quantize.quantize_tensor(weights(3, 64, 8), quantize.QuantConfig(method="lloyd", bits=3))
  with pytest.raises(NotImplementedError, match=r"bits=3"):
    lm.lut_matmul_t(jnp.ones((16, 8)), three.buckets[0], group=64)


def test_set_default_backend_changes_what_auto_runs(monkeypatch):
  """`set_default_backend('interpret')` routes `auto` through the Pallas kernels (spied on)."""
  from pallas_kernels import backend as backend_lib
  from pallas_kernels import lut_matmul, set_default_backend

  calls = []
  original = lut_matmul.lut_matmul
  monkeypatch.setattr(
    lut_matmul, "lut_matmul", lambda *a, **k: calls.append(1) or original(*a, **k)
  )
  w = weights(4, 128, 64)
  qt = quantize.quantize_tensor(w, quantize.QuantConfig(method="nf", bits=2))
  x = np.random.default_rng(5).normal(size=(4, 128)).astype(np.float32)
  ref = x.astype(np.float64) @ np.asarray(quantize.dequantize(qt, jnp.float32), np.float64)
  try:
    set_default_backend("interpret")
    assert backend_lib.resolve("auto") == "interpret"
    assert rel_err(quantized_matmul(jnp.asarray(x), qt), ref) < TOL[jnp.float32] and calls
  finally:
    set_default_backend("auto")
  assert backend_lib.resolve("auto") == ("triton" if jax.default_backend() == "gpu" else "xla")
  with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
    set_default_backend("cuda")


def test_forward_split_model_picks_the_measured_best_on_an_h200(monkeypatch):
  """`_forward_splits` on 132 SMs, M = 1, 2 bits (block_n 64, block_k 64): the split counts the
  H200 probe measured fastest (docs/results.md); every count within [1, steps]."""
  monkeypatch.setattr(quantized_ops, "_num_sms", lambda: 132)
  for (k, n), best in {(4096, 11008): 3, (11008, 4096): 4, (4096, 4096): 4}.items():
    assert quantized_ops._forward_splits(n // 64, k * 2 // 8 // 64) == best
  for tiles, steps in [(1, 4), (2, 40), (448, 32), (5000, 7)]:
    assert 1 <= quantized_ops._forward_splits(tiles, steps) <= steps


def test_plan_is_data_for_every_path():
  """`plan` names the path of each pass without running it: LUT kernels per bucket at decode
  sizes (a 1-bucket tensor has no one-launch forward), the dense path from `dense_from_m` rows, and
  only dense dots on the xla backend."""
  qt = quantize.quantize_tensor(weights(9, 256, 64), quantize.QuantConfig(method="lloyd", bits=2))
  p = quantized_ops.plan(qt, 1, jnp.bfloat16, "interpret")
  assert not p.dense and not p.one_launch and len(p.buckets) == 1 and p.buckets[0].narrow
  assert p.buckets[0] == quantized_ops.tiles_for(1, 64, 64, 64, backward=False)
  assert not quantized_ops.plan(qt, 1, jnp.bfloat16, "interpret", backward=True).buckets[0].narrow
  big = quantized_ops.plan(qt, quantized_ops.H200.dense_from_m, jnp.bfloat16, "interpret")
  assert big == quantized_ops.Plan(dense=True, weight="lut_dequantize")
  xla = quantized_ops.plan(qt, 1, jnp.float32, "xla")
  assert xla == quantized_ops.Plan(dense=True, weight="xla")


def test_override_tuning_replaces_fields_and_tiles(monkeypatch):
  """Benchmarks' `--tuning` JSON: plain fields replaced (lists as tuples), a `Tiles` field's
  or `GemvTiles` field's named fields only; the plans made afterwards follow it; an unknown field is refused."""
  monkeypatch.setattr(quantized_ops, "TUNINGS", dict(quantized_ops.TUNINGS))
  new = quantized_ops.override_tuning(
    {"waves": [3, 5], "decode": {"block_n": 32}, "gemv": {"num_stages": 3}}
  )
  assert quantized_ops.tuning() == new and new.waves == (3, 5)
  assert new.decode == dataclasses.replace(quantized_ops.H200.decode, block_n=32)
  assert new.gemv == dataclasses.replace(quantized_ops.H200.gemv, num_stages=3)
  assert quantized_ops.tiles_for(1, 64, 256, 64, backward=False).block_n == 32
  with pytest.raises(ValueError, match="no field 'wave'"):
    quantized_ops.override_tuning({"wave": 1})
