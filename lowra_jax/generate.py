"""Batched autoregressive generation with a preallocated KV cache (`llama.KVCache`).

    out = generate(model, variables, [tok.encode("Once upon a time")], max_new_tokens=32,
                   sampling=Sampling(temperature=0.8, top_p=0.9), key=jax.random.key(0),
                   eos_id=tok.eos_id)                       # -> [[new token ids], ...]

`variables` are whatever the model applies: ``{"params"}`` (dense), ``{"params", "quant"}`` (the
packed base, read through `quantized_matmul` with M = batch rows per decode step) and optionally
``"lora"`` (adapters applied on the fly, exact). Two jitted programs run a generation:

* `prefill`: the prompts, left-padded to one width T, go through the model once; they fill cache
  slots [0, T) and the first new token is sampled from the last position's logits.
* `decode`: one `lax.while_loop` of single-token steps (each writes one cache slot with
  `dynamic_update_slice`) until every row has produced EOS or the step budget is spent.

Both compile once per shape (batch, prompt width, cache length) and sampling settings, never per
token; the loop carries the cache in place. Rows keep their own positions (slot minus left
padding) and never attend to padding. Token j of the cache is sampled with `fold_in(key, j)`, so
the same key, prompts and settings give the same tokens. Streaming (`on_token`) is a host callback
inside the loop, traced only when asked for.

`decode_layout(variables, batch)` puts the packed base in the word layout where the GPU kernels
decode it faster (`quantize.to_word_layout`: batch <= `quantized_ops.word_rows()` rows, tensors
of 1- to 4-bit channels) and fuses the kernels and adapters of sibling projections (q/k/v, gate/up:
`fusion.fuse_for_decoding` by `llama.FUSED_PROJECTIONS`) into one launch each: generate.py does
so before generating.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from lowra_jax import fusion
from lowra_jax.models.llama import FUSED_PROJECTIONS, KVCache, Llama
from lowra_jax.quantize import to_word_layout
from pallas_kernels import backend as kernel_backend
from pallas_kernels import quantized_ops

# Prompts are left-padded to a multiple of this many tokens where the cache has room, so prompts
# of similar length share one compiled prefill.
PROMPT_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0: greedy (argmax); else softmax(logits / temperature) restricted to the smallest
  set of top tokens whose probability reaches `top_p` (nucleus sampling; 1.0: no restriction)."""

  temperature: float = 0.0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} — use >= 0 (0: greedy).")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} — use a mass in (0, 1] (1: off).")


def decode_layout(variables: dict, batch: int, fuse: bool = True) -> dict:
  """`variables` with the packed base ("quant") in the word layout if the word kernels would
  decode it: at most `quantized_ops.word_rows()` rows (`word_gemv`, then `word_mma`) and the
  Pallas kernels (Triton on a GPU; "interpret"), else unchanged. The prefill then multiplies
  weights dequantized by XLA. `fuse`: also fuse sibling projections' kernels and adapters
  (module docstring)."""
  kernels = kernel_backend.resolve("auto") in ("triton", "interpret")
  if "quant" not in variables or batch > quantized_ops.word_rows() or not kernels:
    return variables
  parts = {k: variables[k] for k in ("quant", "lora") if k in variables}  # what changes
  return {**variables, **jax.jit(functools.partial(word_form, fuse=fuse))(parts)}


