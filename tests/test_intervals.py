"""jtl.intervals: the 95% intervals of a run's test figures (Wilson, bootstrap) and of a study's
figures over seeds (Student's t), and report.md showing them beside the figures."""
import math
import statistics

import numpy as np
import pytest

from jtl import intervals, metrics, report_md

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def _wilson_closed_form(k, n, z=Z95):
  p = k / n
  centre = p + z * z / (2 * n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def test_wilson_interval_of_95_of_100_is_the_closed_form():
  low, high = intervals.wilson_interval(95, 100)
  expected = _wilson_closed_form(95, 100)
  assert low == pytest.approx(expected[0], abs=1e-9)
  assert high == pytest.approx(expected[1], abs=1e-9)
  # The published figures (e.g. Newcombe 1998's method 3): 0.8882..0.9785.
  assert (round(low, 4), round(high, 4)) == (0.8882, 0.9785)


def test_wilson_interval_stays_in_0_1_and_holds_the_proportion():
  assert intervals.wilson_interval(0, 40)[0] == 0.0
  assert intervals.wilson_interval(40, 40)[1] == 1.0
  for k, n in ((0, 40), (40, 40), (3, 7), (5400, 10000)):
    low, high = intervals.wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0
  # A 540-image test split at 97%: about +-1.5 points, the "+-1.6".
  low, high = intervals.wilson_interval(524, 540)
  assert 0.025 < high - low < 0.035


def _predictions(n=300, num_classes=4, accuracy=0.8, seed=1):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n)
  wrong = rng.random(n) > accuracy
  preds = np.where(wrong, (labels + rng.integers(1, num_classes, n)) % num_classes, labels)
  return labels, preds


def test_macro_f1_of_confusion_matrices_is_classification_reports():
  labels, preds = _predictions(num_classes=5)
  preds[preds == 4] = 0  # class 4 never predicted: precision 0 by zero_division=0
  report = metrics.classification_report(labels, preds, np.ones(len(labels)),
                                         np.zeros(len(labels)), list("abcde"))
  cm = metrics.confusion_matrix(labels, preds, 5)
  assert metrics.macro_f1(cm) == pytest.approx(report["macro_f1"], abs=1e-12)
  stacked = metrics.macro_f1(np.stack([cm, np.eye(5, dtype=np.int64)]))
  assert stacked.shape == (2,) and stacked[1] == 1.0


def test_bootstrap_interval_is_identical_on_rerun_with_the_same_seed():
  labels, preds = _predictions()
  first = intervals.bootstrap_macro_f1(labels, preds, 4, resamples=300, seed=7)
  again = intervals.bootstrap_macro_f1(labels, preds, 4, resamples=300, seed=7)
  other = intervals.bootstrap_macro_f1(labels, preds, 4, resamples=300, seed=8)
  assert first == again
  assert first != other
  observed = metrics.macro_f1(metrics.confusion_matrix(labels, preds, 4))
  assert first[0] < observed < first[1]
  # Four times the examples: about half the width.
  big_labels, big_preds = _predictions(n=1200)
  big = intervals.bootstrap_macro_f1(big_labels, big_preds, 4, resamples=300, seed=7)
  assert 0.3 < (big[1] - big[0]) / (first[1] - first[0]) < 0.75


def test_bootstrap_chunks_give_the_same_draws_as_one_pass():
  # Resamples are drawn in chunks bounded in memory; the chunking must not change the answer.
  labels, preds = _predictions(n=50)
  whole = intervals.bootstrap_macro_f1(labels, preds, 4, resamples=40, seed=3)
  rng = np.random.default_rng(3)
  scores = [metrics.macro_f1(metrics.confusion_matrix(labels[i], preds[i], 4))
            for i in rng.integers(0, 50, size=(40, 50))]
  assert whole == tuple(float(q) for q in np.quantile(scores, [0.025, 0.975]))


def test_final_intervals_are_what_final_metrics_json_gains():
  labels, preds = _predictions(n=200)
  fields = intervals.final_intervals(labels, preds, 4)
  correct = int(np.sum(labels == preds))
  assert fields["test_accuracy_ci"] == list(intervals.wilson_interval(correct, 200))
  assert fields["test_macro_f1_ci"] == list(intervals.bootstrap_macro_f1(labels, preds, 4))
  assert fields["intervals"]["confidence"] == 0.95
  assert fields["intervals"]["bootstrap_resamples"] == intervals.BOOTSTRAP_RESAMPLES


def test_seed_summary_is_the_student_t_interval():
  values = [0.9296, 0.9574, 0.9648]
  s = intervals.seed_summary(values)
  t_2 = 4.302652729749464  # Student's t, 2 degrees of freedom, 97.5% quantile
  assert s.n == 3 and s.mean == pytest.approx(statistics.mean(values), abs=1e-12)
  assert s.std == pytest.approx(statistics.stdev(values), abs=1e-12)
  half = t_2 * statistics.stdev(values) / math.sqrt(3)
  assert (s.low, s.high) == pytest.approx((s.mean - half, s.mean + half), abs=1e-9)
  one = intervals.seed_summary([0.5, None])
  assert (one.n, one.mean, one.std, one.low, one.high) == (1, 0.5, None, None, None)
  assert not one.excludes_zero
  assert intervals.seed_summary([0.01, 0.02, 0.015]).excludes_zero
  assert not intervals.seed_summary([-0.01, 0.02, 0.015]).excludes_zero


def test_report_shows_the_intervals_beside_the_figures(tmp_path):
  final = {"split": "test", "test_accuracy": 0.75, "test_macro_f1": 0.7428,
           "test_accuracy_ci": [0.4677, 0.9111], "test_macro_f1_ci": [0.41, 0.93],
           "intervals": {"confidence": 0.95, "test_accuracy_ci": "wilson score",
                         "test_macro_f1_ci": "percentile bootstrap over the test examples",
                         "bootstrap_resamples": 500, "bootstrap_seed": 0},
           "per_class": {"a": dict(precision=1.0, recall=1.0, f1=1.0, support=12)},
           "confusion_matrix": [[12]], "num_test_examples": 12}
  lines = report_md.build_report(final, {}, str(tmp_path)).splitlines()
  at = lines.index("| accuracy | 0.7500 | `test_accuracy` |")
  assert lines[at + 1] == "| accuracy, 95% interval | 0.4677 .. 0.9111 | `test_accuracy_ci` |"
  at = lines.index("| macro F1 | 0.7428 | `test_macro_f1` |")
  assert lines[at + 1] == "| macro F1, 95% interval | 0.4100 .. 0.9300 | `test_macro_f1_ci` |"
  note = next(line for line in lines if line.startswith("Intervals: 95%"))
  assert "wilson score over the 12 examples" in note
  assert "500 resamples, seed 0" in note
