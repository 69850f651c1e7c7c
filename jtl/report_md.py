"""report.md: one page, readable on GitHub, about a finished run, built from the final_metrics
dict the run writes to final_metrics.json (so the two cannot disagree) and the pictures next
to it (curves.png, confusion_matrix.png, top_losses.png, linked relatively).

  jtl report --workdir runs/x     # rewrite report.md and most_confused.csv (`regenerate`)

from an existing finished workdir (top_losses.png needs the per-example predictions, which only
the run has: it is linked when present, not redrawn).
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

from jtl import error_analysis
from jtl.errors import UserError

REPORT_MD = "report.md"
FINAL_METRICS = "final_metrics.json"
NUM_CONFUSED_SHOWN = 10

# The headline figures in this order; any other "test_*" figure present (EMA, TTA, probe ...) is
# listed after them under its own key, so a new field shows without touching this file.
HEADLINE = {"test_accuracy": "accuracy", "test_top5": "top-5 accuracy",
            "test_balanced_accuracy": "balanced accuracy",
            "test_macro_precision": "macro precision", "test_macro_recall": "macro recall",
            "test_macro_f1": "macro F1", "test_loss": "loss (cross-entropy)"}
# Run facts shown when present, in this order.
FACTS = {"model": "model", "strategy": "strategy", "dataset": "dataset",
         "split": "evaluated on", "num_test_examples": "examples evaluated",
         "steps": "steps trained", "best_step": "best checkpoint (step)",
         "skipped_steps": "skipped steps (non-finite loss)", "train_seconds": "train seconds",
         "wall_seconds": "wall seconds", "step_seconds": "seconds per step",
         "images_per_second": "images per second", "feature_cache": "feature cache",
         "feature_cache_seconds": "feature cache seconds", "best_val": "best validation value",
         "best_val_metric": "early-stopping metric", "exported_weights": "exported weights",
         "tta": "test-time augmentation", "tta_views": "test-time views",
         "suggested_lr": "learning rate found (lr_find)"}
PICTURES = (("Curves", "curves.png", "loss and accuracy per epoch"),
            ("Confusion matrix", "confusion_matrix.png", "confusion matrix"))


class NoFinalMetricsError(UserError, FileNotFoundError):
  """The workdir holds no final_metrics.json (the run has not finished)."""


def run_facts(config) -> dict:
  """The facts of a run that final_metrics does not hold, from its config (a ConfigDict or
  config.json's dict)."""
  return {k: config[k] for k in ("model", "strategy", "dataset") if k in config}


def _cell(value) -> str:
  """Metrics (floats) to 4 decimals; facts are passed as text already."""
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, float):
    return f"{value:.4f}" if math.isfinite(value) else str(value)
  if isinstance(value, int):
    return f"{value:,}"
  return str(value).replace("|", "\\|")


def _table(header: Sequence[str], rows) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
  return lines


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def headline_metrics(final: dict) -> list[tuple[str, str, object]]:
  """(label, key, value) of the figures measured on the evaluated split that final holds."""
  known = [(label, key, final[key]) for key, label in HEADLINE.items() if key in final]
  other = sorted(k for k, v in final.items() if _is_number(v) and k not in HEADLINE
                 and k not in FACTS and (k.startswith("test_") or "_test_" in k))
  return known + [(k.replace("_", " "), k, final[k]) for k in other]


def _facts(final: dict, run: dict) -> list[tuple[str, object]]:
  merged = {**run, **final}
  # As final_metrics.json has them (seconds already rounded there), not as 4-decimal metrics.
  text = lambda v: _cell(v) if isinstance(v, (bool, int)) else str(v)
  rows = [(label, text(merged[key])) for key, label in FACTS.items() if key in merged]
  if "trainable_params" in final and "total_params" in final:
    share = final["trainable_params"] / max(final["total_params"], 1)
    after_run = sum(k in run for k in ("model", "strategy", "dataset"))
    rows.insert(after_run, ("trainable / total parameters",
                                    f"{final['trainable_params']:,} / "
                                    f"{final['total_params']:,} ({share:.1%})"))
  return rows


def _pictures(workdir: str) -> list[str]:
  lines = []
  for title, name, alt in PICTURES:
    if os.path.isfile(os.path.join(workdir, name)):
      lines += [f"## {title}", "", f"![{alt}]({name})", ""]
  return lines