def word_form(variables: dict, fuse: bool = True) -> dict:
  """`variables` (at least "quant") with the packed base in the word layout and, when `fuse`,
  sibling projections' kernels and adapters ("lora") fused (`fusion.fuse_for_decoding`).
  Traceable; `decode_layout` applies it where it pays."""
  out = {**variables, "quant": to_word_layout(variables["quant"])}
  return fusion.fuse_for_decoding(out, FUSED_PROJECTIONS) if fuse else out


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """Next tokens int32 [B] from logits float32 [B, V]."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_p < 1:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    kept = jnp.sum(before < sampling.top_p, axis=-1, keepdims=True)  # >= 1
    threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class DecodeState:
  """cache: keys/values of slots [0, cache.index); tokens: int32 [B, S], every slot's token (left
  padding 0, then the prompt, then new tokens; the token at slot cache.index is sampled but not
  yet in the cache); pad: int32 [B] left padding per row (position = slot - pad); done: bool [B],
  rows that produced EOS."""

  cache: KVCache
  tokens: jax.Array
  pad: jax.Array
  done: jax.Array


def _is_eos(tokens: jax.Array, eos_id: int | None) -> jax.Array:
  return jnp.zeros(tokens.shape, bool) if eos_id is None else tokens == eos_id


@functools.partial(jax.jit, static_argnames=("model", "max_len", "sampling", "eos_id"))
def prefill(
  model: Llama,
  variables,
  tokens: jax.Array,
  pad: jax.Array,
  key: jax.Array,
  *,
  max_len: int,
  sampling: Sampling,
  eos_id: int | None,
) -> DecodeState:
  """Runs left-padded prompts tokens int32 [B, T] (row b starts at slot pad[b]) into a new cache
  of `max_len` > T slots and samples the token of slot T."""
  b, t = tokens.shape
  slots = jnp.arange(t)[None]
  positions = jnp.maximum(slots - pad[:, None], 0)
  cache = KVCache.create(model.config, b, max_len, model.dtype)
  logits, cache = model.apply(
    variables, tokens, positions, slots >= pad[:, None], cache=cache, last_only=True
  )
  first = sample(logits[:, 0], jax.random.fold_in(key, t), sampling)
  buffer = jnp.zeros((b, max_len), jnp.int32).at[:, :t].set(tokens).at[:, t].set(first)
  return DecodeState(cache, buffer, pad, _is_eos(first, eos_id))


@functools.partial(
  jax.jit,
  static_argnames=("model", "sampling", "eos_id", "on_token", "steps_per_sync"),
  donate_argnames=("state",),
)
def decode(
  model: Llama,
  variables,
  state: DecodeState,
  key: jax.Array,
  stop: jax.Array,
  *,
  sampling: Sampling,
  eos_id: int | None,
  on_token: Callable[[np.ndarray, np.ndarray], None] | None = None,
  steps_per_sync: int = 1,
) -> DecodeState:
  """Decode steps while cache.index < stop (int32 [], <= S - 1) and some row is not done.

  Each step feeds the token at slot cache.index, writes its keys/values there and samples the
  token of the next slot (rows already done repeat EOS). `on_token(tokens int32 [B], live bool
  [B])` is called on the host with every step's tokens (live: rows not done before this step).

  A `lax.while_loop` hands its condition to the host before every iteration, so the GPU drains
  between steps. `steps_per_sync` > 1 runs that many steps an iteration (a loop of fixed trip
  count inside); steps after the condition fails leave the state as it was (the cache index,
  mask, tokens and done flags are kept; the one slot such a step writes stays masked out and is
  what the next real step would write), so the results are the same, at the cost of up to
  steps_per_sync - 1 steps computed in vain. Streaming (`on_token`) always syncs every step.
  """

  def cond(s: DecodeState):
    return (s.cache.index < stop) & ~jnp.all(s.done)

  def step(s: DecodeState) -> DecodeState:
    index = s.cache.index
    last = jax.lax.dynamic_slice_in_dim(s.tokens, index, 1, axis=1)
    logits, cache = model.apply(variables, last, (index - s.pad)[:, None], cache=s.cache)
    new = sample(logits[:, 0], jax.random.fold_in(key, index + 1), sampling)
    if eos_id is not None:
      new = jnp.where(s.done, eos_id, new)
    if on_token is not None:
      io_callback(on_token, None, new, ~s.done, ordered=True)
    tokens = jax.lax.dynamic_update_slice(s.tokens, new[:, None], (0, index + 1))
    return DecodeState(cache, tokens, s.pad, s.done | _is_eos(new, eos_id))

  if steps_per_sync == 1 or on_token is not None:
    return jax.lax.while_loop(cond, step, state)

  def guarded(_, s: DecodeState) -> DecodeState:
    go, n = cond(s), step(s)
    keep = lambda new, old: jnp.where(go, new, old)  # noqa: E731
    cache = n.cache.replace(
      mask=keep(n.cache.mask, s.cache.mask), index=keep(n.cache.index, s.cache.index)
    )
    return DecodeState(cache, keep(n.tokens, s.tokens), s.pad, keep(n.done, s.done))

  chunk = lambda s: jax.lax.fori_loop(0, steps_per_sync, guarded, s)  # noqa: E731
  return jax.lax.while_loop(cond, chunk, state)


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """Prompts laid out for `prefill`: tokens int32 [B, T] left-padded with 0, pad int32 [B],
  max_len cache slots, new: tokens to generate per row (at most)."""

  tokens: np.ndarray
  pad: np.ndarray
  max_len: int
  new: int


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def layout(
  prompts: Sequence[Sequence[int]], max_new_tokens: int, max_len: int | None, vocab_size: int
) -> PromptBatch:
  """Checks the prompts and left-pads them (ValueError with one line on bad input).

  max_len: cache slots (prompt + new tokens); default: the padded prompt width + max_new_tokens.
  Generation stops early when the cache is full.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("a prompt has no tokens — give every prompt at least one token (e.g. BOS).")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} — ask for at least 1 new token.")
  ids = np.concatenate([np.asarray(p) for p in prompts])
  if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= vocab_size:
    raise ValueError(f"prompt token ids lie outside [0, {vocab_size}) — use the model's tokenizer.")
  longest = max(len(p) for p in prompts)
  if max_len is None:
    max_len = _round_up(longest, PROMPT_MULTIPLE) + max_new_tokens
  if longest >= max_len:
    raise ValueError(
      f"a prompt of {longest} tokens leaves no room for new tokens in max_len={max_len} slots "
      "— raise max_len or shorten the prompt."
    )
  new = min(max_new_tokens, max_len - longest)
  width = min(_round_up(longest, PROMPT_MULTIPLE), max_len - new)
  pad = np.asarray([width - len(p) for p in prompts], np.int32)
  tokens = np.zeros((len(prompts), width), np.int32)
  for row, (p, n) in enumerate(zip(prompts, pad)):
    tokens[row, n:] = p
  return PromptBatch(tokens, pad, max_len, new)


