"""Where a finished run goes wrong: the most-confused class pairs and the test images with the
highest loss, written at the end of every run from the final evaluation's own per-example
arrays (nothing is evaluated twice).

  most_confused.csv  true,predicted,count: the confusion matrix off its diagonal, most first
  top_losses.csv     rank,index,source,true,predicted,probability,loss of the worst examples
  top_losses.png     those images, as the model saw them, captioned true / predicted (p) / loss

The pictures are the split's own images through the pipeline's reader and decoder
(data.images.SplitImages, with the decode scale the scan recorded; a tfds record's encoded bytes
are decoded like a file's) and `eval_pixels`, the eval transform before normalisation: the very
crop the model was shown, which is what explains an error (an object cropped away, a tiny image
blown up), every tile the same size. `load_eval_image` is the same transform but normalised,
and it re-derives the JPEG scale from its own argument rather than the dataset's record.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
from typing import Sequence

import numpy as np

from jtl import evaluation
from jtl.data.images import SplitImages
from jtl.data.preprocess import eval_pixels
from jtl.data.tf_setup import tf

MOST_CONFUSED_CSV = "most_confused.csv"
TOP_LOSSES_CSV = "top_losses.csv"
TOP_LOSSES_PNG = "top_losses.png"
NUM_TOP_LOSSES = 16  # a 4 x 4 grid

log = logging.getLogger(__name__)


def most_confused(confusion: Sequence[Sequence[int]], class_names: Sequence[str]
                  ) -> list[tuple[str, str, int]]:
  """(true, predicted, count) of every off-diagonal cell with a count, most first; equal counts
  by true then predicted class name."""
  cm = np.asarray(confusion, np.int64).reshape(len(class_names), len(class_names))
  pairs = [(class_names[i], class_names[j], int(cm[i, j]))
           for i, j in zip(*np.nonzero(cm)) if i != j]
  return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))


def top_k_losses(losses: np.ndarray, k: int) -> np.ndarray:
  """Positions of the k largest losses (all of them when fewer), largest first; equal losses by
  position. A NaN loss (a diverged example) ranks as +inf: it is the first thing to look at."""
  losses = np.asarray(losses, np.float64).reshape(-1)
  key = np.where(np.isnan(losses), np.inf, losses)
  return np.lexsort((np.arange(len(key)), -key))[:max(k, 0)]


def in_example_order(arrays: dict[str, np.ndarray], rows: np.ndarray,
                     labels: np.ndarray) -> dict[str, np.ndarray]:
  """The per-example arrays of `evaluation.predictions` rearranged so that position i is example
  i of the split; `rows` is the example index of each row (evaluation.example_indices). Raises
  ValueError when they do not line up with the split's labels: a wrong order must not caption
  one image with another's prediction."""
  rows, labels = np.asarray(rows), np.asarray(labels)
  if len(rows) != len(labels) or len(arrays["label"]) != len(labels):
    raise ValueError(f"{len(arrays['label'])} predictions and {len(rows)} row indices for a "
                     f"split of {len(labels)} examples")
  order = np.argsort(rows, kind="stable")
  if not np.array_equal(rows[order], np.arange(len(labels))):
    raise ValueError("the row indices are not a permutation of the split's examples")
  ordered = {k: np.asarray(v)[order] for k, v in arrays.items()}
  if not np.array_equal(ordered["label"], labels):
    raise ValueError("the evaluated labels differ from the split's labels in example order")
  return ordered


@dataclasses.dataclass(frozen=True)
class TopLoss:
  """One of the worst examples."""
  index: int              # example index in the split
  source: str             # its file, or "<split> record <index>" for an in-memory (tfds) record
  true_class: str
  predicted_class: str
  probability: float      # the softmax probability of the predicted class
  loss: float             # the evaluation's per-example cross-entropy

  def caption(self, width: int = 22) -> str:
    cut = lambda name: name if len(name) <= width else name[:width - 1] + "…"
    return (f"true: {cut(self.true_class)}\npred: {cut(self.predicted_class)} "
            f"({self.probability:.2f})\nloss {self.loss:.3g}")


def top_losses(ordered: dict[str, np.ndarray], table, class_names: Sequence[str], split: str,
               k: int = NUM_TOP_LOSSES) -> list[TopLoss]:
  """The k examples of highest loss, from arrays in example order (see in_example_order)."""
  picked = top_k_losses(ordered["loss"], k)
  logits = np.asarray(ordered["logits"], np.float64)[picked]
  if logits.ndim != 2:  # an empty split
    return []
  shifted = logits - logits.max(axis=1, keepdims=True)
  probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
  out = []
  for row, i in enumerate(picked):
    pred = int(ordered["pred"][i])
    source = str(table.sources[i]) if table.from_files else f"{split} record {int(i)}"
    out.append(TopLoss(int(i), source, class_names[int(ordered["label"][i])], class_names[pred],
                       float(probs[row, pred]), float(ordered["loss"][i])))
  return out


