"""jtl models [PATTERN]: every registered model (or those matching PATTERN, e.g. 'resnet*') with
its parameter count, input size, default weights, their licence ("-": not recorded) and stages."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="jtl models", description="Every registered model (or those matching PATTERN) with "
      "its parameter count, input size, default weights, their licence and stages.")
  parser.add_argument("pattern", nargs="?", default="*",
                      help="a shell-style pattern over the names (default: every model)")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  from jtl.models import catalog  # jax and every model family: once the arguments are read
  for row in catalog.describe(args.pattern):
    stages = row["stages"]
    shown = " ".join(stages) if len(stages) <= 8 else " ".join(stages[:3] + ["..."] + stages[-3:])
    print(f"{row['name']:28s} {row['params']:>13,d}  {row['input']:4d}px  "
          f"{row['default_weights']:45s} {row['license'] or '-':13s} {shown}")
  return 0
