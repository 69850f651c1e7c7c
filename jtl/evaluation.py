"""Evaluating a train state on a split: the batches through the compiled eval step, the
predictions gathered on the host, the metrics computed once there."""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import jax
import numpy as np

from jtl import distributed
from jtl import metrics as metrics_lib
from jtl.data.pipeline import eval_example_indices

_GATHERED = ("loss", "pred", "label", "top5", "logits")


@dataclasses.dataclass(frozen=True)
class Splits:
  """Which split validates (evaluations, early stopping, the best checkpoint, the EMA choice),
  which one tests, and the early-stopping metric: the one rule every part of a run reads.

  A dataset without a validation split validates on its test split; one without a test split
  tests on its validation split."""
  val: str
  test: str
  metric: str  # config.early_stopping.metric: val_accuracy | val_loss | val_macro_f1 | val_top5

  @classmethod
  def of(cls, dataset, metric: str) -> "Splits":
    return cls(val="val" if dataset.has_split("val") else "test",
               test="test" if dataset.has_split("test") else "val", metric=metric)

  @property
  def key(self) -> str:
    """The metric's key in an evaluation's result ("accuracy" for val_accuracy)."""
    return self.metric[len("val_"):]

  @property
  def higher_is_better(self) -> bool:
    return self.metric != "val_loss"

  def improved(self, value: float, best: float | None, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than min_delta (any finite value beats None)."""
    if best is None:
      return bool(np.isfinite(value))
    if self.higher_is_better:
      return value > best + min_delta
    return value < best - min_delta


def predictions(eval_fn, state, batches: Iterable[dict], mesh) -> dict[str, np.ndarray]:
  """Per-example loss, prediction, label, top-5 hit and logits of every real example."""
  outputs = {k: [] for k in _GATHERED}
  for local in batches:
    out = jax.device_get(eval_fn(state.params, state.batch_stats,
                                 distributed.global_batch(local, mesh)))
    mask = np.asarray(out["mask"], bool)
    for k in outputs:
      outputs[k].append(np.asarray(out[k])[mask])
  return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in outputs.items()}


def example_indices(num_examples: int, local_batch_size: int, process_count: int = 1
                    ) -> np.ndarray:
  """The example index of each row `predictions` returns for batches of data.eval_batches (or
  the feature cache's eval_split): a global batch holds process 0's local rows, then process
  1's, ..., each process's slots per data.eval_example_indices, and padding is dropped. On one
  process that is 0, 1, 2, ...; on several it is not."""
  per_process = [eval_example_indices(num_examples, local_batch_size, p, process_count)
                 .reshape(-1, local_batch_size) for p in range(process_count)]
  rows = np.concatenate(per_process, axis=1).reshape(-1)
  return rows[rows >= 0]


def evaluate(eval_fn, state, batches: Iterable[dict], mesh, class_names: Sequence[str], *,
             keep_predictions: bool = False) -> dict:
  """The classification report (accuracy, top-5, macro P/R/F1, per class, confusion matrix).

  keep_predictions adds the per-example arrays under "predictions" (the final evaluation's error
  analysis reuses them instead of evaluating twice)."""
  arrays = predictions(eval_fn, state, batches, mesh)
  result = metrics_lib.classification_report(arrays["label"], arrays["pred"], arrays["top5"],
                                             arrays["loss"], class_names)
  if keep_predictions:
    result["predictions"] = arrays
  return result


def final_metrics(result: dict, split: str, prefix: str = "test_") -> dict:
  """The final_metrics.json fields of a report on `split`."""
  final = {"split": split}
  for key in ("accuracy", "top5", "loss", "macro_precision", "macro_recall", "macro_f1",
              "balanced_accuracy"):
    final[f"{prefix}{key}"] = result[key]
  final["per_class"] = result["per_class"]
  final["confusion_matrix"] = result["confusion_matrix"]
  final["num_test_examples"] = result["num_examples"]
  return final


# A validation split with fewer images than this in some class ranks checkpoints poorly (one
# image of 6 moves that class's recall by 17 points): config.val_min_per_class's default.
RANKING_MIN_PER_CLASS = 20


class RankingCheck:
  """Whether the validation split can tell checkpoints apart, as evaluations come in: each of
  its warnings is given once per run, as a message (the caller logs it).

  - small: some class has fewer than RANKING_MIN_PER_CLASS validation images;
  - saturated: the early-stopping metric reached its ceiling (val accuracy 1.0 on 60 images):
    no later checkpoint can look better, whatever the test would say, so the first is kept;
  - a tie at the best on a small split: a later evaluation reaches the best value again, and
    the split is too coarse to say which is better. On a large split a tie is a plateau, and
    says nothing about its size."""

  def __init__(self, splits: Splits):
    self.splits = splits
    self.warned: set[str] = set()

  def _once(self, kind: str, message: str) -> list[str]:
    if kind in self.warned:
      return []
    self.warned.add(kind)
    return [message]

  def observe(self, result: dict, *, step: int, best: float | None,
              best_step: int | None) -> list[str]:
    """Messages for an evaluation `result` at `step`, given the best value before it."""
    messages = []
    support = [c["support"] for c in result.get("per_class", {}).values()]
    n = result.get("num_examples", sum(support))
    small = bool(support) and min(support) < RANKING_MIN_PER_CLASS
    split = f"the {self.splits.val} split ({n} images)"
    larger = "a larger validation split (val_fraction, val_min_per_class) would rank them"
    if small:
      messages += self._once("small", (
          f"{split} is too small to rank checkpoints: {min(support)} images in its smallest "
          f"class, and one image moves accuracy by {100 / max(n, 1):.1f} points. Carve more "
          f"(val_fraction, val_min_per_class: at least {RANKING_MIN_PER_CLASS} per class by "
          f"default) or give a larger validation folder"))
    value, metric = result[self.splits.key], self.splits.metric
    if not np.isfinite(value):
      return messages
    if self.splits.higher_is_better and value >= 1.0:
      messages += self._once("saturated", (
          f"{metric} reached {value:.4f} at step {step}: {split} can show no later "
          f"checkpoint to be better, so the first to reach it is kept; {larger}"))
    elif small and best is not None and value == best:
      messages += self._once("tie", (
          f"{metric} {value:.4f} at step {step} ties the best, reached at step {best_step}: "
          f"{split} cannot tell these checkpoints apart, and the first is kept; {larger}"))
    return messages
