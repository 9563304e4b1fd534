"""Calibration: input second moments against float64 numpy (the tiny model's intermediates and an
independent forward pass of both bundled checkpoints) and against the whole model run at once,
what the layer-by-layer pass reads and holds, the weighted objective, 'none' as before, streamed
== in memory with moments, bad input in one line."""

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_stream import _assert_identical, _need
from tiny_model import CONFIG, tiny_model
from tolerances import (
  assert_close_at_scale,
  f32_sum,
  f32_sum_random,
  llama_grad_terms,
  llama_terms,
)

from lowra_jax import calibration
from lowra_jax.models import llama
from lowra_jax.models.weights_source import CheckpointSource
from lowra_jax.quantize import QuantConfig, QuantizationError, quantize_params, quantize_stream
from lowra_jax.quantize import pipeline
from lowra_jax.quantize.qtensor import dequantize, is_quantized

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / ".." / "shared" / "data" / "models"
PYCODE = MODELS / "pycode-llama-17m"
STORIES = MODELS / "stories260K" / "stories260K.bin"


class _TreeSource:
  """A params tree as a weights source (`shapes`, `read`)."""

  def __init__(self, params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    self.leaves = {pipeline.path_str(p): x for p, x in flat}

  def shapes(self):
    return {p: x.shape for p, x in self.leaves.items()}

  def read(self, path):
    return np.array(self.leaves[path])  # a new array each read, as a checkpoint's


class _Recording:
  """`source` read through, recording each read: its path, the leaf's bytes, and the device
  bytes alive just before it (`jax.live_arrays`) above those alive when this was made."""

  def __init__(self, source):
    self.source, self.reads, self.live, self.nbytes = source, [], [], {}
    self._baseline = self._live_bytes()

  @staticmethod
  def _live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays())

  def shapes(self):
    return self.source.shapes()

  def read(self, path):
    self.live.append(self._live_bytes() - self._baseline)
    self.reads.append(path)
    leaf = self.source.read(path)
    self.nbytes[path] = leaf.nbytes
    return leaf


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
  h = calibration.input_moments(model, _TreeSource(params), blocks, batch_size=4)  # 4, 4, 2
  ref = _moments_reference(model, params, blocks)
  assert set(h) == set(ref)
  for path, expected in ref.items():
    assert h[path].dtype == np.float32 and h[path].shape == expected.shape
    np.testing.assert_allclose(h[path], expected, rtol=2e-5, err_msg=path)


def _numpy_forward_moments(
  config: llama.LlamaConfig, params, tokens, full: bool = False
) -> dict[str, np.ndarray]:
  """float64 numpy E[x^2] (`full`: E[x x^T]) of every projection's input along a LLaMA forward
  pass of `tokens` [B, T] (HF's half-split rotary of the default type, grouped-query causal
  attention, SwiGLU; no biases), written independently of `llama`'s modules."""
  assert config.rope.rope_type == "default" and not config.attention_bias and not config.mlp_bias
  heads, groups, dim = config.num_heads, config.num_heads // config.num_kv_heads, config.head_dim
  model = jax.tree.map(lambda x: np.asarray(x, np.float64), params)["model"]
  b, t = tokens.shape
  half = dim // 2
  angles = np.arange(t)[:, None] / config.rope.theta ** (np.arange(half) / half)
  angles = np.concatenate([angles, angles], axis=-1)[:, None, :]  # [T, 1, D]

  def rotate(x):  # [B, T, H, D]
    return x * np.cos(angles) + np.concatenate([-x[..., half:], x[..., :half]], -1) * np.sin(angles)

  def norm(x, scale):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + config.rms_norm_eps) * scale

  def ms(x):
    x = x.reshape(-1, x.shape[-1])
    return x.T @ x / len(x) if full else (x * x).mean(axis=0)

  ref = {}
  x = model["embed_tokens"]["embedding"][tokens]
  for i in range(config.num_layers):
    layer, p = model["layers"][str(i)], f"model/layers/{i}/"
    attn, mlp = layer["self_attn"], layer["mlp"]
    h = norm(x, layer["input_layernorm"]["scale"])
    q, k, v = (h @ attn[f"{n}_proj"]["kernel"] for n in "qkv")
    q = rotate(q.reshape(b, t, heads, dim))
    k = np.repeat(rotate(k.reshape(b, t, -1, dim)), groups, axis=2)  # query head j: kv j // groups
    v = np.repeat(v.reshape(b, t, -1, dim), groups, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(dim)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, heads * dim)
    x = x + out @ attn["o_proj"]["kernel"]
    m = norm(x, layer["post_attention_layernorm"]["scale"])
    gate, up = m @ mlp["gate_proj"]["kernel"], m @ mlp["up_proj"]["kernel"]
    act = gate / (1.0 + np.exp(-gate)) * up
    x = x + act @ mlp["down_proj"]["kernel"]
    for name in ("q_proj", "k_proj", "v_proj"):
      ref[f"{p}self_attn/{name}/kernel"] = ms(h)
    ref[f"{p}self_attn/o_proj/kernel"] = ms(out)
    ref[f"{p}mlp/gate_proj/kernel"] = ref[f"{p}mlp/up_proj/kernel"] = ms(m)
    ref[f"{p}mlp/down_proj/kernel"] = ms(act)
  if not config.tie_word_embeddings:
    ref["lm_head/kernel"] = ms(norm(x, model["norm"]["scale"]))
  return ref


