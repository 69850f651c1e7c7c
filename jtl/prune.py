"""Pruning a finished run, as `jtl prune` asks for it (jtl/commands/prune.py): the request
checked before any work, then every sparsity an ordinary engine run in runs/x/prune/ and the
summaries (jtl.pruning does the pruning itself).
"""
from __future__ import annotations

import json
import logging
import os

from jtl import export
from jtl.errors import UserError
from jtl import prune_runs as runs
from jtl.pruning import channels, summary
from jtl.run_record import RunRecord

REQUIRED_FILES = ("config.json", "final_metrics.json", os.path.join(export.EXPORT_DIR, "model.json"),
                  os.path.join(export.EXPORT_DIR, "model.safetensors"))


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
  """(Request, the run's config) with every check that needs no weights or data done; `args`
  holds the command's options (jtl/commands/prune.py)."""
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
