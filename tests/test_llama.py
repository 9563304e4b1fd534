"""Tests for lowra_jax.models.llama: parity with HF's PyTorch LlamaForCausalLM and real checkpoints.

Oracles: logits recorded from transformers' PyTorch `LlamaForCausalLM` (tests/fixtures/hf_parity,
made by tests/fixtures/make_hf_parity.py on a machine with torch) for the real pycode-llama-17m and
two random tiny configs (GQA + llama3 rope scaling + tied head; dynamic-NTK rope + attention bias +
untied head); the documented greedy sample and validation loss of the real stories260K model.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import (
  assert_close_at_scale,
  assert_trees_close_at_scale,
  f32_sum,
  f32_sum_random,
  llama_grad_terms,
  llama_terms,
)

from lowra_jax.generate import generate
from lowra_jax.models import llama
from lowra_jax.models.tokenizer import load_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf_parity"
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MODELS = {
  "tiny_llama3": FIXTURES / "tiny_llama3",
  "tiny_dynamic": FIXTURES / "tiny_dynamic",
  "pycode": DATA / "models" / "pycode-llama-17m",
}
STORIES = DATA / "models" / "stories260K"


def _need(path: Path) -> Path:
  if not path.exists():
    pytest.skip(f"../shared/data not present ({path.name} missing)")
  return path


def _f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


@pytest.fixture(scope="module")
def recorded():
  return np.load(FIXTURES / "logits.npz")


@pytest.fixture(scope="module")
def stories():
  model, params = llama.load_pretrained(_need(STORIES) / "stories260K.bin", dtype=jnp.float32)
  return model, {"params": _f32(params)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_match_hf_pytorch(recorded, name):
  model, params = llama.load_pretrained(_need(MODELS[name]), dtype=jnp.float32)
  tokens = recorded[f"{name}/tokens"]
  ref = recorded[f"{name}/logits"]
  out = np.asarray(jax.jit(model.apply)({"params": _f32(params)}, jnp.asarray(tokens)))
  assert out.shape == ref.shape
  # Two float32 programs (JAX, PyTorch) of up to 25k terms: the worst case would be 3e-3.
  assert_close_at_scale(out, ref, f32_sum_random(llama_terms(model.config, tokens.shape[1])))


def test_bf16_compute_tracks_fp32(recorded):
  model, params = llama.load_pretrained(_need(MODELS["pycode"]))  # bf16 compute by default
  tokens = jnp.asarray(recorded["pycode/tokens"])
  ref = recorded["pycode/logits"]
  out = np.asarray(jax.jit(model.apply)({"params": params}, tokens))
  assert out.dtype == np.float32
  # bf16 activations: 2^-8 per rounding, ~40 of them along 8 layers (in quadrature: 0.025)
  assert np.abs(out - ref).max() / np.abs(ref).max() < 0.05
  assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_config_transformers_4_and_5_forms_agree():
  v5 = json.loads((FIXTURES / "tiny_llama3" / "config.json").read_text())
  v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
  rope = dict(v5["rope_parameters"])
  v4["rope_theta"] = rope.pop("rope_theta")
  v4["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rope.items()}
  a, b = llama.LlamaConfig.from_hf(v5), llama.LlamaConfig.from_hf(v4)
  assert a == b
  assert a.rope.rope_type == "llama3" and a.rope.theta == 500000.0 and a.num_kv_heads == 2


@pytest.mark.parametrize(
  ("change", "message"),
  [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type 'yarn'"),
  ],
)
def test_config_rejects_unsupported(change, message):
  config = json.loads((FIXTURES / "tiny_dynamic" / "config.json").read_text()) | change
  with pytest.raises(ValueError, match=message):
    llama.LlamaConfig.from_hf(config)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_num_params_counts_the_checkpoint(name):
  model, params = llama.load_pretrained(_need(MODELS[name]))
  assert model.config.num_params == sum(np.size(x) for x in jax.tree.leaves(params))


def test_load_rejects_unknown_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="expected an HF model directory"):
    llama.load_pretrained(tmp_path / "model.pt")


def test_stories260k_greedy_sample(stories):
  model, variables = stories
  tok = load_tokenizer(STORIES / "tok512.bin")
  ids = generate(model, variables, [[tok.bos_id]], max_new_tokens=16)[0]
  assert tok.decode(ids).startswith("Once upon a time, there was a little girl named Lily.")


def test_stories260k_validation_loss(stories):
  """Mean next-token loss over the first 128 windows of 512 tokens of TinyStories val (the text
  after the leading fragment, as one stream): the documented ~1.39 nats/token."""
  model, variables = stories
  tok = load_tokenizer(STORIES / "tok512.bin")
  text = (_need(DATA / "tinystories" / "tinystories_val.txt")).read_text()
  windows, t = 128, 512
  ids = np.asarray(tok.encode(text.split("\n\n", 1)[1][:300_000])[: windows * t + 1])
  inputs, targets = ids[:-1].reshape(windows, t), ids[1:].reshape(windows, t)

  @jax.jit
  def loss(x, y):
    logits = model.apply(variables, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  mean = np.mean([float(loss(inputs[i : i + 16], targets[i : i + 16])) for i in range(0, 128, 16)])
  assert abs(mean - 1.39) < 0.02


def test_padding_and_positions(stories):
  """Right padding leaves real tokens' logits unchanged; a left-padded row with shifted positions
  and a key mask reproduces the unpadded row."""
  model, variables = stories
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 512, size=(1, 12))
  ref = model.apply(variables, jnp.asarray(tokens))
  padded = np.concatenate([tokens, np.zeros((1, 4), int)], axis=1)
  out = model.apply(variables, jnp.asarray(padded))
  bound = f32_sum(llama_terms(model.config, 16))
  assert_close_at_scale(out[:, :12], ref, bound)
  left = np.concatenate([np.zeros((1, 4), int), tokens], axis=1)
  positions = np.maximum(np.arange(16) - 4, 0)[None]
  mask = (np.arange(16) >= 4)[None]
  out = model.apply(variables, jnp.asarray(left), jnp.asarray(positions), jnp.asarray(mask))
  assert_close_at_scale(out[:, 4:], ref, bound)


def test_remat_matches_plain(stories):
  model, variables = stories
  remat = llama.Llama(model.config, dtype=jnp.float32, remat=True)
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, 512, size=(2, 10)))

  def loss(m):
    return lambda p: jnp.mean(m.apply({"params": p}, tokens) ** 2)

  g_plain = jax.grad(loss(model))(variables["params"])
  g_remat = jax.grad(loss(remat))(variables["params"])
  assert_trees_close_at_scale(
    g_remat, g_plain, f32_sum(llama_grad_terms(model.config, *tokens.shape))
  )
