"""The training step: AdamW over the LoRA adapters only, under one `jax.jit`.

    tx = make_optimizer(OptimConfig(learning_rate=2e-4, warmup_steps=20, total_steps=500))
    state = TrainState.create(adapters, tx)
    step = make_train_step(model, tx)
    frozen = {"params": frozen_params, "quant": quant}      # never differentiated
    state, metrics = step(state, frozen, batch, rng)        # batch: inputs/targets int32 [B, T]

The packed base and the dense leftovers enter the step as arguments (not closed-over constants, so
they are not baked into the compiled program), the adapters and optimizer state are donated.
On several devices (`lowra_jax.sharding`), place the arguments first and pass the mesh:

    state = jax.device_put(state, state_sharding := sharding.tree_shardings(state, mesh, cfg))
    frozen = jax.device_put(frozen, sharding.tree_shardings(frozen, mesh, cfg))
    step = make_train_step(model, tx, mesh=mesh, state_sharding=state_sharding)
    state, metrics = step(state, frozen, sharding.put_batch(batch, mesh), rng)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from lowra_jax import data, sharding

SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup, then cosine decay (to `final_fraction` of the peak) or constant.

  accumulation: optimizer updates happen every `accumulation` steps on the mean gradient
  (optax.MultiSteps); `total_steps` counts updates.
  """

  learning_rate: float = 2e-4
  warmup_steps: int = 20
  total_steps: int = 1000
  schedule: str = "cosine"
  final_fraction: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  grad_clip: float = 1.0
  accumulation: int = 1

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule={self.schedule!r} — use one of {SCHEDULES}.")
    if self.learning_rate <= 0 or self.total_steps < 1 or self.accumulation < 1:
      raise ValueError(
        f"learning_rate={self.learning_rate}, total_steps={self.total_steps}, accumulation="
        f"{self.accumulation} — use learning_rate > 0, total_steps >= 1 and accumulation >= 1."
      )
    if not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(
        f"warmup_steps={self.warmup_steps} is outside [0, total_steps={self.total_steps}] — "
        "lower warmup_steps or raise total_steps."
      )
    if self.schedule == "cosine" and self.warmup_steps == self.total_steps:
      raise ValueError(
        f"warmup_steps={self.warmup_steps} = total_steps leaves the cosine schedule no steps to "
        "decay over — lower warmup_steps, raise total_steps or use schedule='constant'."
      )


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
  """Learning rate per optimizer update."""
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0,
      cfg.learning_rate,
      cfg.warmup_steps,
      cfg.total_steps,
      end_value=cfg.final_fraction * cfg.learning_rate,
    )
  warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  return optax.join_schedules(
    [warmup, optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps]
  )


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on the schedule, optionally accumulated."""
  tx = optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip),
    optax.adamw(learning_rate_schedule(cfg), cfg.b1, cfg.b2, weight_decay=cfg.weight_decay),
  )
  if cfg.accumulation > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulation)
  return tx


@flax.struct.dataclass
class TrainState:
  """step: int32 [] micro-steps taken; adapters: the LoRA tree; opt_state: optax state of it."""

  step: jax.Array
  adapters: Any
  opt_state: Any

  @classmethod
  def create(cls, adapters, tx: optax.GradientTransformation) -> TrainState:
    """Step 0; the state owns copies of `adapters` (the train step donates its state)."""
    adapters = jax.tree.map(jnp.copy, adapters)
    return cls(jnp.zeros((), jnp.int32), adapters, tx.init(adapters))


def next_token_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
  """Mean cross-entropy (float32) of logits [B, T, V] against targets int [B, T] over `mask`."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  if mask is None:
    return losses.mean()
  mask = mask.astype(jnp.float32)
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def make_train_step(
  model, tx: optax.GradientTransformation, *, mesh=None, state_sharding: TrainState | None = None
):
  """A jitted (state, frozen variables, batch, rng) -> (state, metrics) step.

  frozen: {"params": ..., "quant": ...} (any collections but "lora"); batch: {"inputs", "targets"}
  int32 [B, T] (optional "mask" [B, T]); rng: a PRNG key for LoRA dropout, folded with the step.
  metrics: loss and gradient global norm (float32 scalars).
  mesh: trace under this device mesh (arguments already placed on it); the new state keeps
  `state_sharding` (a `TrainState` of shardings), the metrics are replicated.
  """

  def loss_fn(adapters, frozen, batch, rng):
    logits = model.apply(
      {**frozen, "lora": adapters},
      batch["inputs"],
      deterministic=False,
      rngs={"dropout": rng},
    )
    return next_token_loss(logits, batch["targets"], batch.get("mask"))

  def step(state: TrainState, frozen, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    loss, grads = jax.value_and_grad(loss_fn)(state.adapters, frozen, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.adapters)
    adapters = optax.apply_updates(state.adapters, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return TrainState(state.step + 1, adapters, opt_state), metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  if state_sharding is None:
    raise ValueError("make_train_step: a mesh needs the state's sharding (state_sharding=...).")
  out = (state_sharding, sharding.replicated(mesh))
  return sharding.with_mesh(jax.jit(step, donate_argnums=0, out_shardings=out), mesh)


def make_eval_step(model, *, mesh=None):
  """A jitted (frozen variables, adapters or None, batch) -> (summed loss, token count) step.

  mesh: trace under this device mesh (arguments already placed on it); results replicated.
  """

  def step(frozen, adapters, batch):
    variables = frozen if adapters is None else {**frozen, "lora": adapters}
    logits = model.apply(variables, batch["inputs"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch.get("mask")
    mask = jnp.ones_like(losses) if mask is None else mask.astype(jnp.float32)
    return (losses * mask).sum(), mask.sum()

  if mesh is None:
    return jax.jit(step)
  return sharding.with_mesh(jax.jit(step, out_shardings=sharding.replicated(mesh)), mesh)


def mean_loss(
  eval_step, variables, adapters, blocks, batch_size: int, mesh=None
) -> tuple[float, int]:
  """(token-weighted mean next-token loss, tokens scored) of `blocks` [n, T + 1], in order.

  eval_step: from `make_eval_step`; variables: frozen collections; adapters: tree or None;
  mesh: the eval step's mesh (batches are split over it, padded with masked rows).
  """
  total = count = 0.0
  for batch in data.eval_batches(blocks, batch_size):
    if mesh is not None:
      batch = sharding.put_batch(batch, mesh, pad=True)
    loss_sum, n = eval_step(variables, adapters, batch)
    total, count = total + float(loss_sum), count + float(n)
  return total / count, int(count)


def kept_records(records: list[dict], start: int) -> list[dict]:
  """The metrics records ({"step": int, ...}) a run resumed at step `start` keeps: those before
  it, and those of step `start` itself unless it is 0 (the step-0 eval is measured again)."""
  return [r for r in records if r["step"] < start or (r["step"] == start and start > 0)]
