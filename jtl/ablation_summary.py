"""What a study's runs add up to: summary.csv, summary.md and ablation.png in its output
directory (and, with seeds, runs.csv and comparisons.csv), from the rows jtl.ablation reads out
of each run's final_metrics.json.

One run per point: one row per run, its figures with the run's own 95% intervals over its test
examples (Wilson for accuracy, bootstrap for macro F1: final_metrics.json's test_accuracy_ci and
test_macro_f1_ci). Several seeds per point (`jtl ablate --seeds N`): one row per point, test
accuracy, macro F1 and training seconds each as mean, sample standard deviation and 95%
Student's t interval over the point's finished seeds (jtl.intervals.seed_summary); the runs'
own rows go to runs.csv; and every two neighbouring values of each grid axis, the other axes
held, are compared over the seeds both finished (the paired t interval of the differences,
comparisons.csv, one line each in summary.md).
"""
from __future__ import annotations

import csv
import os
from typing import Mapping, Sequence

from jtl import intervals

SEED_KEY = "seed"
# Per run, from final_metrics.json.
METRICS = ("trainable_params", "step_seconds", "images_per_second", "train_seconds",
           "wall_seconds", "best_val", "test_accuracy", "test_macro_f1")
# A run's own intervals over its test examples: column prefix -> final_metrics.json key.
RUN_INTERVALS = {"test_accuracy_wilson": "test_accuracy_ci",
                 "test_macro_f1_bootstrap": "test_macro_f1_ci"}
# Per point, over its seeds.
SEED_METRICS = ("test_accuracy", "test_macro_f1", "train_seconds")
SEED_STATISTICS = ("mean", "std", "ci_low", "ci_high")
# Compared between neighbouring points.
COMPARED = ("test_accuracy", "test_macro_f1")
FOUR_DECIMALS = ("test_accuracy", "test_macro_f1", "best_val", "step_seconds")


def run_row(point: Mapping, final: dict | None, status: str, run: str) -> dict:
  """One run's row: its grid values (and seed), METRICS and intervals, status, workdir name."""
  row = dict(point)
  row.update({m: (final.get(m) if final else None) for m in METRICS})
  for column, key in RUN_INTERVALS.items():
    interval = (final or {}).get(key) or (None, None)
    row[f"{column}_low"], row[f"{column}_high"] = interval
  row["status"], row["run"] = status, run
  return row


def run_columns(keys: Sequence[str]) -> list[str]:
  bounds = [f"{c}_{side}" for c in RUN_INTERVALS for side in ("low", "high")]
  return [*keys, *METRICS, *bounds, "status", "run"]


def _key(row: Mapping, keys: Sequence[str]) -> tuple:
  return tuple(row[k] for k in keys)


def point_rows(runs: Sequence[dict], grid_keys: Sequence[str]) -> list[dict]:
  """One row per grid point (grid_keys' values), aggregating its seeds' runs: seeds finished,
  trainable_params, and <metric>_{mean,std,ci_low,ci_high} of SEED_METRICS."""
  groups: dict[tuple, list[dict]] = {}
  for row in runs:
    groups.setdefault(_key(row, grid_keys), []).append(row)
  points = []
  for values, rows in groups.items():
    done = [r for r in rows if r["status"] == "done"]
    point = dict(zip(grid_keys, values))
    point["seeds"] = len(done)
    point["trainable_params"] = next((r["trainable_params"] for r in done), None)
    for metric in SEED_METRICS:
      s = intervals.seed_summary([r[metric] for r in done])
      point.update(zip((f"{metric}_{stat}" for stat in SEED_STATISTICS),
                       (s.mean, s.std, s.low, s.high)))
    point["status"] = "done" if len(done) == len(rows) else f"{len(done)}/{len(rows)} done"
    point["runs"] = " ".join(r["run"] for r in rows)
    points.append(point)
  return points


