"""jtl report --workdir runs/x: rewrites report.md and most_confused.csv of a finished run from
its final_metrics.json (jtl.report_md; top_losses.png needs the run's own predictions: it is
linked when present, not redrawn)."""
from __future__ import annotations

import argparse
from typing import Sequence

from jtl import cli_errors


def main(argv: Sequence[str] | None = None) -> int:
  """Returns 0; a user's mistake exits with status 2 after one `error:` line, as predict does."""
  parser = argparse.ArgumentParser(prog="jtl report", description="Rewrite report.md and "
                                   "most_confused.csv of a finished run's workdir.")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--debug", action="store_true", help="show tracebacks")
  args = parser.parse_args(argv)
  with cli_errors.reported_errors(args.debug or cli_errors.debug_requested()):
    from jtl import report_md
    print(report_md.regenerate(args.workdir))
  return 0
