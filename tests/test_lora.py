"""Tests for lowra_jax.lora and lowra_jax.loftq: LoRA over quantized bases, QLoRA and LoftQ init.

Oracles: float64 numpy for the layer, a dense model holding the dequantized kernels (plain jnp,
no custom VJP) for gradients, numpy's float64 SVD for LoftQ's low-rank step (Eckart-Young), and
XLA's compiled memory analysis for the no-dense-copy property.
"""

from __future__ import annotations

from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import (
  assert_close_at_scale,
  assert_trees_close_at_scale,
  f32_sum,
  llama_grad_terms,
  llama_terms,
)

from lowra_jax import lora as lora_lib
from lowra_jax import reporting
from lowra_jax.base import Prepared
from lowra_jax.loftq import get_kernel
from lowra_jax.models import llama
from lowra_jax.quantize import (
  QuantConfig,
  dequantize,
  dequantize_params,
  is_quantized,
  quantize_params,
  quantize_tensor,
)

STORIES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "models" / "stories260K"
NF2 = QuantConfig(method="nf", bits=2)


@pytest.fixture(scope="module")
def stories():
  if not STORIES.exists():
    pytest.skip("../shared/data not present (stories260K missing)")
  model, params = llama.load_pretrained(STORIES / "stories260K.bin", dtype=jnp.float32)
  return model.config, params


def _tokens(seed=0, shape=(2, 12)):
  return jnp.asarray(np.random.default_rng(seed).integers(3, 512, size=shape))


def _dense_variables(qparams):
  """Every QuantizedTensor replaced by its float32 dequantization, all in 'params'."""
  return jax.tree.map(
    lambda x: dequantize(x, jnp.float32) if is_quantized(x) else jnp.asarray(x, jnp.float32),
    qparams,
    is_leaf=is_quantized,
  )


def test_layer_matches_float64():
  rng = np.random.default_rng(0)
  k, n, r = 96, 80, 4
  w = rng.standard_normal((k, n)).astype(np.float32)
  x = rng.standard_normal((3, 5, k)).astype(np.float32)
  a, b = rng.standard_normal((k, r)), rng.standard_normal((r, n))
  bias = rng.standard_normal(n)
  cfg = lora_lib.LoraConfig(rank=r, alpha=8.0)
  layer = lora_lib.QLoRALinear(n, use_bias=True, dtype=jnp.float32, lora=cfg)
  qt = quantize_tensor(w, QuantConfig(method="nf", bits=4))
  lora = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
  w_hat = np.asarray(dequantize(qt, jnp.float32), np.float64)
  c_a, c_b = rng.standard_normal((k, r)), rng.standard_normal((r, n))
  correction = {"correction_a": jnp.asarray(c_a, jnp.float32), "correction_b": c_b}
  for variables, kernel in [
    ({"params": {"kernel": w, "bias": bias}, "lora": lora}, w.astype(np.float64)),
    ({"params": {"bias": bias}, "quant": {"kernel": qt}, "lora": lora}, w_hat),
    ({"params": {"bias": bias, **correction}, "quant": {"kernel": qt}, "lora": lora}, w_hat),
  ]:
    out = layer.apply(variables, jnp.asarray(x))
    ref = x @ kernel + bias + 2.0 * (x @ a) @ b
    if "correction_a" in variables["params"]:  # a frozen LoftQ correction, same scale
      ref = ref + 2.0 * (x @ c_a) @ c_b
    # float32 dots over K = 96 and the rank (twice), after rounding a, b and bias to float32
    assert_close_at_scale(out, ref, f32_sum(k + 2 * r + 4))


