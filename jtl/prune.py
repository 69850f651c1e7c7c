"""Prune a finished run, fine-tune each pruned model briefly, and compare them.

  python -m jtl.prune --workdir runs/x --sparsity 0.5,0.7,0.9 [--method magnitude|channels]
      [--steps N] [--scope global|per_layer] [--schedule one_shot|polynomial]

magnitude: the smallest |w| of every conv / dense kernel but the head's (one global threshold,
or --scope per_layer) set to zero and held there by the optimizer through the fine-tune
(jtl.pruning.magnitude); --schedule polynomial prunes gradually instead (Zhu & Gupta 2017).
channels: that fraction of the channels inside every block removed (jtl.pruning.channels):
a smaller dense model, for the resnet, vgg and efficientnet families.

Each sparsity is an ordinary engine run in runs/x/prune/<method>-<sparsity>/ (metrics,
checkpoints, export/, loadable by `jtl.predict --workdir`), starting from the run's exported
weights with every layer training for --steps optimizer steps (0: evaluated as pruned). Then
runs/x/prune/summary.csv, summary.md and pruning.png: the unpruned run and every pruned run
there, of either method (parameters, FLOPs, export size plain and gzipped, latency at batch 1
and 32, test accuracy and macro F1). Every mistake in the arguments is one `error:` line, exit
status 2, before any work.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jtl import cli_errors  # noqa: E402
from jtl import export  # noqa: E402
from jtl.errors import UserError  # noqa: E402
from jtl.pruning import channels, magnitude, runs, summary  # noqa: E402
from jtl.run_record import RunRecord  # noqa: E402

REQUIRED_FILES = ("config.json", "final_metrics.json", os.path.join(export.EXPORT_DIR, "model.json"),
                  os.path.join(export.EXPORT_DIR, "model.safetensors"))
DEFAULT_STEPS = 100


class PruneArgumentError(UserError, ValueError):
  """A --sparsity, --steps or option combination that cannot work."""


def parse_sparsities(text: str) -> tuple[float, ...]:
  values = []
  for part in filter(None, (p.strip() for p in text.split(","))):
    try:
      value = float(part)
    except ValueError:
      raise PruneArgumentError(f"--sparsity {text!r}: {part!r} is not a number") from None
    if not 0.0 <= value < 1.0:
      raise PruneArgumentError(f"--sparsity {part}: each sparsity must be in [0, 1) (the "
                               "fraction of weights or channels removed)")
    values.append(value)
  if not values:
    raise PruneArgumentError(f"--sparsity {text!r}: no values (e.g. --sparsity 0.5,0.7,0.9)")
  return tuple(dict.fromkeys(values))


def check_finished_run(workdir: str) -> None:
  missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(workdir, f))]
  if missing:
    raise export.NoFinishedRunError(
        f"--workdir {workdir}: no finished jtl run there (missing {', '.join(missing)})")


def check_request(args):
  """(Request, the run's config) with every check that needs no weights or data done."""
  check_finished_run(args.workdir)
  sparsities = parse_sparsities(args.sparsity)
  if args.steps < 0:
    raise PruneArgumentError(f"--steps {args.steps}: must be >= 0 (0: no fine-tune)")
  if args.schedule == "polynomial" and (args.method != "magnitude" or args.steps == 0):
    raise PruneArgumentError("--schedule polynomial prunes during the fine-tune: it needs "
                             "--method magnitude and --steps > 0")
  record = RunRecord.read(os.path.join(args.workdir, export.EXPORT_DIR, "model.json"))
  if args.method == "channels":
    channels.check_supported(record.model)
  with open(os.path.join(args.workdir, "config.json")) as f:
    base = runs.config_from_saved(json.load(f))
  folder = runs.dataset_path(base)
  if folder is not None and not os.path.isdir(folder):
    raise PruneArgumentError(f"{args.workdir}/config.json: the run's dataset folder {folder} "
                             "does not exist here (run from the directory it was trained in)")
  request = runs.Request(args.workdir, args.method, sparsities, args.steps, args.scope,
                         args.schedule, args.rank, args.lr, args.latency_repeats)
  exported = os.path.join(args.workdir, export.EXPORT_DIR, "model.safetensors")
  for sparsity in sparsities:  # every fine-tune config checked before the first one runs
    runs.finetune_config(base, request, sparsity, exported)
  return request, base


def prune_run(request, base) -> list[dict]:
  """Every sparsity of `request`, then the summaries; returns the summary rows."""
  model = export.load_exported(request.workdir)
  os.makedirs(request.prune_dir, exist_ok=True)
  for index, sparsity in enumerate(request.sparsities, 1):
    logging.info("[%d/%d] %s at sparsity %g", index, len(request.sparsities), request.method,
                 sparsity)
    runs.run_one(request, base, model, sparsity)
  return summary.write_all(request.prune_dir, runs.unpruned_row(request))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jtl prune", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a finished run (runs/x)")
  parser.add_argument("--sparsity", required=True, help="comma-separated, each in [0, 1)")
  parser.add_argument("--method", default="magnitude", choices=("magnitude", "channels"))
  parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                      help="fine-tune optimizer steps per sparsity, rounded up to whole epochs "
                      f"(0: evaluate as pruned; default {DEFAULT_STEPS})")
  parser.add_argument("--scope", default="global", choices=magnitude.SCOPES,
                      help="magnitude: one threshold over all kernels, or each layer its own")
  parser.add_argument("--schedule", default="one_shot", choices=magnitude.SCHEDULES,
                      help="magnitude: prune at once, or gradually over the fine-tune")
  parser.add_argument("--rank", default="bn_scale", choices=channels.RANKINGS,
                      help="channels: rank by |BatchNorm scale| or by kernel L2 norm")
  parser.add_argument("--lr", type=float, default=None,
                      help="fine-tune peak learning rate (default: a tenth of the run's)")
  parser.add_argument("--latency-repeats", type=int, default=5,
                      help="timed forward passes per latency figure (median)")
  parser.add_argument("--debug", action="store_true", help="tracebacks instead of one line")
  return parser


class _QuietOrbax(logging.Filter):
  """Orbax logs every checkpoint operation at INFO; keep its warnings and errors only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger().setLevel(logging.INFO)  # absl may have installed its handler first
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietOrbax())
  with cli_errors.reported_errors(args.debug or cli_errors.debug_requested()):
    request, base = check_request(args)
    try:
      rows = prune_run(request, base)
    except runs.Preempted as e:
      print(f"stopped: {e}", file=sys.stderr)
      return 1
  print(summary.markdown_table(rows), end="")
  print(f"wrote {os.path.join(request.prune_dir, 'summary.csv')}, summary.md, pruning.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