def example_pixels(table, index: int, preprocess) -> np.ndarray:
  """Example `index` of a split's table as evaluation feeds it to the model before
  normalisation, uint8 [S, S, 3]: the pipeline's own reader and decoder (data.images), without
  decoding the whole split into memory as the dataset's cached view would."""
  one = SplitImages(table.take(np.array([index])), cache=False)
  data = tf.constant(one.encoded(0) if table.reader is not None else b"")
  return eval_pixels(one.image(tf.constant(0, tf.int64), data), preprocess).numpy()


# Inches: one tile (caption above its image) and the figure's title band.
TILE_WIDTH, TILE_HEIGHT, CAPTION_HEIGHT, TITLE_HEIGHT = 2.6, 3.1, 0.6, 0.4


def plot_top_losses(pixels: Sequence[np.ndarray], captions: Sequence[str],
                    misclassified: Sequence[bool], path: str) -> None:
  """A grid, four to a row, of the images with their captions (red: misclassified). Tiles are
  placed by hand: tight_layout took 2 of the 2.5 s a 4 x 4 grid cost."""
  from matplotlib.figure import Figure  # without pyplot: no global state, no GUI backend
  cols = min(4, len(pixels))
  rows = math.ceil(len(pixels) / cols)
  width, height = TILE_WIDTH * cols, TILE_HEIGHT * rows + TITLE_HEIGHT
  fig = Figure(figsize=(width, height))
  fig.suptitle("highest-loss examples", fontsize=10, y=1 - 0.1 / height, va="top")
  for k, (image, caption, wrong) in enumerate(zip(pixels, captions, misclassified)):
    row, col = divmod(k, cols)
    top = height - TITLE_HEIGHT - row * TILE_HEIGHT - CAPTION_HEIGHT
    ax = fig.add_axes(((col * TILE_WIDTH + 0.1) / width, (top - TILE_HEIGHT + CAPTION_HEIGHT
                                                          + 0.1) / height,
                       (TILE_WIDTH - 0.2) / width, (TILE_HEIGHT - CAPTION_HEIGHT - 0.1) / height))
    ax.set_axis_off()
    ax.imshow(image, interpolation="nearest")  # small images stay sharp blown up
    ax.text(0.0, 1.02, caption, transform=ax.transAxes, ha="left", va="bottom", fontsize=8,
            color="tab:red" if wrong else "black")
  tmp = path + ".tmp"
  fig.savefig(tmp, dpi=100, format="png")
  os.replace(tmp, path)


def _write_csv(path: str, header: Sequence[str], rows) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  os.replace(tmp, path)


def write_most_confused(workdir: str, final: dict) -> list[tuple[str, str, int]]:
  """most_confused.csv from final_metrics' confusion matrix and class names (per_class order)."""
  pairs = most_confused(final["confusion_matrix"], list(final["per_class"]))
  _write_csv(os.path.join(workdir, MOST_CONFUSED_CSV), ("true", "predicted", "count"), pairs)
  return pairs


def write_top_losses(workdir: str, final: dict, predictions: dict, dataset, preprocess, *,
                     local_batch_size: int, process_count: int = 1) -> list[TopLoss]:
  """top_losses.csv and top_losses.png of the final evaluation's per-example arrays
  (evaluation.evaluate(..., keep_predictions=True)), whose batches were local_batch_size per
  process; nothing when the split is empty."""
  split, class_names = final["split"], list(final["per_class"])
  table = dataset.table(split)
  rows = evaluation.example_indices(len(table), local_batch_size, process_count)
  try:
    ordered = in_example_order(predictions, rows, table.labels)
  except ValueError as e:  # a bug, but the run's model and metrics are written by now
    log.warning("%s not drawn: %s", TOP_LOSSES_PNG, e)
    return []
  worst = top_losses(ordered, table, class_names, split)
  if not worst:
    return []
  _write_csv(os.path.join(workdir, TOP_LOSSES_CSV),
             ("rank", "index", "source", "true", "predicted", "probability", "loss"),
             [(r + 1, t.index, t.source, t.true_class, t.predicted_class,
               f"{t.probability:.6f}", f"{t.loss:.6f}") for r, t in enumerate(worst)])
  plot_top_losses([example_pixels(table, t.index, preprocess) for t in worst],
                  [t.caption() for t in worst],
                  [t.predicted_class != t.true_class for t in worst],
                  os.path.join(workdir, TOP_LOSSES_PNG))
  return worst
