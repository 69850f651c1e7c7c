"""python -m jtl.main --config configs/partial_ft.py --workdir runs/x [--config.key=value ...]

The documented way to train from a checkout: the same command as `jtl train`
(jtl/commands/train.py).
"""
import sys

from jtl.commands import train

if __name__ == "__main__":
  sys.exit(train.main())