_BLOCKS = np.random.default_rng(0).integers(3, 512, size=(7, 33))


@pytest.mark.parametrize("path", [PYCODE, STORIES], ids=["pycode", "stories"])
def test_layer_by_layer_moments_equal_a_float64_numpy_forward(path):
  """float32 compute, from the checkpoint, against float64 numpy of the same weights (read whole
  by `llama.load_pretrained`). A float32 forward pass differs from the exact one by its
  accumulation error, relative to the activations' scale; along the chain of L layers' sums (the
  tokens-to-head length `llama_terms`) with independent roundings that is `f32_sum_random` of
  it (the worst case, k * eps32 = 3e-3 for pycode, would let a wrong rotary or mask through on
  small features); squaring doubles a relative error."""
  model, params = llama.load_pretrained(_need(path), dtype=jnp.float32)
  h = calibration.input_moments(model, CheckpointSource(path), _BLOCKS, batch_size=3)  # 3, 3, 1
  ref = _numpy_forward_moments(model.config, params, _BLOCKS[:, :-1])
  assert set(h) == set(ref)
  bound = 2 * f32_sum_random(llama_terms(model.config, _BLOCKS.shape[1] - 1))
  for key, expected in ref.items():
    assert h[key].dtype == np.float32 and h[key].shape == expected.shape
    assert_close_at_scale(h[key], expected, bound, err_msg=key)


def test_layer_by_layer_covariances_equal_a_float64_numpy_forward():
  """`full=True` (for GPTQ rounding): E[x x^T] of every projection's input, float32 compute,
  against float64 numpy, at the scale of each matrix (the diagonal test's bound, plus the
  rows summed by the float32 x^T x)."""
  model, params = llama.load_pretrained(_need(PYCODE), dtype=jnp.float32)
  cov = calibration.input_moments(
    model, CheckpointSource(PYCODE), _BLOCKS, batch_size=3, full=True
  )
  ref = _numpy_forward_moments(model.config, params, _BLOCKS[:, :-1], full=True)
  assert set(cov) == set(ref)
  rows = _BLOCKS.shape[0] * (_BLOCKS.shape[1] - 1)
  bound = 2 * f32_sum_random(llama_terms(model.config, _BLOCKS.shape[1] - 1) + rows)
  for key, expected in ref.items():
    assert cov[key].dtype == np.float32 and cov[key].shape == expected.shape
    assert_close_at_scale(cov[key], expected, bound, err_msg=key)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_input_sums_of_the_cast_inputs_equal_float64_numpy(dtype):
  """`_input_sums` (full): x^T x of x cast to the compute dtype, summed in float32 (bf16: the
  bf16 dot accumulating in float32), against float64 numpy of the same cast values: within
  float32 summation of the 2 x 96 rows, at the matrix's scale. The diagonal: the same sums."""
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 96, 40)) * 3.0, jnp.float32)
  cast = np.asarray(x.astype(dtype).astype(jnp.float32), np.float64).reshape(-1, 40)
  full = calibration._input_sums(x, dtype, full=True)
  assert full.dtype == jnp.float32 and full.shape == (40, 40)
  assert_close_at_scale(np.asarray(full), cast.T @ cast, f32_sum(2 * 96))
  diag = calibration._input_sums(x, dtype, full=False)
  assert_close_at_scale(np.asarray(diag), (cast**2).sum(axis=0), f32_sum(2 * 96))


