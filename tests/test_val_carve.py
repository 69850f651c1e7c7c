"""The carved validation split sized for the decisions it drives: at least val_min_per_class
images of each class (at most a quarter of the class), the carve of older runs kept for them by
the same-run rule, a minimum no class can give refused, and the warnings of a validation split
too small to rank checkpoints."""
import inspect
import json

import numpy as np
import pytest

from conftest import write_image_folder
from jtl import config as config_lib
from jtl import data
from jtl.data import class_counts, splits
from jtl.evaluation import RANKING_MIN_PER_CLASS, RankingCheck, Splits


@pytest.fixture(scope="module")
def folder_300(tmp_path_factory):
  """3 classes x 100 training images, no validation folder."""
  root = str(tmp_path_factory.mktemp("carve") / "data")
  write_image_folder(root, num_classes=3, per_class=100, size=8, splits=("train",))
  return root


def _per_class(ds, split):
  return np.bincount(ds.table(split).labels, minlength=ds.num_classes)


def test_the_carve_of_a_300_image_folder_holds_the_per_class_minimum(folder_300):
  ds = data.open_dataset(f"folder:{folder_300}", val_fraction=0.05, seed=0)
  assert ds.num_examples("train") + ds.num_examples("val") == 300
  # round(0.05 * 100) = 5 per class alone; the default minimum raises it to 20.
  assert _per_class(ds, "val").tolist() == [20, 20, 20]
  assert _per_class(ds, "train").tolist() == [80, 80, 80]
  old = data.open_dataset(f"folder:{folder_300}", val_fraction=0.05, seed=0, val_min_per_class=0)
  assert _per_class(old, "val").tolist() == [5, 5, 5]
  # The minimum adds to the older carve: its 5 images per class still validate.
  assert set(old.table("val").sources) < set(ds.table("val").sources)
  assert not set(ds.table("val").sources) & set(ds.table("train").sources)


def test_a_carve_that_meets_the_minimum_is_the_older_carve(folder_300):
  # round(0.25 * 100) = 25 >= 20: the very images jtl validated on before the minimum existed.
  new = data.open_dataset(f"folder:{folder_300}", val_fraction=0.25, seed=3)
  old = data.open_dataset(f"folder:{folder_300}", val_fraction=0.25, seed=3, val_min_per_class=0)
  assert list(new.table("val").sources) == list(old.table("val").sources)
  assert list(new.table("train").sources) == list(old.table("train").sources)


def test_the_minimum_takes_at_most_a_quarter_of_a_class():
  assert splits.holdout_size(100, 0.05, 20) == 20
  assert splits.holdout_size(40, 0.05, 20) == 10     # a quarter of 40
  assert splits.holdout_size(12, 0.25, 20) == 3      # the tests' tiny folders: as before
  assert splits.holdout_size(1000, 0.05, 20) == 50   # the fraction gives more
  assert splits.holdout_size(100, 0.0, 20) == 0      # no validation asked for: none
  assert splits.holdout_size(3, 0.1, 0) == 1         # every class still validates and trains
  assert splits.holdout_size(1, 0.3, 20) == 0


def test_one_default_for_the_minimum_everywhere():
  default = config_lib.default_config().val_min_per_class
  assert default == config_lib.DEFAULT_VAL_MIN_PER_CLASS == splits.DEFAULT_VAL_MIN_PER_CLASS
  assert default == RANKING_MIN_PER_CLASS
  assert inspect.signature(data.open_dataset).parameters["val_min_per_class"].default == default


def test_a_run_saved_before_the_key_keeps_its_carve():
  config = config_lib.default_config()
  saved = config_lib.to_jsonable(config)
  del saved["val_min_per_class"]
  # It ran with the carve val_min_per_class=0 reproduces, not the default's.
  assert config_lib.same_run_differences(saved, config) == ["val_min_per_class: saved 0, now 20"]
  config.val_min_per_class = 0
  assert config_lib.same_run_differences(saved, config) == []


