"""Tests for lowra_jax.models.weights: checkpoint readers and the Flax kernel-tree conversion.

Oracles are independent of the code under test: a hand-parsed safetensors header (struct + json)
for bf16 bytes, a llama2.c writer built here with struct/tofile, float64 numpy rotary
implementations of both conventions, and a float64 numpy LLaMA forward pass whose greedy sample
from the real stories260K checkpoint must reproduce the documented opening sentence.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from lowra_jax.models.weights import read_hf_checkpoint, read_llama2c_checkpoint, to_kernel_tree

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
PYCODE = DATA / "models" / "pycode-llama-17m"
STORIES = DATA / "models" / "stories260K"


def _need(path: Path) -> Path:
  if not path.exists():
    pytest.skip(f"../shared/data not present ({path.name} missing); real-checkpoint test skipped")
  return path


@pytest.fixture(scope="module")
def pycode():
  return read_hf_checkpoint(_need(PYCODE))


@pytest.fixture(scope="module")
def stories():
  return read_llama2c_checkpoint(_need(STORIES) / "stories260K.bin")


# ----------------------------------------------------------------------------- HF safetensors


def test_pycode_shapes_dtypes_and_keys(pycode):
  config, state = pycode
  index = json.loads((PYCODE / "model.safetensors.index.json").read_text())
  assert set(state) == set(index["weight_map"])
  H, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
  hd = config["head_dim"]
  q_out, kv_out = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
  assert (H, I, V, q_out) == (384, 1024, 4096, 384)
  expected = {
    "model.embed_tokens.weight": (V, H),
    "model.norm.weight": (H,),
    "lm_head.weight": (V, H),
  }
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    expected |= {
      p + "input_layernorm.weight": (H,),
      p + "post_attention_layernorm.weight": (H,),
      p + "self_attn.q_proj.weight": (q_out, H),
      p + "self_attn.k_proj.weight": (kv_out, H),
      p + "self_attn.v_proj.weight": (kv_out, H),
      p + "self_attn.o_proj.weight": (H, q_out),
      p + "mlp.gate_proj.weight": (I, H),
      p + "mlp.up_proj.weight": (I, H),
      p + "mlp.down_proj.weight": (H, I),
    }
  assert {k: v.shape for k, v in state.items()} == expected
  assert config["dtype"] == "bfloat16"
  assert all(v.dtype == ml_dtypes.bfloat16 for v in state.values())
  assert "rope_parameters" in config  # transformers-5 config passed through untouched


def _hand_read_bf16(shard: Path, name: str) -> np.ndarray:
  """Independent safetensors read: 8-byte little-endian header length, JSON header, raw bytes."""
  raw = shard.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  meta = json.loads(raw[8 : 8 + n])[name]
  assert meta["dtype"] == "BF16"
  start, end = meta["data_offsets"]
  return np.frombuffer(raw[8 + n + start : 8 + n + end], dtype="<u2").reshape(meta["shape"])


def test_pycode_tensor_matches_hand_parsed_bytes(pycode):
  _, state = pycode
  weight_map = json.loads((PYCODE / "model.safetensors.index.json").read_text())["weight_map"]
  for name in ("model.layers.5.mlp.down_proj.weight", "lm_head.weight"):
    bits = _hand_read_bf16(PYCODE / weight_map[name], name)
    ours = state[name]
    np.testing.assert_array_equal(ours.view(np.uint16), bits)
    as_f32 = (bits.astype(np.uint32) << 16).view(np.float32)  # bf16 is the top half of fp32
    np.testing.assert_array_equal(ours.astype(np.float32), as_f32)
    assert 0 < np.abs(as_f32).max() < 100


def _write_hf(root: Path, tensors: dict[str, np.ndarray], shards: int = 1) -> None:
  root.mkdir(parents=True, exist_ok=True)
  (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
  if shards == 1:
    save_file(tensors, root / "model.safetensors")
    return
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = names[s::shards]
    save_file({k: tensors[k] for k in part}, root / fname)
    weight_map |= dict.fromkeys(part, fname)
  (root / "model.safetensors.index.json").write_text(
    json.dumps({"metadata": {}, "weight_map": weight_map})
  )


def _tiny_tensors() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {
    "a.q_proj.weight": rng.normal(size=(3, 4)).astype(ml_dtypes.bfloat16),
    "a.norm.weight": rng.normal(size=(4,)).astype(np.float32),
    "b.x": rng.normal(size=(2, 2, 2)).astype(np.float16),
    "b.ids": np.arange(5, dtype=np.int64),
  }


@pytest.mark.parametrize("shards", [1, 2])
def test_tiny_checkpoint_round_trips(tmp_path, shards):
  tensors = _tiny_tensors()
  _write_hf(tmp_path / "ckpt", tensors, shards)
  config, state = read_hf_checkpoint(tmp_path / "ckpt")
  assert config == {"model_type": "llama", "hidden_size": 4}
  assert set(state) == set(tensors)
  for k, v in tensors.items():
    assert state[k].dtype == v.dtype and state[k].shape == v.shape, k
    np.testing.assert_array_equal(state[k].view(np.uint8), v.view(np.uint8))


def test_hf_error_messages(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    read_hf_checkpoint(tmp_path / "nope")

  _write_hf(tmp_path / "noconf", _tiny_tensors())
  (tmp_path / "noconf" / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    read_hf_checkpoint(tmp_path / "noconf")

  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="no safetensors weights"):
    read_hf_checkpoint(empty)

  _write_hf(tmp_path / "sharded", _tiny_tensors(), shards=2)
  (tmp_path / "sharded" / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=r"missing shard.*model-00002-of-00002\.safetensors"):
    read_hf_checkpoint(tmp_path / "sharded")

  _write_hf(tmp_path / "noindex", _tiny_tensors(), shards=2)
  (tmp_path / "noindex" / "model.safetensors.index.json").unlink()
  with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json"):
    read_hf_checkpoint(tmp_path / "noindex")

  _write_hf(tmp_path / "badindex", _tiny_tensors(), shards=2)
  index_path = tmp_path / "badindex" / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
  index_path.write_text(json.dumps(index))
  with pytest.raises(ValueError, match="ghost.weight"):
    read_hf_checkpoint(tmp_path / "badindex")

  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "config.json").write_text("{}")
  (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02 not to be unpickled")
  with pytest.raises(ValueError, match=r"pytorch_model\.bin.*convert to safetensors"):
    read_hf_checkpoint(pickled)


# ----------------------------------------------------------------------------- llama2.c


def test_stories_config_and_shapes(stories):
  config, state = stories
  assert config == {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 5,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 8,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
  }
  assert len(state) == 3 + 9 * 5
  assert state["model.embed_tokens.weight"].shape == (512, 64)
  assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
  p = "model.layers.4."
  assert state[p + "self_attn.q_proj.weight"].shape == (64, 64)
  assert state[p + "self_attn.k_proj.weight"].shape == (32, 64)
  assert state[p + "self_attn.v_proj.weight"].shape == (32, 64)
  assert state[p + "self_attn.o_proj.weight"].shape == (64, 64)
  assert state[p + "mlp.gate_proj.weight"].shape == (172, 64)
  assert state[p + "mlp.up_proj.weight"].shape == (172, 64)
  assert state[p + "mlp.down_proj.weight"].shape == (64, 172)
  assert state[p + "input_layernorm.weight"].shape == (64,)
  assert all(v.dtype == np.float32 for v in state.values())


def test_truncated_or_foreign_llama2c_files_raise(tmp_path):
  raw = (_need(STORIES) / "stories260K.bin").read_bytes()
  (tmp_path / "cut.bin").write_bytes(raw[:-100])
  with pytest.raises(ValueError, match=r"1056440 bytes .*implies 1056540.*truncated or corrupt"):
    read_llama2c_checkpoint(tmp_path / "cut.bin")
  (tmp_path / "stub.bin").write_bytes(raw[:20])
  with pytest.raises(ValueError, match="truncated"):
    read_llama2c_checkpoint(tmp_path / "stub.bin")
  (tmp_path / "v1.bin").write_bytes(struct.pack("<II", 0x616B3432, 1) + raw[8:])
  with pytest.raises(ValueError, match="version-1/2"):
    read_llama2c_checkpoint(tmp_path / "v1.bin")
  with pytest.raises(FileNotFoundError):
    read_llama2c_checkpoint(tmp_path / "absent.bin")


def _write_llama2c(path: Path, dim, hidden, n_layers, n_heads, n_kv, vocab, seq, shared, seed=0):
  """Independent llama2.c version-0 writer; returns the Meta-layout arrays it wrote."""
  rng = np.random.default_rng(seed)
  hs, L = dim // n_heads, n_layers
  kv = n_kv * hs
  names = [
    ("emb", (vocab, dim)),
    ("rms_att", (L, dim)),
    ("wq", (L, dim, dim)),
    ("wk", (L, kv, dim)),
    ("wv", (L, kv, dim)),
    ("wo", (L, dim, dim)),
    ("rms_ffn", (L, dim)),
    ("w1", (L, hidden, dim)),
    ("w2", (L, dim, hidden)),
    ("w3", (L, hidden, dim)),
    ("rms_final", (dim,)),
    ("fr", (seq, hs // 2)),
    ("fi", (seq, hs // 2)),
  ] + ([] if shared else [("wcls", (vocab, dim))])
  arrays = {n: rng.normal(size=s).astype(np.float32) for n, s in names}
  with open(path, "wb") as f:
    f.write(
      struct.pack("<7i", dim, hidden, n_layers, n_heads, n_kv, vocab if shared else -vocab, seq)
    )
    for n, _ in names:
      arrays[n].astype("<f4").tofile(f)
  return arrays


@pytest.mark.parametrize("shared", [True, False])
def test_llama2c_layout_and_names(tmp_path, shared):
  meta = _write_llama2c(tmp_path / "m.bin", 16, 24, 2, 4, 2, 11, 7, shared)
  config, state = read_llama2c_checkpoint(tmp_path / "m.bin")
  assert config["tie_word_embeddings"] is shared and config["vocab_size"] == 11
  np.testing.assert_array_equal(state["lm_head.weight"], meta["emb"] if shared else meta["wcls"])
  np.testing.assert_array_equal(state["model.norm.weight"], meta["rms_final"])
  for i in range(2):
    p = f"model.layers.{i}."
    for hf, m in [
      ("mlp.gate_proj", "w1"),
      ("mlp.up_proj", "w3"),
      ("mlp.down_proj", "w2"),
      ("self_attn.v_proj", "wv"),
      ("self_attn.o_proj", "wo"),
      ("input_layernorm", "rms_att"),
      ("post_attention_layernorm", "rms_ffn"),
    ]:
      np.testing.assert_array_equal(state[p + hf + ".weight"], meta[m][i])
    # q/k rows are a per-head permutation of the Meta rows, never a different set of numbers.
    for hf, m, heads in [("self_attn.q_proj", "wq", 4), ("self_attn.k_proj", "wk", 2)]:
      ours = state[p + hf + ".weight"]
      assert sorted(map(tuple, ours)) == sorted(map(tuple, meta[m][i]))
      assert not np.array_equal(ours, meta[m][i])


def _rope_meta(x: np.ndarray, theta: float = 10000.0) -> np.ndarray:
  """llama2.c / Meta rotary on x [T, heads, hd]: rotate pairs (2i, 2i+1) by pos * theta^(-2i/hd)."""
  T, _, hd = x.shape
  out = x.copy()
  for pos in range(T):
    for i in range(hd // 2):
      a = pos * theta ** (-2 * i / hd)
      x0, x1 = x[pos, :, 2 * i], x[pos, :, 2 * i + 1]
      out[pos, :, 2 * i] = x0 * np.cos(a) - x1 * np.sin(a)
      out[pos, :, 2 * i + 1] = x0 * np.sin(a) + x1 * np.cos(a)
  return out


def _rope_hf(x: np.ndarray, theta: float = 10000.0) -> np.ndarray:
  """HF rotary on x [T, heads, hd]: x * cos + rotate_half(x) * sin with duplicated frequencies."""
  T, _, hd = x.shape
  inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
  ang = np.arange(T)[:, None] * np.concatenate([inv_freq, inv_freq])[None, :]
  rotate_half = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], axis=-1)
  return x * np.cos(ang)[:, None, :] + rotate_half * np.sin(ang)[:, None, :]


@pytest.mark.parametrize("n_heads,n_kv", [(4, 2), (2, 2)])
def test_rotary_permutation_oracle(tmp_path, n_heads, n_kv):
  dim, T = 32, 9
  hd = dim // n_heads
  meta = _write_llama2c(tmp_path / "m.bin", dim, 8, 1, n_heads, n_kv, 5, T, True, seed=n_heads)
  _, state = read_llama2c_checkpoint(tmp_path / "m.bin")
  x = np.random.default_rng(1).normal(size=(T, dim))
  wq_m, wk_m = meta["wq"][0].astype(np.float64), meta["wk"][0].astype(np.float64)
  wq_h = state["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
  wk_h = state["model.layers.0.self_attn.k_proj.weight"].astype(np.float64)

  q_meta = _rope_meta((x @ wq_m.T).reshape(T, n_heads, hd))
  k_meta = _rope_meta((x @ wk_m.T).reshape(T, n_kv, hd))
  q_hf = _rope_hf((x @ wq_h.T).reshape(T, n_heads, hd))
  k_hf = _rope_hf((x @ wk_h.T).reshape(T, n_kv, hd))

  hf_order = [2 * j for j in range(hd // 2)] + [2 * j + 1 for j in range(hd // 2)]
  np.testing.assert_allclose(q_meta[..., hf_order], q_hf, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(k_meta[..., hf_order], k_hf, rtol=1e-10, atol=1e-10)

  group = np.arange(n_heads) // (n_heads // n_kv)  # q head h reads kv head h // n_rep
  scores_meta = np.einsum("shd,thd->hst", q_meta, k_meta[:, group])
  scores_hf = np.einsum("shd,thd->hst", q_hf, k_hf[:, group])
  np.testing.assert_allclose(scores_meta, scores_hf, rtol=1e-10, atol=1e-10)
  # The unpermuted Meta weights under HF rotary give different scores: the permutation matters.
  q_wrong = _rope_hf((x @ wq_m.T).reshape(T, n_heads, hd))
  k_wrong = _rope_hf((x @ wk_m.T).reshape(T, n_kv, hd))
  assert not np.allclose(
    np.einsum("shd,thd->hst", q_wrong, k_wrong[:, group]), scores_hf, atol=1e-3
  )


def _hf_llama_logits(config: dict, state: dict, tokens: list[int]) -> np.ndarray:
  """Float64 numpy LlamaForCausalLM forward with HF conventions; returns logits [T, vocab]."""
  w = {k: v.astype(np.float64) for k, v in state.items()}
  nh, nkv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
  T = len(tokens)

  def rms(v, g):
    return v / np.sqrt((v * v).mean(-1, keepdims=True) + config["rms_norm_eps"]) * g

  x = w["model.embed_tokens.weight"][tokens]
  mask = np.triu(np.full((T, T), -np.inf), 1)
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = rms(x, w[p + "input_layernorm.weight"])
    q = _rope_hf((h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd), config["rope_theta"])
    k = _rope_hf((h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd), config["rope_theta"])
    v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd)
    k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
    s = np.einsum("shd,thd->hst", q, k) / np.sqrt(hd) + mask
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + np.einsum("hst,thd->shd", a, v).reshape(T, nh * hd) @ w[p + "self_attn.o_proj.weight"].T
    h = rms(x, w[p + "post_attention_layernorm.weight"])
    g = h @ w[p + "mlp.gate_proj.weight"].T
    x = (
      x
      + (g / (1 + np.exp(-g)) * (h @ w[p + "mlp.up_proj.weight"].T))
      @ w[p + "mlp.down_proj.weight"].T
    )
  return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def _llama2c_vocab(path: Path) -> list[bytes]:
  raw, off, pieces = path.read_bytes(), 4, []
  while off < len(raw):
    (n,) = struct.unpack_from("<i", raw, off + 4)
    pieces.append(raw[off + 8 : off + 8 + n])
    off += 8 + n
  return pieces


def test_stories_greedy_sample_under_hf_conventions(stories):
  """End-to-end oracle: the converted weights run under HF rotary reproduce the known greedy story."""
  config, state = stories
  vocab = _llama2c_vocab(STORIES / "tok512.bin")
  assert len(vocab) == config["vocab_size"]
  tokens = [config["bos_token_id"]]
  for _ in range(20):
    tokens.append(int(_hf_llama_logits(config, state, tokens)[-1].argmax()))
  text = (
    b"".join(
      bytes([int(p[3:5], 16)]) if p.startswith(b"<0x") else p
      for p in (vocab[t] for t in tokens[1:])
    )
    .decode("utf-8", "replace")
    .lstrip()
  )
  assert text.startswith("Once upon a time, there was a little girl named Lily."), text


# ----------------------------------------------------------------------------- kernel tree


def test_to_kernel_tree_transposes_linears(pycode):
  config, state = pycode
  tree = to_kernel_tree(state)
  for i in (0, 3, config["num_hidden_layers"] - 1):
    layer = tree["model"]["layers"][str(i)]
    for mod, name in [
      ("self_attn", "q_proj"),
      ("self_attn", "k_proj"),
      ("self_attn", "o_proj"),
      ("mlp", "gate_proj"),
      ("mlp", "down_proj"),
    ]:
      kernel = layer[mod][name]["kernel"]
      weight = state[f"model.layers.{i}.{mod}.{name}.weight"]
      assert kernel.shape == weight.shape[::-1] and kernel.dtype == weight.dtype
      assert kernel.flags["C_CONTIGUOUS"]
      np.testing.assert_array_equal(kernel, weight.T)
    np.testing.assert_array_equal(
      layer["input_layernorm"]["scale"], state[f"model.layers.{i}.input_layernorm.weight"]
    )
  assert tree["model"]["layers"]["0"]["mlp"]["gate_proj"]["kernel"].shape == (384, 1024)
  np.testing.assert_array_equal(tree["lm_head"]["kernel"], state["lm_head.weight"].T)
  embedding = tree["model"]["embed_tokens"]["embedding"]
  np.testing.assert_array_equal(embedding, state["model.embed_tokens.weight"])
  np.testing.assert_array_equal(tree["model"]["norm"]["scale"], state["model.norm.weight"])

  def n_leaves(node):
    return sum(n_leaves(v) for v in node.values()) if isinstance(node, dict) else 1

  assert n_leaves(tree) == len(state)


def test_to_kernel_tree_lists_every_unknown_key():
  good = {
    "model.layers.0.self_attn.q_proj.weight": np.zeros((4, 2), np.float32),
    "model.norm.weight": np.ones(2, np.float32),
    "model.layers.0.self_attn.q_proj.bias": np.ones(4, np.float32),
  }
  bad = {
    "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(2, np.float32),
    "model.layers.0.mlp.up_proj.bias": np.zeros((4, 1), np.float32),  # bias of rank 2
    "model.norm.weight_2d": np.zeros((2, 2), np.float32),
    "model.layers.1.mlp.down_proj.weight": np.zeros(4, np.float32),  # linear of rank 1
    "orphan": np.zeros(1, np.float32),
  }
  with pytest.raises(ValueError, match="5 unrecognised") as err:
    to_kernel_tree(good | bad)
  for key in bad:
    assert key in str(err.value)
  assert to_kernel_tree(good)["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].shape == (
    2,
    4,
  )


def test_to_kernel_tree_keeps_projection_biases():
  tree = to_kernel_tree({"model.layers.0.self_attn.q_proj.bias": np.arange(4, dtype=np.float32)})
  np.testing.assert_array_equal(
    tree["model"]["layers"]["0"]["self_attn"]["q_proj"]["bias"], np.arange(4)
  )
