"""jtl.ablation (`jtl ablate`): a grid of tiny engine runs, its summary, and resuming a grid."""
import csv
import json
import os

import pytest

from conftest import tiny_config
from jtl import ablation
from jtl import config as config_lib
from jtl import train


def _summary(out):
  with open(os.path.join(out, "summary.csv")) as f:
    return list(csv.DictReader(f))


def _counting_train(calls):
  def train_fn(config, workdir):
    calls.append(os.path.basename(workdir))
    return train.train_and_evaluate(config, workdir)
  return train_fn


def test_grid_summary_comes_from_each_runs_final_metrics_and_a_rerun_skips_them(
    image_folder, tmp_path):
  out = str(tmp_path / "ablation")
  base = tiny_config(image_folder, num_epochs=1)
  grid = {"freeze_depth": [0, 2], "optimizer.lr": [0.03]}
  calls = []
  ablation.run_grid(base, grid, out, train_fn=_counting_train(calls))
  names = ["freeze_depth=0_optimizer.lr=0.03", "freeze_depth=2_optimizer.lr=0.03"]
  assert calls == names

  rows = _summary(out)
  assert [(r["freeze_depth"], r["optimizer.lr"], r["run"]) for r in rows] == [
      ("0", "0.03", names[0]), ("2", "0.03", names[1])]
  for row in rows:
    with open(os.path.join(out, row["run"], "final_metrics.json")) as f:
      final = json.load(f)
    with open(os.path.join(out, row["run"], "config.json")) as f:
      assert json.load(f)["freeze_depth"] == int(row["freeze_depth"])
    assert float(row["test_accuracy"]) == final["test_accuracy"]
    assert float(row["test_macro_f1"]) == final["test_macro_f1"]
    assert int(row["trainable_params"]) == final["trainable_params"]
    assert float(row["train_seconds"]) == final["train_seconds"]
    for key in ("step_seconds", "images_per_second", "wall_seconds", "best_val"):
      assert float(row[key]) == final[key], key
    assert final["wall_seconds"] > final["train_seconds"] > 0
    # images_per_second is rounded to 0.1 and train_seconds to 10 ms, 8% of a 0.12 s run (seen
    # here): the figure must lie within what those two roundings allow.
    images, seconds = final["steps"] * base.batch_size, final["train_seconds"]
    assert (images / (seconds + 0.005) - 0.05 <= final["images_per_second"]
            <= images / max(seconds - 0.005, 1e-9) + 0.05)
    assert row["status"] == "done"
  # Freezing stem and stage1 leaves fewer parameters to train.
  assert int(rows[1]["trainable_params"]) < int(rows[0]["trainable_params"])
  with open(os.path.join(out, "summary.md")) as f:
    table = f.read().splitlines()
  assert table[0].startswith("| freeze_depth | optimizer.lr | trainable_params | step_seconds")
  assert len(table) == 2 + 2
  assert os.path.getsize(os.path.join(out, "ablation.png")) > 0

  final_steps = {n: json.load(open(os.path.join(out, n, "final_metrics.json")))["steps"]
                 for n in names}
  # The same grid again: nothing runs, the summary is the same.
  summary_before = open(os.path.join(out, "summary.csv")).read()
  calls.clear()
  ablation.run_grid(base, grid, out, train_fn=_counting_train(calls))
  assert calls == []
  assert open(os.path.join(out, "summary.csv")).read() == summary_before

  # A grid grown by one depth runs only the new point.
  grown = {"freeze_depth": [0, 1, 2], "optimizer.lr": [0.03]}
  ablation.run_grid(base, grown, out, train_fn=_counting_train(calls))
  assert calls == ["freeze_depth=1_optimizer.lr=0.03"]
  assert [r["freeze_depth"] for r in _summary(out)] == ["0", "1", "2"]

  # Finished runs made with another config are refused, before anything runs.
  with pytest.raises(config_lib.ConfigError, match="label_smoothing: saved 0.0, now 0.1"):
    ablation.run_grid(tiny_config(image_folder, num_epochs=1, label_smoothing=0.1), grid, out,
                      train_fn=_counting_train(calls))
  assert calls == ["freeze_depth=1_optimizer.lr=0.03"]
  # A larger budget is the same run continued (the engine's one same-run rule): they run on.
  calls.clear()
  ablation.run_grid(tiny_config(image_folder, num_epochs=2), grid, out,
                    train_fn=_counting_train(calls))
  assert calls == names
  assert all(json.load(open(os.path.join(out, n, "final_metrics.json")))["steps"]
             > final_steps[n] for n in names)


def test_a_failed_run_is_reported_and_the_others_still_run(image_folder, tmp_path):
  out = str(tmp_path / "ablation")

  def train_fn(config, workdir):
    if config.optimizer.lr > 0.5:
      raise FloatingPointError("diverged")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"test_accuracy": 0.5, "test_macro_f1": 0.25, "trainable_params": 7,
                 "train_seconds": 1.5}, f)
    return {}

  rows = ablation.run_grid(tiny_config(image_folder), {"optimizer.lr": [1.0, 0.1]}, out,
                           train_fn=train_fn)
  assert [(r["optimizer.lr"], r["status"], r["test_accuracy"]) for r in rows] == [
      (1.0, "failed", None), (0.1, "done", 0.5)]
  assert [r["test_accuracy"] for r in _summary(out)] == ["", "0.5"]


def test_grid_and_overrides_are_typed_like_the_config():
  config = config_lib.default_config()
  grid = ablation.parse_grid(config, ["freeze_depth=0,2,4", "optimizer.lr=1e-3, 3e-3",
                                      "augment.hflip=true,false", "optimizer.name=adam,sgd"])
  assert grid == {"freeze_depth": [0, 2, 4], "optimizer.lr": [1e-3, 3e-3],
                  "augment.hflip": [True, False], "optimizer.name": ["adam", "sgd"]}
  assert type(grid["freeze_depth"][0]) is int
  with pytest.raises(config_lib.ConfigError,
                     match='config.optimizer.lrr: unknown key \\(did you mean "lr"'):
    ablation.parse_grid(config, ["optimizer.lrr=1e-3"])
  with pytest.raises(config_lib.ConfigError, match="config.freeze_depth: '1.5' is not of type int"):
    ablation.parse_grid(config, ["freeze_depth=1.5"])
  with pytest.raises(config_lib.ConfigError, match="not key=value"):
    ablation.parse_assignment("num_epochs")


def test_default_grid_spreads_freezing_over_the_models_stages():
  config = config_lib.default_config()
  config.model = "efficientnet_lite0"  # stem, stage1..7, top, head
  assert ablation.default_grid(config) == {"freeze_depth": [0, 3, 6, 9],
                                         "optimizer.lr": [3e-4, 1e-3, 3e-3]}
  config.model = "resnet50"  # stem, stage1..4, head
  assert ablation.default_grid(config)["freeze_depth"] == [0, 2, 3, 5]