def test_dense_matmul_gradients_match_float64():
  rng = np.random.default_rng(3)
  k, n = 48, 24
  x, w = rng.standard_normal((2, 5, k)), rng.standard_normal((k, n))
  g = rng.standard_normal((2, 5, n))
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  y, vjp = jax.vjp(lora_lib.dense_matmul, f32(x), f32(w))
  dx, dw = vjp(f32(g))
  assert_close_at_scale(y, x @ w, f32_sum(k))
  assert_close_at_scale(dx, g @ w.T, f32_sum(n))
  assert_close_at_scale(dw, np.einsum("btk,btn->kn", x, g), f32_sum(10))


def test_frozen_bf16_kernel_gets_no_float32_copy_in_the_backward():
  """The input gradient through a frozen bf16 kernel (e.g. the head) is taken with the kernel as
  stored: no float32 [K, N] copy of it appears in the lowered step."""
  k, n = 64, 384
  layer = lora_lib.QLoRALinear(n, dtype=jnp.bfloat16)
  kernel = jnp.ones((k, n), jnp.bfloat16)
  x = jnp.ones((4, k), jnp.bfloat16)

  def loss(x):
    return layer.apply({"params": {"kernel": kernel}}, x).astype(jnp.float32).sum()

  text = jax.jit(jax.grad(loss)).lower(x).as_text()
  assert f"tensor<{k}x{n}xf32>" not in text and f"tensor<{n}x{k}xf32>" not in text


def test_zero_b_is_the_quantized_base(stories):
  config, params = stories
  qparams, lora, _ = lora_lib.init_lora(
    params, NF2, lora_lib.LoraConfig(rank=4), jax.random.key(0), progress=False
  )
  frozen, quant = lora_lib.split_quantized(qparams)
  model = llama.Llama(config, dtype=jnp.float32, lora=lora_lib.LoraConfig(rank=4))
  tokens = _tokens()
  with_lora = model.apply({"params": frozen, "quant": quant, "lora": lora}, tokens)
  without = model.apply({"params": frozen, "quant": quant}, tokens)
  np.testing.assert_array_equal(with_lora, without)  # eagerly, the same base ops plus exact 0s
  dense = model.apply({"params": _dense_variables(qparams)}, tokens)
  assert_close_at_scale(with_lora, dense, f32_sum(llama_terms(config, tokens.shape[1], 4)))


def test_gradients_reach_only_adapters_and_match_dense_reference(stories):
  config, params = stories
  lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0)
  qparams, lora, _ = lora_lib.init_lora(params, NF2, lcfg, jax.random.key(1), progress=False)
  lora = jax.tree.map(lambda x: x + 0.01, lora)  # B != 0, so A gets gradients too
  frozen, quant = lora_lib.split_quantized(qparams)
  model = llama.Llama(config, dtype=jnp.float32, lora=lcfg)
  tokens = _tokens(1)

  def loss(variables, model=model):
    return lambda ad: jnp.mean(model.apply({**variables, "lora": ad}, tokens) ** 2)

  grads = jax.grad(loss({"params": frozen, "quant": quant}))(lora)
  ref = jax.grad(loss({"params": _dense_variables(qparams)}))(lora)
  chex.assert_trees_all_equal_structs(grads, lora)
  bound = f32_sum(llama_grad_terms(config, *tokens.shape, 4))
  assert_trees_close_at_scale(grads, ref, bound)
  # Remat'd layers: the backward multiplies by the recomputed forward's kept weights.
  remat = llama.Llama(config, dtype=jnp.float32, lora=lcfg, remat=True)
  g_remat = jax.grad(loss({"params": frozen, "quant": quant}, remat))(lora)
  assert_trees_close_at_scale(g_remat, ref, bound)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  assert not any(is_quantized(x) for x in jax.tree.leaves(frozen, is_leaf=is_quantized))
  assert all(is_quantized(x) for x in jax.tree.leaves(quant, is_leaf=is_quantized))


