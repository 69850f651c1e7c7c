"""A grid of engine runs (freezing depth x learning rate by default), resumable, then summarised;
the command is `jtl ablate` (jtl/commands/ablate.py).

Every grid point is one `jtl.train.train_and_evaluate` run in its own workdir under the output
directory, named after its grid values (e.g. runs/ablation/freeze_depth=3_optimizer.lr=0.001). A
run whose final_metrics.json exists is not run again, and an interrupted one resumes from its
checkpoints, so running the same grid again finishes it; a workdir that holds a run with another
config is an error, never silently reused (the engine's same-run rule,
jtl.config.same_run_differences: a larger budget, such as more epochs, continues the finished
runs instead). At the end: summary.csv and summary.md (one row per run: the grid values, test
accuracy and macro F1, trainable parameters, training seconds, read from each run's
final_metrics.json) and ablation.png (test accuracy against the first grid key, freeze_depth
when present, one line per combination of the others).

The default grid is freeze_depth at four depths spread over the model's stages (0 = full
fine-tuning ... all but the head = feature extraction) x optimizer.lr = 3e-4, 1e-3, 3e-3.
"""
from __future__ import annotations

import ast
import csv
import itertools
import json
import logging
import os
import traceback
from typing import Any, Callable, Mapping, Sequence

from jtl import config as config_lib
from jtl import config_file

METRICS = ("trainable_params", "step_seconds", "images_per_second", "train_seconds",
           "wall_seconds", "best_val", "test_accuracy", "test_macro_f1")
DEFAULT_LRS = (3e-4, 1e-3, 3e-3)


# ---------------------------------------------------------------------------------------------
# Grid and overrides, as the command line gives them.

