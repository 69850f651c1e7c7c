"""A grid of engine runs (freezing depth x learning rate by default), resumable, then summarised;
the command is `jtl ablate` (jtl/commands/ablate.py).

Every grid point is one `jtl.train.train_and_evaluate` run in its own workdir under the output
directory, named after its grid values (e.g. runs/ablation/freeze_depth=3_optimizer.lr=0.001). A
run whose final_metrics.json exists is not run again, and an interrupted one resumes from its
checkpoints, so running the same grid again finishes it; a workdir that holds a run with another
config is an error, never silently reused (the engine's same-run rule,
jtl.config.same_run_differences: a larger budget, such as more epochs, continues the finished
runs instead).

With seeds (`--seeds N`) every point runs with config.seed = 0..N-1 (workdirs ..._seed=0,
...), seed 0 of every point first. The seed draws the initialisation, the data order and
augmentation, and the carved validation split and training subset too, so the spread over
seeds is the spread a rerun of the study would show.

At the end, from each run's final_metrics.json (jtl.ablation_summary): summary.csv and
summary.md (one row per run, or with seeds one row per point: means, standard deviations and
95% intervals over the seeds, and the paired comparison of neighbouring points), and
ablation.png (test accuracy and training seconds against freeze_depth, or the first grid key,
one line per combination of the others, with their intervals).

The default grid is freeze_depth at four depths spread over the model's stages (0 = full
fine-tuning ... all but the head = feature extraction) x optimizer.lr = 3e-4, 1e-3, 3e-3.
"""
from __future__ import annotations

import ast
import itertools
import json
import logging
import os
import traceback
from typing import Any, Callable, Mapping, Sequence

from jtl import ablation_summary as summary
from jtl import config as config_lib
from jtl import config_file

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


def with_seeds(grid: Mapping[str, Sequence], seeds: int | None, *,
               overridden: Sequence[str] = ()) -> dict[str, list]:
  """The grid with a last axis seed = 0..seeds-1 (None: the grid as it is). overridden: the
  keys --set gives, none of which may be the seed then."""
  if seeds is None:
    return dict(grid)
  if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
    raise config_lib.ConfigError(f"--seeds {seeds}: must be a positive number of seeds")
  if summary.SEED_KEY in grid:
    raise config_lib.ConfigError(
        "--grid seed=... and --seeds both set config.seed: give --seeds N alone (seeds "
        "0..N-1, aggregated per point) or the seed axis alone (one point per seed)")
  if summary.SEED_KEY in overridden:
    raise config_lib.ConfigError("--set seed=... and --seeds both set config.seed: give one "
                                 "of them")
  return {**grid, summary.SEED_KEY: list(range(seeds))}


def _points_in_run_order(grid: Mapping[str, Sequence], seeded: bool) -> list[dict]:
  """Every point; with seeds, seed 0 of every point first, then seed 1, ...: an interrupted
  study has whole sweeps done, and the first one is a study of its own."""
  if not seeded:
    return grid_points(grid)
  points = grid_points({k: v for k, v in grid.items() if k != summary.SEED_KEY})
  return [{**p, summary.SEED_KEY: s} for s in grid[summary.SEED_KEY] for p in points]


def _check_val_minimum(configs: Sequence) -> None:
  """An explicit config.val_min_per_class larger than a class of the data is refused before the
  first run (config.validate_val_minimum); the default needs no look at the data."""
  counted: dict[str, dict | None] = {}
  for config in configs:
    explicit = config.val_min_per_class != config_lib.DEFAULT_VAL_MIN_PER_CLASS
    if not (explicit and config.val_fraction):
      continue
    if config.dataset not in counted:
      from jtl.data import class_counts  # TensorFlow loads with the data package
      counted[config.dataset] = class_counts.carved_class_counts(config.dataset)
    config_lib.validate_val_minimum(config, counted[config.dataset] or {})


def run_grid(base_config, grid: Mapping[str, Sequence], out_dir: str,
             train_fn: Callable | None = None, *, seeds: int | None = None) -> list[dict]:
  """Runs every grid point not finished yet, then writes the summaries; returns the runs' rows
  (jtl.ablation_summary.run_row). seeds: each point with config.seed = 0..seeds-1, the
  summary aggregating them (None: config.seed as given, one run per point).

  Every point's config is built and checked before the first run, so that a bad value fails in
  seconds rather than after hours of earlier runs.
  """
  if train_fn is None:
    from jtl import train
    train_fn = train.train_and_evaluate
  grid_keys = list(grid)
  grid = with_seeds(grid, seeds)
  planned = []
  for point in _points_in_run_order(grid, seeds is not None):
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
  _check_val_minimum([config for _, config, _ in planned])

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
    rows.append(summary.run_row(point, final,
                                "done" if final is not None else status.get(workdir, "not run"),
                                os.path.basename(workdir)))
  plot_path = os.path.join(out_dir, "ablation.png")
  if seeds is None:
    summary.write_summary(rows, grid_keys, out_dir)
    summary.plot_ablation(
        rows, grid_keys, plot_path,
        accuracy=("test_accuracy", "test_accuracy_wilson_low", "test_accuracy_wilson_high"),
        seconds=("train_seconds", None, None),
        note="one run per point; accuracy with its 95% Wilson interval over the test examples")
  else:
    points = summary.write_seed_summary(rows, grid_keys, out_dir)
    summary.plot_ablation(
        points, grid_keys, plot_path,
        accuracy=("test_accuracy_mean", "test_accuracy_ci_low", "test_accuracy_ci_high"),
        seconds=("train_seconds_mean", "train_seconds_ci_low", "train_seconds_ci_high"),
        note=f"mean over seeds 0..{seeds - 1} with its 95% Student's t interval")
  return rows
