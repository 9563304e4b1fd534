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

For generation, a `KVCache` passed as ``cache=`` makes the call write the new tokens' keys and
values into the cache and attend over every filled slot (see `lowra_jax.generate`)::

    cache = KVCache.create(model.config, batch=B, max_len=S, dtype=model.dtype)
    logits, cache = model.apply(variables, tokens, positions, mask, cache=cache)
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lowra_jax.lora import LoraConfig, QLoRALinear, fused_outputs
from lowra_jax.models import weights

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# Sibling projections that read one input, by parent module: their quantized kernels may be fused
# into one for decoding, with their adapters (`fusion.fuse_for_decoding`, `generate.decode_layout`).
FUSED_PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


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

  @property
  def num_params(self) -> int:
    """Parameters of the model: embeddings, decoder layers, final norm and head (biases
    included; a tied head counted once)."""
    h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    attn = h * (q + 2 * kv) + q * h + (q + 2 * kv + h if self.attention_bias else 0)
    mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h if self.mlp_bias else 0)
    layer = attn + mlp + 2 * h
    embed = self.vocab_size * h
    return embed * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + h


@flax.struct.dataclass
class KVCache:
  """Preallocated keys and values of every layer, for decoding (slot = position in the cache).

  keys, values: per layer [B, S, kv_heads, head_dim] in the compute dtype (rotary applied to keys);
  mask: bool [B, S], slots holding a real token (False: not written yet, or left padding);
  index: int32 [], the next slot to write (the same for every row: prompts are left-padded).
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  mask: jax.Array
  index: jax.Array

  @classmethod
  def create(cls, config: LlamaConfig, batch: int, max_len: int, dtype) -> KVCache:
    """An empty cache of `max_len` slots per row."""
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)

    def empty():
      return tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))

    return cls(
      keys=empty(),
      values=empty(),
      mask=jnp.zeros((batch, max_len), bool),
      index=jnp.zeros((), jnp.int32),
    )

  @property
  def max_len(self) -> int:
    return self.mask.shape[1]


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
  """Causal grouped-query self-attention with rotary embeddings (in_remat: see `QLoRALinear`)."""

  config: LlamaConfig
  dtype: Any
  lora: LoraConfig | None
  deterministic: bool
  in_remat: bool = False

  def _proj(self, features: int, name: str) -> QLoRALinear:
    return QLoRALinear(
      features,
      use_bias=self.config.attention_bias,
      dtype=self.dtype,
      lora=self.lora,
      deterministic=self.deterministic,
      in_remat=self.in_remat,
      name=name,
    )

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv_cache=None, index=None):
    """x [B, T, d]; cos/sin [B, T, 1, D]; mask bool [B, 1, 1, T, S] (True = attend).

    Without a cache S = T. With `kv_cache` = (keys, values) [B, S, kv_heads, D], this call's keys
    and values are written at slots [index, index + T) and the queries attend over all S slots.
    Returns (output [B, T, d], updated (keys, values) or None).
    """
    cfg = self.config
    b, t, _ = x.shape
    heads, kv, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    names = FUSED_PROJECTIONS["self_attn"]
    widths = (heads * dim, kv * dim, kv * dim)
    fused = fused_outputs(self, x, names, widths, self.dtype, self.lora)
    q = self._proj(heads * dim, "q_proj")(x, fused[0]).reshape(b, t, heads, dim)
    k = self._proj(kv * dim, "k_proj")(x, fused[1]).reshape(b, t, kv, dim)
    v = self._proj(kv * dim, "v_proj")(x, fused[2]).reshape(b, t, kv, dim)
    q = apply_rotary(q, cos, sin).reshape(b, t, kv, heads // kv, dim)
    k = apply_rotary(k, cos, sin)
    if kv_cache is not None:
      start = (0, index, 0, 0)
      k = jax.lax.dynamic_update_slice(kv_cache[0], k.astype(kv_cache[0].dtype), start)
      v = jax.lax.dynamic_update_slice(kv_cache[1], v.astype(kv_cache[1].dtype), start)
      kv_cache = (k, v)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores / math.sqrt(dim), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    out = out.astype(self.dtype).reshape(b, t, heads * dim)
    return self._proj(cfg.hidden_size, "o_proj")(out), kv_cache


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)) (in_remat: see `QLoRALinear`)."""

  config: LlamaConfig
  dtype: Any
  lora: LoraConfig | None
  deterministic: bool
  in_remat: bool = False

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
        in_remat=self.in_remat,
        name=name,
      )

    width = cfg.intermediate_size
    fused = fused_outputs(self, x, FUSED_PROJECTIONS["mlp"], (width, width), self.dtype, self.lora)
    gate = proj(width, "gate_proj")(x, fused[0])
    up = proj(width, "up_proj")(x, fused[1])
    return proj(cfg.hidden_size, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)) (in_remat: see `QLoRALinear`)."""

  config: LlamaConfig
  dtype: Any
  lora: LoraConfig | None
  deterministic: bool
  in_remat: bool = False

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv_cache=None, index=None):
    """Returns (x [B, T, d], the layer's updated (keys, values) or None); see `Attention`."""
    cfg = self.config
    kw = {
      "dtype": self.dtype,
      "lora": self.lora,
      "deterministic": self.deterministic,
      "in_remat": self.in_remat,
    }
    h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
    attn, kv_cache = Attention(cfg, name="self_attn", **kw)(h, cos, sin, mask, kv_cache, index)
    x = x + attn
    h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
    return x + MLP(cfg, name="mlp", **kw)(h), kv_cache


class Layers(nn.Module):
  """The decoder stack, unrolled (layers of a mixed-precision model differ in shape)."""

  config: LlamaConfig
  dtype: Any
  lora: LoraConfig | None
  deterministic: bool
  remat: bool

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache: KVCache | None = None):
    """Returns (x, per-layer updated (keys, values) or None without a cache)."""
    layer = nn.remat(DecoderLayer) if self.remat else DecoderLayer
    updated = []
    for i in range(self.config.num_layers):
      kv = None if cache is None else (cache.keys[i], cache.values[i])
      block = layer(self.config, self.dtype, self.lora, self.deterministic, self.remat, name=str(i))
      x, kv = block(x, cos, sin, mask, kv, None if cache is None else cache.index)
      updated.append(kv)
    return x, (None if cache is None else updated)


