"""jtl lr-find --config configs/partial_ft.py --workdir runs/lrf [--config.KEY=VALUE ...]

The learning-rate range test alone (jtl.lr_find): writes lr_find.png and lr_find.json into the
workdir and prints the suggested learning rate; config.lr_find sets the sweep. A mistake prints
one `error:` line naming the key or file and exits with status 2.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from jtl import cli_errors
from jtl.commands import config_args, logs


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  with cli_errors.reported_errors(cli_errors.debug_requested(argv)):
    args = config_args.parse(
        argv, prog="jtl lr-find", description=__doc__.split("\n\n")[1].replace("\n", " "),
        workdir_help="directory for lr_find.json and lr_find.png")
  logs.to_stderr(absl_format=True)
  with cli_errors.reported_errors(args.debug or cli_errors.debug_requested(), quiet_exit=True):
    from jtl.lr_find import driver
    result = driver.lr_range_test(args.config, args.workdir)
    print(f"suggested learning rate: {result['suggested_lr']:.4g} ({result['method']}; "
          f"sweep stopped by {result['stop_reason']}); curve in "
          f"{os.path.join(args.workdir, 'lr_find.png')}", flush=True)
  return 0
