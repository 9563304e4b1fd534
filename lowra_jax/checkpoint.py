"""Training checkpoints through Orbax: adapters + optimizer state + step + data position.

    ckpt = TrainCheckpoints(workdir / "checkpoints", every=100, keep=3)
    ckpt.save(state, data_position=1234)          # a no-op unless state.step is due
    state, data_position = ckpt.restore(template)   # template: TrainState.create(adapters, tx)

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
at any moment leaves only whole checkpoints; `restore` takes the newest one. The frozen base is not
part of these checkpoints (it never changes). Arrays are saved as global arrays and restored onto
the template's shardings, so a checkpoint written on one device count loads on any other.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import optax
import orbax.checkpoint as ocp

from lowra_jax.train_lib import TrainState


class TrainCheckpoints:
  """Periodic, atomic checkpoints of a `TrainState` and the data iterator's position."""

  def __init__(self, directory: str | os.PathLike[str], *, every: int, keep: int):
    if every < 1 or keep < 1:
      raise ValueError(f"checkpoint every/keep must be >= 1, got every={every}, keep={keep}.")
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=every, create=True, enable_async_checkpointing=False
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state: TrainState, data_position: int, *, force: bool = False) -> bool:
    """Saves if `state.step` is a multiple of `every` (or `force`); True when written."""
    step = int(state.step)
    saved = self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"step": step, "data_position": int(data_position)}),
      ),
      force=force,
    )
    self._manager.wait_until_finished()
    return bool(saved)

  def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, int]:
    """(state, data_position) of `step` (default: the newest); `template` gives the structure and
    the shardings to restore onto."""
    step = self.latest_step if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory} to resume from.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
      ),
    )
    return restored["state"], int(restored["meta"]["data_position"])

  def close(self) -> None:
    self._manager.close()


def latest_adapters(
  directory: str | os.PathLike[str], adapters, tx: optax.GradientTransformation, place=None
) -> tuple[object, int] | None:
  """(adapters, step) of the newest checkpoint in `directory`; None when there is none.

  adapters: a tree of the run's structure (its initial adapters); tx: the run's optimizer (its
  state is part of the checkpoint's structure); place: optional tree -> tree putting the template
  on the devices (shardings) to restore onto.
  """
  if not Path(directory).exists():
    return None
  ckpt = TrainCheckpoints(directory, every=1, keep=1)
  try:
    if ckpt.latest_step is None:
      return None
    template = TrainState.create(adapters, tx)
    state, _ = ckpt.restore(place(template) if place else template)
    return state.adapters, int(state.step)
  finally:
    ckpt.close()