def point_columns(grid_keys: Sequence[str]) -> list[str]:
  stats = [f"{m}_{s}" for m in SEED_METRICS for s in SEED_STATISTICS]
  return [*grid_keys, "seeds", "trainable_params", *stats, "status", "runs"]


def comparisons(runs: Sequence[dict], grid_keys: Sequence[str]) -> list[dict]:
  """Every two neighbouring values (in grid order) of each axis, the other axes held at each of
  their combinations: the differences second minus first over the seeds both finished, as
  <metric>_diff_{mean,std,ci_low,ci_high} (paired t interval), and whether the accuracy
  difference's interval excludes 0."""
  finished = {(*_key(r, grid_keys), r[SEED_KEY]): r for r in runs if r["status"] == "done"}
  seeds = list(dict.fromkeys(r[SEED_KEY] for r in runs))
  out = []
  for axis in grid_keys:
    others = [k for k in grid_keys if k != axis]
    values = list(dict.fromkeys(r[axis] for r in runs))
    for held in dict.fromkeys(_key(r, others) for r in runs):
      for first, second in zip(values, values[1:]):
        def run_at(value, seed, held=held):
          point = {**dict(zip(others, held)), axis: value}
          return finished.get((*_key(point, grid_keys), seed))
        pairs = [(run_at(first, s), run_at(second, s)) for s in seeds]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        row = {"axis": axis, "held": ", ".join(f"{k}={v}" for k, v in zip(others, held)),
               "first": first, "second": second, "seeds": len(pairs)}
        for metric in COMPARED:
          s = intervals.seed_summary([b[metric] - a[metric] for a, b in pairs
                                      if a[metric] is not None and b[metric] is not None])
          row.update(zip((f"{metric}_diff_{stat}" for stat in SEED_STATISTICS),
                         (s.mean, s.std, s.low, s.high)))
          if metric == "test_accuracy":
            row["accuracy_interval_excludes_0"] = s.excludes_zero
        out.append(row)
  return out


def comparison_columns() -> list[str]:
  diffs = [f"{m}_diff_{s}" for m in COMPARED for s in SEED_STATISTICS]
  return ["axis", "held", "first", "second", "seeds", *diffs, "accuracy_interval_excludes_0"]


def comparison_line(row: Mapping) -> str:
  """'freeze_depth 7 vs 6: +0.56 points, 95% interval -0.30..+1.42 over 3 seeds (...)'."""
  where = f" ({row['held']})" if row["held"] else ""
  head = f"{row['axis']} {row['first']} vs {row['second']}{where}"
  mean = row["test_accuracy_diff_mean"]
  if mean is None:
    return f"- {head}: no seed finished at both"
  text = f"- {head}: {100 * mean:+.2f} points"
  if row["test_accuracy_diff_ci_low"] is None:
    return text + f" over {row['seeds']} seed (no interval from one seed)"
  low, high = 100 * row["test_accuracy_diff_ci_low"], 100 * row["test_accuracy_diff_ci_high"]
  verdict = ("the interval excludes 0" if row["accuracy_interval_excludes_0"]
             else "within noise: the interval holds 0")
  f1 = (f"; macro F1 {row['test_macro_f1_diff_mean']:+.4f}, "
        f"{row['test_macro_f1_diff_ci_low']:+.4f}..{row['test_macro_f1_diff_ci_high']:+.4f}"
        if row["test_macro_f1_diff_ci_low"] is not None else "")
  return (f"{text}, 95% interval {low:+.2f}..{high:+.2f} over {row['seeds']} seeds{f1} "
          f"({verdict})")


# ---------------------------------------------------------------------------------------------
# Files.

