"""End-to-end `quantize_params` / `QuantizedTensor` against float64 numpy references."""

import dataclasses
import math
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_trees_close_at_scale, f32_sum, f32_sum_random

from lowra_jax import quantize
from lowra_jax.quantize import codebooks, packing

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def heavy(seed, shape, dtype=np.float32):
  rng = np.random.default_rng(seed)
  w = 0.02 * rng.standard_t(5, shape) * rng.uniform(0.3, 3.0, (1, shape[1]))  # channel spread
  return w.astype(dtype)


def f64_sq_err(w, w_hat):
  return float(((np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)) ** 2).sum())


CONFIGS = {
  "nf4": quantize.QuantConfig(method="nf", bits=4),
  "nf3_nodq": quantize.QuantConfig(method="nf", bits=3, double_quant=False),
  "lloyd1": quantize.QuantConfig(method="lloyd", bits=1),
  "lowra1.5": quantize.QuantConfig(method="lowra", budget=1.5),
  "lowra2.25_shared": quantize.QuantConfig(method="lowra", budget=2.25, lut_clusters=8),
  "lowra3_1234": quantize.QuantConfig(
    method="lowra", budget=3.0, precisions=(1, 2, 3, 4), dq_block=16
  ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reported_error_equals_float64_error_of_dequantize(name):
  params = {
    "a": {"kernel": heavy(0, (100, 37))},  # ragged K (padded to 128) and N
    "b": {"kernel": heavy(1, (192, 80), jnp.bfloat16)},
  }
  qparams, report = quantize.quantize_params(params, CONFIGS[name], progress=False)
  dense = quantize.dequantize_params(qparams, jnp.float32)
  for layer, key in zip(report.layers, ("a", "b")):
    w = params[key]["kernel"]
    assert dense[key]["kernel"].shape == w.shape
    # Positive float32 sums: per channel over K <= 192 rows (and as much again for the roundings
    # of w_hat), and over all of w.
    np.testing.assert_allclose(
      layer.sq_error, f64_sq_err(w, dense[key]["kernel"]), rtol=2 * f32_sum(192)
    )
    np.testing.assert_allclose(layer.sq_norm, f64_sq_err(w, 0 * w), rtol=f32_sum_random(w.size))
  assert dense["b"]["kernel"].dtype == jnp.float32
  assert quantize.dequantize_params(qparams)["b"]["kernel"].dtype == jnp.bfloat16
  if CONFIGS[name].method == "lowra":
    assert report.code_bits <= CONFIGS[name].budget + 1e-9
  # The encode step's own reconstruction is what dequantize gives (up to float32 rounding).
  again, recon, _ = quantize.quantize_and_dequantize(params, CONFIGS[name], progress=False)
  chex.assert_trees_all_equal(jax.device_get(again), jax.device_get(qparams))
  # Two float32 evaluations of level * (offset + code * absmax / 127): 4 roundings each, of
  # terms below 2 max|w|
  assert_trees_close_at_scale(recon, dense, f32_sum(8))


def bnb_nf4_reference(w):
  """bitsandbytes' quantize_4bit(nf4, blocksize 64, no double quant) semantics in float64:
  the torch weight W.T [out, in] is flattened row-major into blocks of 64 with an absmax each."""
  flat = np.asarray(w, np.float64).T.reshape(-1, 64)
  absmax = np.abs(flat).max(axis=1, keepdims=True).astype(np.float32).astype(np.float64)
  nf4 = codebooks.nf_levels(4).astype(np.float64)
  codes = np.abs(flat[:, :, None] / absmax[:, :, None] - nf4).argmin(axis=-1)
  return codes.reshape(w.shape[1], w.shape[0]).T, (nf4[codes] * absmax).reshape(w.shape[::-1]).T


def test_nf4_matches_bitsandbytes_semantics():
  w = heavy(2, (256, 48))
  qt = quantize.quantize_tensor(w, quantize.QuantConfig(method="nf", bits=4, double_quant=False))
  ref_codes, ref_w = bnb_nf4_reference(w)
  (bucket,) = qt.buckets
  np.testing.assert_array_equal(np.asarray(packing.unpack(bucket.planes, 4)), ref_codes)
  np.testing.assert_allclose(np.asarray(quantize.dequantize(qt, jnp.float32)), ref_w, rtol=1e-6)


def test_bits_per_param_counts_every_stored_byte():
  k, n = 256, 300
  w = heavy(3, (k, n))
  plain = quantize.quantize_tensor(w, quantize.QuantConfig(method="nf", bits=4, double_quant=False))
  g = k // 64
  bpp = quantize.bits_per_param({"x": plain, "y": jnp.ones(3)})
  assert bpp.code == 4.0 and bpp.num_params == k * n
  assert bpp.total == pytest.approx((4 * k * n + 32 * g * n + 32 * 16) / (k * n))
  dq = quantize.quantize_tensor(w, quantize.QuantConfig(method="nf", bits=4))
  expected = 4 * k * n + 8 * g * n + 32 * g * math.ceil(n / 256) + 32 + 32 * 16
  assert quantize.bits_per_param(dq).total == pytest.approx(expected / (k * n))
  assert expected / (k * n) - 4 == pytest.approx(0.127, abs=0.01)  # QLoRA's double-quant cost


def test_mixed_precision_layout_and_permutation():
  w = heavy(4, (128, 64))
  qt = quantize.quantize_tensor(w, quantize.QuantConfig(method="lowra", budget=2.0))
  bits = qt.channel_bits()
  assert set(bits.tolist()) <= {1, 2, 4} and len(set(bits.tolist())) > 1
  assert (bits * 128).sum() <= 2.0 * 128 * 64
  assert [b.bits for b in qt.buckets] == sorted(b.bits for b in qt.buckets)
  assert sorted(np.asarray(qt.perm).tolist()) == list(range(64))
  # Each bucket dequantizes to the columns of its channels.
  dense = np.asarray(quantize.dequantize(qt, jnp.float32))
  start = 0
  for b in qt.buckets:
    cols = np.asarray(qt.perm)[start : start + b.num_channels]
    np.testing.assert_array_equal(np.asarray(b.dequantize(64))[:128], dense[:, cols])
    start += b.num_channels


@pytest.mark.parametrize(
  ("channels", "multiple", "expected"),
  [(4096, 64, 64), (11008, 64, 64), (2048, 64, 32), (1024, 64, 16), (1023, 64, 1), (512, 16, 1),
   (1024, 16, 16), (256, 4, 4), (255, 4, 1), (8192, 128, 128), (100, 1, 1)],
)
def test_count_multiple_keeps_64_multiples_per_tensor(channels, multiple, expected):
  assert quantize.precision.count_multiple(channels, multiple) == expected


def test_bucket_sizes_are_multiples_of_bucket_multiple_within_budget():
  # 4096 output channels hold 64 x 64: multiples of 64; 1024 hold 64 x 16: multiples of 16;
  # 64 channels: left alone.
  params = {
    "wider": {"kernel": heavy(13, (64, 4096))},
    "wide": {"kernel": heavy(11, (64, 1024))},
    "narrow": {"kernel": heavy(12, (64, 64))},
  }
  cfg = quantize.QuantConfig(budget=1.5)
  q, report = quantize.quantize_params(params, cfg, progress=False)
  assert report.code_bits <= 1.5 + 1e-9
  free, _ = quantize.quantize_params(
    params, dataclasses.replace(cfg, bucket_multiple=1), progress=False
  )
  for name, m in (("wider", 64), ("wide", 16)):
    sizes = [b.num_channels for b in q[name]["kernel"].buckets]
    assert len(sizes) > 1 and all(n % m == 0 for n in sizes), (name, sizes)
    solved = [b.num_channels for b in free[name]["kernel"].buckets]
    assert any(n % m for n in solved), "the test needs tensors the solver leaves ragged"
    moved = np.abs(np.array(sizes) - np.array(solved))
    assert moved.max() < 2 * m, (sizes, solved)  # at most multiple - 1 per precision, cascaded
  for name in ("narrow",):  # below 64 x 16 channels: as solved
    a, b = q[name]["kernel"], free[name]["kernel"]
    assert [x.num_channels for x in a.buckets] == [x.num_channels for x in b.buckets]


@pytest.mark.parametrize("precisions", [(1, 2), (1, 2, 4)])
def test_shape_bucket_sizes_give_equal_shape_tensors_one_compiled_kernel(precisions):
  """`bucket_sizes="shape"`: two 1024-channel tensors of one shape whose solved splits differ
  (the calmer one gets fewer bits) pack into identical leaf shapes and share one compiled
  matmul, within the budget; a tensor of another shape keeps its own counts."""
  from pallas_kernels import quantized_matmul

  params = {
    "calm": {"kernel": heavy(21, (64, 1024)) * 0.3},
    "loud": {"kernel": heavy(22, (64, 1024)) * 3.0},
    "other": {"kernel": heavy(23, (128, 1024))},
  }
  cfg = quantize.QuantConfig(budget=1.5, precisions=precisions, bucket_sizes="tensor")
  shape_of = lambda t: jax.tree.map(lambda a: a.shape, t)  # noqa: E731
  apart, _ = quantize.quantize_params(params, cfg, progress=False)
  assert shape_of(apart["calm"]["kernel"]) != shape_of(apart["loud"]["kernel"])
  shared_cfg = dataclasses.replace(cfg, bucket_sizes="shape")
  q, report = quantize.quantize_params(params, shared_cfg, progress=False)
  calm, loud = q["calm"]["kernel"], q["loud"]["kernel"]
  assert jax.tree.structure(calm) == jax.tree.structure(loud)
  assert shape_of(calm) == shape_of(loud) and len(calm.buckets) > 1
  assert all(b.num_channels % 16 == 0 for b in calm.buckets)  # 1024 channels: multiples of 16
  assert report.code_bits <= 1.5 + 1e-9
  matmul = jax.jit(lambda x, qt: quantized_matmul(x, qt, backend="interpret"))
  x = jnp.ones((2, 64), jnp.float32)
  for qt in (calm, loud):
    w = np.asarray(quantize.dequantize(qt, jnp.float32), np.float64)
    bound = f32_sum(64) * np.abs(w).sum(axis=0).max()  # a float32 sum of 64 products
    np.testing.assert_allclose(matmul(x, qt)[0], w.sum(axis=0), rtol=0, atol=bound)
  assert matmul._cache_size() == 1


def test_role_bucket_sizes_share_counts_across_layers_not_across_roles():
  """`bucket_sizes="role"`: every layer's `q` shares one split, kept apart from the `o` tensors of
  the same shape (which "shape" would merge with them), within the budget."""
  params = {
    "layers": {
      str(i): {
        "q": {"kernel": heavy(30 + i, (64, 1024)) * 0.3 * (i + 1)},
        "o": {"kernel": heavy(40 + i, (64, 1024)) * 3.0 * (i + 1)},
      }
      for i in range(2)
    }
  }
  cfg = quantize.QuantConfig(budget=1.5, precisions=(1, 2), bucket_sizes="role")
  q, report = quantize.quantize_params(params, cfg, progress=False)
  sizes = {
    (i, r): [b.num_channels for b in q["layers"][str(i)][r]["kernel"].buckets]
    for i in range(2)
    for r in ("q", "o")
  }
  assert sizes[0, "q"] == sizes[1, "q"] and sizes[0, "o"] == sizes[1, "o"], sizes
  assert sizes[0, "q"] != sizes[0, "o"], sizes  # the louder role keeps more 2-bit channels
  assert report.code_bits <= 1.5 + 1e-9
  shared, _ = quantize.quantize_params(
    params, dataclasses.replace(cfg, bucket_sizes="shape"), progress=False
  )
  merged = {
    tuple(b.num_channels for b in shared["layers"][str(i)][r]["kernel"].buckets)
    for i in range(2)
    for r in ("q", "o")
  }
  assert len(merged) == 1, merged


def test_model_wide_budget_gives_noisier_layers_more_bits():
  params = {
    "calm": {"kernel": heavy(5, (128, 64)) * 0.1},
    "loud": {"kernel": heavy(6, (128, 64)) * 10.0},
  }
  cfg = quantize.QuantConfig(budget=2.0, bucket_sizes="tensor")  # "shape" would share one split
  _, report = quantize.quantize_params(params, cfg, progress=False)
  calm, loud = report.layers
  assert report.code_bits <= 2.0 + 1e-9
  assert loud.code_bits > 2.0 > calm.code_bits


def test_lowra_not_worse_than_single_precision_lloyd_at_equal_code_bits():
  w = heavy(7, (256, 96))
  for bits in (1, 2, 4):
    cfg = dict(double_quant=False)
    _, fixed = quantize.quantize_params(
      {"w": w}, quantize.QuantConfig(method="lloyd", bits=bits, **cfg), progress=False
    )
    _, mixed = quantize.quantize_params(
      {"w": w}, quantize.QuantConfig(method="lowra", budget=float(bits), **cfg), progress=False
    )
    assert mixed.rel_error <= fixed.rel_error * (1 + 1e-6)


def test_shared_tables_cut_total_bits_at_small_in_features():
  w = heavy(8, (64, 512))
  _, own = quantize.quantize_params({"w": w}, quantize.QuantConfig(budget=2.0), progress=False)
  _, shared = quantize.quantize_params(
    {"w": w}, quantize.QuantConfig(budget=2.0, lut_clusters=16), progress=False
  )
  assert shared.total_bits < own.total_bits - 0.2
  assert shared.rel_error < own.rel_error * 1.1


def test_deterministic_and_jittable():
  params = {"w": heavy(9, (128, 40))}
  cfg = quantize.QuantConfig(budget=1.75, lut_clusters=4)
  q1, _ = quantize.quantize_params(params, cfg, progress=False)
  q2, _ = quantize.quantize_params(params, cfg, progress=False)
  chex.assert_trees_all_equal(q1, q2)
  chex.assert_trees_all_close(
    jax.jit(quantize.dequantize_params)(q1), quantize.dequantize_params(q1)
  )


def test_default_filter_skips_embeddings_norms_head_and_vectors():
  params = {
    "embed_tokens": {"embedding": heavy(0, (64, 64))},
    "lm_head": {"kernel": heavy(1, (64, 64))},
    "input_layernorm": {"scale": np.ones(64, np.float32)},
    "mlp": {"up_proj": {"kernel": heavy(2, (64, 64))}, "bias": np.zeros(64, np.float32)},
  }
  qparams, report = quantize.quantize_params(
    params, quantize.QuantConfig(method="nf"), progress=False
  )
  assert [l.path for l in report.layers] == ["mlp/up_proj/kernel"]
  assert quantize.is_quantized(qparams["mlp"]["up_proj"]["kernel"])
  assert qparams["lm_head"]["kernel"] is params["lm_head"]["kernel"]


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(budget=0.5), r"budget=0.5 is outside \[1, 4\]"),
    (dict(budget=4.5), r"outside \[1, 4\]"),
    (dict(budget=1.5, precisions=(2, 4)), r"infeasible"),
    (dict(budget=2.5, precisions=(1, 2)), r"unreachable .* allow higher precisions"),
    (dict(method="gptq"), r"unknown quantization method 'gptq'"),
    (dict(method="nf", bits=5), r"bits=5 is not supported"),
    (dict(precisions=(1, 8)), r"subset of"),
    (dict(group_size=60), r"multiple of 8"),
    (dict(weighting="abs"), r"unknown weighting"),
    (dict(bucket_multiple=0), r"bucket_multiple=0 — use >= 1"),
    (dict(gptq_damp=0.0), r"gptq_damp=0.0 — use a positive multiple"),
    (dict(gptq_sequential=True), r"gptq_sequential=True orders GPTQ's covariances"),
    (dict(bucket_sizes="layer"), r"unknown bucket_sizes 'layer'"),
    (dict(method="lowra", layer_bits=(("q", 4),)), r"layer_bits applies to methods"),
    (dict(method="nf", layer_bits=(("q", 5),)), r"\(regex, bits\) pair"),
    (dict(method="nf", layer_bits=(("q[", 4),)), r"not a regex"),
  ],
)
def test_bad_configs_raise_clear_errors(kwargs, match):
  with pytest.raises(quantize.QuantizationError, match=match):
    quantize.QuantConfig(**kwargs)


