"""runs/x/prune/summary.csv, summary.md and pruning.png, from the pruned runs on disk.

Rows are read back from every finished `<method>-<sparsity>/` workdir (its final_metrics.json
and the measurements in pruning.json), so a rerun for one method rewrites its own rows and
keeps the other method's; the unpruned run comes first, as sparsity 0. Every file is written
beside its final name and renamed into place.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Sequence

MEASUREMENTS = "pruning.json"
UNPRUNED = "unpruned"
COLUMNS = ("method", "sparsity", "params", "nonzero_params", "kernel_sparsity", "flops",
           "export_bytes", "export_gzip_bytes", "latency_b1_ms", "latency_b32_ms",
           "test_accuracy", "test_macro_f1", "steps", "run")
METRICS = ("test_accuracy", "test_macro_f1", "steps")


def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def row_of(workdir: str, method: str, sparsity: float, measured: dict, run: str) -> dict:
  final = _read_json(os.path.join(workdir, "final_metrics.json")) or {}
  row = {"method": method, "sparsity": sparsity, "run": run}
  row.update({k: measured.get(k) for k in COLUMNS if k in measured})
  row.update({k: final.get(k) for k in METRICS})
  return row


def pruned_rows(prune_dir: str) -> list[dict]:
  """A row per finished pruned workdir under `prune_dir`, by method then sparsity."""
  rows = []
  for name in sorted(os.listdir(prune_dir)) if os.path.isdir(prune_dir) else ():
    workdir = os.path.join(prune_dir, name)
    measured = _read_json(os.path.join(workdir, MEASUREMENTS))
    if name.startswith(".") or measured is None:
      continue
    rows.append(row_of(workdir, measured["method"], measured["sparsity"], measured, name))
  return sorted(rows, key=lambda r: (r["method"], r["sparsity"]))


def _write_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    f.write(text)
  os.replace(tmp, path)


def write_csv(rows: Sequence[dict], path: str) -> None:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=COLUMNS)
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
  _write_atomic(path, out.getvalue())


def _cell(key: str, value) -> str:
  if value is None:
    return "-"
  if key in ("test_accuracy", "test_macro_f1", "kernel_sparsity"):
    return f"{value:.4f}"
  if key == "flops":
    return f"{value / 1e6:,.1f} M"
  if key in ("export_bytes", "export_gzip_bytes"):
    return f"{value / 1e6:.2f} MB" if value >= 1e5 else f"{value / 1e3:.1f} kB"
  if key.startswith("latency"):
    return f"{value:.2f}"
  if key in ("params", "nonzero_params"):
    return f"{value:,}"
  return str(value)


def markdown_table(rows: Sequence[dict]) -> str:
  shown = [c for c in COLUMNS if c != "run"]
  lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
  lines += ["| " + " | ".join(_cell(k, row.get(k)) for k in shown) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], path: str) -> None:
  """Test accuracy and compressed export size against sparsity, one line per method, each
  starting from the unpruned run."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  base = [r for r in rows if r["method"] == UNPRUNED]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for method in sorted({r["method"] for r in rows} - {UNPRUNED}):
    line = base + [r for r in rows if r["method"] == method]
    line = [r for r in line if r.get("test_accuracy") is not None]
    xs = [r["sparsity"] for r in line]
    axes[0].plot(xs, [r["test_accuracy"] for r in line], "-o", label=method)
    axes[1].plot(xs, [(r.get("export_gzip_bytes") or 0) / 1e6 for r in line], "-o",
                 label=method)
  for ax, title in zip(axes, ("test accuracy", "export, gzip-compressed (MB)")):
    ax.set_xlabel("sparsity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


def write_all(prune_dir: str, unpruned: dict) -> list[dict]:
  """The three summaries of `prune_dir`: the unpruned row, then every pruned run's."""
  rows = [unpruned, *pruned_rows(prune_dir)]
  write_csv(rows, os.path.join(prune_dir, "summary.csv"))
  _write_atomic(os.path.join(prune_dir, "summary.md"), markdown_table(rows))
  plot(rows, os.path.join(prune_dir, "pruning.png"))
  return rows
