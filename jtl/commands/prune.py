"""Prune a finished run, fine-tune each pruned model briefly, and compare them.

  jtl prune --workdir runs/x --sparsity 0.5,0.7,0.9 [--method magnitude|channels]
      [--steps N] [--scope global|per_layer] [--schedule one_shot|polynomial]

magnitude: the smallest |w| of every conv / dense kernel but the head's (one global threshold,
or --scope per_layer) set to zero and held there by the optimizer through the fine-tune
(jtl.pruning.magnitude); --schedule polynomial prunes gradually instead (Zhu & Gupta 2017).
channels: that fraction of the channels inside every block removed (jtl.pruning.channels):
a smaller dense model, for the resnet, vgg and efficientnet families.

Each sparsity is an ordinary engine run in runs/x/prune/<method>-<sparsity>/ (metrics,
checkpoints, export/, loadable by `jtl predict --workdir`), starting from the run's exported
weights with every layer training for --steps optimizer steps (0: evaluated as pruned). Then
runs/x/prune/summary.csv, summary.md and pruning.png: the unpruned run and every pruned run
there, of either method (parameters, FLOPs, export size plain and gzipped, latency at batch 1
and 32, test accuracy and macro F1). Every mistake in the arguments is one `error:` line, exit
status 2, before any work.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from jtl import cli_errors
from jtl import config as config_lib
from jtl.commands import logs

DEFAULT_STEPS = 100


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jtl prune", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a finished run (runs/x)")
  parser.add_argument("--sparsity", required=True, help="comma-separated, each in [0, 1)")
  parser.add_argument("--method", default="magnitude", choices=("magnitude", "channels"))
  parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                      help="fine-tune optimizer steps per sparsity, rounded up to whole epochs "
                      f"(0: evaluate as pruned; default {DEFAULT_STEPS})")
  # The choices of config.pruning's keys, which these options set for each fine-tune.
  parser.add_argument("--scope", default="global", choices=config_lib.CHOICES["pruning.scope"],
                      help="magnitude: one threshold over all kernels, or each layer its own")
  parser.add_argument("--schedule", default="one_shot",
                      choices=config_lib.CHOICES["pruning.schedule"],
                      help="magnitude: prune at once, or gradually over the fine-tune")
  parser.add_argument("--rank", default="bn_scale",
                      help="channels: rank by |BatchNorm scale| (bn_scale) or by kernel L2 norm "
                           "(kernel_norm)")
  parser.add_argument("--lr", type=float, default=None,
                      help="fine-tune peak learning rate (default: a tenth of the run's)")
  parser.add_argument("--latency-repeats", type=int, default=5,
                      help="timed forward passes per latency figure (median)")
  parser.add_argument("--debug", action="store_true", help="tracebacks instead of one line")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  logs.to_stderr(absl_format=False)
  with cli_errors.reported_errors(args.debug or cli_errors.debug_requested()):
    # jax, TensorFlow and the models: only once the arguments are read.
    from jtl import prune, prune_runs
    from jtl.pruning import channels, summary
    if args.rank not in channels.RANKINGS:
      parser.error(f"argument --rank: invalid choice: {args.rank!r} (choose from "
                   f"{', '.join(channels.RANKINGS)})")
    request, base = prune.check_request(args)
    try:
      rows = prune.prune_run(request, base)
    except prune_runs.Preempted as e:
      print(f"stopped: {e}", file=sys.stderr)
      return 1
  print(summary.markdown_table(rows), end="")
  print(f"wrote {os.path.join(request.prune_dir, 'summary.csv')}, summary.md, pruning.png")
  return 0
