"""Error analysis and report.md: the pure functions on hand-made inputs (marked fast), then a
tiny run, on images and on cached features, whose files are checked against final_metrics.json
and against an independent evaluation of the exported model."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config, write_image_folder
from jtl import error_analysis as ea
from jtl import evaluation, report_md
from jtl.commands import report as report_command

NAMES = ["cat", "ant", "bee"]


def _read_csv(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Pure functions.

@pytest.mark.fast
def test_most_confused_sorts_by_count_then_names_and_drops_the_diagonal_and_zeros():
  cm = [[5, 2, 0],   # cat -> ant 2
        [2, 3, 1],   # ant -> cat 2, ant -> bee 1
        [0, 2, 9]]   # bee -> ant 2
  assert ea.most_confused(cm, NAMES) == [("ant", "cat", 2), ("bee", "ant", 2), ("cat", "ant", 2),
                                         ("ant", "bee", 1)]
  assert ea.most_confused(np.diag([4, 5, 6]), NAMES) == []


@pytest.mark.fast
def test_top_k_losses_breaks_ties_by_position_and_takes_what_there_is():
  losses = np.array([0.5, 2.0, 0.5, 2.0, 1.0], np.float32)
  assert ea.top_k_losses(losses, 3).tolist() == [1, 3, 4]
  assert ea.top_k_losses(losses, 10).tolist() == [1, 3, 4, 0, 2]
  assert ea.top_k_losses(losses, 0).tolist() == []
  assert ea.top_k_losses(np.zeros(0), 16).tolist() == []
  # A diverged example first, ahead of an infinite loss at a later position.
  assert ea.top_k_losses(np.array([1.0, np.inf, np.nan]), 2).tolist() == [1, 2]
  assert ea.top_k_losses(np.array([1.0, np.nan, np.inf]), 2).tolist() == [1, 2]


@pytest.mark.fast
def test_example_indices_follow_the_global_batch_layout_of_several_processes():
  # 7 examples, 2 processes, local batches of 2: process 0 evaluates 0, 2, 4, 6 and process 1
  # 1, 3, 5 and one pad; each global batch is process 0's two rows, then process 1's.
  assert evaluation.example_indices(7, 2, 2).tolist() == [0, 2, 1, 3, 4, 6, 5]
  assert evaluation.example_indices(5, 4, 1).tolist() == [0, 1, 2, 3, 4]
  assert evaluation.example_indices(0, 4, 2).tolist() == []


@pytest.mark.fast
def test_in_example_order_reorders_and_refuses_a_mismatch():
  rows = np.array([0, 2, 1, 3])
  labels = np.array([0, 1, 2, 0])
  arrays = {"label": labels[rows], "loss": np.array([0.0, 0.2, 0.1, 0.3])}
  ordered = ea.in_example_order(arrays, rows, labels)
  assert ordered["label"].tolist() == labels.tolist()
  assert ordered["loss"].tolist() == [0.0, 0.1, 0.2, 0.3]
  with pytest.raises(ValueError, match="differ from the split's labels"):
    ea.in_example_order(arrays, np.arange(4), labels)
  with pytest.raises(ValueError, match="3 predictions and 4 row indices for a split of 4"):
    ea.in_example_order({"label": labels[:3], "loss": np.zeros(3)}, rows, labels)


@pytest.mark.fast
def test_top_losses_rows_and_captions():
  logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.25, 0.5, 0.25]]))
  ordered = {"logits": logits, "pred": logits.argmax(1), "label": np.array([0, 0, 1]),
             "loss": -logits[np.arange(3), [0, 0, 1]]}
  table = type("Table", (), {"sources": np.array(["a.png", "b.png", "c.png"], object),
                             "from_files": True})()
  worst = ea.top_losses(ordered, table, NAMES, "test", k=2)
  assert [(t.index, t.source, t.true_class, t.predicted_class) for t in worst] == [
      (1, "b.png", "cat", "bee"), (2, "c.png", "ant", "ant")]
  assert worst[0].probability == pytest.approx(0.8)
  assert worst[0].loss == pytest.approx(-np.log(0.1))
  assert worst[0].caption() == "true: cat\npred: bee (0.80)\nloss 2.3"
  table.from_files = False
  assert ea.top_losses(ordered, table, NAMES, "val", k=1)[0].source == "val record 1"


@pytest.mark.fast
def test_pictures_are_the_eval_pixels_of_files_and_of_in_memory_records(tmp_path):
  import dataclasses
  from jtl import data as data_lib
  from jtl.data.preprocess import Preprocess, load_eval_image
  root = str(tmp_path / "data")
  write_image_folder(root, num_classes=2, per_class=2, size=23, splits=("train", "test"))
  table = data_lib.open_dataset(f"folder:{root}", val_fraction=0).table("test")
  encoded = np.empty(len(table), object)
  encoded[:] = [Path(p).read_bytes() for p in table.sources]
  records = dataclasses.replace(table, sources=encoded, from_files=False)  # as tfds_source has
  pp = Preprocess(image_size=16, crop_pct=0.875, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
  for i in range(len(table)):
    pixels = ea.example_pixels(table, i, pp)
    assert pixels.dtype == np.uint8 and pixels.shape == (16, 16, 3)
    np.testing.assert_array_equal(ea.example_pixels(records, i, pp), pixels)
    model_input = load_eval_image(table.sources[i], pp)  # what evaluation feeds, normalised
    restored = (model_input * np.array(pp.std) + np.array(pp.mean)) * 255.0
    np.testing.assert_array_equal(np.round(restored).astype(np.uint8), pixels)


def _final(**extra):
  cm = [[3, 1, 0], [0, 2, 2], [0, 0, 4]]
  per_class = {"cat": dict(precision=1.0, recall=0.75, f1=0.857142, support=4),
               "a|b": dict(precision=2 / 3, recall=0.5, f1=0.571428, support=4),
               "bee": dict(precision=2 / 3, recall=1.0, f1=0.8, support=4)}
  return {"split": "test", "test_accuracy": 0.75, "test_top5": 1.0, "test_loss": 0.61,
          "test_macro_f1": 0.7428, "per_class": per_class, "confusion_matrix": cm,
          "num_test_examples": 12, "trainable_params": 10, "total_params": 40, "steps": 7,
          "train_seconds": 1.5, "feature_cache": True, **extra}


@pytest.mark.fast
def test_report_shows_the_fields_that_exist_and_escapes_class_names(tmp_path):
  final = _final(test_balanced_accuracy=0.7512, test_ema_accuracy=0.8125)
  text = report_md.build_report(final, {"model": "tiny_cnn", "strategy": "partial"},
                                str(tmp_path))
  lines = text.splitlines()
  assert lines[0] == "# tiny_cnn"
  assert "| accuracy | 0.7500 | `test_accuracy` |" in lines
  assert "| balanced accuracy | 0.7512 | `test_balanced_accuracy` |" in lines
  assert "| test ema accuracy | 0.8125 | `test_ema_accuracy` |" in lines  # a key unknown here
  assert not any("macro precision" in line for line in lines)  # absent from this final
  assert "| trainable / total parameters | 10 / 40 (25.0%) |" in lines
  assert "| train seconds | 1.5 |" in lines and "| feature cache | yes |" in lines
  assert "| a\\|b | 0.6667 | 0.5000 | 0.5714 | 4 |" in lines
  assert lines.index("| a\\|b | bee | 2 |") < lines.index("| cat | a\\|b | 1 |")
  assert "curves.png" not in text and "top_losses.png" not in text  # not in tmp_path


@pytest.mark.fast
def test_regenerate_cli_rewrites_the_report_and_pairs(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with pytest.raises(SystemExit) as exited:  # as predict and argparse do
    report_command.main(["--workdir", str(workdir)])
  assert exited.value.code == 2
  assert f"error: {workdir}: no final_metrics.json" in capsys.readouterr().err
  (workdir / "final_metrics.json").write_text(json.dumps(_final()))
  (workdir / "config.json").write_text(json.dumps({"model": "m", "dataset": "folder:x"}))
  (workdir / "curves.png").write_bytes(b"")
  assert report_command.main(["--workdir", str(workdir)]) == 0
  text = (workdir / "report.md").read_text()
  assert text.startswith("# m on folder:x\n")
  assert "![loss and accuracy per epoch](curves.png)" in text
  assert _read_csv(str(workdir / ea.MOST_CONFUSED_CSV)) == [
      {"true": "a|b", "predicted": "bee", "count": "2"},
      {"true": "cat", "predicted": "a|b", "count": "1"}]


# ---------------------------------------------------------------------------------------------
# A run.

@pytest.fixture(scope="module", params=["images", "feature_cache"])
def run(request, tmp_path_factory):
  """One epoch at a small learning rate, so that the test split has errors; the test split (36)
  is not a multiple of the eval batch (8), so the last batch is padded."""
  from jtl import train
  root = tmp_path_factory.mktemp(f"error_analysis_{request.param}")
  data = str(root / "data")
  write_image_folder(data, num_classes=3, per_class=12, size=20)
  overrides = {"num_epochs": 1, "optimizer.lr": 0.003}
  if request.param == "feature_cache":
    overrides["strategy"] = "feature_extraction"
  workdir = str(root / "run")
  train.train_and_evaluate(tiny_config(data, **overrides), workdir)
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    final = json.load(f)
  assert final["feature_cache"] == (request.param == "feature_cache")
  return workdir, final


def test_most_confused_csv_is_the_off_diagonal_of_final_metrics(run):
  workdir, final = run
  cm = np.asarray(final["confusion_matrix"])
  names = list(final["per_class"])
  rows = _read_csv(os.path.join(workdir, ea.MOST_CONFUSED_CSV))
  off = {(names[i], names[j]): int(cm[i, j]) for i in range(3) for j in range(3)
         if i != j and cm[i, j]}
  assert off, "the run should misclassify something at this learning rate"
  assert {(r["true"], r["predicted"]): int(r["count"]) for r in rows} == off
  counts = [int(r["count"]) for r in rows]
  assert counts == sorted(counts, reverse=True)


def _independent_losses(workdir, paths):
  """Logits of the exported model on each file through load_eval_image (predict's path)."""
  from jtl.data.preprocess import Preprocess, load_eval_image
  from jtl.export import load_exported
  model = load_exported(workdir)
  pp = Preprocess.from_pretrained_cfg(model.pretrained_cfg)
  logits = np.asarray(model.predict(np.stack([load_eval_image(p, pp) for p in paths])),
                      np.float64)
  labels = np.array([model.pretrained_cfg.label_names.index(os.path.basename(os.path.dirname(p)))
                     for p in paths])
  top = logits.max(1, keepdims=True)
  log_z = (top + np.log(np.exp(logits - top).sum(1, keepdims=True)))[:, 0]
  return log_z - logits[np.arange(len(paths)), labels], logits, model.pretrained_cfg.label_names


def test_top_losses_are_the_largest_losses_of_an_independent_evaluation(run):
  workdir, final = run
  data = os.path.join(os.path.dirname(workdir), "data", "test")
  paths = sorted(os.path.join(data, c, f) for c in os.listdir(data)
                 for f in os.listdir(os.path.join(data, c)))
  losses, logits, names = _independent_losses(workdir, paths)
  rows = _read_csv(os.path.join(workdir, ea.TOP_LOSSES_CSV))
  assert len(rows) == ea.NUM_TOP_LOSSES == 16
  by_loss = np.argsort(-losses, kind="stable")
  assert losses[by_loss[15]] - losses[by_loss[16]] > 1e-4  # no near-tie at the cut
  assert [r["source"] for r in rows] == [paths[i] for i in by_loss[:16]]
  for row, i in zip(rows, by_loss[:16]):
    assert float(row["loss"]) == pytest.approx(losses[i], abs=1e-4)
    assert row["true"] == os.path.basename(os.path.dirname(paths[i]))
    assert row["predicted"] == names[int(np.argmax(logits[i]))]
    probs = np.exp(logits[i] - logits[i].max())
    assert float(row["probability"]) == pytest.approx(probs.max() / probs.sum(), abs=1e-4)
  with Image.open(os.path.join(workdir, ea.TOP_LOSSES_PNG)) as picture:
    assert picture.size == (1040, 1280)  # 4 x 4 tiles of 2.6 x 3.1 in and a 0.4 in title, 100 dpi


def test_report_md_holds_final_metrics(run):
  workdir, final = run
  with open(os.path.join(workdir, report_md.REPORT_MD), encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert f"| accuracy | {final['test_accuracy']:.4f} | `test_accuracy` |" in lines
  if "wall_seconds" in final:  # added by the last write of final_metrics.json: so is the report
    assert f"| wall seconds | {final['wall_seconds']} |" in lines
  for name, c in final["per_class"].items():
    assert (f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | "
            f"{c['support']} |") in lines
  for picture in ("curves.png", "confusion_matrix.png", ea.TOP_LOSSES_PNG):
    assert any(f"]({picture})" in line for line in lines), picture
