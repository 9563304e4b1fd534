"""Quantization settings (`QuantConfig`) and the one error type the quantizer raises."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

METHODS = ("nf", "lloyd", "lowra", "none")
PACKABLE_BITS = (1, 2, 3, 4)
# `lowra` precisions without the paper's 4-bit channels (the LowRA configs' up to 2 bits): their
# table lookup dominates a real checkpoint's decode (7B shape, batch 1: LowRA 2 at 1.45x bf16's
# tokens/s against 0.78x with {1, 2, 4}, LowRA 1.5 at 1.27x against 1.05x); fine-tuned, pycode-17m
# is within 0.02 ppl at 1.15-2 bits and stories260K 0.6 % higher at 2 bits (docs/results.md
# "Channel precisions {1, 2}").
DECODE_PRECISIONS = (1, 2)
PAPER_PRECISIONS = (1, 2, 4)
# Above 2 bits the LowRA configs leave the 1-bit channels out: {2, 4} with "fisher" calibration
# fine-tunes lower than the paper's {1, 2, 4} with "kernel" (pycode-17m, the sweep's protocol:
# -0.026 ppl at 2.5 bits over 3 seeds, -0.027 at 3 bits), with fewer total bits; with 1-bit
# channels beside 4-bit ones, fisher makes the base worse (docs/results.md "Output-gradient
# (Fisher) weighting").
WIDE_PRECISIONS = (2, 4)


def recommended_precisions(budget: float) -> tuple[int, ...]:
  """`lowra` channel precisions for `budget` code bits (the LowRA configs'): `DECODE_PRECISIONS`
  up to their largest, else `WIDE_PRECISIONS`."""
  return DECODE_PRECISIONS if budget <= max(DECODE_PRECISIONS) else WIDE_PRECISIONS


# Refitted levels (`QuantConfig.refit`) lower the fine-tuned perplexity below 2 code bits and raise
# it from 2 bits up (pycode-17m, the sweep's protocol: -0.074 at 1.5 bits over 3 seeds, -0.068 at
# 1.15; +0.052 at 2 bits, +0.025 at 2.5; stories260K +0.035 at 2 bits; docs/results.md "Refitted
# levels").
REFIT_BELOW = 2.0


def recommended_refit(budget: float) -> bool:
  """Whether the LowRA configs refit the levels to GPTQ's codes at `budget` code bits."""
  return budget < REFIT_BELOW


# GPTQ's error feedback (`QuantConfig.rounding="gptq"`) lowers the fine-tuned perplexity up to 3
# code bits and raises it at 4, where every channel has 4 bits (pycode-17m, the sweep's protocol:
# -0.05 at 2.5 bits, -0.009 at 3; +0.028 at 4 bits against nearest rounding with the same
# calibration and LoftQ fit; docs/results.md "Calibration: fine-tuned A/B").
GPTQ_BELOW = 4.0


def recommended_rounding(budget: float) -> str:
  """The LowRA configs' `QuantConfig.rounding` at `budget` code bits."""
  return "gptq" if budget < GPTQ_BELOW else "nearest"


# Output-gradient weighting (`QuantConfig.calibration="fisher"`) lowers the fine-tuned perplexity
# wherever the recommended precisions give it a choice: below 2 code bits ({1, 2}; pycode-17m, the
# sweep's protocol: -0.08 at 1.5 bits and -0.10 at 1.15 over 3 seeds each) and between 2 and 4
# ({2, 4}: above). At exactly 2 bits every channel gets 2 bits and from 4 bits every channel 4:
# fisher would change nothing there and cost a backward pass of calibration.
def recommended_calibration(budget: float) -> str:
  """The LowRA configs' `QuantConfig.calibration` at `budget` code bits."""
  low, high = max(DECODE_PRECISIONS), max(WIDE_PRECISIONS)
  return "fisher" if budget < low or low < budget < high else "kernel"


Method = Literal["nf", "lloyd", "lowra", "none"]
Weighting = Literal["absmax2", "absmax", "none"]
Calibration = Literal["none", "kernel", "model", "fisher"]
CALIBRATIONS = ("none", "kernel", "model", "fisher")
Rounding = Literal["nearest", "gptq"]
ROUNDINGS = ("nearest", "gptq")
Solver = Literal["auto", "greedy", "milp"]
BucketSizes = Literal["tensor", "shape", "role"]
BUCKET_SIZES = ("tensor", "shape", "role")


class QuantizationError(ValueError):
  """Bad input to the quantizer; the message says what is wrong and how to fix it."""


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How to quantize the selected 2-D kernels of a params pytree.

  Methods:
    nf:    QLoRA's NormalFloat codebook at `bits` (shared by all channels), absmax scaling per group.
    lloyd: per-output-channel weighted Lloyd-Max levels at a fixed `bits`.
    lowra: per-channel Lloyd-Max levels at each precision in `precisions`, then per-channel
           precision chosen model-wide so that the average *code* bits per parameter <= `budget`.
    none:  nothing is quantized (the bf16 LoRA reference); `quantize_params` refuses it.
  """

  method: Method = "lowra"
  bits: int = 2
  """Fixed precision for `nf` and `lloyd` (1..4)."""
  layer_bits: tuple[tuple[str, int], ...] = ()
  """`nf` / `lloyd`: (regex, bits) pairs; a kernel whose '/'-joined path matches a pattern (the
  first that does) gets that precision instead of `bits` -- LoftQ's mixed precision, e.g.
  ((r"layers/[0-3]/", 4),) keeps the first four decoder layers at 4 bits."""
  budget: float = 1.5
  """`lowra`: average code bits per parameter over all quantized layers, in [1, 4]."""
  precisions: tuple[int, ...] = PAPER_PRECISIONS
  """`lowra`: precisions a channel may take (the paper's; `recommended_precisions(budget)` is
  what the configs use: without 4-bit channels up to 2 bits, which decodes faster)."""
  group_size: int = 64
  """Input elements sharing one absmax scale. K not divisible by it is zero-padded (stored, counted)."""
  double_quant: bool = True
  """Quantize the group scales to int8 (blocks of `dq_block` channels, fp32 block scale), as QLoRA."""
  dq_block: int = 256
  lloyd_iters: int = 30
  """Lloyd-Max iterations (fixed, so results are deterministic and jit-friendly)."""
  weighting: Weighting = "absmax2"
  """Lloyd-Max sample weights: `absmax2` minimises the error in weight space (absmax(group)^2)."""
  calibration: Calibration = "none"
  """`lowra` / `lloyd`: `none` minimises the error of the weights. The others weigh the error of
  input row k of a kernel by its input's second moment h_k = E[x_k^2] on calibration data
  (`calibration.input_moments`, handed to the quantizer per kernel path) in the Lloyd-Max fit and
  in the per-channel errors the budget solver compares: omega_kn = scale^2 * h_k with
  `weighting="absmax2"` (other weightings are multiplied by h_k too).
  `kernel`: h divided by its mean over the kernel's rows, so rows are weighted by their relative
  input energy while kernels are compared in weight-space units, as with `none`.
  `model`: h as measured, so the solver compares the layers' expected squared *output* errors
  (for uncorrelated inputs) across the model.
  `fisher`: as `model`, and each output channel n's errors also multiplied by g_n = E[(dL/dy_n)^2],
  the squared gradient of the calibration data's next-token loss with respect to that
  projection's output (`calibration.output_gradients`, handed over as importance[
  `output_key(path)`]): the solver then compares the diagonal second-order estimate of the loss
  increase, sum_kn h_k g_n dW_kn^2, across channels and layers. Computing g takes a forward and
  a backward through the dense model, streamed one decoder layer at a time as the moments are."""
  rounding: Rounding = "nearest"
  """How codes are chosen once the tables, scales and precisions are fixed. `nearest`: each weight's
  nearest level. `gptq`: row by row (inputs of largest second moment first), each row's rounding
  error fed back into the rows not yet rounded through the inverse input covariance
  (H + gptq_damp mean(diag H) I)^-1 (GPTQ's update, Frantar et al. 2023), which minimises the
  layer's output error E||x (W - W_hat)||^2 rather than each weight's. Needs `calibration` other
  than `none` (the fit is weighed by h as usual) and each kernel's whole input covariance H =
  E[x x^T]
  (the quantizer's `covariances`: `calibration.input_moments(full=True)`, or computed one
  decoder layer at a time as the kernels are encoded, `calibration.LayerCovariances`)."""
  gptq_damp: float = 0.1
  """With `rounding="gptq"`: the multiple of H's mean diagonal added to its diagonal. GPTQ's own
  0.01 fits the calibration blocks more closely and fine-tunes worse: 0.1 gave pycode-17m -0.045 /
  -0.014 / -0.008 ppl at 1.5 / 2 / 2.5 bits (docs/results.md, "GPTQ's damping")."""
  gptq_sequential: bool = False
  """With `rounding="gptq"`: each decoder layer's input covariances come from calibration blocks
  that went through the layers before it as quantized (with LoftQ: the base plus its scaled
  factors), as GPTQ's paper runs them, so each layer's rounding answers the errors upstream;
  False: through the dense model. Needs covariances that follow the quantizer
  (`calibration.LayerCovariances(sequential=True)`, which `base.prepare` makes): two forwards of
  each layer per quantizer pass, none kept across LoftQ rounds. On pycode-17m it fine-tunes the
  same as the dense order at 2 and 2.5 bits (docs/results.md "GPTQ's sequential order")."""
  refit: bool = False
  """With `rounding="gptq"`: once the codes are chosen, refit each channel's levels to them by
  least squares through the input covariance H (levels L minimising (w - Z L)^T H (w - Z L),
  Z[k, j] = scale_k [code_k = j]): the levels move to where the rounded codes need them. Costs
  2^bits matmuls [K, K] x [K, N] per tensor."""
  lut_clusters: int = 0
  """0: one lookup table per output channel. C > 0: each precision bucket of a tensor shares C
  tables (k-means over the channels' tables, then a pooled Lloyd-Max refit) plus a uint8 index per
  channel -- fewer total bits when in_features is small."""
  solver: Solver = "auto"
  """Budget solver: `milp` (exact, scipy/HiGHS), `greedy` (convex-hull, optimal up to one channel),
  `auto` = milp up to `milp_max_channels` channels, else greedy."""
  milp_max_channels: int = 2_000
  bucket_multiple: int = 64
  """`lowra`: each tensor's channel count at each precision is rounded to a multiple of this
  (`precision.align_counts`: fewer than this many channels per precision move one step, least error
  first, within the budget), so that every precision bucket fills whole 64-channel blocks of the
  decode kernels (no masked loads) and equal-shape tensors share more compiled kernels: a
  LLaMA-7B-shaped model quantized layer by layer decodes 1.12x faster and compiles 2.6x faster
  than with 16 (docs/results.md). Tensors with fewer than 64 x this many output channels use the
  largest halving of it (not below 16) they hold 64 of (`precision.count_multiple`), or are left
  as solved. 1 turns it off."""
  bucket_sizes: BucketSizes = "shape"
  """`lowra`: "tensor" rounds each tensor's solved channel counts on its own (`bucket_multiple`);
  "shape" gives every tensor of one [K, N] shape the same channel count at each precision (the
  mean of their solved counts, rounded to the multiple; `precision.shared_counts`), each tensor
  then choosing which of its channels take each precision (`precision.assign_counts`), so that
  equal-shape tensors pack into identical leaf shapes and share every compiled kernel. "role"
  shares them among the tensors of one shape and one role: paths equal but for their numeric
  components (every layer's q_proj apart from every layer's o_proj), a few more layouts.
  "shape" is the default: against "tensor" (the paper's model-wide solve, which starves the early
  layers) it fine-tunes pycode-17m at 1.5 bits to 6.334 +- 0.017 ppl instead of 6.452 +- 0.024,
  and no worse at 1.15 and 2.5 bits; a 7B-shaped model compiles 3 packed layouts instead of 12
  (docs/results.md, "Bucket sizes per weight shape")."""
  skip_patterns: tuple[str, ...] = ("embed", "lm_head", "norm")
  """Regexes on the '/'-joined parameter path; matching leaves are never quantized."""

  def __post_init__(self):
    validate(self)

  @property
  def candidate_bits(self) -> tuple[int, ...]:
    """Precisions a channel may be given under this config."""
    if self.method == "lowra":
      return tuple(sorted(self.precisions))
    return tuple(sorted({self.bits, *(b for _, b in self.layer_bits)}))

  def bits_for(self, path: str) -> int:
    """`nf` / `lloyd`: the fixed precision of the kernel at `path` (see `layer_bits`)."""
    return next((b for p, b in self.layer_bits if re.search(p, path)), self.bits)


def validate(cfg: QuantConfig) -> None:
  """Raises `QuantizationError` naming the bad field and the fix."""
  if cfg.method not in METHODS:
    raise QuantizationError(f"unknown quantization method {cfg.method!r} — use one of {METHODS}.")
  if cfg.method == "lowra":
    bad = [b for b in cfg.precisions if b not in PACKABLE_BITS]
    if not cfg.precisions or bad:
      raise QuantizationError(
        f"precisions={cfg.precisions} — use a non-empty subset of {PACKABLE_BITS}."
      )
    if not 1.0 <= cfg.budget <= 4.0:
      raise QuantizationError(
        f"budget={cfg.budget} is outside [1, 4] — give the average code bits per parameter, "
        "e.g. budget=1.5."
      )
    if cfg.budget < min(cfg.precisions):
      raise QuantizationError(
        f"budget={cfg.budget} is infeasible with precisions={cfg.precisions}: every channel needs "
        f"at least {min(cfg.precisions)} bits — raise the budget or allow lower precisions."
      )
    if cfg.budget > max(cfg.precisions):
      raise QuantizationError(
        f"budget={cfg.budget} is unreachable with precisions={cfg.precisions}: no channel takes "
        f"more than {max(cfg.precisions)} bits — lower the budget or allow higher precisions, "
        "e.g. precisions=(1, 2, 4)."
      )
  elif cfg.bits not in PACKABLE_BITS:
    raise QuantizationError(f"bits={cfg.bits} is not supported — use one of {PACKABLE_BITS}.")
  if cfg.layer_bits and cfg.method not in ("nf", "lloyd"):
    raise QuantizationError(
      f"layer_bits applies to methods 'nf' and 'lloyd', not {cfg.method!r} — remove it "
      "(lowra chooses precisions itself from `budget`)."
    )
  for entry in cfg.layer_bits:
    if len(entry) != 2 or entry[1] not in PACKABLE_BITS:
      raise QuantizationError(
        f"layer_bits entry {entry!r} is not a (regex, bits) pair — give bits in {PACKABLE_BITS}."
      )
    try:
      re.compile(entry[0])
    except re.error as e:
      raise QuantizationError(
        f"layer_bits pattern {entry[0]!r} is not a regex ({e}) — fix the pattern."
      ) from None
  if cfg.group_size <= 0 or cfg.group_size % 8:
    raise QuantizationError(f"group_size={cfg.group_size} — use a positive multiple of 8, e.g. 64.")
  if cfg.dq_block <= 0:
    raise QuantizationError(f"dq_block={cfg.dq_block} — use a positive block size, e.g. 256.")
  if cfg.lloyd_iters < 0:
    raise QuantizationError(f"lloyd_iters={cfg.lloyd_iters} — use >= 0 iterations.")
  if cfg.weighting not in ("absmax2", "absmax", "none"):
    raise QuantizationError(
      f"unknown weighting {cfg.weighting!r} — use 'absmax2', 'absmax' or 'none'."
    )
  if cfg.calibration not in CALIBRATIONS:
    raise QuantizationError(
      f"unknown calibration {cfg.calibration!r} — use one of {CALIBRATIONS}."
    )
  if cfg.calibration != "none" and cfg.method not in ("lowra", "lloyd"):  # nf: no fit
    raise QuantizationError(
      f"calibration={cfg.calibration!r} weights a Lloyd-Max fit, which method {cfg.method!r} "
      "does not have — use method 'lowra' or 'lloyd', or calibration='none'."
    )
  if cfg.rounding not in ROUNDINGS:
    raise QuantizationError(f"unknown rounding {cfg.rounding!r} — use one of {ROUNDINGS}.")
  if cfg.rounding == "gptq" and cfg.calibration == "none":
    raise QuantizationError(
      "rounding='gptq' feeds errors back through the input covariances of calibration data — set "
      "calibration='kernel' (or 'model'), or rounding='nearest'."
    )
  if not (math.isfinite(cfg.gptq_damp) and cfg.gptq_damp > 0):
    raise QuantizationError(
      f"gptq_damp={cfg.gptq_damp} — use a positive multiple of H's mean diagonal (default 0.1)."
    )
  if cfg.gptq_sequential and cfg.rounding != "gptq":
    raise QuantizationError(
      "gptq_sequential=True orders GPTQ's covariances through the quantized layers — use it with "
      "rounding='gptq', or set gptq_sequential=False."
    )
  if cfg.refit and (cfg.rounding != "gptq" or cfg.method == "nf" or cfg.lut_clusters):
    raise QuantizationError(
      "refit=True refits per-channel tables through the covariances GPTQ rounding reads — use it "
      "with rounding='gptq', method 'lowra' or 'lloyd' and lut_clusters=0, or set refit=False."
    )
  if cfg.solver not in ("auto", "greedy", "milp"):
    raise QuantizationError(f"unknown solver {cfg.solver!r} — use 'auto', 'greedy' or 'milp'.")
  if cfg.bucket_multiple < 1:
    raise QuantizationError(
      f"bucket_multiple={cfg.bucket_multiple} — use >= 1 (1 leaves bucket sizes as solved)."
    )
  if cfg.bucket_sizes not in BUCKET_SIZES:
    raise QuantizationError(
      f"unknown bucket_sizes {cfg.bucket_sizes!r} — use one of {BUCKET_SIZES}."
    )
  if not 0 <= cfg.lut_clusters <= 256:
    raise QuantizationError(
      f"lut_clusters={cfg.lut_clusters} — use a value in [0, 256] (0: one table per channel)."
    )
