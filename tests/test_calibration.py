"""Calibration: input second moments against float64 numpy, the weighted objective, 'none' as
before, streamed == in memory with moments, bad input in one line."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_stream import _assert_identical, _need
from tiny_model import CONFIG, tiny_model

from lowra_jax import calibration
from lowra_jax.models import llama
from lowra_jax.models.weights_source import CheckpointSource
from lowra_jax.quantize import QuantConfig, QuantizationError, quantize_params, quantize_stream
from lowra_jax.quantize import pipeline

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / ".." / "shared" / "data" / "models" / "stories260K" / "stories260K.bin"


def _moments_reference(model, params, blocks) -> dict[str, np.ndarray]:
  """float64 E[x^2] of every projection's input from the model's own intermediates: norms'
  outputs (q/k/v, gate/up, head), silu(gate) * up (down), and o_proj's output with o_proj set
  to the identity (its input, exactly)."""
  _, state = model.apply(
    {"params": params}, jnp.asarray(blocks[:, :-1]), capture_intermediates=True,
    mutable=["intermediates"],
  )
  inter = state["intermediates"]

  def out(*path):
    node = inter
    for name in path:
      node = node[name]
    x = np.asarray(node["__call__"][0], np.float64)
    return x.reshape(-1, x.shape[-1])

  def ms(x):
    return (x * x).mean(axis=0)

  ref = {"lm_head/kernel": ms(out("model", "norm"))}
  for i in range(CONFIG.num_layers):
    layer = ("model", "layers", str(i))
    attn_in = ms(out(*layer, "input_layernorm"))
    mlp_in = ms(out(*layer, "post_attention_layernorm"))
    gate, up = out(*layer, "mlp", "gate_proj"), out(*layer, "mlp", "up_proj")
    p = "/".join(layer)
    for name in ("q_proj", "k_proj", "v_proj"):
      ref[f"{p}/self_attn/{name}/kernel"] = attn_in
    ref[f"{p}/self_attn/o_proj/kernel"] = ms(out(*layer, "self_attn", "o_proj"))
    ref[f"{p}/mlp/gate_proj/kernel"] = ref[f"{p}/mlp/up_proj/kernel"] = mlp_in
    ref[f"{p}/mlp/down_proj/kernel"] = ms(gate / (1.0 + np.exp(-gate)) * up)
  return ref


def test_input_moments_equal_float64_numpy_of_the_projection_inputs():
  model, params, *_ = tiny_model()
  for i in range(CONFIG.num_layers):  # o_proj [64, 64] = I: its output is its input
    attn = params["model"]["layers"][str(i)]["self_attn"]
    attn["o_proj"]["kernel"] = np.eye(64, dtype=np.float32)
  blocks = np.random.default_rng(1).integers(0, CONFIG.vocab_size, size=(10, 17))
  h = calibration.input_moments(model, params, blocks, batch_size=4)  # batches of 4, 4, 2
  ref = _moments_reference(model, params, blocks)
  assert set(h) == set(ref)
  for path, expected in ref.items():
    assert h[path].dtype == np.float32 and h[path].shape == expected.shape
    np.testing.assert_allclose(h[path], expected, rtol=2e-5, err_msg=path)


def test_spread_picks_evenly_spaced_blocks_including_both_ends():
  blocks = np.arange(100)[:, None]
  assert calibration.spread(blocks, 5)[:, 0].tolist() == [0, 25, 50, 74, 99]
  assert len(calibration.spread(blocks, 200)) == 100


def _weighted_errors_reference(w, h, tables, group):
  """float64 sum_k h_k scale_gk^2 (x_kn - level(x_kn))^2 per channel, nearest level (ties down)."""
  w = np.asarray(w, np.float64)
  k, n = w.shape
  kp = -(-k // group) * group
  wp = np.zeros((kp, n))
  wp[:k] = w
  scale = np.repeat(np.abs(wp).reshape(kp // group, group, n).max(axis=1), group, axis=0)
  x = np.where(scale > 0, wp / np.where(scale > 0, scale, 1), 0)
  hp = np.zeros(kp)
  hp[:k] = h
  levels = np.asarray(tables, np.float64)  # [N, L] sorted
  t = (levels[:, 1:] + levels[:, :-1]) / 2
  codes = (x.T[:, :, None] > t[:, None, :]).sum(-1)  # [N, Kp]
  q = np.take_along_axis(levels, codes, axis=1)
  return (hp[None] * scale.T**2 * (x.T - q) ** 2).sum(axis=1)


def test_weighted_per_channel_errors_and_fit_match_float64_numpy():
  rng = np.random.default_rng(0)
  k, n, group = 100, 24, 64  # 100 rows: the padded rows must weigh nothing
  w = rng.laplace(size=(k, n)).astype(np.float32)
  h = rng.gamma(0.5, size=k).astype(np.float32) * 10.0
  cfg = QuantConfig(method="lowra", lloyd_iters=200)
  fitted = pipeline._fit(jnp.asarray(w), cfg, "kernel", jnp.asarray(h))
  for i, b in enumerate(cfg.candidate_bits):
    expected = _weighted_errors_reference(w, h, fitted.tables[b], group)
    np.testing.assert_allclose(fitted.errors[:, i], expected, rtol=1e-4, err_msg=f"{b} bits")
  # the levels are (up to float16) the omega-weighted centroids of their bins, omega = scale^2 h
  wp = np.zeros((128, n))
  wp[:k] = w
  scale = np.repeat(np.abs(wp).reshape(2, group, n).max(axis=1), group, axis=0)
  x, omega = (wp / scale).T, (np.pad(h, (0, 28))[:, None] * scale**2).T
  levels = np.asarray(fitted.tables[2], np.float64)
  codes = (x[:, :, None] > ((levels[:, 1:] + levels[:, :-1]) / 2)[:, None, :]).sum(-1)
  for j in range(4):
    mass = np.where(codes == j, omega, 0).sum(1)
    centroid = np.where(codes == j, omega * x, 0).sum(1) / np.where(mass > 0, mass, 1)
    np.testing.assert_allclose(np.where(mass > 0, centroid, levels[:, j]), levels[:, j], atol=2e-3)
  # and they differ from the unweighted fit's
  plain = pipeline._fit(jnp.asarray(w), cfg, "kernel")
  assert not np.array_equal(plain.tables[2], fitted.tables[2])


def _tree_bytes(tree) -> list[bytes]:
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _unit_moments(params) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {pipeline.path_str(p): np.ones(x.shape[0], np.float32) for p, x in flat if x.ndim == 2}


@pytest.mark.parametrize("mode, factor", [("kernel", 7.0), ("model", 1.0)])
@pytest.mark.parametrize(
  "quant",
  [QuantConfig(budget=1.5), QuantConfig(method="lloyd", bits=2), QuantConfig(lut_clusters=4)],
)
def test_unit_moments_give_the_uncalibrated_tensors_bit_for_bit(quant, mode, factor):
  """Equal moments are the weight-space objective: with them (any constant for "kernel", which
  divides by the mean) calibration packs what 'none' packs, and 'none' ignores moments."""
  _, params, *_ = tiny_model(quant=QuantConfig(method="nf", bits=4))
  h = {k: v * factor for k, v in _unit_moments(params).items()}
  ref, ref_report = quantize_params(params, quant, progress=False)
  tripled = {k: 3 * v for k, v in h.items()}
  got, _ = quantize_params(params, quant, progress=False, importance=tripled)
  assert _tree_bytes(got) == _tree_bytes(ref)  # 'none' ignores moments
  calibrated = dataclasses.replace(quant, calibration=mode)
  got, report = quantize_params(params, calibrated, progress=False, importance=h)
  assert _tree_bytes(got) == _tree_bytes(ref)
  assert report.rel_error == ref_report.rel_error


def test_model_mode_draws_bits_to_loud_kernels_and_kernel_mode_ignores_their_scale():
  _, params, *_ = tiny_model(quant=QuantConfig(method="nf", bits=4))
  h = _unit_moments(params)
  rng = np.random.default_rng(0)
  h = {k: rng.gamma(1.0, size=v.shape).astype(np.float32) for k, v in h.items()}
  loud = "model/layers/1/mlp/down_proj/kernel"
  louder = {**h, loud: h[loud] * 100.0}

  def quantize(mode, importance):
    cfg = QuantConfig(budget=1.5, calibration=mode, bucket_multiple=1)
    qparams, report = quantize_params(params, cfg, progress=False, importance=importance)
    return qparams, {r.path: r.code_bits for r in report.layers}

  _, quiet = quantize("model", h)
  _, loud_bits = quantize("model", louder)
  assert loud_bits[loud] > quiet[loud] + 0.5
  assert _tree_bytes(quantize("kernel", h)[0]) == _tree_bytes(quantize("kernel", louder)[0])
  assert _tree_bytes(quantize("kernel", h)[0]) != _tree_bytes(quantize("none", None)[0])


@pytest.mark.parametrize("mode", ["kernel", "model"])
def test_streamed_equals_in_memory_with_moments(mode):
  _need(STORIES)
  model, params = llama.load_pretrained(STORIES, dtype=jnp.float32)
  blocks = np.random.default_rng(0).integers(3, 512, size=(6, 33))
  h = calibration.input_moments(model, params, blocks, batch_size=4)
  cfg = QuantConfig(budget=1.5, calibration=mode)
  reference, ref_report = quantize_params(params, cfg, progress=False, importance=h)
  leaves = []
  report = quantize_stream(
    CheckpointSource(STORIES), cfg, sink=lambda p, leaf, _: leaves.append((p, leaf)),
    progress=False, importance=h,
  )
  _assert_identical(pipeline.nest(leaves), reference)
  assert report.rel_error == ref_report.rel_error
  uncalibrated, _ = quantize_params(params, QuantConfig(budget=1.5), progress=False)
  assert _tree_bytes(uncalibrated) != _tree_bytes(reference)


def test_moments_cache_round_trips_and_refuses_another_identity(tmp_path):
  h = {"a/kernel": np.arange(3, dtype=np.float32), "b/kernel": np.ones(5, np.float32)}
  path = tmp_path / "calibration.safetensors"
  calibration.save(path, h, {"sequences": 4})
  loaded = calibration.load(path, {"sequences": 4})
  assert set(loaded) == set(h) and all(np.array_equal(loaded[k], h[k]) for k in h)
  assert calibration.load(path, {"sequences": 8}) is None
  assert calibration.load(tmp_path / "missing.safetensors", {"sequences": 4}) is None


@pytest.mark.parametrize(
  "importance, message",
  [
    (None, "needs the input second moments of"),
    ({}, "needs the input second moments of"),
    ("short", "expected 64 finite values >= 0, got shape (63,)"),
    ("negative", "expected 64 finite values >= 0"),
  ],
)
def test_bad_moments_are_one_line_errors(importance, message):
  _, params, *_ = tiny_model(quant=QuantConfig(method="nf", bits=4))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  h = {pipeline.path_str(p): np.ones(x.shape[0], np.float32) for p, x in flat if x.ndim == 2}
  if importance == "short":
    importance = {**h, "model/layers/0/self_attn/q_proj/kernel": np.ones(63, np.float32)}
  elif importance == "negative":
    importance = {**h, "model/layers/0/self_attn/q_proj/kernel": -np.ones(64, np.float32)}
  with pytest.raises(QuantizationError) as e:
    quantize_params(
      params, QuantConfig(calibration="kernel"), progress=False, importance=importance
    )
  assert message in str(e.value) and "\n" not in str(e.value)


def test_calibration_needs_a_fitted_method():
  with pytest.raises(QuantizationError, match="method 'nf' does not have"):
    QuantConfig(method="nf", calibration="kernel")
  with pytest.raises(QuantizationError, match="unknown calibration"):
    QuantConfig(calibration="hessian")
  with pytest.raises(ValueError, match="sequences=0"):
    calibration.CalibConfig(sequences=0)
