"""python -m jtl COMMAND [ARGS...]: the `jtl` command, from a checkout (jtl/cli.py)."""
import sys

from jtl import cli

sys.exit(cli.main())