def parse_value(config, key: str, text: str) -> Any:
  """`text` as a value of config key `key`, typed like the key's current value."""
  if (problem := config_file.unknown_key(config, key)) is not None:
    raise config_lib.ConfigError(problem)  # with ml_collections' suggestion of a close key
  try:
    current = config_lib.get(config, key)
  except (KeyError, AttributeError):  # an index (trainable[0]): --grid sets whole keys only
    raise config_lib.ConfigError(f"config.{key}: unknown key") from None
  text = text.strip()
  if isinstance(current, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise config_lib.ConfigError(f"config.{key}: {text!r} is not a boolean")
    return text.lower() in ("true", "1")
  try:
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise config_lib.ConfigError(
        f"config.{key}: {text!r} is not of type {type(current).__name__}") from None


def parse_assignment(text: str) -> tuple[str, str]:
  key, sep, value = text.partition("=")
  if not sep or not key.strip():
    raise config_lib.ConfigError(f"{text!r} is not key=value")
  return key.strip(), value


def parse_grid(config, specs: Sequence[str]) -> dict[str, list]:
  """["freeze_depth=0,2,4", "optimizer.lr=1e-3,3e-3"] -> {key: typed values}, in order."""
  grid = {}
  for spec in specs:
    key, values = parse_assignment(spec)
    if key in grid:
      raise config_lib.ConfigError(f"--grid {key} given twice")
    grid[key] = [parse_value(config, key, v) for v in values.split(",") if v.strip()]
    if not grid[key]:
      raise config_lib.ConfigError(f"--grid {key}: no values")
  return grid


def set_value(config, key: str, value: Any) -> None:
  *parents, leaf = key.split(".")
  target = config
  for part in parents:
    target = target[part]
  try:
    target[leaf] = value
  except TypeError as e:  # ml_collections refuses a change of type
    raise config_lib.ConfigError(f"config.{key}={value!r}: {e}") from None


def default_grid(config) -> dict[str, list]:
  """Four freezing depths over the model's stages x three learning rates."""
  from jtl.models import registry
  try:
    entry = registry.get_entry(config.model)
  except ValueError:
    raise config_lib.ConfigError(
        f"config.model={config.model!r} is not in the registry, so its stages are unknown: "
        "give the depths with --grid freeze_depth=...") from None
  deepest = len(entry.build(num_classes=2).stage_names) - 1  # the head always trains
  depths = sorted({round(i * deepest / 3) for i in range(4)})
  return {"freeze_depth": depths, "optimizer.lr": list(DEFAULT_LRS)}


# ---------------------------------------------------------------------------------------------
# Runs.

def run_name(point: Mapping[str, Any]) -> str:
  """The workdir name of one grid point: its values, readable and unique within the grid."""
  return "_".join(f"{k}={v}".replace(os.sep, "-") for k, v in point.items())


def grid_points(grid: Mapping[str, Sequence]) -> list[dict]:
  keys = list(grid)
  return [dict(zip(keys, values)) for values in itertools.product(*grid.values())]


def config_differences(workdir: str, config) -> list[str]:
  """Where the run saved in `workdir` differs from `config`, by the engine's same-run rule."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return config_lib.same_run_differences(json.load(f), config)


def _budget_changed(workdir: str, config) -> bool:
  """A finished point whose budget (num_epochs, ...) changed is the same run, to be continued:
  the engine resumes it and trains on to the new budget."""
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  return bool(config_lib.same_run_differences(saved, config, ignore=config_lib.PRESENTATION))


def _read_final_metrics(workdir: str) -> dict | None:
  path = os.path.join(workdir, "final_metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_grid(base_config, grid: Mapping[str, Sequence], out_dir: str,
             train_fn: Callable | None = None) -> list[dict]:
  """Runs every grid point not finished yet, then writes the summaries; returns their rows.

  Every point's config is built and checked before the first run, so that a bad value fails in
  seconds rather than after hours of earlier runs.
  """
  if train_fn is None:
    from jtl import train
    train_fn = train.train_and_evaluate
  planned = []
  for point in grid_points(grid):
    config = base_config.copy_and_resolve_references()
    for key, value in point.items():
      set_value(config, key, value)
    config_lib.validate(config)
    workdir = os.path.join(out_dir, run_name(point))
    diffs = config_differences(workdir, config)
    if diffs:
      raise config_lib.ConfigError(
          f"{workdir} holds a run with another config: {'; '.join(diffs)}. "
          "Use another --out, or delete that workdir to run it again.")
    planned.append((point, config, workdir))

  os.makedirs(out_dir, exist_ok=True)
  status = {}
  for index, (point, config, workdir) in enumerate(planned, start=1):
    if _read_final_metrics(workdir) is not None and not _budget_changed(workdir, config):
      logging.info("[%d/%d] %s: finished earlier, not run again", index, len(planned), workdir)
      status[workdir] = "done"
      continue
    logging.info("[%d/%d] %s", index, len(planned), workdir)
    try:
      result = train_fn(config, workdir)
    except Exception:  # one failed run does not void the grid; KeyboardInterrupt still stops it
      logging.error("%s failed:\n%s", workdir, traceback.format_exc())
      status[workdir] = "failed"
      continue
    if result.get("preempted"):
      logging.warning("preempted during %s: rerun the same command to resume", workdir)
      status[workdir] = "preempted"
      break
    status[workdir] = "done"

  rows = []
  for point, _, workdir in planned:
    final = _read_final_metrics(workdir)
    row = dict(point)
    row.update({m: (final.get(m) if final else None) for m in METRICS})
    row["status"] = status.get(workdir, "not run") if final is None else "done"
    row["run"] = os.path.basename(workdir)
    rows.append(row)
  write_summary(rows, list(grid), out_dir)
  plot_ablation(rows, list(grid), os.path.join(out_dir, "ablation.png"))
  return rows


# ---------------------------------------------------------------------------------------------
# Summaries.

def write_summary(rows: Sequence[dict], grid_keys: Sequence[str], out_dir: str) -> None:
  """summary.csv (machine-readable) and summary.md (a table to paste into a README)."""
  columns = [*grid_keys, *METRICS, "status", "run"]
  with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: ("" if row[k] is None else row[k]) for k in columns})

  def cell(key, value):
    if value is None:
      return "-"
    if key in ("test_accuracy", "test_macro_f1", "best_val", "step_seconds"):
      return f"{value:.4f}"
    if key in ("train_seconds", "wall_seconds", "images_per_second"):
      return f"{value:.1f}"
    return str(value)

  lines = ["| " + " | ".join(columns[:-1]) + " |", "|" + "---|" * (len(columns) - 1)]
  lines += ["| " + " | ".join(cell(k, row[k]) for k in columns[:-1]) + " |" for row in rows]
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def plot_ablation(rows: Sequence[dict], grid_keys: Sequence[str], path: str) -> None:
  """Test accuracy and training time against freeze_depth (or the first grid key), one line
  per combination of the other grid values."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  x_key = "freeze_depth" if "freeze_depth" in grid_keys else grid_keys[0]
  others = [k for k in grid_keys if k != x_key]
  x_values = list(dict.fromkeys(row[x_key] for row in rows))
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x_values)
  position = {v: (v if numeric else i) for i, v in enumerate(x_values)}
  lines: dict[tuple, list[dict]] = {}
  for row in rows:
    lines.setdefault(tuple(row[k] for k in others), []).append(row)

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for values, line_rows in lines.items():
    done = [r for r in line_rows if r["test_accuracy"] is not None]
    if not done:
      continue
    label = ", ".join(f"{k}={v}" for k, v in zip(others, values)) or None
    xs = [position[r[x_key]] for r in done]
    axes[0].plot(xs, [r["test_accuracy"] for r in done], "-o", label=label)
    axes[1].plot(xs, [r["train_seconds"] for r in done], "-o", label=label)
  for ax, title in zip(axes, ("test accuracy", "training seconds")):
    ax.set_xlabel(x_key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if not numeric or all(isinstance(v, int) for v in x_values):  # depths: no 6.5 ticks
      ax.set_xticks([position[v] for v in x_values], [str(v) for v in x_values])
    if others:
      ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
