"""Orbax restores whose reads settle before their event loop closes.

Orbax runs each restore on a fresh event loop and closes it as soon as the restore raises. When
one array of a damaged checkpoint fails to read, TensorStore is still reading the others; each
read, finishing, calls the closed loop from a TensorStore thread, and Python prints a
`RuntimeError: Event loop is closed` traceback for it (39-71 of them above a command's one error
line, measured on a tiny run). No library option chooses those loops but asyncio's event loop
policy, so `settled_reads()` sets one for the duration of a restore.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading

SETTLE_SECONDS = 60.0  # longest wait for reads still in flight when a failed restore ends


class _SettlingLoop(asyncio.SelectorEventLoop):
  """An event loop that lets the tasks begun on it finish before it closes.

  Orbax runs each restore on a fresh loop (asyncio_utils.run_sync) and closes it as soon as the
  restore raises. When one array of a damaged checkpoint fails to read, TensorStore is still
  reading the others; each read, finishing, calls the closed loop from a TensorStore thread, and
  Python prints a `RuntimeError: Event loop is closed` traceback for it: one per array still in
  flight, interleaved, whenever the reads end (above or below the command's error line).
  """

  def __init__(self):
    super().__init__()
    self._begun: set[asyncio.Task] = set()

  def create_task(self, coro, **kwargs):
    task = super().create_task(coro, **kwargs)
    self._begun.add(task)
    task.add_done_callback(self._begun.discard)
    return task

  def close(self) -> None:
    if not self.is_closed() and not self.is_running():
      pending = set(self._begun)
      if pending:
        self.run_until_complete(asyncio.wait(pending, timeout=SETTLE_SECONDS))
      for task in pending:  # their failures repeat the one the restore raised: retrieved here
        if task.done() and not task.cancelled():
          task.exception()
      self.run_until_complete(self.shutdown_default_executor())
    super().close()


class _SettlingPolicy(asyncio.DefaultEventLoopPolicy):
  _loop_factory = _SettlingLoop


_settling = threading.Lock()
_settling_depth = 0
_policy_before: asyncio.AbstractEventLoopPolicy | None = None


@contextlib.contextmanager
def settled_reads():
  """Orbax's restores in this block run on _SettlingLoops: the event loop policy is the one way
  to choose the loops that asyncio_utils.run_sync makes."""
  global _settling_depth, _policy_before
  with _settling:
    if _settling_depth == 0:
      _policy_before = asyncio.get_event_loop_policy()
      asyncio.set_event_loop_policy(_SettlingPolicy())
    _settling_depth += 1
  try:
    yield
  finally:
    with _settling:
      _settling_depth -= 1
      if _settling_depth == 0:
        asyncio.set_event_loop_policy(_policy_before)
        _policy_before = None