def test_adapters_cover_the_default_targets(stories):
  _, params = stories
  lora = lora_lib.random_adapters(
    lora_lib.target_paths(params, lora_lib.LoraConfig()), 4, jax.random.key(0)
  )
  layer = lora["model"]["layers"]["3"]
  assert sorted(layer["self_attn"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
  assert sorted(layer["mlp"]) == ["down_proj", "gate_proj", "up_proj"]
  assert layer["mlp"]["down_proj"]["a"].shape == (172, 4)
  assert layer["mlp"]["down_proj"]["b"].shape == (4, 64)
  assert not jnp.any(layer["mlp"]["down_proj"]["b"])
  assert float(jnp.abs(layer["mlp"]["down_proj"]["a"]).max()) <= 1 / np.sqrt(172)


@pytest.mark.parametrize(
  "quant",
  [
    NF2,
    QuantConfig(method="lloyd", bits=2),
    QuantConfig(method="lowra", budget=1.5, solver="greedy"),
  ],
)
def test_loftq_residual_falls_below_qlora(stories, quant):
  _, params = stories
  lcfg = lora_lib.LoraConfig(rank=8, alpha=16.0, init="loftq", loftq_iters=3)
  qparams, lora, report = lora_lib.init_lora(params, quant, lcfg, jax.random.key(0), progress=False)
  errors = report.errors
  assert len(errors) == 3
  assert errors[0] < report.quant_error
  assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:]))
  assert errors[-1] < 0.97 * report.quant_error

  # Independent recomputation in float64: the reported error, and Eckart-Young optimality of A B.
  num = den = 0.0
  dense = dequantize_params(qparams, jnp.float32)
  for path in lora_lib.target_paths(params, lcfg):
    w = np.asarray(get_kernel(params, path), np.float64)
    q = np.asarray(get_kernel(dense, path), np.float64)
    node = lora
    for part in path:
      node = node[part]
    ab = lcfg.scale * np.asarray(node["a"], np.float64) @ np.asarray(node["b"], np.float64)
    s = np.linalg.svd(w - q, compute_uv=False)
    np.testing.assert_allclose(
      np.sum((w - q - ab) ** 2), np.sum(s[lcfg.rank :] ** 2), rtol=1e-3, atol=1e-9
    )
    num, den = num + np.sum((w - q - ab) ** 2), den + np.sum(w**2)
  np.testing.assert_allclose(np.sqrt(num / den), errors[-1], rtol=1e-4)


def test_loftq_model_is_closer_to_full_precision(stories):
  config, params = stories
  tokens = _tokens(2, (4, 32))
  model = llama.Llama(config, dtype=jnp.float32, lora=lora_lib.LoraConfig(rank=8))
  full = model.apply({"params": jax.tree.map(jnp.asarray, params)}, tokens)
  gaps = {}
  for init in ("qlora", "loftq"):
    lcfg = lora_lib.LoraConfig(rank=8, init=init, loftq_iters=2)
    qparams, lora, _ = lora_lib.init_lora(params, NF2, lcfg, jax.random.key(0), progress=False)
    frozen, quant = lora_lib.split_quantized(qparams)
    logits = model.apply({"params": frozen, "quant": quant, "lora": lora}, tokens)
    gaps[init] = float(jnp.mean((logits - full) ** 2))
  assert gaps["loftq"] < 0.8 * gaps["qlora"]


