"""Seeded, stratified selections of examples: the carved validation split and training subsets.

Both depend only on (labels in a stable order, seed), never on file-system listing order, so the
same folder gives the same split on every machine.
"""
from __future__ import annotations

import numpy as np

from jtl.data.errors import DataError

_VAL_STREAM = 0x7A1
_SUBSET_STREAM = 0x5B5
# The carved validation split's floor per class (config.val_min_per_class's default): a split of
# a few images per class ranks checkpoints by chance (one image of 6 is 17 points of accuracy).
DEFAULT_VAL_MIN_PER_CLASS = 20
# The floor never takes more than this share of a class, so that small classes still train on
# most of their images; val_fraction alone may take more.
VAL_MIN_MAX_SHARE = 0.25


def _shuffled_members(labels: np.ndarray, num_classes: int, rng: np.random.Generator):
  return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def holdout_size(n: int, fraction: float, min_per_class: int) -> int:
  """How many of a class's n examples validate: round(fraction * n), raised to
  min(min_per_class, floor(VAL_MIN_MAX_SHARE * n)); with a positive fraction, a class of two
  or more examples gives at least one and keeps at least one. A fraction of 0 carves nothing."""
  if fraction <= 0:
    return 0
  take = max(int(round(fraction * n)), min(min_per_class, int(VAL_MIN_MAX_SHARE * n)))
  return min(max(take, 1), n - 1) if n >= 2 else take


def stratified_holdout(labels: np.ndarray, num_classes: int, fraction: float,
                       seed: int, min_per_class: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(kept, held_out) sorted index arrays; each class gives holdout_size(n, fraction,
  min_per_class) of its examples to held_out.

  Every class is both trained on and validated when the fraction is positive. The held-out
  examples are the first of one seeded permutation per class, so a larger minimum only adds
  examples: a class whose round(fraction * n) already meets it validates on the very images it
  did without one (min_per_class=0, jtl's carve before the minimum).
  """
  if not 0.0 <= fraction < 1.0:
    raise DataError(f"val_fraction must be in [0, 1), got {fraction}")
  if min_per_class < 0:
    raise DataError(f"val_min_per_class must be >= 0, got {min_per_class}")
  rng = np.random.default_rng([seed, _VAL_STREAM])
  kept, held = [], []
  for members in _shuffled_members(labels, num_classes, rng):
    take = holdout_size(len(members), fraction, min_per_class)
    held.append(members[:take])
    kept.append(members[take:])
  return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def stratified_subset(labels: np.ndarray, num_classes: int, size: int, seed: int) -> np.ndarray:
  """Sorted indices of `size` examples with the class proportions kept (largest remainder)."""
  n = len(labels)
  if size >= n:
    return np.arange(n)
  if size <= 0:
    raise DataError(f"max_train_examples must be positive, got {size}")
  counts = np.bincount(labels, minlength=num_classes)
  quota = counts * (size / n)
  take = np.floor(quota).astype(np.int64)
  # Largest fractional parts first; ties go to the lower class index (stable sort).
  order = np.argsort(-(quota - take), kind="stable")
  take[order[:size - take.sum()]] += 1
  rng = np.random.default_rng([seed, _SUBSET_STREAM])
  chosen = [members[:k] for members, k in zip(_shuffled_members(labels, num_classes, rng), take)]
  return np.sort(np.concatenate(chosen))
