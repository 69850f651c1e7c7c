"""jtl train --config configs/partial_ft.py --workdir runs/x [--config.KEY=VALUE ...]

Trains and evaluates the run a config file describes (jtl.train.train_and_evaluate), resuming
from the workdir's checkpoints. A mistake in the config, the data or a checkpoint prints one
`error:` line naming the key or file and exits with status 2 (--debug or JTL_DEBUG=1: the
traceback).
"""
from __future__ import annotations

import sys
from typing import Sequence

from jtl import cli_errors
from jtl.commands import config_args, logs


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  with cli_errors.reported_errors(cli_errors.debug_requested(argv)):
    args = config_args.parse(
        argv, prog="jtl train", description=__doc__.split("\n\n")[1].replace("\n", " "),
        workdir_help="directory for checkpoints, metrics and pictures")
  logs.to_stderr(absl_format=True)
  with cli_errors.reported_errors(args.debug or cli_errors.debug_requested(), quiet_exit=True):
    from jtl import train
    train.train_and_evaluate(args.config, args.workdir)
  return 0