def test_a_minimum_larger_than_a_class_is_refused_naming_the_key(folder_300):
  counts = class_counts.carved_class_counts(f"folder:{folder_300}")
  assert counts == {"class_0": 100, "class_1": 100, "class_2": 100}
  config = config_lib.default_config()
  config.val_min_per_class = 101
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.val_min_per_class=101 is larger than class 'class_0' "
                           r"\(100 training images\)"):
    config_lib.validate_val_minimum(config, counts)
  config.val_min_per_class = 100
  config_lib.validate_val_minimum(config, counts)
  # The default adapts to small classes (a quarter of each) rather than refusing them.
  config_lib.validate_val_minimum(config_lib.default_config(), {"a": 5, "b": 12})
  with pytest.raises(config_lib.ConfigError, match="val_min_per_class=-1: must be >= 0"):
    config.val_min_per_class = -1
    config_lib.validate(config)


def test_a_folder_with_its_own_validation_split_is_not_carved(tmp_path):
  root = str(tmp_path / "data")
  write_image_folder(root, num_classes=2, per_class=3, size=8, splits=("train", "val"))
  assert class_counts.carved_class_counts(f"folder:{root}") is None
  assert class_counts.carved_class_counts("tfds:mnist") is None


def _result(accuracy, per_class_support):
  return {"accuracy": accuracy, "loss": 0.1, "num_examples": sum(per_class_support),
          "per_class": {f"c{i}": {"support": s} for i, s in enumerate(per_class_support)}}


def test_the_ranking_check_warns_of_a_small_split_a_tie_on_it_and_a_ceiling():
  check = RankingCheck(Splits("val", "test", "val_accuracy"))
  first = check.observe(_result(0.9, [6, 6, 6]), step=10, best=None, best_step=None)
  assert len(first) == 1 and "the val split (18 images) is too small to rank" in first[0]
  assert "6 images in its smallest class" in first[0]
  assert check.observe(_result(0.95, [6, 6, 6]), step=20, best=0.9, best_step=10) == []
  (tie,) = check.observe(_result(0.95, [6, 6, 6]), step=30, best=0.95, best_step=20)
  assert "val_accuracy 0.9500 at step 30 ties the best, reached at step 20" in tie
  (ceiling,) = check.observe(_result(1.0, [6, 6, 6]), step=40, best=0.95, best_step=20)
  assert "val_accuracy reached 1.0000 at step 40" in ceiling
  # Each once per run.
  assert check.observe(_result(1.0, [6, 6, 6]), step=50, best=1.0, best_step=40) == []
  # 20 per class: a tie is a plateau, not a split too small; the ceiling still blinds it.
  large = RankingCheck(Splits("val", "test", "val_accuracy"))
  assert large.observe(_result(0.5, [20, 25]), step=1, best=None, best_step=None) == []
  assert large.observe(_result(0.5, [20, 25]), step=2, best=0.5, best_step=1) == []
  assert len(large.observe(_result(1.0, [20, 25]), step=3, best=0.5, best_step=1)) == 1
  loss = RankingCheck(Splits("val", "test", "val_loss"))
  assert loss.observe(_result(1.0, [20, 25]) | {"loss": 1.0}, step=1, best=None,
                      best_step=None) == []


def test_a_records_source_is_counted_from_its_manifest(tmp_path):
  from jtl.data import convert
  root = str(tmp_path / "data")
  write_image_folder(root, num_classes=2, per_class=5, size=8, splits=("train", "test"))
  out = str(tmp_path / "records")
  convert.convert(f"folder:{root}", out, show_progress=False)
  assert class_counts.carved_class_counts(f"records:{out}") == {"class_0": 5, "class_1": 5}
  with open(f"{out}/manifest.json") as f:
    assert "val" not in json.load(f)["splits"]
