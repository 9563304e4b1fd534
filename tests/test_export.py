"""Tests for lowra_jax.export: PEFT adapter directories and merged HF checkpoints.

Oracles: PEFT's naming/layout convention written out by hand (lora_A [r, in] = Aᵀ, lora_B
[out, r] = Bᵀ), and the model itself: a merged checkpoint re-read by the HF safetensors reader
must give the logits of base + adapters.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_model import CONFIG, LORA, tiny_model

from lowra_jax import export
from lowra_jax.models import llama


@pytest.fixture(scope="module")
def setup():
  return tiny_model()


def test_peft_directory(setup, tmp_path):
  _, _, _, _, adapters, _ = setup
  out = export.save_peft_adapters(tmp_path / "adapter", adapters, LORA, "org/base-model")
  config = json.loads((out / "adapter_config.json").read_text())
  assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
  assert config["base_model_name_or_path"] == "org/base-model"
  assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"} | {
    "gate_proj",
    "up_proj",
    "down_proj",
  }
  tensors = load_file(out / "adapter_model.safetensors")
  assert len(tensors) == 2 * 7 * CONFIG.num_layers
  a = np.asarray(adapters["model"]["layers"]["1"]["mlp"]["down_proj"]["a"])
  b = np.asarray(adapters["model"]["layers"]["1"]["mlp"]["down_proj"]["b"])
  prefix = "base_model.model.model.layers.1.mlp.down_proj"
  np.testing.assert_array_equal(tensors[f"{prefix}.lora_A.weight"], a.T)  # [r, in]
  np.testing.assert_array_equal(tensors[f"{prefix}.lora_B.weight"], b.T)  # [out, r]
  assert list(tmp_path.iterdir()) == [out]  # no temporary directory left behind


def test_merged_checkpoint_reproduces_base_plus_adapters(setup, tmp_path):
  model, _, qparams, frozen, adapters, batch = setup
  hf_config = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": CONFIG.vocab_size,
    "hidden_size": CONFIG.hidden_size,
    "intermediate_size": CONFIG.intermediate_size,
    "num_hidden_layers": CONFIG.num_layers,
    "num_attention_heads": CONFIG.num_heads,
    "num_key_value_heads": CONFIG.num_kv_heads,
    "head_dim": CONFIG.head_dim,
    "max_position_embeddings": CONFIG.max_position_embeddings,
    "rms_norm_eps": CONFIG.rms_norm_eps,
    "rope_theta": CONFIG.rope.theta,
    "tie_word_embeddings": False,
  }
  out = export.save_merged(tmp_path / "merged", qparams, adapters, LORA, hf_config, np.float32)
  merged_model, params = llama.load_pretrained(out, dtype=jnp.float32)
  assert merged_model.config == CONFIG
  ref = model.apply({**frozen, "lora": adapters}, batch["inputs"])
  got = merged_model.apply({"params": jax.tree.map(jnp.asarray, params)}, batch["inputs"])
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
  bf16 = export.merged_state_dict(qparams, adapters, LORA)
  assert all(v.dtype.name == "bfloat16" for v in bf16.values())


def test_refuses_to_overwrite(setup, tmp_path):
  _, _, _, _, adapters, _ = setup
  (tmp_path / "adapter").mkdir()
  with pytest.raises(FileExistsError, match="choose a new export directory"):
    export.save_peft_adapters(tmp_path / "adapter", adapters, LORA, "x")
  assert list((tmp_path / "adapter").iterdir()) == []
