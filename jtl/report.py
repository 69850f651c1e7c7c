"""What a run leaves behind for people: metrics.jsonl, TensorBoard events and pictures."""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np


class RunLog:
  """Appends evaluation records to metrics.jsonl and scalars to TensorBoard (host 0 only); a
  context manager that closes the TensorBoard writer on leaving."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._closed = False
    if enabled:
      from flax.metrics import tensorboard
      self._tb = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def record(self, entry: dict) -> None:
    """One evaluation: step, epoch, split, loss, accuracy, top5, learning rate, ..."""
    if not self.enabled:
      return
    # Strict JSON: a diverged value is written as null, not as the non-standard NaN.
    clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
             for k, v in entry.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(clean, allow_nan=False) + "\n")
    for key, value in clean.items():
      if isinstance(value, (int, float)) and key not in ("step", "epoch"):
        self._tb.scalar(f"{entry['split']}/{key}", value, entry["step"])
    self._tb.flush()

  def scalars(self, step: int, values: dict) -> None:
    if self.enabled:
      for key, value in values.items():
        self._tb.scalar(key, value, step)

  def records(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    records = []
    with open(self.path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash or a full disk
          break
    return records

  def truncate_after(self, step: int) -> None:
    """On resume: drop records written after the checkpoint being resumed from."""
    if self.enabled and os.path.exists(self.path):
      kept = [r for r in self.records() if r["step"] <= step]
      with open(self.path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)

  def __enter__(self) -> RunLog:
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    self.close()

  def close(self) -> None:
    """Flushes and closes the TensorBoard writer; a second call does nothing."""
    if self._tb is not None and not self._closed:
      self._tb.close()
    self._closed = True


def plot_curves(records: Sequence[dict], path: str) -> None:
  """Loss and accuracy per epoch, train and val."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for split, style in (("train", "-o"), ("val", "-s")):
    rows = [r for r in records if r["split"] == split]
    if not rows:
      continue
    epochs = [r["epoch"] for r in rows]
    values = lambda key: [np.nan if r.get(key) is None else r[key] for r in rows]
    axes[0].plot(epochs, values("loss"), style, label=split)
    axes[1].plot(epochs, values("accuracy"), style, label=split)
  from matplotlib.ticker import MaxNLocator
  for ax, title in zip(axes, ("loss", "accuracy")):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_confusion_matrix(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: str,
                          title: str = "confusion matrix (rows: true class)") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cm = np.asarray(cm)
  n = len(class_names)
  size = min(max(4.0, 0.5 * n + 2), 30.0)
  fig, ax = plt.subplots(figsize=(size, size))
  ax.imshow(cm, cmap="Blues")
  ax.set_xticks(range(n), class_names, rotation=90)
  ax.set_yticks(range(n), class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  if n <= 30:
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n):
      for j in range(n):
        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                color="white" if cm[i, j] > threshold else "black")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_json(path: str, value) -> None:
  """Atomic: a crash never leaves a half-written file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)
