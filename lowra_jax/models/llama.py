"""A Flax (Linen) LLaMA whose every projection is a `QLoRALinear`.

The module tree mirrors Hugging Face's ``LlamaForCausalLM`` names, so a checkpoint's state dict maps
onto it one to one (``weights.to_kernel_tree``)::

    model/embed_tokens/embedding          [vocab, d]
    model/layers/{i}/input_layernorm/scale, post_attention_layernorm/scale   [d]
    model/layers/{i}/self_attn/{q,k,v,o}_proj/kernel   [in, out]   (+ bias with attention_bias)
    model/layers/{i}/mlp/{gate,up,down}_proj/kernel    [in, out]   (+ bias with mlp_bias)
    model/norm/scale                      [d]
    lm_head/kernel                        [d, vocab]   (absent when tie_word_embeddings)

Variables come in three collections (see `lowra_jax.lora`): ``params`` (dense weights: everything
for a plain model, the leftovers -- embeddings, norms, head, biases -- for a quantized one),
``quant`` (`QuantizedTensor` kernels) and ``lora`` (adapters). Compute runs in ``dtype`` (bf16 by
default) with float32 RMSNorm, rotary embeddings, attention softmax and matmul accumulation.

    model, params = llama.load_pretrained("../shared/data/models/pycode-llama-17m")
    logits = model.apply({"params": params}, tokens)        # tokens int [B, T] -> f32 [B, T, V]
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowra_jax.lora import LoraConfig, QLoRALinear
from lowra_jax.models import weights

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding settings (HF ``rope_parameters`` / ``rope_theta`` + ``rope_scaling``)."""

  rope_type: str = "default"
  theta: float = 10000.0
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int | None = None


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture hyper-parameters, read from an HF ``config.json`` by `from_hf`."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-5
  rope: RopeConfig = RopeConfig()
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2

  @classmethod
  def from_hf(cls, config: dict[str, Any]) -> LlamaConfig:
    """Parse a transformers 4.x (``rope_theta``, ``rope_scaling``) or 5.x (``rope_parameters``)
    LLaMA ``config.json`` dict."""
    if config.get("hidden_act", "silu") != "silu":
      raise ValueError(f"hidden_act={config['hidden_act']!r} is not supported; LLaMA uses 'silu'.")
    heads = config["num_attention_heads"]
    rope = dict(config.get("rope_parameters") or {})
    rope.update(config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type {rope_type!r} is not supported; use one of {ROPE_TYPES}.")
    eos = config.get("eos_token_id", 2)
    return cls(
      vocab_size=config["vocab_size"],
      hidden_size=config["hidden_size"],
      intermediate_size=config["intermediate_size"],
      num_layers=config["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=config.get("num_key_value_heads") or heads,
      head_dim=config.get("head_dim") or config["hidden_size"] // heads,
      max_position_embeddings=config.get("max_position_embeddings", 2048),
      rms_norm_eps=config.get("rms_norm_eps", 1e-5),
      rope=RopeConfig(
        rope_type=rope_type,
        theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        factor=float(rope.get("factor", 1.0)),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=rope.get("original_max_position_embeddings"),
      ),
      tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
      attention_bias=bool(config.get("attention_bias", False)),
      mlp_bias=bool(config.get("mlp_bias", False)),
      bos_token_id=config.get("bos_token_id", 1),
      eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )


def rope_inv_freq(config: LlamaConfig, seq_len: jax.Array | int) -> jax.Array:
  """float32 [head_dim / 2] inverse frequencies, with HF's rope scaling variants.

  `seq_len` (1 + the largest position) only matters for 'dynamic' (NTK-aware) scaling.
  """
  rope, dim = config.rope, config.head_dim
  base = jnp.float32(rope.theta)
  exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  if rope.rope_type == "dynamic":
    max_pos = config.max_position_embeddings
    seq = jnp.maximum(jnp.asarray(seq_len, jnp.float32), max_pos)
    base = base * ((rope.factor * seq / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
  inv_freq = 1.0 / base**exponent
  if rope.rope_type == "linear":
    inv_freq = inv_freq / rope.factor
  if rope.rope_type == "llama3":
    old_ctx = rope.original_max_position_embeddings or config.max_position_embeddings
    low_wavelen = old_ctx / rope.low_freq_factor
    high_wavelen = old_ctx / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_ctx / wavelen - rope.low_freq_factor) / (
      rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = jnp.where(medium, smoothed, scaled)
  return inv_freq


def rotary_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """positions int [B, T] -> (cos, sin) float32 [B, T, 1, head_dim] in HF's half-split layout."""
  inv_freq = rope_inv_freq(config, jnp.max(positions) + 1)
  angles = positions[..., None].astype(jnp.float32) * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, H, D] rotated (dimension j with j + D/2), in float32, returned in x.dtype."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) * scale, computed in float32, returned in `dtype`."""

  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


class Attention(nn.Module):
  """Causal grouped-query self-attention with rotary embeddings."""

  config: LlamaConfig
  dtype: Any
  lora: LoraConfig | None
  deterministic: bool

  def _proj(self, features: int, name: str) -> QLoRALinear:
    return QLoRALinear(
      features,
      use_bias=self.config.attention_bias,
      dtype=self.dtype,
      lora=self.lora,
      deterministic=self.deterministic,
      name=name,
    )

  @nn.compact
  def __call__(self, x, cos, sin, mask):
    """x [B, T, d]; cos/sin [B, T, 1, D]; mask bool [B, 1, 1, T, T] (True = attend)."""
    cfg = self.config
    b, t, _ = x.shape
    heads, kv, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = self._proj(heads * dim, "q_proj")(x).reshape(b, t, heads, dim)
    k = self._proj(kv * dim, "k_proj")(x).reshape(b, t, kv, dim)
    v = self._proj(kv * dim, "v_proj")(x).reshape(b, t, kv, dim)
    q = apply_rotary(q, cos, sin).reshape(b, t, kv, heads // kv, dim)
    k = apply_rotary(k, cos, sin)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores / math.sqrt(dim), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    out = out.astype(self.dtype).reshape(b, t, heads * dim)
    return self._proj(cfg.hidden_size, "o_proj")(out)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  config: LlamaConfig
  dtype: Any
  lora: LoraConfig | None
  deterministic: bool

  @nn.compact
  def __call__(self, x):
    cfg = self.config

    def proj(features, name):
      return QLoRALinear(
        features,
        use_bias=cfg.mlp_bias,
        dtype=self.dtype,
        lora=self.lora,
        deterministic=self.deterministic,
        name=name,
      )

    gate = proj(cfg.intermediate_size, "gate_proj")(x)
    up = proj(cfg.intermediate_size, "up_proj")(x)
    return proj(cfg.hidden_size, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

  config: LlamaConfig
  dtype: Any
  lora: LoraConfig | None
  deterministic: bool

  @nn.compact
  def __call__(self, x, cos, sin, mask):
    cfg, kw = self.config, dict(dtype=self.dtype, lora=self.lora, deterministic=self.deterministic)
    h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
    x = x + Attention(cfg, name="self_attn", **kw)(h, cos, sin, mask)
    h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
    return x + MLP(cfg, name="mlp", **kw)(h)


class Layers(nn.Module):
  """The decoder stack, unrolled (layers of a mixed-precision model differ in shape)."""

  config: LlamaConfig
  dtype: Any
  lora: LoraConfig | None
  deterministic: bool
  remat: bool

  @nn.compact
  def __call__(self, x, cos, sin, mask):
    layer = nn.remat(DecoderLayer) if self.remat else DecoderLayer
    for i in range(self.config.num_layers):
      x = layer(self.config, self.dtype, self.lora, self.deterministic, name=str(i))(
        x, cos, sin, mask
      )
    return x


class LlamaModel(nn.Module):
  """Embeddings, decoder stack and final norm: tokens [B, T] -> hidden [B, T, d] in `dtype`."""

  config: LlamaConfig
  dtype: Any
  lora: LoraConfig | None
  deterministic: bool
  remat: bool

  @nn.compact
  def __call__(self, tokens, positions, attention_mask):
    cfg = self.config
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="embed_tokens")
    x = embed(tokens)
    cos, sin = rotary_tables(cfg, positions)
    t = tokens.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    mask = causal[None] & attention_mask[:, None, :].astype(bool)
    mask = mask[:, None, None]
    x = Layers(cfg, self.dtype, self.lora, self.deterministic, self.remat, name="layers")(
      x, cos, sin, mask
    )
    return RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(x), embed


class Llama(nn.Module):
  """LLaMA causal LM: tokens int [B, T] -> logits float32 [B, T, vocab].

  Attributes:
    config: the architecture.
    dtype: compute dtype of activations and matmuls (weights are cast to it).
    lora: adapter settings (scale, dropout); adapters themselves live in the ``lora`` collection.
    remat: recompute each decoder layer in the backward pass (gradient checkpointing).
  """

  config: LlamaConfig
  dtype: Any = jnp.bfloat16
  lora: LoraConfig | None = None
  remat: bool = False

  @nn.compact
  def __call__(
    self,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    deterministic: bool = True,
  ) -> jax.Array:
    """tokens int [B, T]; positions int [B, T] (default 0..T-1); attention_mask [B, T] (1 = real
    token, 0 = padding; default all ones); deterministic=False enables LoRA dropout (needs a
    'dropout' rng)."""
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    model = LlamaModel(self.config, self.dtype, self.lora, deterministic, self.remat, name="model")
    hidden, embed = model(tokens, positions, attention_mask)
    if self.config.tie_word_embeddings:
      return embed.attend(hidden).astype(jnp.float32)
    head = QLoRALinear(self.config.vocab_size, dtype=self.dtype, lora=None, name="lm_head")
    return head(hidden).astype(jnp.float32)


def _checkpoint_params(state: dict[str, np.ndarray], config: LlamaConfig) -> dict[str, Any]:
  if config.tie_word_embeddings:
    state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
  return weights.to_kernel_tree(state)


def load_pretrained(
  path: str | os.PathLike[str], *, dtype=jnp.bfloat16, remat: bool = False
) -> tuple[Llama, dict[str, Any]]:
  """Load an HF model directory or a llama2.c ``.bin`` file.

  Returns ``(model, params)``: a `Llama` module and its ``params`` tree of numpy arrays in the
  stored dtypes (put them on a device, or quantize them first with `lowra_jax.quantize`).
  """
  path = Path(path)
  if path.is_dir():
    hf_config, state = weights.read_hf_checkpoint(path)
  elif path.suffix == ".bin":
    hf_config, state = weights.read_llama2c_checkpoint(path)
  else:
    raise FileNotFoundError(
      f"{path}: expected an HF model directory (config.json + *.safetensors) or a llama2.c .bin"
    )
  config = LlamaConfig.from_hf(hf_config)
  return Llama(config, dtype=dtype, remat=remat), _checkpoint_params(state, config)


def greedy_generate(model: Llama, variables, prompt: list[int], steps: int) -> list[int]:
  """Greedy continuation of `prompt` by `steps` tokens.

  Recomputes the whole prefix each step (no KV cache) over one fixed-length buffer, so it compiles
  once; causal attention makes the not-yet-written tail irrelevant.
  """
  length = len(prompt) + steps
  apply = jax.jit(model.apply)
  tokens = np.zeros((1, length), np.int32)
  tokens[0, : len(prompt)] = prompt
  for i in range(len(prompt), length):
    logits = apply(variables, jnp.asarray(tokens))
    tokens[0, i] = int(jnp.argmax(logits[0, i - 1]))
  return tokens[0, len(prompt) :].tolist()