def nf_reference(w, bits):
  """Plain NF-k with one float32 absmax per 64 inputs of a channel, float64 elsewhere."""
  blocks = np.asarray(w, np.float64).reshape(-1, 64, w.shape[1])
  absmax = np.abs(blocks).max(axis=1, keepdims=True).astype(np.float32).astype(np.float64)
  levels = codebooks.nf_levels(bits).astype(np.float64)
  codes = np.abs((blocks / absmax)[..., None] - levels).argmin(axis=-1)
  return (levels[codes] * absmax).reshape(w.shape)


def test_layer_bits_give_matching_kernels_their_own_precision():
  """LoftQ-style mixed NF: layer 0 at 4 bits, the rest at 2, each equal to plain NF-k."""
  params = {"layers": {str(i): {"q": {"kernel": heavy(10 + i, (128, 32))}} for i in range(3)}}
  cfg = quantize.QuantConfig(
    method="nf", bits=2, layer_bits=((r"layers/0/", 4),), double_quant=False
  )
  qparams, report = quantize.quantize_params(params, cfg, progress=False)
  dense = quantize.dequantize_params(qparams, jnp.float32)
  for i, bits in enumerate((4, 2, 2)):
    w = params["layers"][str(i)]["q"]["kernel"]
    assert report.layers[i].code_bits == bits
    np.testing.assert_allclose(
      dense["layers"][str(i)]["q"]["kernel"], nf_reference(w, bits), rtol=1e-6
    )
  assert report.code_bits == pytest.approx(8 / 3)