def attention_mask_of(
  attention_mask: jax.Array, cache: KVCache | None = None
) -> tuple[jax.Array, jax.Array]:
  """The decoder layers' mask of a call on T tokens: (bool [B, 1, 1, T, S] causal and real-key
  mask, bool [B, S] the real keys). `attention_mask` [B, T] (1 = real token); without a cache
  S = T, with one the tokens sit in slots [cache.index, cache.index + T) of its S."""
  t = attention_mask.shape[1]
  attention_mask = attention_mask.astype(bool)
  if cache is None:
    keys = attention_mask  # [B, S = T]
    query_slots = jnp.arange(t)
  else:
    keys = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache.index))
    query_slots = cache.index + jnp.arange(t)
  causal = jnp.arange(keys.shape[1])[None, :] <= query_slots[:, None]  # [T, S]
  return (causal[None] & keys[:, None, :])[:, None, None], keys


class LlamaModel(nn.Module):
  """Embeddings, decoder stack and final norm: tokens [B, T] -> hidden [B, T, d] in `dtype`."""

  config: LlamaConfig
  dtype: Any
  lora: LoraConfig | None
  deterministic: bool
  remat: bool

  @nn.compact
  def __call__(self, tokens, positions, attention_mask, cache: KVCache | None = None):
    """Returns (hidden, the embedding module, updated cache or None)."""
    cfg = self.config
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="embed_tokens")
    x = embed(tokens)
    cos, sin = rotary_tables(cfg, positions)
    mask, keys = attention_mask_of(attention_mask, cache)
    t = tokens.shape[1]
    x, kv = Layers(cfg, self.dtype, self.lora, self.deterministic, self.remat, name="layers")(
      x, cos, sin, mask, cache
    )
    if cache is not None:
      cache = KVCache(tuple(k for k, _ in kv), tuple(v for _, v in kv), keys, cache.index + t)
    return RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(x), embed, cache


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
    cache: KVCache | None = None,
    last_only: bool = False,
  ) -> jax.Array | tuple[jax.Array, KVCache]:
    """tokens int [B, T]; positions int [B, T] (default 0..T-1, after the cache's filled slots
    with a cache); attention_mask [B, T] (1 = real token, 0 = padding; default all ones);
    deterministic=False enables LoRA dropout (needs a 'dropout' rng).

    With a `cache`, the tokens go into slots [cache.index, cache.index + T) and attend to every
    earlier real slot; returns (logits, updated cache) instead of logits. `last_only`: logits of
    the last position only, [B, 1, V] (what a prefill needs).
    """
    b, t = tokens.shape
    if positions is None:
      start = 0 if cache is None else cache.index
      positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    model = LlamaModel(self.config, self.dtype, self.lora, deterministic, self.remat, name="model")
    hidden, embed, new_cache = model(tokens, positions, attention_mask, cache)
    if last_only:
      hidden = hidden[:, -1:]
    if self.config.tie_word_embeddings:
      logits = embed.attend(hidden).astype(jnp.float32)
    else:
      head = QLoRALinear(self.config.vocab_size, dtype=self.dtype, lora=None, name="lm_head")
      logits = head(hidden).astype(jnp.float32)
    return logits if cache is None else (logits, new_cache)


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
  hf_config, state = weights.read_checkpoint(path)
  config = LlamaConfig.from_hf(hf_config)
  return Llama(config, dtype=dtype, remat=remat), _checkpoint_params(state, config)
