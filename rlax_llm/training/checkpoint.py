"""Orbax checkpoints of the train state plus a small JSON of run metadata.

Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save leaves no checkpoint that `latest_step`
would pick up; the previous one stays the latest. Such leftovers are removed
by the next `Checkpointer` on the directory (in the background from when it
opens, at the latest by the end of its first save).

Multi-process runs: every process constructs the `Checkpointer` on the same
directory (a shared file system or a bucket) and every process calls `save`
and `restore`. Each process writes the array shards its devices hold; the
JSON metadata and the final rename are done by process 0 after all processes
have finished writing.

Arrays are stored as global arrays with no trace of the mesh that wrote
them: `restore` places them on whatever shardings it is given, so a
checkpoint written on one mesh shape restores onto another (or onto one
device).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (TrainState, metadata) under `directory`.

  Args:
    directory: where step directories are written (created if missing).
    max_to_keep: how many recent checkpoints to keep.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False,
            create=True, cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, None if there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of every complete checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Writes `state` and the JSON-able `meta` as checkpoint `step`.

    In a multi-process run every process must call it with the same step.
    """
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any, shardings: Any):
    """Returns (state placed on `shardings`, meta) of checkpoint `step`.

    Args:
      step: a complete checkpoint's step.
      abstract_state: pytree of ShapeDtypeStructs (or arrays) of the state.
      shardings: matching pytree of shardings, on any mesh.
    """
    self._check_step(step)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, shardings)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return out.state, dict(out.meta)

  def restore_meta(self, step: int) -> dict[str, Any]:
    """The JSON metadata of checkpoint `step`."""
    self._check_step(step)
    out = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return dict(out.meta)

  def _check_step(self, step: int) -> None:
    steps = self.all_steps()
    if step not in steps:
      raise FileNotFoundError(
          f"No complete checkpoint for step {step} under {self.directory!r}; "
          f"the complete ones are {steps}.")

  def close(self) -> None:
    self._manager.close()
