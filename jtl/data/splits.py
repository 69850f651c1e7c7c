"""Seeded, stratified selections of examples: the carved validation split and training subsets.

Both depend only on (labels in a stable order, seed), never on file-system listing order, so the
same folder gives the same split on every machine.
"""
from __future__ import annotations

import numpy as np

from jtl.data.errors import DataError

_VAL_STREAM = 0x7A1
_SUBSET_STREAM = 0x5B5


def _shuffled_members(labels: np.ndarray, num_classes: int, rng: np.random.Generator):
  return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def stratified_holdout(labels: np.ndarray, num_classes: int, fraction: float,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(kept, held_out) sorted index arrays; each class gives round(fraction * n) to held_out.

  A class with at least two examples gives at least one and keeps at least one, so every class
  is both trained on and validated when the fraction is positive.
  """
  if not 0.0 <= fraction < 1.0:
    raise DataError(f"val_fraction must be in [0, 1), got {fraction}")
  rng = np.random.default_rng([seed, _VAL_STREAM])
  kept, held = [], []
  for members in _shuffled_members(labels, num_classes, rng):
    n = len(members)
    take = int(round(fraction * n))
    if fraction > 0 and n >= 2:
      take = min(max(take, 1), n - 1)
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