def _cell(key: str, value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    if any(key.startswith(m) for m in FOUR_DECIMALS):
      return f"{value:.4f}"
    if "seconds" in key or key.startswith("images_per_second"):
      return f"{value:.1f}"
  return str(value)


def _write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


def _table(rows: Sequence[dict], columns: Sequence[str]) -> list[str]:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  return lines + ["| " + " | ".join(_cell(k, row.get(k)) for k in columns) + " |"
                  for row in rows]


def write_summary(runs: Sequence[dict], grid_keys: Sequence[str], out_dir: str) -> None:
  """One seed per point: summary.csv (machine-readable) and summary.md (a table to paste into
  a README), one row per run."""
  columns = run_columns(grid_keys)
  _write_csv(os.path.join(out_dir, "summary.csv"), runs, columns)
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write("\n".join(_table(runs, columns[:-1])) + "\n")


def write_seed_summary(runs: Sequence[dict], grid_keys: Sequence[str], out_dir: str) -> list[dict]:
  """Several seeds per point: summary.csv (per point), comparisons.csv, runs.csv (per run) and
  summary.md (all three); returns the point rows."""
  points, compared = point_rows(runs, grid_keys), comparisons(runs, grid_keys)
  _write_csv(os.path.join(out_dir, "summary.csv"), points, point_columns(grid_keys))
  _write_csv(os.path.join(out_dir, "comparisons.csv"), compared, comparison_columns())
  run_keys = [*grid_keys, SEED_KEY]
  _write_csv(os.path.join(out_dir, "runs.csv"), runs, run_columns(run_keys))
  lines = ["## Points", "",
           "Over each point's finished seeds: mean, sample standard deviation (std) and the 95% "
           "interval of the mean (ci_low..ci_high, Student's t with seeds - 1 degrees of "
           "freedom).", ""]
  lines += _table(points, point_columns(grid_keys)[:-1])
  lines += ["", "## Neighbouring points", "",
            "Test accuracy of the second minus the first, paired by seed over the seeds both "
            "finished (95% paired t interval).", ""]
  lines += [comparison_line(row) for row in compared] or ["(one value per axis: nothing to "
                                                           "compare)"]
  lines += ["", "## Runs", "",
            "Each run's own 95% intervals over its test examples: Wilson (accuracy), "
            "bootstrap (macro F1).", ""]
  lines += _table(runs, run_columns(run_keys)[:-1])
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return points


def plot_ablation(rows: Sequence[dict], grid_keys: Sequence[str], path: str, *,
                  accuracy: Sequence[str | None], seconds: Sequence[str | None],
                  note: str = "") -> None:
  """Test accuracy and training time against freeze_depth (or the first grid key), one line
  per combination of the other grid values, each value with its interval where it has one.
  accuracy, seconds: the (value, low, high) column names in `rows` (low, high may be None);
  note: what the values and intervals are, above the plots."""
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

  def errors(done, value, low, high):
    """matplotlib's yerr: distances below and above, 0 where a row has no interval."""
    below = [r[value] - r[low] if low and r.get(low) is not None else 0.0 for r in done]
    above = [r[high] - r[value] if high and r.get(high) is not None else 0.0 for r in done]
    return [below, above]

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for values, line_rows in lines.items():
    label = ", ".join(f"{k}={v}" for k, v in zip(others, values)) or None
    for ax, (value, low, high) in zip(axes, (accuracy, seconds)):
      done = [r for r in line_rows if r.get(value) is not None]
      if done:
        ax.errorbar([position[r[x_key]] for r in done], [r[value] for r in done],
                    yerr=errors(done, value, low, high), fmt="-o", capsize=4, label=label)
  for ax, title, (value, low, _) in zip(axes, ("test accuracy", "training seconds"),
                                        (accuracy, seconds)):
    ax.set_xlabel(x_key)
    ax.set_title(title + (" (95% interval)" if low else ""))
    ax.grid(alpha=0.3)
    if not numeric or all(isinstance(v, int) for v in x_values):  # depths: no 6.5 ticks
      ax.set_xticks([position[v] for v in x_values], [str(v) for v in x_values])
    if others:
      ax.legend()
  if note:
    fig.suptitle(note, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
