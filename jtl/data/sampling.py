"""Class-balanced sampling: an epoch's draw of the train split in which every class is equally
frequent (config.balanced_sampling).

Repeat-and-subsample rather than independent draws with replacement: a class of n_c examples
that needs k slots gets floor(k / n_c) full passes over its examples in random order plus a
random subset for the rest, so a minority example recurs as evenly as its quota allows and a
majority class is subsampled without repeats. The epoch keeps the split's length (steps per
epoch do not change); `pipeline.epoch_order` calls this, so the image pipeline and the feature
cache draw the very same examples.
"""
from __future__ import annotations

import numpy as np


def class_quotas(num_examples: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
  """Slots per class: num_examples // num_classes each, the remainder given to classes drawn at
  random (a different few each epoch, so no class is favoured over the run)."""
  quotas = np.full(num_classes, num_examples // num_classes, np.int64)
  quotas[rng.choice(num_classes, num_examples % num_classes, replace=False)] += 1
  return quotas


def balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Example indices (len(labels) of them, shuffled) in which each class present in `labels`
  fills an equal share of the slots (to within one)."""
  labels = np.asarray(labels)
  classes = np.unique(labels)  # a class without training examples cannot be drawn
  quotas = class_quotas(len(labels), len(classes), rng)
  drawn = []
  for c, quota in zip(classes, quotas):
    members = np.flatnonzero(labels == c)
    passes = -(-int(quota) // len(members))
    drawn.append(np.concatenate([rng.permutation(members) for _ in range(passes)])[:quota])
  return rng.permutation(np.concatenate(drawn))
