"""Orbax checkpoints of a run: the latest ones (to resume) and the best one (to report).

workdir/checkpoints/latest/<step>/ and workdir/checkpoints/best/<step>/, each holding the
train state and a JSON "meta" item (epoch, position in the epoch, early-stopping state).
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
run killed mid-save resumes from the last complete one; leftover temporaries are removed.

Checkpoints prove themselves: the meta item carries a sha256 digest of the saved state
(meta["state_digest"]). Restoring tries the newest step first; one that cannot be read or whose
state does not match its digest is named in a warning, moved aside to
workdir/checkpoints/damaged/<which>-<step>/ (never deleted) and the next newest is tried. When
none is intact, CheckpointDamagedError names them all. Checkpoints written before digests existed
are accepted as they read. A best checkpoint holds the same state and meta as a latest one, so a
resume whose latest checkpoints are all damaged goes on from the newest intact best one.

Open them with `with Checkpoints(workdir) as checkpoints:`: leaving the block finishes the saves in
flight and joins Orbax's threads, also when an error is on its way up.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import logging
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from jtl.checkpoint_reads import settled_reads
from jtl.errors import UserError

DIGEST_KEY = "state_digest"  # in the meta item; stripped from the meta handed back


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, permissions); earlier ones are intact."""


class CheckpointDamagedError(UserError):
  """No intact checkpoint is left; the message names every damaged one and where it now lies."""


class Restored(NamedTuple):
  """What Checkpoints.load found: the step it read, its state and its meta (and from which
  manager, "latest" or "best")."""
  step: int
  state: Any
  meta: dict[str, Any]
  which: str = "latest"


@dataclasses.dataclass(frozen=True)
class Damaged:
  """A checkpoint set aside: which manager, its step, where it was, why, and where it lies now."""
  which: str
  step: int
  path: str
  reason: str
  moved_to: str | None  # None when it could not be moved (it is then left in place)


class _Unreadable(Exception):
  """A checkpoint's files are damaged (as opposed to a template that does not fit them)."""


