"""python -m jtl.main --config configs/partial_ft.py --workdir runs/x [--config.key=value ...]

A mistake in the config, the data or a checkpoint prints one `error:` line naming the key or
file and exits with status 2 (--debug or JTL_DEBUG=1: the traceback).
"""
import logging
import os
import sys

# TensorFlow (the input pipeline) must never take the accelerator from JAX, and its C++
# logging is noise here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jtl import cli_errors  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
flags.DEFINE_bool("debug", False, "Show the traceback of a configuration, data or checkpoint "
                  "error instead of one line.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.Filter):
  """Orbax logs every checkpoint operation at INFO; keep its warnings and errors only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  debug = flags.FLAGS.debug or cli_errors.debug_requested()
  with cli_errors.reported_errors(debug, quiet_exit=True):
    from jtl import train
    train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


def run(argv=None) -> int:
  """The console script `jtl-train` (and `jtl train`)."""
  app.run(main, argv=argv if argv is not None else sys.argv)
  return 0


if __name__ == "__main__":
  app.run(main)