def _new_tokens(state: DecodeState, width: int, new: int, eos_id: int | None) -> list[list[int]]:
  """Each row's new tokens, cut before the first EOS."""
  rows = np.asarray(state.tokens)[:, width : width + new].tolist()
  if eos_id is None:
    return rows
  return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def generate(
  model: Llama,
  variables,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  sampling: Sampling = Sampling(),
  key: jax.Array | None = None,
  eos_id: int | None = None,
  max_len: int | None = None,
  on_token: Callable[[np.ndarray, np.ndarray], None] | None = None,
  steps_per_sync: int = 1,
) -> list[list[int]]:
  """New tokens for each prompt (lists of ids of any lengths), EOS not included.

  Args:
    model, variables: a `Llama` and its variables (dense, packed base, adapters).
    max_new_tokens: at most this many new tokens per prompt.
    sampling: greedy (default) or temperature / top-p; `key` (a PRNG key) is required to sample.
    eos_id: a row stops after this token (None: never).
    max_len: KV-cache slots per row, prompt included (see `layout`).
    on_token: streaming, called with (tokens int32 [B], live bool [B]) for every new token.
    steps_per_sync: decode steps between the host's checks of the loop condition (`decode`).
  """
  if sampling.temperature > 0 and key is None:
    raise ValueError("sampling with temperature > 0 needs an explicit PRNG key (key=...).")
  key = jax.random.key(0) if key is None else key
  batch = layout(prompts, max_new_tokens, max_len, model.config.vocab_size)
  width = batch.tokens.shape[1]
  state = prefill(
    model,
    variables,
    jnp.asarray(batch.tokens),
    jnp.asarray(batch.pad),
    key,
    max_len=batch.max_len,
    sampling=sampling,
    eos_id=eos_id,
  )
  if on_token is not None:
    on_token(np.asarray(state.tokens[:, width]), np.ones(len(prompts), bool))
  stop = jnp.asarray(width + batch.new - 1, jnp.int32)
  if steps_per_sync < 1:
    raise ValueError(f"steps_per_sync must be at least 1, not {steps_per_sync}.")
  state = decode(
    model, variables, state, key, stop, sampling=sampling, eos_id=eos_id, on_token=on_token,
    steps_per_sync=steps_per_sync,
  )
  return _new_tokens(state, width, batch.new, eos_id)
