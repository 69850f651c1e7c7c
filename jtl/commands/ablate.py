"""A grid of engine runs (freezing depth x learning rate by default), resumable, then summarised.

  jtl ablate --config configs/partial_ft.py --out runs/ablation \\
      --grid freeze_depth=0,3,6,9 --grid optimizer.lr=3e-4,1e-3,3e-3 --set num_epochs=5
  jtl ablate --config configs/partial_ft.py --out runs/depth --grid freeze_depth=9,8,7 --seeds 3

One `jtl.train.train_and_evaluate` run per grid point, in its own workdir under --out (named
after its grid values); rerunning the same command finishes the grid. Then summary.csv,
summary.md and ablation.png in --out (jtl.ablation). Without --grid: freeze_depth at four depths
spread over the model's stages x optimizer.lr = 3e-4, 1e-3, 3e-3. --seeds N runs every point
with seeds 0..N-1 and summarises each point as a mean with its 95% interval over the seeds,
neighbouring points compared seed by seed. A mistake in the config file, a key or a value
prints one `error:` line naming it and exits with status 2, before any run.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from jtl import cli_errors, config_file
from jtl.commands import logs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jtl ablate", description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "partial_ft.py"),
                      metavar="FILE[:ARG]",
                      help="base config file (default: configs/partial_ft.py)")
  parser.add_argument("--out", default="runs/ablation", help="one workdir per run under it")
  parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                      help="a grid axis; repeat for more (default: freeze_depth x optimizer.lr)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="an override for every run, e.g. --set num_epochs=3")
  parser.add_argument("--seeds", type=int, default=None, metavar="N",
                      help="run every grid point with config.seed = 0..N-1; the summary gives "
                           "each point's mean and 95%% interval over them (default: one run "
                           "per point, with the config's seed)")
  parser.add_argument("--debug", action="store_true",
                      help="show the traceback of an error instead of one line (also: env "
                           "JTL_DEBUG=1)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logs.to_stderr(absl_format=False)
  with cli_errors.reported_errors(args.debug or cli_errors.debug_requested()):
    from jtl import ablation  # the config checks; jax and the engine only when a run starts
    config = config_file.load(args.config)
    overridden = []
    for assignment in args.set:
      key, text = ablation.parse_assignment(assignment)
      ablation.set_value(config, key, ablation.parse_value(config, key, text))
      overridden.append(key)
    grid = ablation.parse_grid(config, args.grid) if args.grid else ablation.default_grid(config)
    ablation.with_seeds(grid, args.seeds, overridden=overridden)  # a bad --seeds: at once
    rows = ablation.run_grid(config, grid, args.out, seeds=args.seeds)
  with open(os.path.join(args.out, "summary.md")) as f:
    print(f.read())
  unfinished = [r["run"] for r in rows if r["status"] != "done"]
  if unfinished:
    print(f"not finished: {', '.join(unfinished)}; rerun the same command to retry",
          file=sys.stderr)
    return 1
  return 0