def test_method_none_quantizes_nothing():
  with pytest.raises(quantize.QuantizationError, match=r"method='none' quantizes nothing"):
    quantize.quantize_params({"k": heavy(0, (64, 8))}, quantize.QuantConfig(method="none"))


def test_bad_tensors_raise_clear_errors_naming_the_parameter():
  cfg = quantize.QuantConfig(method="nf")
  with pytest.raises(quantize.QuantizationError, match=r"only 2-D kernels"):
    quantize.quantize_tensor(np.ones(8, np.float32), cfg)
  with pytest.raises(quantize.QuantizationError, match=r"empty"):
    quantize.quantize_tensor(np.ones((0, 8), np.float32), cfg)
  bad = heavy(0, (64, 8))
  bad[3, 2] = np.nan
  with pytest.raises(quantize.QuantizationError, match=r"'layers/3/q_proj/kernel' contains NaN"):
    quantize.quantize_params({"layers": {"3": {"q_proj": {"kernel": bad}}}}, cfg, progress=False)
  with pytest.raises(quantize.QuantizationError, match=r"no parameter was selected"):
    quantize.quantize_params({"norm": np.ones(3)}, cfg, progress=False)


@pytest.mark.skipif(
  not (DATA / "models" / "pycode-llama-17m").exists(),
  reason="../shared/data is not beside the project",
)
def test_real_model_lowra_below_nf_at_equal_code_bits():
  from lowra_jax.models import weights

  _, state = weights.read_hf_checkpoint(DATA / "models" / "pycode-llama-17m")
  tree = weights.to_kernel_tree(state)
  params = {"0": tree["model"]["layers"]["0"], "7": tree["model"]["layers"]["7"]}
  for bits in (2, 4):
    _, nf = quantize.quantize_params(
      params, quantize.QuantConfig(method="nf", bits=bits), progress=False
    )
    _, lowra = quantize.quantize_params(
      params, quantize.QuantConfig(budget=float(bits)), progress=False
    )
    assert lowra.code_bits <= nf.code_bits
    assert lowra.rel_error < nf.rel_error


@pytest.mark.parametrize("scale", [0.0, 1e4])
def test_degenerate_weights_stay_finite(scale):
  w = np.full((128, 16), scale, np.float32) + scale * heavy(11, (128, 16))
  for cfg in (quantize.QuantConfig(method="nf", bits=2), quantize.QuantConfig(lut_clusters=4)):
    qparams, report = quantize.quantize_params({"w": w}, cfg, progress=False)
    w_hat = np.asarray(quantize.dequantize(qparams["w"], jnp.float32))
    assert np.isfinite(w_hat).all() and np.isfinite(report.rel_error)
    np.testing.assert_allclose(
      report.layers[0].sq_error, f64_sq_err(w, w_hat), rtol=1e-4, atol=1e-6
    )
