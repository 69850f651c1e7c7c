"""One run per workdir: a lock file, workdir/.jtl.lock, naming the run that holds it.

Two runs on one workdir would both write metrics.jsonl and delete each other's checkpoints, so a
run takes the lock before it touches anything and a second run is refused with one line naming
the holder. The file is created atomically (a complete temporary file hard-linked into place, or
O_CREAT|O_EXCL where links are not supported), so exactly one of several racing runs gets it.

A holder killed by SIGKILL leaves the file behind: when the holder ran on this host and its
process is gone (or its pid now belongs to another process), the lock is stale and is taken over
with a warning. A holder on another host cannot be checked from here: force=True
(--config.force_unlock=true) takes the lock regardless.

Multi-host: host 0 takes the lock; the other hosts check, after a barrier, that the lock names
their run (the run_id every host of one run shares) and hold nothing themselves.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from typing import Callable

from jtl.errors import UserError

try:
  import fcntl
except ImportError:  # not on Linux or macOS: takeovers go unguarded
  fcntl = None

LOCK_NAME = ".jtl.lock"


class WorkdirBusyError(UserError):
  """The workdir is held by another run; the message names it and how to take it over."""


@dataclasses.dataclass(frozen=True)
class LockHolder:
  """The contents of a lock file: who holds the workdir."""
  host: str
  pid: int
  started: str                   # local time, "2026-12-01 12:00:00"
  run_id: str                    # shared by all hosts of one run
  token: str                     # this acquisition alone: release removes only its own lock
  pid_start: int | None = None   # the process's start time in clock ticks since boot (Linux)

  @classmethod
  def read(cls, path: str) -> "LockHolder | None":
    """The holder named in `path`; None when there is no such file. Raises ValueError when the
    file cannot be parsed."""
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except FileNotFoundError:
      return None
    try:
      d = json.loads(text)
      return cls(host=str(d["host"]), pid=int(d["pid"]), started=str(d["started"]),
                 run_id=str(d["run_id"]), token=str(d["token"]),
                 pid_start=None if d.get("pid_start") is None else int(d["pid_start"]))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{type(e).__name__}: {e}") from None

  def describe(self) -> str:
    return f"pid {self.pid} on host {self.host} since {self.started}"


class WorkdirLock:
  """Holds `workdir` for one run, as a context manager (or acquire()/verify_shared()/release()).

  process_index/process_count/run_id: on a multi-host run host 0 takes the lock and every other
  host verifies that it names `run_id`; `barrier` (called by every host between the two, e.g.
  jtl.distributed.sync) makes the others look only after host 0 is done.
  """

  def __init__(self, workdir: str, *, run_id: str | None = None, process_index: int = 0,
               process_count: int = 1, force: bool = False,
               barrier: Callable[[], None] | None = None, verify_timeout_s: float = 60.0):
    if process_count > 1 and not run_id:
      raise ValueError("a multi-host WorkdirLock needs the run_id that all its hosts share")
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.run_id = run_id or uuid.uuid4().hex
    self.process_index = process_index
    self.force = force
    self._barrier = barrier
    self._verify_timeout_s = verify_timeout_s
    self._held: LockHolder | None = None

  @property
  def held(self) -> bool:
    """Whether this process holds the lock (host 0 between acquire and release)."""
    return self._held is not None

  def __enter__(self) -> "WorkdirLock":
    refused = None
    if self.process_index == 0:
      try:
        self.acquire()
      except WorkdirBusyError as e:
        refused = e  # raised after the barrier, which the other hosts would wait at forever
    if self._barrier is not None:
      self._barrier()
    if refused is not None:
      raise refused
    if self.process_index != 0:
      self.verify_shared()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    """Takes the lock (host 0); raises WorkdirBusyError when another live run holds it."""
    me = self._new_holder()
    os.makedirs(self.workdir, exist_ok=True)
    temp = f"{self.path}.{me.token}.tmp"
    with open(temp, "w", encoding="utf-8") as f:
      json.dump(dataclasses.asdict(me), f)
    try:
      # A few rounds: a holder may vanish (released) or be replaced between two looks.
      for _ in range(20):
        if _create_from(temp, self.path):
          self._held = me
          return
        try:
          holder = LockHolder.read(self.path)
        except ValueError as e:
          self._take_unreadable(str(e))
          continue
        if holder is None:
          continue
        why = self._takeover_reason(holder)
        if why is None:
          raise WorkdirBusyError(self._busy_message(holder))
        if self._replace_if_unchanged(temp, holder):
          logging.warning("%s: taking over the lock %s of %s", why, self.path, holder.describe())
          self._held = me
          return
      raise WorkdirBusyError(f"workdir {self.workdir}: the lock {self.path} kept changing hands "
                             "while this run tried to take it; another run is starting there")
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.remove(temp)

  def verify_shared(self) -> None:
    """On hosts other than 0: waits until the lock names this run, which host 0 holds."""
    deadline = time.monotonic() + self._verify_timeout_s
    while True:
      try:
        holder = LockHolder.read(self.path)
      except ValueError:
        holder = None  # being replaced by host 0; look again
      if holder is not None and holder.run_id == self.run_id:
        return
      if time.monotonic() >= deadline:
        break
      time.sleep(0.1)
    if holder is not None:
      raise WorkdirBusyError(self._busy_message(holder))
    raise RuntimeError(f"workdir {self.workdir}: host 0 of run {self.run_id} took no lock "
                       f"({self.path} absent after {self._verify_timeout_s:.0f} s)")

  def release(self) -> None:
    """Removes the lock file if it is still ours (a forced takeover may have replaced it)."""
    mine, self._held = self._held, None
    if mine is None:
      return
    with _guard(self.workdir):
      try:
        holder = LockHolder.read(self.path)
      except ValueError:
        holder = None
      if holder is not None and holder.token == mine.token:
        os.remove(self.path)
        return
    if holder is None:
      logging.warning("the lock %s of this run was removed by someone else", self.path)
    else:
      logging.warning("the lock %s now belongs to %s; left in place", self.path,
                      holder.describe())

  # ---------------------------------------------------------------------------------------------

  def _new_holder(self) -> LockHolder:
    return LockHolder(host=socket.gethostname(), pid=os.getpid(),
                      started=time.strftime("%Y-%m-%d %H:%M:%S"), run_id=self.run_id,
                      token=uuid.uuid4().hex, pid_start=_process_start(os.getpid()))

  def _takeover_reason(self, holder: LockHolder) -> str | None:
    """Why the lock of `holder` may be taken ('force_unlock', 'stale lock'), or None."""
    if self.force:
      return "force_unlock"
    if holder.host == socket.gethostname() and not _alive(holder.pid, holder.pid_start):
      return "stale lock (that process is gone)"
    return None

  def _replace_if_unchanged(self, temp: str, holder: LockHolder) -> bool:
    # Under the guard, so that two runs taking over one stale lock cannot both succeed: the
    # second finds the first one's lock in place of the stale one it judged.
    with _guard(self.workdir):
      try:
        current = LockHolder.read(self.path)
      except ValueError:
        return False
      if current is None or current.token != holder.token:
        return False
      os.replace(temp, self.path)
      return True

  def _take_unreadable(self, reason: str) -> None:
    if not self.force:
      raise WorkdirBusyError(
          f"workdir {self.workdir} has a lock file that cannot be read (lock {self.path}: "
          f"{reason}); if no run uses the workdir, rerun with --config.force_unlock=true")
    logging.warning("force_unlock: replacing the unreadable lock %s (%s)", self.path, reason)
    # Removed rather than replaced: the next round creates ours from `temp` as usual.
    with _guard(self.workdir), contextlib.suppress(FileNotFoundError):
      os.remove(self.path)

  def _busy_message(self, holder: LockHolder) -> str:
    return (f"workdir {self.workdir} is in use by {holder.describe()} (lock {self.path}); "
            "if that run is gone from another host, rerun with --config.force_unlock=true")


def _create_from(temp: str, path: str) -> bool:
  """Puts the complete file `temp` at `path` unless `path` exists; True when it did."""
  try:
    os.link(temp, path)
    return True
  except FileExistsError:
    return False
  except OSError:
    pass  # no hard links on this filesystem
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w", encoding="utf-8") as f, open(temp, encoding="utf-8") as src:
    f.write(src.read())
  return True


@contextlib.contextmanager
def _guard(workdir: str):
  """An exclusive flock on the workdir itself, held by the kernel only while we live."""
  fd = None
  if fcntl is not None:
    try:
      fd = os.open(workdir, os.O_RDONLY)
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:  # a filesystem without flock: fall back to the token checks alone
      logging.debug("no flock on %s: %s", workdir, e)
      if fd is not None:
        os.close(fd)
      fd = None
  try:
    yield
  finally:
    if fd is not None:
      os.close(fd)  # closing releases the flock


def _alive(pid: int, pid_start: int | None) -> bool:
  """Whether process `pid` of this host still runs and is the one that wrote the lock."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # it exists, owned by another user
  stat = _proc_stat(pid)
  if stat is None:
    return True
  state, start = stat
  # A zombie has exited (its parent has not reaped it yet). A different start time means the
  # pid was reused, e.g. by a container restart that numbers processes from 1 again.
  return state != "Z" and (pid_start is None or start == pid_start)


def _process_start(pid: int) -> int | None:
  stat = _proc_stat(pid)
  return None if stat is None else stat[1]


def _proc_stat(pid: int) -> tuple[str, int] | None:
  """(state letter, start time in clock ticks) from /proc/<pid>/stat; None without /proc."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      text = f.read()
  except OSError:
    return None
  # The command name (field 2) may hold spaces and parentheses: split after its last ")".
  fields = text.rpartition(")")[2].split()
  try:
    return fields[0], int(fields[19])
  except (IndexError, ValueError):
    return None
