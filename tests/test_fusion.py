"""Fused sibling projections (`quantize.concat_channels`, `lowra_jax.fusion`), against float64
numpy and the unfused model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_word_gemv import dense64, gemv_bound, quantized
from tiny_model import tiny_model

from lowra_jax import fusion, quantize
from lowra_jax import generate as gen
from lowra_jax.models import llama
from pallas_kernels import backend, quantized_matmul

PIECES = [("mixed 1.5", 72, 0), ("mixed 1.5", 40, 1), ("2 bits", 24, 2)]  # name, N, seed
WIDE = [("nf4", 40, 0), ("mixed 3.0", 72, 1), ("2 bits", 24, 2)]  # 2 to 4 bits, NF4's tables


def pieces(which=PIECES):
  return [quantized(name, n=n, seed=seed) for name, n, seed in which]


@pytest.mark.parametrize("layout", ["planes", "words"])
def test_concat_channels_dequantizes_to_the_pieces_side_by_side(layout):
  parts = pieces()
  if layout == "words":
    parts = [quantize.to_word_layout(p) for p in parts]
  fused = quantize.concat_channels(parts)
  assert fused.shape == (128, 136)
  want = np.concatenate([dense64(p) for p in pieces()], axis=1)
  got = np.asarray(quantize.dequantize(fused, jnp.float32), np.float64)
  np.testing.assert_allclose(got, want, rtol=2.0**-23, atol=0)  # float32 level * scale
  np.testing.assert_array_equal(
    fused.channel_bits(), np.concatenate([p.channel_bits() for p in parts])
  )


ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.parametrize("impl", ["interpret"] + (["triton"] if ON_GPU else []))
@pytest.mark.parametrize("m, which", [(1, PIECES), (4, PIECES), (1, WIDE)])
def test_fused_word_gemv_matches_float64(m, which, impl):
  """All buckets of three tensors in one `word_gemv` launch, columns in the pieces' order."""
  fused = quantize.concat_channels([quantize.to_word_layout(p) for p in pieces(which)])
  w = np.concatenate([dense64(p) for p in pieces(which)], axis=1)
  x = jax.random.normal(jax.random.key(m), (m, w.shape[0])).astype(jnp.bfloat16)
  y = quantized_matmul(x, fused, backend=impl).astype(jnp.float32)
  x64 = np.asarray(x, np.float64)
  scale = np.abs(x64) @ np.abs(w)
  bf16_out = 2.0**-8 * np.abs(x64 @ w)  # the output's rounding to x's dtype
  assert (np.abs(np.asarray(y, np.float64) - x64 @ w) <= gemv_bound(1) * scale + bf16_out).all()


def test_concat_channels_rejects_other_input_widths():
  with pytest.raises(ValueError, match="one input width, group size"):
    quantize.concat_channels([quantized("2 bits"), quantized("2 bits", k=96)])


def test_fusion_moves_kernels_and_adapters_and_keeps_the_rest():
  q, k, v = (quantize.to_word_layout(p) for p in pieces())
  bias = jnp.ones(72)
  other = quantize.to_word_layout(quantized("2 bits", k=96))
  quant = {
    "0": {
      "self_attn": {
        "q_proj": {"kernel": q, "bias": bias},
        "k_proj": {"kernel": k},
        "v_proj": {"kernel": v},
        "o_proj": {"kernel": q},
      },
      "mlp": {"gate_proj": {"kernel": q}, "up_proj": {"kernel": other}},
    }
  }
  rng = np.random.default_rng(0)
  lora = {
    "0": {
      name: {"a": rng.normal(size=(128, r)).astype(np.float32), "b": rng.normal(size=(r, n))}
      for name, r, n in [("q_proj", 2, 72), ("k_proj", 3, 40), ("v_proj", 2, 24)]
    }
  }
  lora = jax.tree.map(lambda a: np.asarray(a, np.float32), lora)
  lora["0"] = {"self_attn": lora["0"], "mlp": {"gate_proj": {"a": 0, "b": 0}}}
  out = fusion.fuse_for_decoding({"quant": quant, "lora": lora}, llama.FUSED_PROJECTIONS)
  attn = out["quant"]["0"]["self_attn"]
  assert sorted(attn) == ["o_proj", "q_proj", "q_proj+k_proj+v_proj"]
  assert attn["q_proj"] == {"bias": bias} and attn["o_proj"]["kernel"] is q
  assert attn["q_proj+k_proj+v_proj"].shape == (128, 136)
  assert out["quant"]["0"]["mlp"] == quant["0"]["mlp"]  # gate and up read inputs of two widths
  assert out["lora"]["0"]["mlp"] == lora["0"]["mlp"]  # adapters fused only with their kernels
  (fused,) = out["lora"]["0"]["self_attn"].values()
  x = rng.normal(size=(3, 128))
  pairs = [lora["0"]["self_attn"][n] for n in llama.FUSED_PROJECTIONS["self_attn"]]
  want = np.concatenate([x @ p["a"] @ p["b"] for p in pairs], axis=1)
  a, b = (np.asarray(fused[n], np.float64) for n in "ab")
  rank, edges = 3, [0, 72, 112, 136]  # the largest rank; the siblings' columns
  assert a.shape == (128, 3 * rank) and b.shape == (rank, 136)
  got = [x @ a[:, s * rank : (s + 1) * rank] @ b[:, lo:hi] for s, (lo, hi) in
         enumerate(zip(edges[:-1], edges[1:]))]
  np.testing.assert_allclose(np.concatenate(got, 1), want, rtol=1e-12)  # copies and exact zeros


def test_planes_are_not_fused():
  quant = {"mlp": {n: {"kernel": quantized("2 bits")} for n in ("gate_proj", "up_proj")}}
  out = fusion.fuse_for_decoding({"quant": quant}, llama.FUSED_PROJECTIONS)
  assert out["quant"] == quant


LOWRA = quantize.QuantConfig(method="lowra", budget=1.5, precisions=(1, 2), group_size=32)


@pytest.mark.parametrize("tokens", [1, 16])
def test_model_with_fused_projections_matches_unfused(tokens):
  """The tiny model with non-zero adapters, decode-sized (4 rows: `word_gemv`) and prefill-sized
  (64 rows: weights dequantized by XLA) inputs: the fused kernels give the unfused logits up to
  float32 summation order (the split ranges differ with the launch's width)."""
  model, _, _, variables, adapters, batch = tiny_model(quant=LOWRA)
  variables = variables | {"lora": adapters}
  inputs = batch["inputs"][:, :tokens]
  backend.set_default("interpret")
  try:
    fused = gen.decode_layout(variables, 4)
    unfused = gen.decode_layout(variables, 4, fuse=False)
    for tree in ("quant", "lora"):
      layer = fused[tree]["model"]["layers"]["0"]
      assert set(layer["self_attn"]) == {"o_proj", "q_proj+k_proj+v_proj"}
      assert set(layer["mlp"]) == {"down_proj", "gate_proj+up_proj"}
    got, want = (model.apply(v, inputs) for v in (fused, unfused))
  finally:
    backend.set_default("auto")
  want = np.asarray(want, np.float64)
  # float32 sums over at most K = 128 inputs added in another order: <= 128 * 2^-24 (7.6e-6) of
  # their scale, taken as the largest logit
  bound = 128 * 2.0**-24 * abs(want).max()
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=bound)