def test_frozen_loftq_correction_starts_where_loftq_does_and_is_never_trained(stories):
  """init 'loftq_frozen': LoftQ's factors sit in params as a frozen correction, the adapters are
  QLoRA's (B = 0); the model equals a float64-built dense model of W_hat + s·A0·B0, gradients
  reach only the adapters, and merging folds both low-rank terms into the kernels."""
  config, params = stories
  kw = dict(rank=4, alpha=8.0, loftq_iters=2)
  loftq = lora_lib.LoraConfig(init="loftq", **kw)
  frozen_cfg = lora_lib.LoraConfig(init="loftq_frozen", **kw)
  q_ref, factors, _ = lora_lib.init_lora(params, NF2, loftq, jax.random.key(0), progress=False)
  qparams, adapters, _ = lora_lib.init_lora(
    params, NF2, frozen_cfg, jax.random.key(0), progress=False
  )
  rest, corrections = lora_lib.split_corrections(qparams)
  chex.assert_trees_all_equal_structs(rest, q_ref)
  paths = lora_lib.target_paths(params, frozen_cfg)
  assert sorted(corrections) == sorted(paths)
  for path in paths:
    node = factors
    for part in path:
      node = node[part]
    np.testing.assert_array_equal(corrections[path][0], node["a"])
    np.testing.assert_array_equal(corrections[path][1], node["b"])
  assert all(float(jnp.abs(b).max()) == 0 for b in jax.tree.leaves(adapters)[1::2])

  adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # B != 0
  dense = jax.tree.map(lambda x: np.asarray(x, np.float64), _dense_variables(rest))
  merged_ref = jax.tree.map(np.copy, dense)
  for path in paths:
    node, merged, ad = dense, merged_ref, adapters
    for part in path:
      node, merged, ad = node[part], merged[part], ad[part]
    a0, b0 = (np.asarray(f, np.float64) for f in corrections[path])
    node["kernel"] = node["kernel"] + frozen_cfg.scale * a0 @ b0
    a, b = (np.asarray(ad[name], np.float64) for name in ("a", "b"))
    merged["kernel"] = node["kernel"] + frozen_cfg.scale * a @ b
  frozen, quant = lora_lib.split_quantized(qparams)
  prep = Prepared(None, None, {"params": frozen, "quant": quant}, adapters, None)
  stored = sum(32 * (k + n) * kw["rank"] for k, n in paths.values())  # float32 [k, r] + [r, n]
  quantized = sum(x.num_params for x in jax.tree.leaves(quant, is_leaf=is_quantized))
  assert reporting.correction_bits(prep) == pytest.approx(stored / quantized, rel=1e-12)
  model = llama.Llama(config, dtype=jnp.float32, lora=frozen_cfg)
  tokens = _tokens(3)
  logits = model.apply({"params": frozen, "quant": quant, "lora": adapters}, tokens)
  ref = model.apply({"params": merged_ref}, jnp.asarray(tokens))
  assert_close_at_scale(logits, ref, f32_sum(llama_terms(config, tokens.shape[1], 8)))
  merged = lora_lib.merge_adapters(qparams, adapters, frozen_cfg)
  chex.assert_trees_all_equal_structs(merged, _dense_variables(q_ref))
  for path in paths:
    got, want = merged, merged_ref
    for part in path:
      got, want = got[part], want[part]
    assert_close_at_scale(got["kernel"], want["kernel"], f32_sum(2 * kw["rank"] + 2))

  def loss(variables):
    return lambda ad: jnp.mean(model.apply({**variables, "lora": ad}, tokens) ** 2)

  grads = jax.grad(loss({"params": frozen, "quant": quant}))(adapters)
  dense32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dense)  # W_hat + s·A0·B0
  ref_grads = jax.grad(loss({"params": dense32}))(adapters)
  chex.assert_trees_all_equal_structs(grads, adapters)
  bound = f32_sum(llama_grad_terms(config, *tokens.shape, 8))
  assert_trees_close_at_scale(grads, ref_grads, bound)


def test_dropout_only_in_training(stories):
  config, params = stories
  lcfg = lora_lib.LoraConfig(rank=4, dropout=0.5)
  qparams, lora, _ = lora_lib.init_lora(params, NF2, lcfg, jax.random.key(0), progress=False)
  lora = jax.tree.map(lambda x: x + 0.05, lora)
  frozen, quant = lora_lib.split_quantized(qparams)
  model = llama.Llama(config, dtype=jnp.float32, lora=lcfg)
  variables, tokens = {"params": frozen, "quant": quant, "lora": lora}, _tokens(3)
  eval_a = model.apply(variables, tokens)
  np.testing.assert_array_equal(eval_a, model.apply(variables, tokens))
  rngs = {"dropout": jax.random.key(5)}
  train = model.apply(variables, tokens, deterministic=False, rngs=rngs)
  assert float(jnp.abs(train - eval_a).max()) > 1e-3
  np.testing.assert_array_equal(
    train, model.apply(variables, tokens, deterministic=False, rngs=rngs)
  )