def _confused(final: dict) -> list[str]:
  pairs = error_analysis.most_confused(final["confusion_matrix"], list(final["per_class"]))
  lines = ["## Most confused pairs", ""]
  if not pairs:
    return lines + ["No example was misclassified.", ""]
  shown = pairs[:NUM_CONFUSED_SHOWN]
  lines += [f"Top {len(shown)} of {len(pairs)} (all in "
            f"[{error_analysis.MOST_CONFUSED_CSV}]({error_analysis.MOST_CONFUSED_CSV})).", ""]
  return lines + _table(("true", "predicted", "count"), shown) + [""]


def _top_losses(workdir: str) -> list[str]:
  if not os.path.isfile(os.path.join(workdir, error_analysis.TOP_LOSSES_PNG)):
    return []
  return ["## Highest-loss examples", "",
          f"As the model saw them (the eval crop); caption: true class, predicted class "
          f"(its probability), loss. Files and figures in "
          f"[{error_analysis.TOP_LOSSES_CSV}]({error_analysis.TOP_LOSSES_CSV}).", "",
          f"![highest-loss examples]({error_analysis.TOP_LOSSES_PNG})", ""]


def _rows_with_intervals(final: dict) -> list[tuple]:
  """The headline rows, each figure that has an interval in final (`<key>_ci`) followed by a row
  of it, so that the figure's own row reads as it always has."""
  rows = []
  for label, key, value in headline_metrics(final):
    rows.append((label, value, f"`{key}`"))
    interval = final.get(f"{key}_ci")
    if isinstance(interval, (list, tuple)) and len(interval) == 2:
      rows.append((f"{label}, 95% interval", f"{_cell(interval[0])} .. {_cell(interval[1])}",
                   f"`{key}_ci`"))
  return rows


def _interval_note(final: dict) -> list[str]:
  """How the intervals were made, from final_metrics' own record of it."""
  how = final.get("intervals")
  if not isinstance(how, dict):
    return []
  examples = _cell(final.get("num_test_examples", "?"))
  return ["", f"Intervals: {how.get('confidence', 0.95):.0%}; accuracy: "
          f"{how.get('test_accuracy_ci', '?')} over the {examples} "
          f"examples; macro F1: {how.get('test_macro_f1_ci', '?')} "
          f"({how.get('bootstrap_resamples', '?')} resamples, seed "
          f"{how.get('bootstrap_seed', '?')})."]


def build_report(final: dict, run: dict, workdir: str) -> str:
  """The markdown text; pictures are linked when they exist in workdir."""
  title = " on ".join(str(run[k]) for k in ("model", "dataset") if k in run) or "jtl run"
  lines = [f"# {title}", "", "## Metrics", "",
           f"On the {final.get('split', '?')} split, with the best checkpoint.", ""]
  lines += _table(("metric", "value", "key in final_metrics.json"), _rows_with_intervals(final))
  lines += _interval_note(final)
  lines += ["", "## Run", ""] + _table(("run", ""), _facts(final, run)) + [""]
  lines += ["## Per class", ""]
  lines += _table(("class", "precision", "recall", "F1", "support"),
                  [(name, c["precision"], c["recall"], c["f1"], c["support"])
                   for name, c in final["per_class"].items()]) + [""]
  lines += _pictures(workdir) + _confused(final) + _top_losses(workdir)
  return "\n".join(lines)


def write_report(workdir: str, final: dict, run: dict) -> str:
  """Writes workdir/report.md (atomically); returns its path."""
  path = os.path.join(workdir, REPORT_MD)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(build_report(final, run, workdir))
  os.replace(tmp, path)
  return path


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def regenerate(workdir: str) -> str:
  """most_confused.csv and report.md of a finished workdir, from its final_metrics.json."""
  path = os.path.join(workdir, FINAL_METRICS)
  if not os.path.isfile(path):
    raise NoFinalMetricsError(f"{workdir}: no {FINAL_METRICS} (is it the workdir of a finished "
                              f"jtl run?)")
  final = _read_json(path)
  config_path = os.path.join(workdir, "config.json")
  run = run_facts(_read_json(config_path)) if os.path.isfile(config_path) else {}
  error_analysis.write_most_confused(workdir, final)
  return write_report(workdir, final, run)
