"""Tests for lowra_jax.export: base-hf/, adapter-step{N}/ (PEFT) and merged-step{N}/ of a run.

Oracles: the model itself (an HF export re-read by our own HF reader must give the logits of the
quantized base, resp. of base + adapters; a float32 export so that the comparison is exact up to
float32 summation order), PEFT's naming/layout convention written out by hand (lora_A [r, in] =
Aᵀ, lora_B [out, r] = Bᵀ), the bundled models' own checkpoints (an unquantized export must hold
their tensors under their names, rounded to bf16) and their tokenizers (transformers'
AutoTokenizer on the export must encode like the source tokenizer).
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_model import CONFIG, LORA, tiny_model
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers
from tolerances import assert_close_at_scale, f32_sum, llama_terms
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lowra_jax import export
from lowra_jax import lora as lora_lib
from lowra_jax.models import llama, weights
from lowra_jax.models.tokenizer import Tokenizer, load_tokenizer

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SOURCES = {
  "pycode": DATA / "models" / "pycode-llama-17m",
  "stories": DATA / "models" / "stories260K" / "stories260K.bin",
}
TEXT = "def f(x):\n    return x ** 2  # Once upon a time, a  cat said <s> ünï 日本\n\n"
HF_CONFIG = {
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
STEP = 3


def _need(path: Path) -> Path:
  if not path.exists():
    pytest.skip(f"{path} (shared material) is absent")
  return path


def tiny_tokenizer() -> Tokenizer:
  """A word-level tokenizer over the tiny model's vocabulary (no shared material needed)."""
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, CONFIG.vocab_size)}
  rust = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  rust.pre_tokenizer = pre_tokenizers.Whitespace()
  return Tokenizer(
    PreTrainedTokenizerFast(
      tokenizer_object=rust, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
  )


def _logits(model, variables, tokens):
  return np.asarray(model.apply(jax.tree.map(jnp.asarray, variables), tokens))


def _reread_logits(directory: Path, tokens) -> np.ndarray:
  model, params = llama.load_pretrained(directory, dtype=jnp.float32)
  assert model.config == CONFIG
  return _logits(model, {"params": params}, tokens)


def _assert_close(got, ref):
  """Two programs' float32 logits (ours from another checkpoint, or torch's): they agree up to
  float32 accumulation along the forward pass, at the logits' scale."""
  seq_len = np.asarray(ref).shape[-2]
  assert_close_at_scale(got, ref, f32_sum(llama_terms(CONFIG, seq_len, LORA.rank)))


@pytest.fixture(scope="module")
def setup():
  return tiny_model()


@pytest.fixture(scope="module")
def run(setup, tmp_path_factory):
  """(workdir, paths) of a float32 `export_run` of the tiny model at STEP, merged included."""
  _, _, qparams, _, adapters, _ = setup
  workdir = tmp_path_factory.mktemp("run")
  paths = export.export_run(
    workdir,
    STEP,
    qparams,
    adapters,
    LORA,
    HF_CONFIG,
    tiny_tokenizer(),
    merged=True,
    dtype=np.float32,
  )
  return workdir, paths


def test_run_layout(run):
  workdir, paths = run
  assert paths == {
    "base": workdir / "base-hf",
    "adapters": workdir / f"adapter-step{STEP}",
    "merged": workdir / f"merged-step{STEP}",
  }
  assert sorted(p.name for p in workdir.iterdir()) == sorted(p.name for p in paths.values())
  for name in ("base", "merged"):
    files = {p.name for p in paths[name].iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
  adapter_config = json.loads((paths["adapters"] / "adapter_config.json").read_text())
  assert adapter_config["base_model_name_or_path"] == str(paths["base"].resolve())
  assert Path(adapter_config["base_model_name_or_path"]).is_absolute()


def test_base_export_gives_the_quantized_model(setup, run):
  model, _, _, frozen, adapters, batch = setup
  got = _reread_logits(run[1]["base"], batch["inputs"])
  _assert_close(got, _logits(model, frozen, batch["inputs"]))
  with_adapters = _logits(model, {**frozen, "lora": adapters}, batch["inputs"])
  assert np.abs(got - with_adapters).max() > 1e-2 * np.abs(with_adapters).max()


def test_merged_export_gives_base_plus_adapters(setup, run):
  model, _, _, frozen, adapters, batch = setup
  got = _reread_logits(run[1]["merged"], batch["inputs"])
  _assert_close(got, _logits(model, {**frozen, "lora": adapters}, batch["inputs"]))


def test_bf16_export_is_the_float32_export_rounded(setup, run, tmp_path):
  _, _, qparams, _, adapters, _ = setup
  paths = export.export_run(
    tmp_path, STEP, qparams, adapters, LORA, HF_CONFIG, tiny_tokenizer(), merged=True
  )
  for name in ("base", "merged"):
    f32 = load_file(run[1][name] / "model.safetensors")
    bf16 = load_file(paths[name] / "model.safetensors")
    assert sorted(bf16) == sorted(f32)
    for key, value in bf16.items():
      assert value.dtype == ml_dtypes.bfloat16
      np.testing.assert_array_equal(value, f32[key].astype(ml_dtypes.bfloat16), err_msg=key)
    assert json.loads((paths[name] / "config.json").read_text())["dtype"] == "bfloat16"


def test_rerun_keeps_the_base_and_adds_the_new_step(setup, tmp_path):
  _, _, qparams, _, adapters, _ = setup
  tok = tiny_tokenizer()
  export.export_run(tmp_path, STEP, qparams, adapters, LORA, HF_CONFIG, tok, dtype=np.float32)
  base = tmp_path / "base-hf" / "model.safetensors"
  before = base.stat().st_mtime_ns
  later = jax.tree.map(lambda x: 2 * x, adapters)
  paths = export.export_run(tmp_path, STEP + 1, qparams, later, LORA, HF_CONFIG, tok)
  assert base.stat().st_mtime_ns == before
  assert load_file(base)["lm_head.weight"].dtype == np.float32  # not rewritten in bf16
  assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter-step3", "adapter-step4", "base-hf"]
  assert set(paths) == {"base", "adapters"}
  got = load_file(paths["adapters"] / "adapter_model.safetensors")
  a = later["model"]["layers"]["0"]["self_attn"]["q_proj"]["a"]
  np.testing.assert_array_equal(
    got["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], np.asarray(a).T
  )


def test_peft_directory_lists_the_adapted_modules(setup, tmp_path):
  """target_modules: the modules that have adapters, not every name of the config's targets."""
  _, params, _, _, _, _ = setup
  some = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "down_proj"))
  adapters = lora_lib.random_adapters(
    lora_lib.target_paths(params, some), some.rank, jax.random.key(2)
  )
  adapters = jax.tree.map(lambda x: x + 0.02, adapters)
  out = export.save_peft_adapters(tmp_path / "adapter", adapters, LORA, "/runs/x/base-hf")
  adapter_config = json.loads((out / "adapter_config.json").read_text())
  assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
  assert adapter_config["lora_alpha"] == 8.0
  assert adapter_config["base_model_name_or_path"] == "/runs/x/base-hf"
  assert adapter_config["target_modules"] == ["down_proj", "q_proj"]
  tensors = load_file(out / "adapter_model.safetensors")
  assert len(tensors) == 2 * 2 * CONFIG.num_layers
  a = np.asarray(adapters["model"]["layers"]["1"]["mlp"]["down_proj"]["a"])
  b = np.asarray(adapters["model"]["layers"]["1"]["mlp"]["down_proj"]["b"])
  prefix = "base_model.model.model.layers.1.mlp.down_proj"
  np.testing.assert_array_equal(tensors[f"{prefix}.lora_A.weight"], a.T)  # [r, in]
  np.testing.assert_array_equal(tensors[f"{prefix}.lora_B.weight"], b.T)  # [out, r]
  assert list(tmp_path.iterdir()) == [out]  # no temporary directory left behind


def test_refuses_to_overwrite(setup, tmp_path):
  _, _, _, _, adapters, _ = setup
  (tmp_path / "adapter").mkdir()
  with pytest.raises(FileExistsError, match="choose a new export directory"):
    export.save_peft_adapters(tmp_path / "adapter", adapters, LORA, "x")
  assert list((tmp_path / "adapter").iterdir()) == []


def _source(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
  """The bundled model's config.json dict and tensors as stored, under HF names (no lm_head when
  it is tied)."""
  config, state = weights.read_checkpoint(path)
  if config.get("tie_word_embeddings"):
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}
  return config, state


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_bundled_model_exports(name, tmp_path):
  """Unquantized (dense params as qparams): the base export is the source checkpoint in bf16."""
  source = _need(SOURCES[name])
  model, params = llama.load_pretrained(source)
  tokenizer = load_tokenizer(source if source.is_dir() else source.parent)
  adapters = lora_lib.random_adapters(
    lora_lib.target_paths(params, LORA), LORA.rank, jax.random.key(0)
  )
  hf_config, expected = _source(source)
  paths = export.export_run(tmp_path, STEP, params, adapters, LORA, hf_config, tokenizer)
  base = paths["base"]
  exported_config = json.loads((base / "config.json").read_text())
  assert llama.LlamaConfig.from_hf(exported_config) == model.config
  exported = load_file(base / "model.safetensors")
  assert sorted(exported) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(exported[key], value.astype(ml_dtypes.bfloat16), err_msg=key)
  adapter_config = json.loads((paths["adapters"] / "adapter_config.json").read_text())
  assert adapter_config["target_modules"] == sorted(LORA.targets)

  reloaded = AutoTokenizer.from_pretrained(base)
  assert reloaded(TEXT)["input_ids"] == tokenizer.hf(TEXT)["input_ids"]
  ids = tokenizer.encode(TEXT)
  assert reloaded.decode(ids) == tokenizer.hf.decode(ids)
  assert load_tokenizer(base).encode(TEXT, eos=True) == tokenizer.encode(TEXT, eos=True)


def test_transformers_and_peft_reproduce_our_logits(setup, run):
  """Where torch and peft are installed (not in requirements.txt): the real loaders on the
  float32 exports give our logits (base alone, base + PEFT adapters, merged), up to float32
  rounding in another op order (PEFT adds the LoRA branch as two extra matmuls)."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from transformers import AutoModelForCausalLM

  model, _, _, frozen, adapters, batch = setup
  paths, tokens = run[1], torch.as_tensor(np.asarray(batch["inputs"]), dtype=torch.long)

  def logits(hf_model) -> np.ndarray:
    with torch.no_grad():
      return hf_model.eval()(tokens).logits.numpy()

  base = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
  _assert_close(logits(base), _logits(model, frozen, batch["inputs"]))
  ref = _logits(model, {**frozen, "lora": adapters}, batch["inputs"])
  _assert_close(logits(peft.PeftModel.from_pretrained(base, paths["adapters"])), ref)
  merged = AutoModelForCausalLM.from_pretrained(paths["merged"], dtype=torch.float32)
  _assert_close(logits(merged), ref)