class Checkpoints:
  """The two CheckpointManagers of a run; a context manager that closes them on leaving."""

  def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True):
    root = self.root = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._in_flight: int | None = None  # step of the last save begun
    self.damaged: list[Damaged] = []  # every checkpoint this object set aside, oldest first
    self._barriers = itertools.count()
    self.closed = False
    options = dict(create=True, cleanup_tmp_directories=True,
                   enable_async_checkpointing=async_save)
    self.latest = ocp.CheckpointManager(
        os.path.join(root, "latest"), options=ocp.CheckpointManagerOptions(
            max_to_keep=max(keep, 1), **options))
    try:
      # Saved only on improvement, so the newest one kept is the best. Two are kept so that a
      # resume which discards a best saved after its checkpoint (see discard_best_after) still
      # has the one before.
      self.best = ocp.CheckpointManager(
          os.path.join(root, "best"),
          options=ocp.CheckpointManagerOptions(max_to_keep=2, **options))
    except BaseException:
      self.latest.close()  # its threads (the clean-up of temporaries) are running already
      raise

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    # With an error on its way up, a failed save is logged rather than raised over it.
    self.close(raise_errors=exc_type is None)

  def save(self, step: int, state, meta: dict[str, Any], *, best: bool = False) -> None:
    """Saves asynchronously; an error of the previous save (disk full...) surfaces here.

    A best checkpoint is complete before the latest one that names it (meta["best_step"]) is
    begun, so a kill between the two never leaves a resumable checkpoint whose best is missing.
    """
    self.wait()
    args = self._args(state, meta)
    # Any failure here is a failed write: a full disk reaches us from TensorStore as a
    # ValueError ("RESOURCE_EXHAUSTED ... No space left on device"), not as an OSError.
    try:
      if best:
        self._write_best(step, args)
      self._replace(self.latest, step, args)
    except Exception as e:
      raise CheckpointWriteError(self._message(step, e)) from e
    self._in_flight = step

  def save_best(self, step: int, state, meta: dict[str, Any]) -> None:
    """Writes a best checkpoint alone, complete on return (one the checkpoint hook held back;
    it is written before the latest checkpoint that names it)."""
    self.wait()
    try:
      self._write_best(step, self._args(state, meta))
    except Exception as e:
      raise CheckpointWriteError(self._message(step, e)) from e

  def _write_best(self, step: int, args) -> None:
    self._replace(self.best, step, args)
    self.best.wait_until_finished()

  @staticmethod
  def _args(state, meta: dict[str, Any]):
    # A copy: the meta is written in the background while the loop goes on changing its own.
    meta = copy.deepcopy(meta)
    digest = state_digest(state)
    if digest is not None:
      meta[DIGEST_KEY] = digest
    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

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

  def load(self, abstract_state, *, which: str = "latest") -> Restored | None:
    """The newest intact checkpoint of `which` ("latest" or "best"); None when there is none.

    `abstract_state` is the state tree to restore into, or a function meta -> that tree (called
    with each candidate's own meta, so that a state whose layout depends on the epoch, as the
    optimizer state of gradual unfreezing does, is read against the right template). Damaged
    checkpoints on the way are set aside (see the module docstring); afterwards latest_step()
    names the step returned. Raises CheckpointDamagedError when every checkpoint is damaged.
    """
    return self._newest_intact((which,), self._reader(abstract_state))

  def load_resumable(self, abstract_state) -> Restored | None:
    """The newest intact checkpoint to resume from, latest or best; None when there is none.

    As load(), over the steps of both managers newest first, latest before best at the same
    step. A best checkpoint holds what a latest one of its step would, so when the latest ones
    after it are damaged (or never completed: a kill between the two saves) the run goes on
    from it, with a warning: restored.which == "best", latest_step() names an older step or
    None, and the caller drops the best ones after it (discard_best_after) as after any resume.
    CheckpointDamagedError names every checkpoint set aside when none of either kind is intact.
    """
    before = len(self.damaged)
    restored = self._newest_intact(("latest", "best"), self._reader(abstract_state))
    if restored is not None and restored.which == "best":
      newer = [d for d in self.damaged[before:] if d.which == "latest" and d.step > restored.step]
      why = ("the latest " + ", ".join(f"step {d.step}" for d in newer) + " damaged (set aside)"
             if newer else "no latest checkpoint at or after it")
      logging.warning("resuming from the best checkpoint, step %d: %s", restored.step, why)
    return restored

  def _reader(self, abstract_state) -> Callable[[Any, str, int], Restored]:
    def read(manager, which, step):
      meta = self._read_meta(manager, step)
      abstract = abstract_state(meta) if callable(abstract_state) else abstract_state
      return Restored(step, self._read_state(manager, step, abstract, meta), meta, which)
    return read

  def restore(self, abstract_state, *, which: str = "latest") -> tuple[Any, dict] | None:
    """(state, meta) of load(); kept for callers that do not need the step (final evaluation)."""
    restored = self.load(abstract_state, which=which)
    return None if restored is None else (restored.state, restored.meta)

  def latest_meta(self) -> dict | None:
    """The meta of the newest latest checkpoint whose meta item reads; None when there is none.

    Only the meta item is checked (the state needs a template): a restore() after it may still
    find that step's state damaged and go further back. To resume, prefer load_resumable() with
    a function of the meta, which reads meta and state of one step together and returns its step.
    """
    def read(manager, which, step):
      meta = self._read_meta(manager, step)
      meta.pop(DIGEST_KEY, None)
      return meta
    return self._newest_intact(("latest",), read)

  def _newest_intact(self, whiches: Sequence[str], read: Callable[[Any, str, int], Any]):
    """read(manager, which, step) of the newest step of the managers named that it succeeds on
    (the one named first wins a tie), setting aside those it cannot read (_Unreadable); None
    when there are no steps."""
    managers = {which: self._manager(which) for which in whiches}
    candidates = sorted(((step, -rank, which) for rank, which in enumerate(whiches)
                         for step in managers[which].all_steps()), reverse=True)
    before = len(self.damaged)
    try:
      for step, _, which in candidates:
        try:
          return read(managers[which], which, step)
        except _Unreadable as e:
          self._set_aside(which, managers[which], step, str(e))
      self._raise_if_damaged(whiches)
      return None
    finally:
      for manager in managers.values():
        self._forget_set_aside(manager, before)

  def _manager(self, which: str):
    if which not in ("latest", "best"):
      raise ValueError(f"which={which!r}: expected 'latest' or 'best'")
    return self.latest if which == "latest" else self.best

  @staticmethod
  def _read_meta(manager, step: int) -> dict:
    """The meta item of `step` (with its digest); raises _Unreadable when it cannot be read."""
    try:
      with settled_reads():
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # missing files, bad JSON, ...: whatever Orbax raises
      raise _Unreadable(_reason(e)) from e
    if not isinstance(meta, dict):
      raise _Unreadable(f"its meta item is a {type(meta).__name__}, not a JSON object")
    return dict(meta)

  @staticmethod
  def _read_state(manager, step: int, abstract_state, meta: dict):
    """The state of `step`, checked against meta's digest (which is removed from meta)."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
      with settled_reads():
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # TensorStore's OUT_OF_RANGE, DATA_LOSS, a missing item, ...
      # Orbax also refuses a template of another structure or shape: that is the caller's
      # mistake (or another version of the code), not damage, and must not set files aside.
      if _layout_differs(manager, step, abstract):
        raise
      raise _Unreadable(_reason(e)) from e
    saved = meta.pop(DIGEST_KEY, None)
    if saved is None:
      logging.debug("checkpoint step %d of %s has no digest (an older run); not checked", step,
                    manager.directory)
      return state
    read = state_digest(state)
    if read is None:
      logging.debug("state of step %d is sharded across hosts; digest not checked", step)
    elif read != saved:
      if _layout_differs(manager, step, abstract):  # restored into other dtypes on purpose
        logging.debug("step %d restored into other dtypes than saved; digest not checked", step)
      else:
        raise _Unreadable(f"its state does not match the digest saved with it (saved "
                          f"{saved[:15]}..., read {read[:15]}...)")
    return state

  def _set_aside(self, which: str, manager, step: int, reason: str) -> None:
    """Moves a damaged step out of the manager's directory (host 0) and records it."""
    path = os.path.join(str(manager.directory), str(step))
    target = os.path.join(self.root, "damaged", f"{which}-{step}")
    if jax.process_index() == 0:
      moved_to = _move_aside(path, target)
      if moved_to is None:
        reason += "; it could not be moved aside and is left in place"
    else:
      moved_to = f"{target} (moved by host 0)"
    self.damaged.append(Damaged(which, step, path, reason, moved_to))
    logging.warning("checkpoint %s step %d is damaged (%s): %s; %s", which, step, path, reason,
                    f"moved to {moved_to}" if moved_to else "skipped")

  def _forget_set_aside(self, manager, damaged_before: int) -> None:
    # Every host must list the same steps (saves and deletes synchronise on them), and only
    # after host 0 has moved the damaged ones: a barrier, then each host reads the directory.
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"jtl_checkpoints_set_aside_{next(self._barriers)}")
    if len(self.damaged) > damaged_before or jax.process_count() > 1:
      manager.reload()

  def _raise_if_damaged(self, whiches: Sequence[str]) -> None:
    found = [d for d in self.damaged if d.which in whiches]
    if not found:
      return
    kind = lambda d: f"{d.which} " if len(whiches) > 1 else ""
    named = "; ".join(f"{kind(d)}step {d.step} ({d.reason}) "
                      + (f"moved to {d.moved_to}" if d.moved_to else f"left at {d.path}")
                      for d in found)
    raise CheckpointDamagedError(
        f"no intact {' or '.join(whiches)} checkpoint under {self.root}: {named}. Nothing was "
        "deleted; start over in another --workdir, or here with --config.resume=false (which "
        "deletes them)")

  def wait(self) -> None:
    """Blocks until the saves in flight are complete; raises CheckpointWriteError if one failed."""
    try:
      self.latest.wait_until_finished()
      self.best.wait_until_finished()
    except Exception as e:
      raise CheckpointWriteError(self._message(self._in_flight, e)) from e

  def close(self, *, raise_errors: bool = True) -> None:
    """Finishes the saves in flight and releases the managers, joining Orbax's threads; a
    second call does nothing.

    raise_errors=False (while another exception is on its way up): a failed save is logged
    rather than raised over it.
    """
    if self.closed:
      return
    self.closed = True
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


