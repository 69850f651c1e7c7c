"""Per-class loss weights (config.class_weights) resolved against the training split.

"auto" is scikit-learn's "balanced" rule, n / (classes * n_c): the inverse class frequency,
scaled so that the weights average 1 over the training examples, so the weighted loss keeps the
unweighted loss's scale and the learning rate its meaning. Explicit weights are used as given.
How the training step applies them: jtl.steps.training_loss.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jtl.errors import ConfigError


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
  return np.asarray(explicit_class_weights(spec, class_names), np.float32)


def class_weight_items(spec: str) -> list[tuple[str | None, float]]:
  """config.class_weights's explicit entries, (class name or None when positional, weight);
  [] for "none" and "auto". Raises ConfigError on a malformed or non-positive weight."""
  if not isinstance(spec, str):
    raise ConfigError(f"config.class_weights={spec!r}: must be a string: none, auto, "
                      "'w0,w1,...' (one per class) or 'name=w,...'")
  if spec in ("none", "auto"):
    return []
  items = []
  for part in spec.split(","):
    name, sep, value = part.rpartition("=")
    try:
      weight = float(value)
    except ValueError:
      raise ConfigError(f"config.class_weights={spec!r}: {part.strip()!r} is not a weight "
                        "(forms: none, auto, 'w0,w1,...', 'name=w,...')") from None
    if not weight > 0 or weight == float("inf"):
      raise ConfigError(f"config.class_weights={spec!r}: weights must be positive and finite, "
                        f"got {part.strip()!r}")
    items.append((name.strip() if sep else None, weight))
  if len({name is None for name, _ in items}) > 1:
    raise ConfigError(f"config.class_weights={spec!r}: either one weight per class in class "
                      "order, or name=weight pairs, not both")
  return items


def explicit_class_weights(spec: str, class_names: Sequence[str]) -> tuple[float, ...] | None:
  """One weight per class in class order for an explicit config.class_weights (named classes
  not listed keep 1); None for "none" and "auto"."""
  items = class_weight_items(spec)
  if not items:
    return None
  names = tuple(class_names)
  if items[0][0] is None:
    if len(items) != len(names):
      raise ConfigError(f"config.class_weights={spec!r}: {len(items)} weights for "
                        f"{len(names)} classes {names}")
    return tuple(w for _, w in items)
  unknown = [n for n, _ in items if n not in names]
  if unknown:
    raise ConfigError(f"config.class_weights={spec!r}: unknown class {', '.join(unknown)} "
                      f"(the classes are {names})")
  given = dict(items)
  return tuple(given.get(n, 1.0) for n in names)
