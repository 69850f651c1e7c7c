"""Where a command's log lines go: stderr, INFO and up, without Orbax's line per checkpoint
operation."""
from __future__ import annotations

import faulthandler
import logging


class _QuietOrbax(logging.Filter):
  """Orbax logs every checkpoint operation at INFO; keep its warnings and errors only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def to_stderr(*, absl_format: bool) -> None:
  """absl_format: absl's handler and line format, as absl's app.run set them up for train and
  lr-find (they no longer go through app.run, which parses the global flags); otherwise a
  timestamp, the level and the message."""
  if absl_format:
    from absl import flags
    from absl import logging as absl_logging
    if not flags.FLAGS.is_parsed():
      flags.FLAGS(["jtl"])  # before it, absl's handler prefixes a warning to the first line
    absl_logging.use_absl_handler()
    absl_logging.set_verbosity(absl_logging.INFO)
    faulthandler.enable()  # as app.run does: a crash in native code still shows a stack
  else:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger().setLevel(logging.INFO)  # absl may have installed its handler first
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietOrbax())