def test_layer_covariances_are_computed_when_asked_for_one_layer_at_a_time():
  """`LayerCovariances` (GPTQ on a model read from its checkpoint): each kernel's E[x x^T] when
  asked for, as the float64 forward gives it (the test above's bound). Asked in the source's
  order, it reads each layer once; holding one layer's at a time (`keep_bytes` below what all
  take), asking for an earlier layer again runs the blocks from the embedding again (reads again
  only up to that layer)."""
  model, params = llama.load_pretrained(_need(PYCODE), dtype=jnp.float32)
  source = _Recording(CheckpointSource(PYCODE))
  cov = calibration.LayerCovariances(model, source, _BLOCKS, batch_size=3, keep_bytes=0)
  assert not cov.keeps_all
  ref = _numpy_forward_moments(model.config, params, _BLOCKS[:, :-1], full=True)
  assert set(cov) == set(ref) and len(cov) == len(ref) and source.reads == [] and cov.seconds == 0
  assert "model/layers/0/self_attn/q_proj/kernel" in cov and "model/norm/scale" not in cov
  rows = _BLOCKS.shape[0] * (_BLOCKS.shape[1] - 1)
  bound = 2 * f32_sum_random(llama_terms(model.config, _BLOCKS.shape[1] - 1) + rows)
  for key in cov:  # the source's order
    assert_close_at_scale(np.asarray(cov[key]), ref[key], bound, err_msg=key)
  assert len(source.reads) == len(set(source.reads)) and cov.seconds > 0
  first = "model/layers/1/mlp/down_proj/kernel"
  reads = len(source.reads)
  assert_close_at_scale(np.asarray(cov[first]), ref[first], bound, err_msg=first)
  again = source.reads[reads:]
  assert again[0] == "model/embed_tokens/embedding"
  assert {int(p.split("/")[2]) for p in again[1:]} == {0, 1}


def test_kept_covariances_take_one_forward_and_their_diagonals_are_the_moments():
  """A model whose covariances fit `keep_bytes`: every layer's kept once computed, so asking
  again (a second LoftQ round) reads nothing; their diagonals equal `input_moments` within the
  float32 sums of the rows (the same exact products, summed in another order)."""
  model, _ = llama.load_pretrained(_need(PYCODE), dtype=jnp.float32)
  source = _Recording(CheckpointSource(PYCODE))
  cov = calibration.LayerCovariances(model, source, _BLOCKS, batch_size=3)
  assert cov.keeps_all
  h = calibration.input_moments(model, CheckpointSource(PYCODE), _BLOCKS, batch_size=3)
  diagonals = cov.diagonals()
  reads = list(source.reads)
  assert len(reads) == len(set(reads)) and reads[0] == "model/embed_tokens/embedding"
  rows = _BLOCKS.shape[0] * (_BLOCKS.shape[1] - 1)
  assert set(diagonals) == set(h)
  for key, expected in h.items():
    assert diagonals[key].dtype == np.float32
    assert_close_at_scale(diagonals[key], expected, 2 * f32_sum_random(rows), err_msg=key)
  first = "model/layers/0/self_attn/q_proj/kernel"
  np.testing.assert_array_equal(np.diagonal(np.asarray(cov[first])), diagonals[first])
  assert source.reads == reads


@pytest.mark.parametrize("keep_bytes", [0, calibration.KEEP_ALL_BYTES])
def test_streamed_loftq_with_layer_covariances_equals_the_in_memory_loftq(keep_bytes):
  """LoftQ (2 rounds, fit weighted by the inputs) with GPTQ rounding over the checkpoint, the
  covariances computed layer by layer (`base.loftq_checkpoint` with a `LayerCovariances`,
  train.py's path: in each round when one layer's are held, once when all are kept), gives the
  base and adapters of `lora.init_lora` on the dense params given every covariance at once, bit
  for bit."""
  from lowra_jax import base, lora

  model, params = llama.load_pretrained(_need(STORIES), dtype=jnp.float32)
  h = calibration.input_moments(model, CheckpointSource(STORIES), _BLOCKS, batch_size=3)
  full = calibration.input_moments(model, CheckpointSource(STORIES), _BLOCKS, 3, full=True)
  quant = QuantConfig(budget=2.0, calibration="kernel", rounding="gptq")
  adapters = lora.LoraConfig(init="loftq", rank=4, loftq_iters=2, loftq_weighting="inputs")
  key = jax.random.key(0)
  source = _Recording(CheckpointSource(STORIES))
  cov = calibration.LayerCovariances(model, source, _BLOCKS, batch_size=3, keep_bytes=keep_bytes)
  streamed = base.loftq_checkpoint(STORIES, quant, adapters, key, h, cov)
  reference = lora.init_lora(
    params, quant, adapters, key, progress=False, importance=h, covariances=full
  )
  _assert_identical(streamed[:2], reference[:2])
  embeddings = source.reads.count("model/embed_tokens/embedding")
  assert embeddings == (1 if cov.keeps_all else 2)  # else one forward per round's pass 2


