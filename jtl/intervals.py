"""Uncertainty of the figures a run or a study reports: 95% intervals, and how they are made.

Three kinds, each for the question it answers:
  wilson_interval     a test accuracy over n test examples (Wilson score interval: right near
                      0 and 1, where the normal approximation leaves [0, 1]);
  bootstrap_macro_f1  a macro F1 over the test predictions (percentile bootstrap, seeded: macro
                      F1 is no proportion, so resampling the examples is what gives its spread);
  seed_summary        a figure over seeds (mean, sample std and Student's t interval, n - 1
                      degrees of freedom: a handful of seeds is far from a normal sample);
                      over paired differences (the same seeds at two grid points) it is the
                      paired t interval.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Sequence

import numpy as np
from scipy import stats

from jtl import metrics

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 500
BOOTSTRAP_SEED = 0


def _z(confidence: float) -> float:
  return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE
                    ) -> tuple[float, float]:
  """The Wilson score interval of a proportion successes / n; (0, 1) when n is 0."""
  if n <= 0:
    return 0.0, 1.0
  z, p = _z(confidence), successes / n
  denominator = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denominator
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
  # Exactly 0 (1) when nothing (everything) succeeded, where rounding would leave 1e-17.
  low = 0.0 if successes == 0 else max(0.0, centre - half)
  high = 1.0 if successes == n else min(1.0, centre + half)
  return low, high


def bootstrap_macro_f1(labels: np.ndarray, preds: np.ndarray, num_classes: int, *,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
  """Percentile bootstrap interval of macro F1 (metrics.macro_f1's definition): `resamples`
  draws of len(labels) examples with replacement, from a generator seeded with `seed`, so the
  same predictions give the same interval on every run."""
  labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
  n = len(labels)
  if n == 0:
    return 0.0, 1.0
  rng = np.random.default_rng(seed)
  cell = labels * num_classes + preds  # the confusion-matrix cell of each example
  scores = np.empty(resamples)
  chunk = max(1, 2_000_000 // n)  # resamples at a time: bounded memory on large test splits
  for start in range(0, resamples, chunk):
    count = min(chunk, resamples - start)
    drawn = cell[rng.integers(0, n, size=(count, n))]
    offsets = (np.arange(count) * num_classes * num_classes)[:, None]
    cms = np.bincount((drawn + offsets).ravel(), minlength=count * num_classes * num_classes)
    scores[start:start + count] = metrics.macro_f1(
        cms.reshape(count, num_classes, num_classes))
  tail = (1 - confidence) / 2
  low, high = np.quantile(scores, [tail, 1 - tail])
  return float(low), float(high)


def final_intervals(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict:
  """final_metrics.json's interval fields of a test evaluation's per-example arrays."""
  labels, preds = np.asarray(labels), np.asarray(preds)
  correct = int(np.sum(labels == preds))
  return {
      "test_accuracy_ci": list(wilson_interval(correct, len(labels))),
      "test_macro_f1_ci": list(bootstrap_macro_f1(labels, preds, num_classes)),
      "intervals": {"confidence": CONFIDENCE, "test_accuracy_ci": "wilson score",
                    "test_macro_f1_ci": "percentile bootstrap over the test examples",
                    "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
                    "bootstrap_seed": BOOTSTRAP_SEED},
  }


@dataclasses.dataclass(frozen=True)
class SeedSummary:
  """A figure over n seeds: mean, sample standard deviation (ddof 1) and the Student's t
  interval of the mean. std, low and high are None below two values."""
  n: int
  mean: float | None
  std: float | None
  low: float | None
  high: float | None

  @property
  def excludes_zero(self) -> bool:
    """Whether the interval lies wholly on one side of 0 (for differences: a real one)."""
    return self.low is not None and (self.low > 0 or self.high < 0)


def seed_summary(values: Sequence[float], confidence: float = CONFIDENCE) -> SeedSummary:
  values = np.asarray([v for v in values if v is not None], np.float64)
  n = len(values)
  if n == 0:
    return SeedSummary(0, None, None, None, None)
  mean = float(values.mean())
  if n == 1:
    return SeedSummary(1, mean, None, None, None)
  std = float(values.std(ddof=1))
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
  return SeedSummary(n, mean, std, mean - half, mean + half)
