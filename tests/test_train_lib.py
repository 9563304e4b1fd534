"""Tests for lowra_jax.train_lib: the loss, the schedule, the adapter-only AdamW step.

Oracles: float64 numpy log-softmax for the loss, the schedule's closed form, a full-batch step for
gradient accumulation, and the real stories260K model for "the loss falls".
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import assert_trees_close_at_scale, f32_sum, llama_grad_terms

from lowra_jax import lora as lora_lib
from lowra_jax import train_lib
from lowra_jax.models import llama
from lowra_jax.quantize import QuantConfig

STORIES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "models" / "stories260K"


@pytest.fixture(scope="module")
def setup():
  if not STORIES.exists():
    pytest.skip("../shared/data not present (stories260K missing)")
  base, params = llama.load_pretrained(STORIES / "stories260K.bin", dtype=jnp.float32)
  lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0)
  qparams, adapters, _ = lora_lib.init_lora(
    params, QuantConfig(method="nf", bits=2), lcfg, jax.random.key(0), progress=False
  )
  frozen, quant = lora_lib.split_quantized(qparams)
  model = llama.Llama(base.config, dtype=jnp.float32, lora=lcfg)
  tokens = np.random.default_rng(0).integers(3, 512, size=(4, 33)).astype(np.int32)
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
  return model, {"params": frozen, "quant": quant}, adapters, batch


def test_next_token_loss_matches_float64():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 5, 11)) * 3
  targets = rng.integers(0, 11, (2, 5))
  mask = rng.integers(0, 2, (2, 5))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  out = train_lib.next_token_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
  np.testing.assert_allclose(out, nll.mean(), rtol=1e-5)
  masked = train_lib.next_token_loss(
    jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(mask)
  )
  np.testing.assert_allclose(masked, (nll * mask).sum() / mask.sum(), rtol=1e-5)


def test_schedule_closed_form():
  cfg = train_lib.OptimConfig(learning_rate=1e-3, warmup_steps=10, total_steps=110)
  lr = train_lib.learning_rate_schedule(cfg)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
  mid = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 0.5))
  np.testing.assert_allclose(float(lr(60)), mid, rtol=1e-5)
  np.testing.assert_allclose(float(lr(110)), 1e-4, rtol=1e-5)
  const = train_lib.learning_rate_schedule(
    train_lib.OptimConfig(learning_rate=1e-3, warmup_steps=10, schedule="constant")
  )
  np.testing.assert_allclose([float(const(5)), float(const(500))], [5e-4, 1e-3], rtol=1e-6)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"schedule": "linear"}, "schedule=.linear. — use one of"),
    ({"learning_rate": 0.0}, "learning_rate > 0"),
    ({"warmup_steps": 5000}, r"warmup_steps=5000 is outside \[0, total_steps=1000\]"),
    ({"accumulation": 0}, "accumulation >= 1"),
    ({"warmup_steps": 5, "total_steps": 5}, "leaves the cosine schedule no steps to decay"),
  ],
)
def test_optim_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    train_lib.OptimConfig(**kwargs)


def test_all_warmup_is_valid_with_a_constant_schedule():
  cfg = train_lib.OptimConfig(warmup_steps=5, total_steps=5, schedule="constant")
  assert float(train_lib.learning_rate_schedule(cfg)(5)) == pytest.approx(cfg.learning_rate)


def test_training_lowers_the_loss_and_touches_only_adapters(setup):
  model, frozen, adapters, batch = setup
  tx = train_lib.make_optimizer(
    train_lib.OptimConfig(learning_rate=1e-2, warmup_steps=2, total_steps=40)
  )
  state = train_lib.TrainState.create(adapters, tx)
  n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
  # Adam's two moments cover exactly the adapters (plus scalar counters): the base is never seen.
  assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * n_adapter
  step = train_lib.make_train_step(model, tx)
  losses = []
  for _ in range(40):
    state, metrics = step(state, frozen, batch, jax.random.key(0))
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 40
  assert losses[-1] < 0.7 * losses[0]
  eval_step = train_lib.make_eval_step(model)
  total, count = eval_step(frozen, state.adapters, batch)
  assert int(count) == batch["targets"].size
  assert float(total / count) < losses[0]


def test_accumulation_equals_one_full_batch_step(setup):
  model, frozen, adapters, batch = setup
  adapters = jax.tree.map(lambda x: x + 0.01, adapters)
  key = jax.random.key(0)
  full_tx = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=1e-2, warmup_steps=0))
  full = train_lib.TrainState.create(adapters, full_tx)
  full, _ = train_lib.make_train_step(model, full_tx)(full, frozen, batch, key)
  acc_tx = train_lib.make_optimizer(
    train_lib.OptimConfig(learning_rate=1e-2, warmup_steps=0, accumulation=2)
  )
  acc = train_lib.TrainState.create(adapters, acc_tx)
  step = train_lib.make_train_step(model, acc_tx)
  for half in (slice(0, 2), slice(2, 4)):
    acc, _ = step(acc, frozen, {k: v[half] for k, v in batch.items()}, key)
  # One Adam step on the mean gradient of two halves vs on the full batch's: the moments agree
  # to the gradient's float32 error. The update lr * m_hat / (sqrt(v_hat) + eps) = lr * sign(g)
  # of a first step flips where g ~ 0, so it is compared weighted by sqrt(nu): 2 lr dg at most.
  bound = f32_sum(llama_grad_terms(model.config, *batch["inputs"].shape, model.lora.rank))
  inner, ref = acc.opt_state.inner_opt_state[1][0], full.opt_state[1][0]
  assert int(inner.count) == int(ref.count) == 1
  assert_trees_close_at_scale(inner.mu, ref.mu, bound)
  assert_trees_close_at_scale(inner.nu, ref.nu, 2 * bound)  # squared gradients

  def weighted_update(s):
    return jax.tree.map(lambda a, b, v: (a - b) * jnp.sqrt(v), s.adapters, adapters, ref.nu)

  assert_trees_close_at_scale(weighted_update(acc), weighted_update(full), 2 * bound)
  assert not all(
    bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(full.adapters), jax.tree.leaves(adapters))
  )


def test_resumed_metrics_keep_one_record_per_step_and_eval():
  records = [
    {"step": 0, "eval_loss": 3.0},
    {"step": 10, "loss": 2.5},
    {"step": 10, "eval_loss": 2.4},
    {"step": 20, "loss": 2.2},
  ]
  assert train_lib.kept_records(records, 0) == []  # step 0's eval is measured again
  assert train_lib.kept_records(records, 10) == records[:3]  # the loop restarts at step 11
  assert train_lib.kept_records(records, 20) == records