def _whole_model_moments(model, params, blocks, batch_size) -> dict[str, np.ndarray]:
  """The moments with the whole model in one program: every batch through `model.apply` with
  calibration's recorder intercepting every QLoRALinear (float32 sums per batch, float64 over
  batches)."""

  @jax.jit
  def batch_sums(params, tokens):
    sums: dict = {}
    with nn.intercept_methods(calibration._recorder(sums, full=False)):
      model.apply({"params": params}, tokens)
    return sums

  tokens = blocks[:, :-1].astype(np.int32)
  total: dict = {}
  for lo in range(0, len(tokens), batch_size):
    for key, s in batch_sums(params, tokens[lo : lo + batch_size]).items():
      total[key] = total.get(key, 0.0) + np.asarray(s, np.float64)
  return {key: (s / tokens.size).astype(np.float32) for key, s in total.items()}


@pytest.mark.parametrize("path", [PYCODE, STORIES], ids=["pycode", "stories"])
def test_layer_by_layer_moments_equal_the_whole_models_in_bf16(path):
  """bf16 compute: layer by layer == the whole model in one program, up to bf16 roundings that
  one program makes and the other does not. XLA (CPU) drops a float32 -> bf16 -> float32 round
  trip inside a program (excess precision), so the whole model may carry the residual stream
  in float32 from one layer into the next, where the layer-by-layer pass stores it in bf16
  between two programs; inside a layer either program may do so with the attention output or
  the MLP product. Each such rounding moves an element by at most 2^-9 relatively, its square
  by 2^-8; the inputs of layer i have passed i layer boundaries and their own layer's roundings,
  so they may differ by (i + 1) 2^-8 relative to their scale (to first order, the norms keeping
  the stream's scale), the head's input by (L + 1) 2^-8. Float32 reassociation (2^-23 per term)
  is far below that."""
  model, params = llama.load_pretrained(_need(path), dtype=jnp.bfloat16)
  h = calibration.input_moments(model, CheckpointSource(path), _BLOCKS, batch_size=7)
  ref = _whole_model_moments(model, params, _BLOCKS, batch_size=7)
  assert set(h) == set(ref)
  for key, expected in ref.items():
    assert h[key].dtype == np.float32 and h[key].shape == expected.shape
    i = int(key.split("/")[2]) if key.startswith("model/layers/") else model.config.num_layers
    assert_close_at_scale(h[key], expected, (i + 1) * 2.0**-8, err_msg=key)


@pytest.mark.parametrize("path", [PYCODE, STORIES], ids=["pycode", "stories"])
def test_layer_by_layer_reads_each_tensor_once_and_holds_one_layer(path):
  """What `input_moments` reads from its source: the embedding, then each decoder layer's
  tensors, layer after layer, then the final norm (untied head only); each once, the head's
  kernel never. At every read the device holds no more than the blocks' hidden states and the
  tensors of the layer being read: an earlier layer's weights (or the embedding) still alive
  would add more than the slack, half the smallest of them."""
  model = llama.Llama(CheckpointSource(_need(path)).config, dtype=jnp.bfloat16)
  config = model.config
  source = _Recording(CheckpointSource(path))
  h = calibration.input_moments(model, source, _BLOCKS, batch_size=7)  # the test above's compile
  shapes = source.shapes()
  assert set(h) == {p for p in shapes if p.endswith("/kernel")}

  def layer(p):
    return int(p.split("/")[2]) if p.startswith("model/layers/") else None

  groups = [["model/embed_tokens/embedding"]]
  groups += [[p for p in shapes if layer(p) == i] for i in range(config.num_layers)]
  if not config.tie_word_embeddings:
    groups.append(["model/norm/scale"])
  assert len(source.reads) == len(set(source.reads))  # each once
  read_groups = [p for group in groups for p in group if p in source.reads]
  assert sorted(source.reads) == sorted(read_groups)  # exactly these
  assert len(read_groups) == sum(map(len, groups))
  order = [next(j for j, group in enumerate(groups) if p in group) for p in source.reads]
  assert order == sorted(order)  # group after group

  hidden = _BLOCKS.shape[0] * (_BLOCKS.shape[1] - 1) * config.hidden_size * 2  # bf16
  weights = groups[: config.num_layers + 1]  # the embedding and each layer
  slack = min(sum(source.nbytes[p] for p in group) for group in weights) // 2
  held, current = 0, None
  for p, live in zip(source.reads, source.live):
    held, current = (held, current) if layer(p) == current else (0, layer(p))
    before_embedding = p == "model/embed_tokens/embedding"
    allowed = (0 if before_embedding else hidden) + held  # held: this layer's tensors so far
    assert live <= allowed + slack, (p, live, allowed)
    held += source.nbytes[p]


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
  h = calibration.input_moments(model, CheckpointSource(STORIES), blocks, batch_size=4)
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
  with pytest.raises(ValueError, match="gradient_sequences=0"):
    calibration.CalibConfig(gradient_sequences=0)


