"""python -m jtl.lr_find --config configs/partial_ft.py --workdir runs/lrf [--config.KEY=VALUE ...]

The learning-rate range test alone (jtl.lr_find): writes lr_find.png and lr_find.json into the
workdir and prints the suggested learning rate. The flags are jtl.main's; config.lr_find sets
the sweep. A mistake prints one `error:` line naming the key or file and exits with status 2.
"""
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # as in jtl.main

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jtl import cli_errors  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for lr_find.json and lr_find.png.")
flags.DEFINE_bool("debug", False, "Show the traceback of a configuration or data error instead "
                  "of one line.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  debug = flags.FLAGS.debug or cli_errors.debug_requested()
  with cli_errors.reported_errors(debug, quiet_exit=True):
    from jtl import train
    workdir = flags.FLAGS.workdir
    result = train.lr_range_test(flags.FLAGS.config, workdir)
    print(f"suggested learning rate: {result['suggested_lr']:.4g} ({result['method']}; "
          f"sweep stopped by {result['stop_reason']}); curve in "
          f"{os.path.join(workdir, 'lr_find.png')}", flush=True)


def run(argv=None) -> int:
  """The console script `jtl-lr-find` (and `jtl lr-find`)."""
  app.run(main, argv=argv if argv is not None else sys.argv)
  return 0


if __name__ == "__main__":
  app.run(main)
