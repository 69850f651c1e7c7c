"""How every jtl command reports a user's mistake: one `error:` line naming the key or file,
exit status 2, no traceback (--debug or JTL_DEBUG=1 shows it)."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback

from jtl.errors import UserError


def debug_requested(argv=()) -> bool:
  return "--debug" in argv or os.environ.get("JTL_DEBUG", "") not in ("", "0")


def _users_mistakes() -> tuple[type[BaseException], ...]:
  """The errors that blame the input: UserError, the weights/registry code's ValueError and
  OSError, and a non-finite loss. The last only once jtl.loop is loaded: a process that never
  loaded the loop cannot raise it, and importing the loop here would load jax before a command
  has even read its arguments (`jtl train --help`, a typo in a config key)."""
  loop = sys.modules.get("jtl.loop")
  return (UserError, ValueError, OSError) + ((loop.NonFiniteLossError,) if loop else ())


def _exit_quietly(status: int) -> None:
  # After an error, background threads (asynchronous checkpointing, TensorStore, tf.data) make
  # the interpreter's shutdown print screens of noise over the one line the user needs; the
  # run's files are all closed by now, so leave at once, with the streams flushed.
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


@contextlib.contextmanager
def reported_errors(debug: bool, *, quiet_exit: bool = False):
  """A user's mistake (_users_mistakes) becomes one line on stderr and exit status 2; anything
  else keeps its traceback and exits 1."""
  try:
    yield
  except Exception as e:
    if not isinstance(e, _users_mistakes()):
      if not quiet_exit:
        raise
      traceback.print_exc()
      _exit_quietly(1)
    if debug:
      raise
    message = " ".join(str(e).split("\n")[:1]) if not isinstance(e, UserError) else str(e)
    print(f"error: {message}", file=sys.stderr)
    if quiet_exit:
      _exit_quietly(2)
    raise SystemExit(2) from None
