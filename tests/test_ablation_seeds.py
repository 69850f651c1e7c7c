"""`jtl ablate --seeds N`: every grid point run with seeds 0..N-1, the summary aggregating them
(means, standard deviations, Student's t intervals) and comparing neighbouring points seed by
seed; bad input refused before any run."""
import csv
import json
import math
import os
import statistics

import pytest

from conftest import tiny_config, write_image_folder
from jtl import ablation, intervals, train
from jtl.commands import ablate

T_975 = {1: 12.706204736174694, 2: 4.302652729749464}  # Student's t quantiles, by df


def _csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _final(out, run):
  with open(os.path.join(out, run, "final_metrics.json")) as f:
    return json.load(f)


def _hand_interval(values):
  """mean, sample std, 95% t interval, computed here from the values alone."""
  n, mean, std = len(values), sum(values) / len(values), statistics.stdev(values)
  half = T_975[n - 1] * std / math.sqrt(n)
  return mean, std, mean - half, mean + half


@pytest.mark.engine
def test_two_depths_with_two_seeds_summarise_their_runs_final_metrics(image_folder, tmp_path):
  out = str(tmp_path / "study")
  base = tiny_config(image_folder, num_epochs=1)
  calls = []

  def counting_train(config, workdir):
    calls.append((os.path.basename(workdir), config.seed))
    return train.train_and_evaluate(config, workdir)

  runs = ablation.run_grid(base, {"freeze_depth": [2, 1]}, out, train_fn=counting_train, seeds=2)
  # Seed 0 of every point first, then seed 1; each run with its own config.seed.
  assert calls == [("freeze_depth=2_seed=0", 0), ("freeze_depth=1_seed=0", 0),
                   ("freeze_depth=2_seed=1", 1), ("freeze_depth=1_seed=1", 1)]
  assert [r["status"] for r in runs] == ["done"] * 4

  points = _csv(os.path.join(out, "summary.csv"))
  assert [(p["freeze_depth"], p["seeds"], p["status"]) for p in points] == [
      ("2", "2", "done"), ("1", "2", "done")]
  finals = {}
  for point in points:
    depth = point["freeze_depth"]
    finals[depth] = [_final(out, f"freeze_depth={depth}_seed={s}") for s in (0, 1)]
    for metric in ("test_accuracy", "test_macro_f1", "train_seconds"):
      expected = _hand_interval([f[metric] for f in finals[depth]])
      got = [float(point[f"{metric}_{stat}"]) for stat in ("mean", "std", "ci_low", "ci_high")]
      assert got == pytest.approx(expected, abs=1e-9), (depth, metric)
    assert int(point["trainable_params"]) == finals[depth][0]["trainable_params"]

  # Every run's own intervals are in final_metrics.json: Wilson over its test examples.
  for depth, seeds in finals.items():
    for final in seeds:
      n = final["num_test_examples"]
      assert final["test_accuracy_ci"] == pytest.approx(
          intervals.wilson_interval(round(final["test_accuracy"] * n), n), abs=1e-12)
      low, high = final["test_macro_f1_ci"]
      assert 0.0 <= low <= high <= 1.0
  per_run = _csv(os.path.join(out, "runs.csv"))
  assert [(r["freeze_depth"], r["seed"]) for r in per_run] == [
      ("2", "0"), ("1", "0"), ("2", "1"), ("1", "1")]
  assert float(per_run[0]["test_accuracy_wilson_low"]) == finals["2"][0]["test_accuracy_ci"][0]

  # Depth 2 vs 1, paired by seed: the differences' mean and t interval (1 degree of freedom).
  (compared,) = _csv(os.path.join(out, "comparisons.csv"))
  differences = [finals["1"][s]["test_accuracy"] - finals["2"][s]["test_accuracy"]
                 for s in (0, 1)]
  assert (compared["axis"], compared["first"], compared["second"], compared["seeds"]) == (
      "freeze_depth", "2", "1", "2")
  if statistics.stdev(differences) > 0:
    mean, _, low, high = _hand_interval(differences)
    assert [float(compared[f"test_accuracy_diff_{s}"]) for s in ("mean", "ci_low", "ci_high")
            ] == pytest.approx([mean, low, high], abs=1e-9)
  with open(os.path.join(out, "summary.md")) as f:
    text = f.read()
  assert "| freeze_depth | seeds | trainable_params | test_accuracy_mean |" in text
  assert "- freeze_depth 2 vs 1: " in text
  assert os.path.getsize(os.path.join(out, "ablation.png")) > 0

  # Resumable like any point: the same study again runs nothing and says the same.
  before = open(os.path.join(out, "summary.csv")).read()
  calls.clear()
  ablation.run_grid(base, {"freeze_depth": [2, 1]}, out, train_fn=counting_train, seeds=2)
  assert calls == [] and open(os.path.join(out, "summary.csv")).read() == before


