"""Error bounds for float comparisons that must hold on every x86 CPU.

XLA's CPU reductions (dots, sums) associate in an order that depends on the instruction set, the
program and the device count, so a float32 result reproduces another program's only up to
accumulation error, relative to sum |terms|: at worst k * eps32 for k terms (`f32_sum`); along a
chain of reductions (a forward or a backward pass) the lengths add, to first order. Independent
roundings give ~sqrt(k) eps32 (`f32_sum_random`), used for single long sums and where the worst
case is too loose to test anything (a 25k-term forward pass); networks whose layers amplify
rounding (the tiny test model's weights are scaled by 5) get the worst case.

The tests take the reference's scale (max |ref| of the whole array) for sum |terms|, never each
element's own value: an element near zero carries the rounding error of the large terms that
cancelled into it.
"""

from __future__ import annotations

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2^-23


def f32_sum(k: int) -> float:
  """Worst-case difference of two float32 evaluations of sums of k terms, in any orders,
  relative to sum |terms|: 2 (k - 1) 2^-24 each way (Higham), below k * eps32."""
  return k * EPS32


def f32_sum_random(k: int) -> float:
  """`f32_sum` for independent roundings: the 2k roundings of two evaluations stay within
  7 sqrt(2k) 2^-24 of sum |terms| but with probability below 4k exp(-7^2 / 2) < 1e-5 for
  k < 1e5 (Higham and Mary, SIAM J. Sci. Comput. 41, 2019)."""
  return 3.5 * np.sqrt(2 * k) * EPS32


def llama_terms(config, seq_len: int, rank: int = 0) -> int:
  """Terms summed along a LLaMA forward pass, tokens to logits. Per layer: two RMSNorms and the
  q/k/v and gate/up projections (hidden each), scores (head_dim), softmax and attention (seq_len
  each), the o and down projections (heads * head_dim, intermediate) and, with adapters, a
  rank-sized sum in each of these 4 projections; then the final norm and the head (hidden each)."""
  h, d = config.hidden_size, config.head_dim
  attention = d + 2 * seq_len + config.num_heads * d
  layer = 4 * h + attention + config.intermediate_size + 4 * rank
  return config.num_layers * layer + 2 * h


def llama_grad_terms(config, batch: int, seq_len: int, rank: int = 0) -> int:
  """Terms along the gradient of a loss of the logits: the forward pass, the backward pass (as
  long, plus the head's transpose over the vocabulary) and the sum over the batch's tokens."""
  return 2 * llama_terms(config, seq_len, rank) + config.vocab_size + batch * seq_len


def assert_close_at_scale(got, ref, bound: float, err_msg: str = "") -> float:
  """max |got - ref| <= bound * max |ref|. Returns the observed max |got - ref| / max |ref|."""
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape, err_msg)
  scale = float(np.abs(ref).max(initial=0.0))
  diff = float(np.abs(got - ref).max(initial=0.0))
  err = diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf)
  assert err <= bound, f"{err_msg} max|got - ref| = {err:.3g} x scale {scale:.3g} > {bound:.3g}"
  return err


def assert_trees_close_at_scale(got, ref, bound: float) -> float:
  """assert_close_at_scale on every leaf of two pytrees of one structure, each leaf at its own
  max |ref|. Returns the largest observed ratio."""
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(ref)[0])
  got_leaves = jax.tree.structure(ref).flatten_up_to(got)
  return max(
    assert_close_at_scale(g, r, bound, err_msg=jax.tree_util.keystr(p))
    for p, g, r in zip(paths, got_leaves, leaves)
  )
