"""Orbax checkpoints of a run: the latest ones (to resume) and the best one (to report).

workdir/checkpoints/latest/<step>/ and workdir/checkpoints/best/<step>/, each holding the
train state and a JSON "meta" item (epoch, position in the epoch, early-stopping state).
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
run killed mid-save resumes from the last complete one; leftover temporaries are removed.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, permissions); earlier ones are intact."""


class Checkpoints:
  """The two CheckpointManagers of a run."""

  def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True):
    root = self.root = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = dict(create=True, cleanup_tmp_directories=True,
                   enable_async_checkpointing=async_save)
    self.latest = ocp.CheckpointManager(
        os.path.join(root, "latest"), options=ocp.CheckpointManagerOptions(
            max_to_keep=max(keep, 1), **options))
    # Saved only on improvement, so the newest one kept is the best.
    self.best = ocp.CheckpointManager(
        os.path.join(root, "best"), options=ocp.CheckpointManagerOptions(max_to_keep=1, **options))

  def save(self, step: int, state, meta: dict[str, Any], *, best: bool = False) -> None:
    """Saves asynchronously; an error of the previous save (disk full...) surfaces here."""
    try:
      self.latest.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
      if best:
        self.best.wait_until_finished()
        self.best.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    except OSError as e:
      raise CheckpointWriteError(self._message(step, e)) from e

  def _message(self, step, error) -> str:
    return (f"cannot write the checkpoint of step {step} under {self.root}: {error}. The last "
            f"complete checkpoint (step {self.latest.latest_step()}) is intact.")

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def restore(self, abstract_state, *, which: str = "latest") -> tuple[Any, dict] | None:
    """(state, meta) of the newest checkpoint of `which`, or None when there is none."""
    manager = self.latest if which == "latest" else self.best
    step = manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def latest_meta(self) -> dict | None:
    step = self.latest.latest_step()
    if step is None:
      return None
    return dict(self.latest.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"])

  def wait(self) -> None:
    try:
      self.latest.wait_until_finished()
      self.best.wait_until_finished()
    except OSError as e:
      raise CheckpointWriteError(self._message("(in flight)", e)) from e

  def close(self) -> None:
    self.latest.close()
    self.best.close()