def state_digest(state) -> str | None:
  """"sha256:<hex>" over every leaf's dtype, shape and bytes, in tree-flatten order.

  Computed on the host from a copy of each leaf. None when a leaf is split across hosts (no host
  sees all of it), in which case the checkpoint is saved without a digest.
  """
  leaves = []
  for leaf in jax.tree_util.tree_leaves(state):
    if isinstance(leaf, jax.Array):
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
      if not leaf.is_fully_addressable:
        if not leaf.is_fully_replicated:
          return None
        leaf = leaf.addressable_data(0)
    leaves.append(leaf)
  digest = hashlib.sha256()
  for value in jax.device_get(leaves):
    value = np.ascontiguousarray(value)
    digest.update(f"{value.dtype.name}{value.shape};".encode())
    digest.update(value.reshape(-1).view(np.uint8))
  return "sha256:" + digest.hexdigest()


def _layout_differs(manager, step: int, abstract) -> bool:
  """Whether the tree structure, shapes or dtypes saved at `step` differ from `abstract`'s.

  False when the saved layout cannot be read either: then it is the files that are damaged.
  """
  try:
    with settled_reads():
      saved = manager.item_metadata(step)["state"]
  except Exception:
    return False
  return _layout(getattr(saved, "tree", saved)) != _layout(abstract)


def _layout(tree) -> dict[tuple[str, ...], tuple]:
  # Keys as plain names: Orbax's metadata holds dicts where the state had dataclasses and tuples.
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(leaf, "shape"):
      out[tuple(_key_name(k) for k in path)] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
  return out


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _reason(error: BaseException) -> str:
  """The root cause of a failed read in one line (TensorStore's lies at the end of the chain,
  under a message that dumps the whole spec)."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else ""
  if len(text) > 300:
    text = text[:300] + "..."
  return f"{type(error).__name__}: {text}"


def _move_aside(path: str, target: str) -> str | None:
  """Renames `path` to `target` (or target-2, -3... if taken); None when it cannot."""
  try:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    for n in itertools.count(1):
      candidate = target if n == 1 else f"{target}-{n}"
      if not os.path.exists(candidate):
        os.rename(path, candidate)
        return candidate
  except OSError as e:
    logging.error("cannot move the damaged checkpoint %s aside: %s", path, e)
  return None
