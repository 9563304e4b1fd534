"""LoRA over frozen (quantized) bases: the layer, the three-way state split and the initialisers.

A model's variables live in three pytrees that are never mixed:

* ``params`` -- frozen dense leftovers (embeddings, norms, head, biases) in the checkpoint dtype,
  and with ``init="loftq_frozen"`` each adapted module's frozen LoftQ correction
  ``{"correction_a": [in, rank], "correction_b": [rank, out]}`` (float32);
* ``quant``  -- frozen `QuantizedTensor` kernels, consumed by `pallas_kernels.quantized_matmul`;
* ``lora``   -- the adapters ``{"a": [in, rank], "b": [rank, out]}`` (float32), the only tree that
  `jax.grad` and the optimizer see.

    qparams, lora, report = init_lora(params, QuantConfig(method="lowra", budget=1.5),
                                      LoraConfig(rank=16, init="loftq"), jax.random.key(0))
    frozen, quant = split_quantized(qparams)
    logits = model.apply({"params": frozen, "quant": quant, "lora": lora}, tokens)

A `QLoRALinear` computes ``y = x @ W (+ bias) + (alpha / rank) * dropout(x) @ A @ B`` where W comes
from ``quant`` when the module has a quantized kernel there and from ``params`` otherwise, and the
adapter term is present when ``lora`` holds one for the module. Sibling projections whose kernels
(and adapters) were fused for decoding (`fusion.fuse_for_decoding`) get their slice of the fused
output as ``base`` (`fused_outputs`). A kernel in the word layout (decoding) gets its adapter term
inside the GEMV's launch (`adapted_matmul`) instead of as two small matmuls after it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowra_jax import loftq
from lowra_jax.fusion import fused_name
from lowra_jax.quantize import (
  QuantConfig,
  QuantReport,
  dequantize_params,
  is_quantized,
  quantize_params,
)
from lowra_jax.quantize.words import is_word_layout
from pallas_kernels import quantized_matmul
from pallas_kernels.quantized_ops import quantized_matmul_low_rank
from pallas_kernels.word_gemv import LowRank

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INITS = ("qlora", "loftq", "loftq_frozen")
LOFTQ_INITS = ("loftq", "loftq_frozen")
CORRECTION = ("correction_a", "correction_b")  # a frozen LoftQ correction's leaves in ``params``
LOFTQ_WEIGHTINGS = ("none", "inputs")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Adapter settings.

  rank, alpha: adapters scale by alpha / rank.  dropout: on the adapter input, training only.
  targets: module names (the path component above ``kernel``) that get adapters.
  init: 'qlora' (A uniform in +-1/sqrt(in), B = 0: the model starts as its quantized base) or
  'loftq' (`loftq_iters` alternations of quantize(W - s A B) and a rank-r SVD of the residual,
  so that base + adapters start close to the full-precision W) or 'loftq_frozen' (LoftQ's
  factors become a frozen correction of the base, kept in ``params``, and the adapters start as
  QLoRA's: they train from B = 0, as on a base that is closer to W).
  loftq_weighting: 'none' (the SVD minimises the residual's weight-space error) or 'inputs' (its
  error on the calibration's inputs, E||x (W - Q - s A B)||^2: needs quant.calibration, and
  takes the covariances under quant.rounding='gptq'; `loftq.low_rank`'s `weight`).
  """

  rank: int = 16
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  init: str = "qlora"
  loftq_iters: int = 5
  loftq_weighting: str = "none"

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"rank={self.rank} — use a rank >= 1, e.g. 16.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout={self.dropout} — use a probability in [0, 1).")
    if self.init not in INITS:
      raise ValueError(f"init={self.init!r} — use one of {INITS}.")
    if self.loftq_weighting not in LOFTQ_WEIGHTINGS:
      raise ValueError(
        f"loftq_weighting={self.loftq_weighting!r} — use one of {LOFTQ_WEIGHTINGS}."
      )
    if self.init in LOFTQ_INITS and self.loftq_iters < 1:
      raise ValueError(f"loftq_iters={self.loftq_iters} — use >= 1 LoftQ rounds.")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@jax.custom_vjp
def dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, N] -> [..., N] in x.dtype, accumulated in float32 (forward and backward).

  The VJP takes the cotangent in x.dtype: autodiff of a float32-accumulating dot would take it in
  float32 against w, which XLA does by a float32 copy of w (for a LLaMA-7B head a 0.5 GB
  temporary of every training step, `benchmarks/model_step.py`)."""
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _dense_matmul_fwd(x, w):
  return dense_matmul(x, w), (x, w)


def _dense_matmul_bwd(residuals, g):
  x, w = residuals
  dx = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
  rows = (-1, x.shape[-1]), (-1, g.shape[-1])
  dw = jnp.dot(x.reshape(rows[0]).T, g.reshape(rows[1]), preferred_element_type=jnp.float32)
  return dx, dw.astype(w.dtype)  # XLA drops dw where w is not differentiated (a frozen base)


dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


class QLoRALinear(nn.Module):
  """x [..., in] -> [..., features] in `dtype`; see the module docstring.

  Variables: params/kernel [in, features] or quant/kernel (`QuantizedTensor`), params/bias
  [features] with `use_bias`, lora/a [in, rank] and lora/b [rank, features] when adapted.
  in_remat: the module runs inside a remat'd layer, where a quantized kernel's backward reuses
  the recomputed forward's transient weight (`quantized_matmul(keep_weight=True)`).
  """

  features: int
  use_bias: bool = False
  dtype: Any = jnp.bfloat16
  lora: LoraConfig | None = None
  deterministic: bool = True
  in_remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, base: jax.Array | None = None) -> jax.Array:
    """base: x @ W already computed ([..., features] in `dtype`, a fused kernel's slice)."""
    x = x.astype(self.dtype)
    adapted = False  # the adapter term added inside the word GEMV's launch
    if base is not None:
      y = base
    elif self.has_variable("quant", "kernel"):
      kernel = self.get_variable("quant", "kernel")
      # decoding (the word layout, no dropout): the adapter's term inside the GEMV's launch
      if self.has_variable("lora", "a") and is_word_layout(kernel) and self.deterministic:
        a, b = (self.get_variable("lora", n) for n in "ab")
        y, adapted = adapted_matmul(x, kernel, a, b, self.lora.scale, self.dtype), True
      else:
        y = quantized_matmul(x, kernel, keep_weight=self.in_remat)
    else:
      init = nn.initializers.lecun_normal()
      kernel = self.param("kernel", init, (x.shape[-1], self.features), jnp.float32)
      y = dense_matmul(x, kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    if self.lora is None:
      return y
    if self.has_variable("params", "correction_a"):
      y = y + self._low_rank(x, "params", "correction_a", "correction_b")
    if self.has_variable("lora", "a") and not adapted:
      h = nn.Dropout(self.lora.dropout, deterministic=self.deterministic)(x)
      y = y + self._low_rank(h, "lora", "a", "b")
    return y

  def _low_rank(self, x: jax.Array, collection: str, a: str, b: str) -> jax.Array:
    a, b = (self.get_variable(collection, name) for name in (a, b))
    return adapter_term(x, a, b, self.lora.scale, self.dtype)


def adapter_term(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, dtype) -> jax.Array:
  """scale * x @ a @ b in `dtype`, each product accumulated in float32."""
  a, b = a.astype(dtype), b.astype(dtype)
  h = jnp.dot(x, a, preferred_element_type=jnp.float32).astype(dtype)
  return (jnp.dot(h, b, preferred_element_type=jnp.float32) * scale).astype(dtype)


def adapted_matmul(
  x: jax.Array, kernel, a: jax.Array, b: jax.Array, scale: float, dtype, bounds=()
) -> jax.Array:
  """x @ W + scale * x @ A @ B for a packed kernel in the word layout (decoding, inference only):
  h = x @ A by XLA, then the term inside the GEMV's launch (`quantized_matmul_low_rank`), in
  `dtype`. With `bounds` (first columns of segments 1, 2, ...), A and B hold fused siblings'
  adapters side by side (`fusion.fuse_for_decoding`): segment s's columns get h[:, s r:(s+1) r]
  @ B's."""
  x = x.astype(dtype)
  h = jnp.dot(x, a.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
  return quantized_matmul_low_rank(x, kernel, LowRank(h, b.astype(dtype), scale, tuple(bounds)))


def fused_outputs(
  module: nn.Module,
  x: jax.Array,
  names: tuple[str, ...],
  widths: tuple[int, ...],
  dtype,
  lora: LoraConfig | None,
) -> list[jax.Array | None]:
  """x @ W of each sibling projection in `names` ([..., width] in `dtype`) from their fused kernel
  in `module`'s ``quant`` collection, plus their fused adapters' terms where ``lora`` holds them
  (`fusion.fuse_for_decoding`: decoding only, no dropout); Nones without a fused kernel."""
  name = fused_name(names)
  if not module.has_variable("quant", name):
    return [None] * len(names)
  x = x.astype(dtype)
  kernel = module.get_variable("quant", name)
  bounds = np.cumsum(widths)[:-1].tolist()
  if lora is not None and module.has_variable("lora", name):
    adapters = module.get_variable("lora", name)
    y = adapted_matmul(x, kernel, adapters["a"], adapters["b"], lora.scale, dtype, bounds)
  else:
    y = quantized_matmul(x, kernel)
  return jnp.split(y, bounds, axis=-1)


def _partition(tree, keep) -> tuple[dict, dict]:
  """Split a nested dict by `keep(leaf)` into (rest, kept); empty sub-dicts are dropped."""
  rest, kept = {}, {}
  for key, value in tree.items():
    if isinstance(value, dict):
      r, k = _partition(value, keep)
      if r:
        rest[key] = r
      if k:
        kept[key] = k
    elif keep(value):
      kept[key] = value
    else:
      rest[key] = value
  return rest, kept


def split_quantized(qparams: dict) -> tuple[dict, dict]:
  """(frozen, quant): the dense leaves and the `QuantizedTensor` leaves of a nested params dict."""
  return _partition(qparams, is_quantized)


def kernel_shapes(params: dict) -> dict[tuple[str, ...], tuple[int, int]]:
  """{module path: (in, out)} of every ``kernel`` leaf of a nested params dict."""
  found = {}

  def visit(node, path):
    for key, value in node.items():
      if isinstance(value, dict):
        visit(value, (*path, key))
      elif key == "kernel":
        found[path] = tuple(value.shape)

  visit(params, ())
  return found


def check_targets(
  kernels: dict[tuple[str, ...], tuple[int, int]], config: LoraConfig
) -> dict[tuple[str, ...], tuple[int, int]]:
  """The entries of `kernels` ({module path: (in, out)}) that `config.targets` adapt.

  ValueError when a target names no module, or the rank exceeds a targeted min(in, out)."""
  modules = {path[-1] for path in kernels if path}
  unknown = [t for t in config.targets if t not in modules]
  if unknown:
    raise ValueError(
      f"LoRA targets {unknown} match no module of the model — use names among {sorted(modules)}"
    )
  found = {p: s for p, s in kernels.items() if p and p[-1] in config.targets}
  too_small = [f"{'/'.join(p)} {s}" for p, s in found.items() if min(s) < config.rank]
  if too_small:
    raise ValueError(
      f"LoRA rank {config.rank} exceeds min(in, out) of {', '.join(too_small[:3])}"
      f"{' ...' if len(too_small) > 3 else ''} — lower the rank"
    )
  return found


def target_paths(params: dict, config: LoraConfig) -> dict[tuple[str, ...], tuple[int, int]]:
  """{module path: (in, out)} of every ``kernel`` whose module name is in `config.targets`
  (ValueError as `check_targets`)."""
  return check_targets(kernel_shapes(params), config)


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return tree


def random_adapters(shapes: dict[tuple[str, ...], tuple[int, int]], rank: int, rng) -> dict:
  """QLoRA/peft initialisation: A ~ U(+-1/sqrt(in)) [in, rank], B = 0 [rank, out], float32."""
  keys = jax.random.split(rng, len(shapes))
  flat = {}
  for key, (path, (k, n)) in zip(keys, sorted(shapes.items())):
    bound = 1.0 / np.sqrt(k)
    a = jax.random.uniform(key, (k, rank), jnp.float32, -bound, bound)
    flat[path] = {"a": a, "b": jnp.zeros((rank, n), jnp.float32)}
  return _nest(flat)


def qlora_adapters(params: dict, config: LoraConfig, rng: jax.Array) -> dict:
  """`random_adapters` for `config.targets` of a (dense or quantized) nested params dict."""
  return random_adapters(target_paths(params, config), config.rank, rng)


def init_lora(
  params: dict,
  quant_config: QuantConfig,
  lora_config: LoraConfig,
  rng: jax.Array,
  *,
  progress: bool = True,
  importance: dict[str, np.ndarray] | None = None,
  covariances: dict[str, np.ndarray] | None = None,
) -> tuple[dict, dict, QuantReport | loftq.LoftQReport]:
  """Quantize `params` and create adapters for `lora_config.targets`.

  Args:
    params: nested dense params (``weights.to_kernel_tree`` / `llama.load_pretrained`).
    quant_config: how the base is quantized (nf, lloyd, lowra; 'none' keeps it dense).
    lora_config: adapter settings; ``init`` picks QLoRA or LoftQ initialisation.
    rng: a jax PRNG key (QLoRA's random A).
    importance: {kernel path: float32 [in]} input second moments, for
      `quant_config.calibration` other than "none" (`calibration.input_moments`).
    covariances: {kernel path: float32 [in, in]} input covariances, for
      `quant_config.rounding="gptq"` (`calibration.input_moments(full=True)`).

  Returns:
    (qparams, lora, report): params with quantized kernels, the adapter tree, and the quantizer's
    report (QLoRA), a `loftq.LoftQReport` (LoftQ) or None (method 'none').
  """
  shapes = target_paths(params, lora_config)
  if quant_config.method == "none":  # the dense (bf16) LoRA reference
    if lora_config.init != "qlora":
      raise ValueError(
        f"LoRA init {lora_config.init!r} needs a quantized base — with quant method 'none' use "
        "init='qlora'."
      )
    return params, qlora_adapters(params, lora_config, rng), None
  if lora_config.init == "qlora":
    qparams, report = quantize_params(
      params, quant_config, progress=progress, importance=importance, covariances=covariances
    )
    return qparams, qlora_adapters(params, lora_config, rng), report
  qparams, factors, report = loftq.loftq(
    params,
    quant_config,
    targets=sorted(shapes),
    rank=lora_config.rank,
    scale=lora_config.scale,
    iters=lora_config.loftq_iters,
    progress=progress,
    importance=importance,
    covariances=covariances,
    weighted=lora_config.loftq_weighting == "inputs",
  )
  return loftq_start(qparams, shapes, factors, lora_config, rng) + (report,)


def loftq_start(
  qparams: dict,
  shapes: dict[tuple[str, ...], tuple[int, int]],
  factors: dict,
  config: LoraConfig,
  rng,
) -> tuple[dict, dict]:
  """(qparams, adapters) at the start of training from LoftQ's `factors` ({module path: (A, B)})
  over its quantized base `qparams`: with init 'loftq' the factors are the adapters
  (`loftq_adapters`); with 'loftq_frozen' they join `qparams` as frozen corrections and the
  adapters are QLoRA's (`random_adapters`)."""
  if config.init == "loftq_frozen":
    corrections = {
      (*p, name): f for p, pair in factors.items() for name, f in zip(CORRECTION, pair)
    }
    return merge_trees(qparams, _nest(corrections)), random_adapters(shapes, config.rank, rng)
  return qparams, loftq_adapters(shapes, factors, config, rng)


def split_corrections(params: dict) -> tuple[dict, dict[tuple[str, ...], tuple]]:
  """(params without them, {module path: (correction_a [in, r], correction_b [r, out])}) of the
  frozen LoftQ corrections in a nested params dict."""
  found = {}

  def visit(node, path):
    out = {}
    for key, value in node.items():
      if isinstance(value, dict):
        out[key] = visit(value, (*path, key))
      elif key not in CORRECTION:
        out[key] = value
    if CORRECTION[0] in node:
      found[path] = tuple(node[name] for name in CORRECTION)
    return out

  return visit(params, ()), found


def loftq_adapters(
  shapes: dict[tuple[str, ...], tuple[int, int]], factors: dict, config: LoraConfig, rng
) -> dict:
  """The adapter tree of LoftQ's `factors` ({module path: (A, B)}); targets in `shapes` without
  factors (kernels the quantizer skipped keep their dense kernel) get QLoRA's random start."""
  rest = {p: s for p, s in shapes.items() if p not in factors}
  lora = _nest({p: {"a": a, "b": b} for p, (a, b) in factors.items()})
  if rest:
    lora = merge_trees(lora, random_adapters(rest, config.rank, rng))
  return lora


def merge_trees(a: dict, b: dict) -> dict:
  """Union of two nested dicts with disjoint leaves."""
  out = dict(a)
  for key, value in b.items():
    out[key] = merge_trees(out[key], value) if key in out else value
  return out


def merge_adapters(qparams: dict, adapters: dict, config: LoraConfig) -> dict:
  """Dense params: every kernel dequantized, W_hat + (alpha / rank) A @ B where it has adapters,
  and + (alpha / rank) correction_a @ correction_b where it has a frozen correction (whose leaves
  are dropped: the result is a plain checkpoint's tree).

  Sums run in float32; every leaf comes back as a jax array in its original dtype (a
  `QuantizedTensor`'s `dtype`).
  """
  qparams, corrections = split_corrections(qparams)
  dense = dequantize_params(qparams, jnp.float32)
  dtypes = jax.tree.map(lambda x: jnp.dtype(x.dtype), qparams, is_leaf=is_quantized)

  def low_rank(a, b):
    return config.scale * (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32))

  def merge(path, w, dtype):
    *module, leaf = (k.key for k in path)
    node = adapters
    for name in module:
      node = node.get(name, {})
    if leaf == "kernel" and "a" in node:
      w = w + low_rank(node["a"], node["b"])
    if leaf == "kernel" and tuple(module) in corrections:
      w = w + low_rank(*corrections[tuple(module)])
    return jnp.asarray(w).astype(dtype)

  return jax.tree_util.tree_map_with_path(merge, dense, dtypes)


def requantize_merged(
  qparams: dict,
  adapters: dict,
  lora_config: LoraConfig,
  quant_config: QuantConfig,
  importance: dict[str, np.ndarray] | None = None,
) -> tuple[dict, QuantReport]:
  """Folds the adapters away: quantizes W_hat + (alpha / rank) A @ B again with `quant_config`
  (for LowRA the same model-wide budget; `importance`: the base's calibration moments), so
  inference needs no adapter matmuls; codes by nearest rounding (GPTQ's would need the input
  covariances again). Lossy: compare its perplexity with the unmerged model's."""
  return quantize_params(
    merge_adapters(qparams, adapters, lora_config),
    dataclasses.replace(quant_config, rounding="nearest", refit=False),
    progress=False,
    importance=importance,
  )
