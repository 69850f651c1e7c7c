"""Orbax checkpoints of a run: the latest ones (to resume) and the best one (to report).

workdir/checkpoints/latest/<step>/ and workdir/checkpoints/best/<step>/, each holding the
train state and a JSON "meta" item (epoch, position in the epoch, early-stopping state).
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
run killed mid-save resumes from the last complete one; leftover temporaries are removed.
"""
from __future__ import annotations

import copy
import logging
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
    self._in_flight: int | None = None  # step of the last save begun
    options = dict(create=True, cleanup_tmp_directories=True,
                   enable_async_checkpointing=async_save)
    self.latest = ocp.CheckpointManager(
        os.path.join(root, "latest"), options=ocp.CheckpointManagerOptions(
            max_to_keep=max(keep, 1), **options))
    # Saved only on improvement, so the newest one kept is the best. Two are kept so that a
    # resume which discards a best saved after its checkpoint (see discard_best_after) still
    # has the one before.
    self.best = ocp.CheckpointManager(
        os.path.join(root, "best"), options=ocp.CheckpointManagerOptions(max_to_keep=2, **options))

  def save(self, step: int, state, meta: dict[str, Any], *, best: bool = False) -> None:
    """Saves asynchronously; an error of the previous save (disk full...) surfaces here.

    A best checkpoint is complete before the latest one that names it (meta["best_step"]) is
    begun, so a kill between the two never leaves a resumable checkpoint whose best is missing.
    """
    self.wait()
    # A copy: the meta is written in the background while the loop goes on changing its own.
    meta = copy.deepcopy(meta)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    # Any failure here is a failed write: a full disk reaches us from TensorStore as a
    # ValueError ("RESOURCE_EXHAUSTED ... No space left on device"), not as an OSError.
    try:
      if best:
        self._replace(self.best, step, args)
        self.best.wait_until_finished()
      self._replace(self.latest, step, args)
    except Exception as e:
      raise CheckpointWriteError(self._message(step, e)) from e
    self._in_flight = step

  @staticmethod
  def _replace(manager, step: int, args) -> None:
    # A step saved twice: stopped by SIGTERM on the last step of an epoch, the run saved that
    # step before its evaluation; resumed, it saves it again with the evaluation done.
    if step in manager.all_steps():
      manager.delete(step)
    manager.save(step, args=args, force=True)

  def discard_best_after(self, step: int) -> None:
    """On resume from `step`: drops best checkpoints of a future the resumed run will redo."""
    for later in [s for s in self.best.all_steps() if s > step]:
      self.best.delete(later)

  def _message(self, step, error) -> str:
    return (f"cannot write the checkpoint of step {step} under {self.root}: {error}. The last "
            f"complete checkpoint (step {self._last_complete()}) is intact.")

  def _last_complete(self) -> int | None:
    # From the directory, not the manager: its step list may already name the failed save.
    try:
      steps = [int(n) for n in os.listdir(os.path.join(self.root, "latest")) if n.isdigit()]
    except OSError:
      return None
    return max(steps, default=None)

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
    """Blocks until the saves in flight are complete; raises CheckpointWriteError if one failed."""
    try:
      self.latest.wait_until_finished()
      self.best.wait_until_finished()
    except Exception as e:
      raise CheckpointWriteError(self._message(self._in_flight, e)) from e

  def close(self, *, raise_errors: bool = True) -> None:
    """Finishes the saves in flight and releases the managers.

    raise_errors=False (while another exception is on its way up): a failed save is logged
    rather than raised over it.
    """
    try:
      self.wait()
    except CheckpointWriteError as e:
      if raise_errors:
        raise
      logging.error("%s", e)
    finally:
      for manager in (self.latest, self.best):
        try:
          manager.close()
        except Exception as e:  # the same failure again; already reported above
          logging.debug("closing %s: %s", manager.directory, e)
