"""Classification metrics from predictions gathered on the host."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
  """Rows are the true class, columns the predicted one."""
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(preds, np.int64)), 1)
  return cm


def classification_report(labels: np.ndarray, preds: np.ndarray, top5_correct: np.ndarray,
                          losses: np.ndarray, class_names: Sequence[str]) -> dict:
  """Accuracy, top-5, macro precision/recall/F1, per-class figures and the confusion matrix.

  Classes with no predictions get precision 0 (and no support gives recall 0), as
  scikit-learn does with zero_division=0. balanced_accuracy is the mean recall over the classes
  present in `labels` (scikit-learn's balanced_accuracy_score); it differs from macro_recall only
  when a class has no example in the split.
  """
  num_classes = len(class_names)
  cm = confusion_matrix(labels, preds, num_classes)
  tp = np.diag(cm).astype(np.float64)
  predicted = cm.sum(0).astype(np.float64)
  support = cm.sum(1).astype(np.float64)
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
  recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
  n = max(len(labels), 1)
  present = support > 0
  balanced = float(recall[present].mean()) if present.any() else 0.0
  return {
      "loss": float(np.sum(losses) / n),
      "accuracy": float(tp.sum() / n),
      "top5": float(np.sum(top5_correct) / n),
      "balanced_accuracy": balanced,
      "macro_precision": float(precision.mean()),
      "macro_recall": float(recall.mean()),
      "macro_f1": float(f1.mean()),
      "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                           "f1": float(f1[i]), "support": int(support[i])}
                    for i, name in enumerate(class_names)},
      "confusion_matrix": cm.tolist(),
      "num_examples": int(len(labels)),
  }


def macro_f1(confusion: np.ndarray) -> np.ndarray:
  """Macro F1 of confusion matrices [..., classes, classes] (rows true, columns predicted), as
  classification_report computes it: the mean over all classes, 0 for a class without
  predictions or support. Vectorised over the leading axes (the bootstrap's resamples)."""
  confusion = np.asarray(confusion, np.float64)
  tp = np.diagonal(confusion, axis1=-2, axis2=-1)
  predicted, support = confusion.sum(-2), confusion.sum(-1)
  precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
  recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
  return f1.mean(-1)