def _unit_outputs(params) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {
    pipeline.output_key(pipeline.path_str(p)): np.ones(x.shape[1], np.float32)
    for p, x in flat
    if pipeline.path_str(p).endswith("/kernel")
  }


def test_output_gradients_of_the_head_equal_float64_numpy():
  """For the untied head, dL/dlogits = softmax - one-hot exactly (L the summed loss): g of the
  head from float64 numpy on the model's float32 logits; every projection present, >= 0."""
  model, params, *_ = tiny_model(quant=QuantConfig(method="nf", bits=4))
  assert not CONFIG.tie_word_embeddings
  blocks = np.random.default_rng(1).integers(0, 64, size=(5, 17))
  g = calibration.output_gradients(model, _TreeSource(params), blocks, batch_size=2)  # 2, 2, 1
  logits = np.asarray(model.apply({"params": params}, jnp.asarray(blocks[:, :-1])), np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  # the logits of two float32 forwards differ by up to `llama_terms`' bound at their scale, and
  # exp turns an absolute logit error into a relative one of p (twice: p and its normaliser)
  logit_err = 2 * f32_sum_random(llama_terms(CONFIG, 16)) * np.abs(logits).max()
  err = 2 * (logit_err + 8 * 2.0**-24 * np.abs(logits).max()) * p
  d = p.copy()
  d[np.arange(5)[:, None], np.arange(16)[None, :], blocks[:, 1:]] -= 1.0
  want = np.square(d).reshape(-1, 64).mean(axis=0)
  bound = (2 * np.abs(d) * err + err**2).reshape(-1, 64).mean(axis=0)
  got = g[pipeline.output_key("lm_head/kernel")]
  assert (np.abs(got - want) <= bound).all(), np.abs(got - want).max()
  outputs = _unit_outputs(params)
  assert set(g) == set(outputs)
  assert all(g[k].shape == v.shape and (g[k] >= 0).all() for k, v in outputs.items())


def _whole_model_output_gradients(model, params, blocks, batch_size) -> dict[str, np.ndarray]:
  """The reference of `output_gradients`: `jax.grad` of the whole model's summed loss at once with
  respect to zeros added to every `QLoRALinear` output, batch by batch, squared and summed over
  the tokens in float64."""

  @jax.jit
  def squared(params, blocks):
    inputs, targets = blocks[:, :-1], blocks[:, 1:]
    shapes: dict = {}
    with nn.intercept_methods(calibration._perturber(None, shapes)):
      jax.eval_shape(lambda: model.apply({"params": params}, inputs))

    def loss(perturbations):
      with nn.intercept_methods(calibration._perturber(perturbations, {})):
        logits = model.apply({"params": params}, inputs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum()

    grads = jax.grad(loss)({k: jnp.zeros(v, jnp.float32) for k, v in shapes.items()})
    return {k: jnp.sum(jnp.square(g), axis=(0, 1)) for k, g in grads.items()}

  blocks = np.asarray(blocks).astype(np.int32)
  total: dict = {}
  for lo in range(0, len(blocks), batch_size):
    for key, v in squared(params, jnp.asarray(blocks[lo : lo + batch_size])).items():
      total[key] = total.get(key, 0.0) + np.asarray(v, np.float64)
  tokens = blocks.shape[0] * (blocks.shape[1] - 1)
  return {pipeline.output_key(k): v / tokens for k, v in total.items()}


@pytest.mark.parametrize("segment", [1, 3, None])
@pytest.mark.parametrize("path", [PYCODE, STORIES], ids=["pycode", "stories"])
def test_streamed_output_gradients_equal_the_whole_models_gradient(path, segment):
  """float32 compute, from the checkpoint (untied head: pycode, tied: stories260K), a layer at a
  time with every layer's inputs kept (segment 1), recomputed by stretches of 3, or of the
  default ceil(sqrt(L)), against the whole model's `jax.grad` in one program per batch. Two
  float32 evaluations of a gradient differ by `f32_sum_random` of the terms along the forward
  and backward; squared, twice that; the sums over the tokens add `f32_sum` of their count."""
  model, params = llama.load_pretrained(_need(path), dtype=jnp.float32)
  source = CheckpointSource(path)
  g = calibration.output_gradients(model, source, _BLOCKS, batch_size=3, segment=segment)
  ref = _whole_model_output_gradients(model, params, _BLOCKS, batch_size=3)
  assert set(g) == set(ref) == {
    pipeline.output_key(p) for p in source.shapes() if p.endswith("/kernel")
  }
  t = _BLOCKS.shape[1] - 1
  bound = 4 * f32_sum_random(llama_grad_terms(model.config, 3, t)) + f32_sum(_BLOCKS.size)
  for key, expected in ref.items():
    assert g[key].dtype == np.float32 and g[key].shape == expected.shape
    assert_close_at_scale(g[key], expected, bound, err_msg=key)


@pytest.mark.parametrize("path", [PYCODE, STORIES], ids=["pycode", "stories"])
def test_output_gradients_with_moments_also_give_the_forwards_input_moments(path):
  """`moments=True`: the input moments summed by the first forward, against the float64 numpy
  forward (the bound of `test_layer_by_layer_moments_equal_a_float64_numpy_forward`), for an
  untied head (pycode: its input too) and a tied one; the output gradients unchanged."""
  model, params = llama.load_pretrained(_need(path), dtype=jnp.float32)
  source = CheckpointSource(path)
  both = calibration.output_gradients(model, source, _BLOCKS, batch_size=3, moments=True)
  g = calibration.output_gradients(model, source, _BLOCKS, batch_size=3)
  ref = _numpy_forward_moments(model.config, params, _BLOCKS[:, :-1])
  assert set(both) == set(ref) | set(g)
  bound = 2 * f32_sum_random(llama_terms(model.config, _BLOCKS.shape[1] - 1))
  for key, expected in ref.items():
    assert both[key].dtype == np.float32 and both[key].shape == expected.shape
    assert_close_at_scale(both[key], expected, bound, err_msg=key)
  for key, v in g.items():
    np.testing.assert_array_equal(both[key], v, err_msg=key)


def test_fisher_moments_take_gradients_of_a_spread_subset_and_moments_of_every_block():
  """`fisher_moments` with `gradient_sequences` below the block count: the output gradients of
  `spread(blocks, 3)` against the whole model's `jax.grad` of those blocks, the input moments of
  all 7 blocks against the float64 numpy forward (the two tests above' bounds); with as many as
  there are blocks, `output_gradients(moments=True)` of all of them."""
  model, params = llama.load_pretrained(_need(STORIES), dtype=jnp.float32)
  source = CheckpointSource(STORIES)
  both = calibration.fisher_moments(model, source, _BLOCKS, 3, gradient_sequences=3)
  some = calibration.spread(_BLOCKS, 3)
  grads = _whole_model_output_gradients(model, params, some, batch_size=3)
  moments = _numpy_forward_moments(model.config, params, _BLOCKS[:, :-1])
  assert set(both) == set(grads) | set(moments)
  t = _BLOCKS.shape[1] - 1
  bound = 4 * f32_sum_random(llama_grad_terms(model.config, 3, t)) + f32_sum(some.size)
  for key, expected in grads.items():
    assert_close_at_scale(both[key], expected, bound, err_msg=key)
  bound = 2 * f32_sum_random(llama_terms(model.config, t))
  for key, expected in moments.items():
    assert_close_at_scale(both[key], expected, bound, err_msg=key)
  every = calibration.fisher_moments(model, source, _BLOCKS, 3, gradient_sequences=7)
  once = calibration.output_gradients(model, source, _BLOCKS, 3, moments=True)
  assert set(every) == set(once)
  for key, v in once.items():
    np.testing.assert_array_equal(every[key], v, err_msg=key)


def test_streamed_output_gradients_hold_one_layer_on_the_device():
  """What `output_gradients` reads, in order, and what the device holds at each read. pycode's 8
  layers in segments of 3 ([0, 3), [3, 6), [6, 8)): the embedding and each layer (the forward);
  the head and final norm; then per segment from the last, the forward again from its first
  layer up to the one before its last, and the backward from its last layer to its first. At
  every read the device holds no more than the hidden states and their gradients (bf16 each)
  and the tensors read so far of the layer being read: an earlier layer's weights still alive
  would add more than the slack, half the smallest layer."""
  model = llama.Llama(CheckpointSource(_need(PYCODE)).config, dtype=jnp.bfloat16)
  config = model.config
  source = _Recording(CheckpointSource(PYCODE))
  calibration.output_gradients(model, source, _BLOCKS, batch_size=7, segment=3)
  shapes = source.shapes()
  assert config.num_layers == 8

  def group(p):
    return int(p.split("/")[2]) if p.startswith("model/layers/") else None

  def layer(i):
    return [p for p in shapes if group(p) == i]

  backward = [6, 7, 6, 3, 4, 5, 4, 3, 0, 1, 2, 1, 0]
  order = [["model/embed_tokens/embedding"], *map(layer, range(8))]
  order += [["lm_head/kernel", "model/norm/scale"], *map(layer, backward)]
  assert source.reads == [p for paths in order for p in paths]

  hidden = _BLOCKS.shape[0] * (_BLOCKS.shape[1] - 1) * config.hidden_size * 2  # bf16
  slack = min(sum(source.nbytes[p] for p in layer(i)) for i in range(8)) // 2
  held, current = 0, None
  for p, live in zip(source.reads, source.live):
    held, current = (held, current) if group(p) == current else (0, group(p))
    allowed = (0 if p == "model/embed_tokens/embedding" else 2 * hidden) + held
    assert live <= allowed + slack, (p, live, allowed)
    held += source.nbytes[p]


def test_fisher_weights_the_solver_by_output_importance():
  """Unit output importance packs what "model" packs; a kernel whose outputs matter 100x more
  draws bits; missing output importance is a one-line error."""
  _, params, *_ = tiny_model(quant=QuantConfig(method="nf", bits=4))
  h = _unit_moments(params)
  unit = {**h, **_unit_outputs(params)}
  loud = "model/layers/0/self_attn/v_proj/kernel"
  louder = {**unit, pipeline.output_key(loud): unit[pipeline.output_key(loud)] * 100.0}

  def quantize(mode, importance):
    cfg = QuantConfig(budget=1.5, calibration=mode, bucket_multiple=1, bucket_sizes="tensor")
    qparams, report = quantize_params(params, cfg, progress=False, importance=importance)
    return qparams, {r.path: r.code_bits for r in report.layers}

  model_bits, model_mode = quantize("model", h)
  fisher_bits, fisher = quantize("fisher", unit)
  assert _tree_bytes(fisher_bits) == _tree_bytes(model_bits) and fisher == model_mode
  _, loud_bits = quantize("fisher", louder)
  assert loud_bits[loud] > fisher[loud] + 0.5
  with pytest.raises(QuantizationError) as e:
    quantize("fisher", h)
  assert "output gradients' second moments" in str(e.value) and "\n" not in str(e.value)


class _Asked(Mapping):
  """A `LayerCovariances` read through, keeping the last value handed out for each path."""

  def __init__(self, cov):
    self.cov, self.asked, self.sequential = cov, {}, cov.sequential

  def __getitem__(self, path):
    value = self.cov[path]
    self.asked[path] = np.asarray(value, np.float64)
    return value

  def __iter__(self):
    return iter(self.cov)

  def __len__(self):
    return len(self.cov)

  def quantized(self, path, kernel):
    self.cov.quantized(path, kernel)


@pytest.mark.parametrize("loftq_rounds", [0, 2], ids=["plain", "loftq2"])
def test_sequential_covariances_come_through_the_quantized_layers_before(loftq_rounds):
  """`gptq_sequential`: the covariances GPTQ used for layer i (the last quantizer pass's, with
  LoftQ) are the float64 numpy forward's through layers 0..i-1 as quantized — their
  dequantization, plus the scaled factors with LoftQ — and layer i itself dense (the float32
  forward's bound, as above). (The head is not quantized by default: nothing asks for its.)"""
  from lowra_jax.loftq import loftq_stream

  model, params = llama.load_pretrained(_need(PYCODE), dtype=jnp.float32)
  h = calibration.input_moments(model, CheckpointSource(PYCODE), _BLOCKS, batch_size=3)
  config = QuantConfig(budget=1.5, calibration="kernel", rounding="gptq", gptq_sequential=True)
  layer_cov = calibration.LayerCovariances(
    model, CheckpointSource(PYCODE), _BLOCKS, batch_size=3, sequential=True
  )
  assert not layer_cov.keeps_all
  cov, kernels, scale = _Asked(layer_cov), {}, 2.0
  if loftq_rounds:
    targets = {tuple(p.split("/")[:-1]) for p in cov if p.startswith("model/")}
    leaves = []
    factors, _ = loftq_stream(
      CheckpointSource(PYCODE), config, targets=targets, rank=4, scale=scale,
      iters=loftq_rounds, sink=lambda p, leaf: leaves.append((p, leaf)), progress=False,
      importance=h, covariances=cov, weighted=True,
    )
    qparams = pipeline.nest(leaves)
  else:
    factors = {}
    qparams, _ = quantize_params(params, config, progress=False, importance=h, covariances=cov)
  flat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_quantized)[0]
  for key, leaf in flat:
    path = pipeline.path_str(key)
    if is_quantized(leaf):
      kernel = np.asarray(dequantize(leaf, jnp.float32), np.float64)
      a, b = factors.get(tuple(path.split("/")[:-1]), (None, None))
      kernels[path] = kernel if a is None else kernel + scale * np.asarray(a @ b, np.float64)
  assert set(cov.asked) == set(kernels) == {p for p in cov if p.startswith("model/")}
  rows = _BLOCKS.shape[0] * (_BLOCKS.shape[1] - 1)
  bound = 2 * f32_sum_random(llama_terms(model.config, _BLOCKS.shape[1] - 1) + rows)
  dense = _numpy_forward_moments(model.config, params, _BLOCKS[:, :-1], full=True)
  for i in range(model.config.num_layers):
    upstream = {p: k for p, k in kernels.items() if p.startswith("model/layers/")
                and int(p.split("/")[2]) < i}
    mixed = jax.tree_util.tree_map_with_path(
      lambda key, x: upstream.get(pipeline.path_str(key), x), params
    )
    ref = _numpy_forward_moments(model.config, mixed, _BLOCKS[:, :-1], full=True)
    prefix = f"model/layers/{i}/"
    for path in [p for p in ref if p.startswith(prefix)]:
      assert_close_at_scale(cov.asked[path], ref[path], bound, err_msg=path)
    if i:  # not what the dense model gives
      path = prefix + "self_attn/q_proj/kernel"
      assert np.abs(cov.asked[path] - dense[path]).max() > 100 * bound * np.abs(dense[path]).max()


def test_sequential_covariances_refuse_what_they_cannot_follow():
  """One line each: sequential GPTQ with covariances that do not follow the quantizer, or asked
  for out of forward order (an earlier layer after a later quantized one)."""
  model, params = llama.load_pretrained(_need(PYCODE), dtype=jnp.float32)
  full = calibration.input_moments(model, CheckpointSource(PYCODE), _BLOCKS, 3, full=True)
  config = QuantConfig(budget=2.0, calibration="kernel", rounding="gptq", gptq_sequential=True)
  with pytest.raises(QuantizationError, match="needs covariances that follow the quantized"):
    h = {path: np.diagonal(c) for path, c in full.items()}
    quantize_params(params, config, progress=False, importance=h, covariances=full)
  cov = calibration.LayerCovariances(model, CheckpointSource(PYCODE), _BLOCKS, 3, sequential=True)
  q0, q2 = "model/layers/0/self_attn/q_proj/kernel", "model/layers/2/self_attn/q_proj/kernel"
  cov.quantized(q0, np.zeros(cov[q0].shape))
  cov[q2]
  with pytest.raises(QuantizationError, match="layer 1's covariances asked for after layer 2's"):
    cov["model/layers/1/mlp/up_proj/kernel"]
