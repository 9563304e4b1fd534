"""Tests for lowra_jax.checkpoint: periodic atomic Orbax checkpoints and exact resume."""

import shutil

import chex
import jax
import pytest
from tiny_model import tiny_model

from lowra_jax import train_lib
from lowra_jax.checkpoint import TrainCheckpoints


@pytest.fixture(scope="module")
def setup():
  model, _, _, frozen, adapters, batch = tiny_model()
  tx = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=1e-2, warmup_steps=1))
  return train_lib.make_train_step(model, tx), tx, frozen, adapters, batch


def run(step, state, frozen, batch, n, ckpt=None):
  for i in range(n):
    state, _ = step(state, frozen, batch, jax.random.key(0))
    if ckpt is not None:
      ckpt.save(state, data_position=100 + int(state.step))
  return state


def test_resume_reproduces_the_uninterrupted_run(setup, tmp_path):
  step, tx, frozen, adapters, batch = setup
  straight = run(step, train_lib.TrainState.create(adapters, tx), frozen, batch, 6)

  ckpt = TrainCheckpoints(tmp_path / "ckpt", every=2, keep=2)
  run(step, train_lib.TrainState.create(adapters, tx), frozen, batch, 5, ckpt)
  assert ckpt.latest_step == 4
  assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir()) == [2, 4]
  ckpt.close()

  again = TrainCheckpoints(tmp_path / "ckpt", every=2, keep=2)
  state, position = again.restore(train_lib.TrainState.create(adapters, tx))
  assert int(state.step) == 4 and position == 104
  resumed = run(step, state, frozen, batch, 2)
  # Bit for bit: the restored state is the saved one and the step the same program.
  chex.assert_trees_all_equal(jax.device_get(resumed), jax.device_get(straight))


def test_unfinished_checkpoint_is_ignored(setup, tmp_path):
  step, tx, frozen, adapters, batch = setup
  ckpt = TrainCheckpoints(tmp_path / "ckpt", every=1, keep=3)
  run(step, train_lib.TrainState.create(adapters, tx), frozen, batch, 1, ckpt)
  ckpt.close()
  # What a kill during step 2's write leaves behind: Orbax's temporary directory, never renamed.
  shutil.copytree(tmp_path / "ckpt" / "1", tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-1")
  again = TrainCheckpoints(tmp_path / "ckpt", every=1, keep=3)
  assert again.latest_step == 1
  state, position = again.restore(train_lib.TrainState.create(adapters, tx))
  assert int(state.step) == 1 and position == 101


def test_errors(setup, tmp_path):
  _, tx, _, adapters, _ = setup
  with pytest.raises(ValueError, match="every/keep must be >= 1"):
    TrainCheckpoints(tmp_path / "x", every=0, keep=1)
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    TrainCheckpoints(tmp_path / "empty", every=1, keep=1).restore(
      train_lib.TrainState.create(adapters, tx)
    )