def _fake_study(accuracies, failing=()):
  """A train_fn writing final_metrics.json with the given test accuracy per (depth, seed)."""
  def train_fn(config, workdir):
    key = (config.freeze_depth, config.seed)
    if key in failing:
      raise FloatingPointError("diverged")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"test_accuracy": accuracies[key], "test_macro_f1": accuracies[key] - 0.01,
                 "trainable_params": 10 - config.freeze_depth, "train_seconds": 2.0 + key[1],
                 "test_accuracy_ci": [accuracies[key] - 0.02, accuracies[key] + 0.02]}, f)
    return {}
  return train_fn


def test_neighbouring_points_are_compared_over_their_common_seeds(image_folder, tmp_path):
  out = str(tmp_path / "study")
  accuracy = {(7, 0): 0.960, (7, 1): 0.965, (7, 2): 0.970,
              (6, 0): 0.966, (6, 1): 0.970, (6, 2): 0.982,
              (5, 0): 0.950, (5, 1): 0.953, (5, 2): 0.0}
  runs = ablation.run_grid(tiny_config(image_folder), {"freeze_depth": [7, 6, 5]}, out,
                           train_fn=_fake_study(accuracy, failing={(5, 2)}), seeds=3)
  assert [r["status"] for r in runs].count("failed") == 1
  points = {p["freeze_depth"]: p for p in _csv(os.path.join(out, "summary.csv"))}
  assert (points["5"]["seeds"], points["5"]["status"]) == ("2", "2/3 done")
  assert float(points["7"]["test_accuracy_mean"]) == pytest.approx(0.965)
  assert float(points["7"]["test_accuracy_std"]) == pytest.approx(0.005)
  assert float(points["7"]["test_accuracy_ci_low"]) == pytest.approx(0.965 - T_975[2] * 0.005
                                                                     / math.sqrt(3))
  compared = _csv(os.path.join(out, "comparisons.csv"))
  # 6 vs 5 over the seeds both finished (seed 2 of depth 5 failed).
  assert [(c["first"], c["second"], c["seeds"]) for c in compared] == [
      ("7", "6", "3"), ("6", "5", "2")]
  # 7 -> 6: differences 0.006, 0.005, 0.012: +0.77 points, interval -0.17..+1.71: noise.
  mean, std, low, high = _hand_interval([0.006, 0.005, 0.012])
  assert [float(compared[0][f"test_accuracy_diff_{s}"]) for s in ("mean", "std", "ci_low",
                                                                   "ci_high")] == pytest.approx(
      [mean, std, low, high])
  assert compared[0]["accuracy_interval_excludes_0"] == "False"
  # 6 -> 5: -0.016 and -0.017: -1.65 points, interval -2.29..-1.01: a real loss.
  assert float(compared[1]["test_accuracy_diff_mean"]) == pytest.approx(-0.0165)
  assert compared[1]["accuracy_interval_excludes_0"] == "True"
  with open(os.path.join(out, "summary.md")) as f:
    lines = f.read().splitlines()
  (seven_six,) = [line for line in lines if line.startswith("- freeze_depth 7 vs 6: ")]
  assert seven_six.startswith("- freeze_depth 7 vs 6: +0.77 points, 95% interval -0.17..+1.71 "
                              "over 3 seeds")
  assert seven_six.endswith("(within noise: the interval holds 0)")
  (six_five,) = [line for line in lines if line.startswith("- freeze_depth 6 vs 5: ")]
  assert six_five.startswith("- freeze_depth 6 vs 5: -1.65 points, 95% interval -2.29..-1.01 "
                             "over 2 seeds")
  assert six_five.endswith("(the interval excludes 0)")


# ---------------------------------------------------------------------------------------------
# Bad input: one error line naming the option, before any run.

def _config_file(tmp_path, root):
  path = tmp_path / "tiny.py"
  path.write_text("from conftest import tiny_config\n\n"
                  f"def get_config():\n  return tiny_config({root!r})\n")
  return str(path)


@pytest.mark.parametrize("argv, expected", [
    (["--seeds", "0"], "error: --seeds 0: must be a positive number of seeds"),
    (["--seeds", "-2"], "error: --seeds -2: must be a positive number of seeds"),
    (["--seeds", "2", "--grid", "seed=0,1"], "error: --grid seed=... and --seeds both set"),
    (["--seeds", "2", "--set", "seed=4"], "error: --set seed=... and --seeds both set"),
    (["--set", "val_min_per_class=13"],
     "error: config.val_min_per_class=13 is larger than class 'class_0' (12 training images)"),
])
def test_bad_input_is_one_error_line_before_any_run(argv, expected, tmp_path, capsys):
  root = str(tmp_path / "data")
  write_image_folder(root, size=8)  # 3 classes x 12 training images
  out = str(tmp_path / "study")
  capsys.readouterr()
  with pytest.raises(SystemExit) as exited:
    ablate.main(["--config", _config_file(tmp_path, root), "--out", out,
                 "--grid", "freeze_depth=1,2", *argv])
  err = capsys.readouterr().err
  assert exited.value.code == 2, err
  error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1 and error_lines[0].startswith(expected), err
  assert not os.path.exists(out)
