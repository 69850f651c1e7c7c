"""Per-class loss weights (config.class_weights) resolved against the training split.

"auto" is scikit-learn's "balanced" rule, n / (classes * n_c): the inverse class frequency,
scaled so that the weights average 1 over the training examples, so the weighted loss keeps the
unweighted loss's scale and the learning rate its meaning. Explicit weights are used as given.
How the training step applies them: jtl.steps.training_loss.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jtl import config as config_lib


def auto_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """n / (present classes * n_c) per class; a class without training examples (never drawn,
  so its weight never counts) gets 1."""
  counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes).astype(np.float64)
  present = counts > 0
  weights = np.ones(num_classes, np.float64)
  weights[present] = counts.sum() / (present.sum() * counts[present])
  return weights.astype(np.float32)


def resolve_class_weights(spec: str, train_labels: np.ndarray,
                          class_names: Sequence[str]) -> np.ndarray | None:
  """float32 [num_classes] for config.class_weights `spec`, or None for "none" (unweighted)."""
  if spec == "none":
    return None
  if spec == "auto":
    return auto_class_weights(train_labels, len(class_names))
  return np.asarray(config_lib.explicit_class_weights(spec, class_names), np.float32)