def test_train_step_keeps_no_dense_copy_of_the_base():
  """A forward+backward step over a model whose weights dominate memory: XLA's temp buffers stay
  far below the bf16 size of the quantized weights (each layer is dequantized transiently)."""
  config = llama.LlamaConfig(
    vocab_size=256,
    hidden_size=512,
    intermediate_size=1536,
    num_layers=4,
    num_heads=8,
    num_kv_heads=8,
    head_dim=64,
  )
  model = llama.Llama(config, lora=lora_lib.LoraConfig(rank=8))
  tokens = jnp.zeros((1, 16), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  qparams, _ = quantize_params(params, NF2, progress=False)
  frozen, quant = lora_lib.split_quantized(qparams)
  lora = lora_lib.random_adapters(
    lora_lib.target_paths(params, lora_lib.LoraConfig()), 8, jax.random.key(1)
  )
  bf16_bytes = sum(2 * q.num_params for q in jax.tree.leaves(quant, is_leaf=is_quantized))

  def loss(ad):
    logits = model.apply({"params": frozen, "quant": quant, "lora": ad}, tokens)
    return jnp.mean(nn.log_softmax(logits)[..., 0])

  compiled = jax.jit(jax.grad(loss)).lower(lora).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert bf16_bytes > 20e6
  assert temp < 0.25 * bf16_bytes, (temp, bf16_bytes)


def test_config_and_target_errors(stories):
  _, params = stories
  with pytest.raises(ValueError, match="rank=0 — use a rank >= 1"):
    lora_lib.LoraConfig(rank=0)
  with pytest.raises(ValueError, match="init=.* — use one of"):
    lora_lib.LoraConfig(init="pissa")
  with pytest.raises(ValueError, match="dropout"):
    lora_lib.LoraConfig(dropout=1.0)
  with pytest.raises(ValueError, match=r"LoRA targets \['wq'\] match no module"):
    lora_lib.init_lora(params, NF2, lora_lib.LoraConfig(targets=("wq",)), jax.random.key(0))
  with pytest.raises(ValueError, match="exceeds min"):
    lora_lib.init_lora(params, NF2, lora_lib.LoraConfig(rank=100), jax.random.key(0))


def test_method_none_is_the_dense_lora_reference(stories):
  """quant method 'none': the params come back untouched, adapters start at B = 0."""
  _, params = stories
  none = QuantConfig(method="none")
  qparams, adapters, report = lora_lib.init_lora(
    params, none, lora_lib.LoraConfig(rank=4), jax.random.key(0)
  )
  assert report is None and qparams is params
  assert not jax.tree.leaves(lora_lib.split_quantized(qparams)[1])
  assert all(float(jnp.abs(b).max()) == 0 for b in jax.tree.leaves(adapters)[1::2])
  with pytest.raises(ValueError, match="needs a quantized base"):
    lora_lib.init_lora(params, none, lora_lib.LoraConfig(init="loftq"), jax.random.key(0))


def _residual(seed: int, k: int, n: int) -> np.ndarray:
  """A LoftQ-like residual: heavy-tailed weights minus their 1.5-bit LowRA quantization."""
  rng = np.random.default_rng(seed)
  w = (0.02 * rng.standard_t(5, (k, n)) * rng.uniform(0.5, 2.0, (1, n))).astype(np.float32)
  return w - np.asarray(dequantize(quantize_tensor(w, QuantConfig(budget=1.5)), jnp.float32))


def test_low_rank_factors_are_near_the_float64_svd_truncation(monkeypatch):
  """Exact and randomized rank-16 factors against float64 numpy's SVD truncation: the exact one's
  squared error equals the optimum up to float32 rounding; the randomized one (8 subspace
  iterations) stays within 1 % of it (its approximation error, not rounding). Above
  EXACT_SVD_MAX on the smaller side `low_rank` is the randomized one."""
  from lowra_jax import loftq

  r = _residual(0, 320, 704)
  r64 = r.astype(np.float64)
  s = np.linalg.svd(r64, compute_uv=False)
  optimum = np.sum(s[16:] ** 2)
  sq_err = lambda ab: np.sum((r64 - np.asarray(ab[0] @ ab[1], np.float64)) ** 2)  # noqa: E731
  assert sq_err(loftq.exact_low_rank(jnp.asarray(r), 16)) == pytest.approx(optimum, rel=1e-4)
  randomized = loftq.randomized_low_rank(jnp.asarray(r), 16)
  assert optimum <= sq_err(randomized) * (1 + 1e-4) and sq_err(randomized) <= 1.01 * optimum
  monkeypatch.setattr(loftq, "EXACT_SVD_MAX", 319)
  np.testing.assert_array_equal(loftq.low_rank(jnp.asarray(r), 16)[0], randomized[0])


@pytest.mark.parametrize("full", [False, True], ids=["moments", "covariance"])
def test_weighted_low_rank_minimises_the_error_on_the_inputs(full):
  """`low_rank(r, rank, weight)` against float64 numpy: the weighted optimum is
  L^-T trunc(L^T r) with L L^T = H + 1 % mean diag (H = diag(h) for moments), its output error
  ||L^T (r - A B)||_F^2 equals the optimum's up to float32 rounding, and it is below the
  unweighted truncation's output error."""
  from lowra_jax import loftq

  rng = np.random.default_rng(3)
  r = _residual(1, 192, 256)
  x = rng.normal(size=(768, 192)) @ rng.normal(size=(192, 192)) * 0.3 + rng.normal(size=(768, 192))
  x *= rng.uniform(0.1, 3.0, 192)  # rows of very different energy
  cov = x.T @ x / len(x)
  weight = cov if full else np.diagonal(cov).copy()
  h = cov if full else np.diag(weight)
  lower = np.linalg.cholesky(h + loftq.LOW_RANK_DAMP * np.mean(np.diagonal(h)) * np.eye(192))
  u, s, vt = np.linalg.svd(lower.T @ r.astype(np.float64), full_matrices=False)
  optimum = np.sum(s[16:] ** 2)

  def out_err(a, b):
    d = r.astype(np.float64) - np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    return np.sum((lower.T @ d) ** 2)

  a, b = loftq.low_rank(jnp.asarray(r), 16, jnp.asarray(weight, jnp.float32))
  assert out_err(a, b) == pytest.approx(optimum, rel=1e-3)
  assert out_err(a, b) < 0.95 * out_err(*loftq.low_rank(jnp.asarray(r), 16))


def test_weighted_loftq_needs_calibration_moments():
  from lowra_jax import loftq

  with pytest.raises(ValueError, match="set quant.calibration='kernel'"):
    loftq._row_weight(None, None, "l/kernel", weighted=True)
  assert loftq._row_weight(None, None, "l/kernel", weighted=False) is None
  h, cov = {"l/kernel": np.ones(4)}, {"l/kernel": np.eye(4)}
  assert loftq._row_weight(h, None, "l/kernel", weighted=True) is h["l/kernel"]
  assert loftq._row_weight(h, cov, "l/kernel", weighted=True) is cov["l/kernel"]  # under GPTQ
  with pytest.raises(ValueError, match="loftq_weighting='outputs'"):
    lora_lib.LoraConfig(loftq_weighting="outputs")
