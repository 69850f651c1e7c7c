"""The learning-rate range test: the sweep and its suggestion on synthetic curves, the real step
on a tiny CNN (on cached features), its files, its refusals, and optimizer.lr=auto runs that use,
store and on resume reuse the suggestion, starting from the pretrained weights."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from safetensors.numpy import load_file

import run_helpers as rh
from conftest import tiny_config, write_image_folder
from jtl import config as config_lib
from jtl import lr_find, train
from jtl.lr_find import driver
from helpers import StopAt

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
FINDER = {"lr_find.num_steps": 24, "lr_find.min_lr": 1e-4, "lr_find.max_lr": 30.0}


# ---------------------------------------------------------------------------------------------
# The sweep and the suggestion, without training.

def test_the_sweep_rises_exponentially_and_the_smoothing_is_a_debiased_ema():
  np.testing.assert_allclose(lr_find.sweep_lrs(1e-6, 1.0, 7), [1e-6, 1e-5, 1e-4, 1e-3, 1e-2,
                                                               1e-1, 1.0], rtol=1e-12)
  # beta 0.5 over 4, 2, 0: averages 2, 2, 1 divided by 1 - 0.5^(i+1) = 0.5, 0.75, 0.875.
  np.testing.assert_allclose(lr_find.smooth([4.0, 2.0, 0.0], 0.5), [4.0, 2 / 0.75, 1 / 0.875],
                             rtol=1e-12)
  assert list(lr_find.smooth([3.0, 1.0, 2.0], 0.0)) == [3.0, 1.0, 2.0]


def test_the_sweep_stops_at_the_first_smoothed_loss_above_the_factor_times_the_best():
  lrs = lr_find.sweep_lrs(1e-5, 10.0, 60)
  curve = [1.0 + 0.01 * i if i < 30 else 1.3 * 1.8 ** (i - 30) for i in range(60)]
  calls = []

  def loss_at(i, lr):
    calls.append((i, lr))
    return curve[i]
  sweep = lr_find.run_sweep(loss_at, lrs, smoothing=0.0, divergence_factor=4.0)
  # Raw losses (smoothing 0): the best is 1.0 (step 0); 1.3 * 1.8^k > 4 first at k = 2.
  assert len(sweep.lrs) == 33 and calls[-1][0] == 32
  assert sweep.losses == curve[:33] and sweep.smoothed == curve[:33]
  assert [lr for _, lr in calls] == pytest.approx(list(lrs[:33]), rel=1e-12)
  assert sweep.stop_reason.startswith("diverged at lr")
  nan_at_5 = lr_find.run_sweep(lambda i, lr: np.nan if i == 5 else 1.0, lrs, smoothing=0.9,
                               divergence_factor=4.0)
  assert len(nan_at_5.losses) == 5 and nan_at_5.stop_reason.startswith("non-finite loss")


def _tanh_valley(lrs, centre: float):
  """Falls fastest (in log lr) at `centre`, bottoms out, then climbs steeply."""
  x = np.log10(lrs)
  return np.where(x < np.log10(centre) + 2, 2 - np.tanh(2 * (x - np.log10(centre))),
                  1 + 5 * (x - np.log10(centre) - 2))


def test_the_suggestion_is_the_steepest_descent_before_the_minimum():
  lrs = lr_find.sweep_lrs(1e-7, 10.0, 81)   # a tenth of a decade a step: 1e-3 is lrs[40]
  curve = _tanh_valley(lrs, 1e-3)
  suggested = lr_find.suggest_lr(lrs, curve, smoothing=0.0)
  assert suggested == pytest.approx(1e-3, rel=1e-9)
  assert lrs[0] <= suggested < lrs[int(np.argmin(curve))] < lrs[-1]
  # Through the engine's sweep (smoothed, stopped at the divergence) it stays below the cliff.
  sweep = lr_find.run_sweep(lambda i, lr: curve[i], lrs, smoothing=0.9, divergence_factor=4.0)
  smoothed_pick = lr_find.suggest_lr(sweep.lrs, sweep.smoothed, smoothing=0.9)
  assert 1e-3 <= smoothed_pick < sweep.lrs[int(np.argmin(sweep.smoothed))] < sweep.lrs[-1]


def test_the_moving_average_s_first_points_do_not_count_as_the_steepest():
  lrs = lr_find.sweep_lrs(1e-6, 1.0, 61)
  curve = np.concatenate([[3.0, 3.0, 2.5], _tanh_valley(lrs, 1e-3)[3:]])  # a noisy early dip
  assert lr_find.suggest_lr(lrs, curve, smoothing=0.9) == pytest.approx(1e-3, rel=1e-9)
  # Raw losses (smoothing 0) skip the first point alone, and the dip wins.
  assert lr_find.suggest_lr(lrs, curve, smoothing=0.0) == lrs[1]


def test_a_loss_that_never_falls_suggests_the_first_rate_and_a_short_sweep_is_an_error():
  lrs = lr_find.sweep_lrs(1e-4, 1.0, 10)
  assert lr_find.suggest_lr(lrs, np.linspace(1, 3, 10)) == lrs[0]
  with pytest.raises(config_lib.ConfigError, match="config.lr_find.min_lr"):
    lr_find.suggest_lr(lrs[:2], [1.0, 9.0])


# ---------------------------------------------------------------------------------------------
# The key: a number or "auto", on the command line too.

def _parsed(tmp_path, *overrides):
  path = tmp_path / "cfg.py"
  path.write_text("from jtl.config import default_config\n\n"
                  "def get_config():\n  return default_config()\n")
  argv = ["prog", f"--config={path}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", str(path), flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("text,expected", [("auto", "auto"), ("3e-4", 3e-4), ("1", 1.0)])
def test_optimizer_lr_takes_a_number_or_auto_on_the_command_line(tmp_path, text, expected):
  config = _parsed(tmp_path, f"--config.optimizer.lr={text}")
  assert config.optimizer.lr == expected and type(config.optimizer.lr) is type(expected)
  config_lib.validate(config)


@pytest.mark.parametrize("text", ["fast", "-1e-3", "0"])
def test_validate_refuses_a_non_numeric_or_non_positive_lr_naming_the_key(tmp_path, text):
  config = _parsed(tmp_path, f"--config.optimizer.lr={text}")
  with pytest.raises(config_lib.ConfigError, match=r"config\.optimizer\.lr=.*number > 0.*auto"):
    config_lib.validate(config)


def test_an_auto_run_is_the_same_run_as_its_saved_config_with_the_found_rate(tmp_path):
  auto = tiny_config(str(tmp_path), **{"optimizer.lr": "auto"})
  found = config_lib.with_learning_rate(auto, 0.0123, found=True)
  assert auto.optimizer.lr == "auto" and found.lr_find.suggested_lr == 0.0123  # a copy
  saved = config_lib.to_jsonable(found)
  assert config_lib.same_run_differences(saved, auto) == []
  assert config_lib.same_run_differences(saved, found) == []
  # A run that was given its rate by hand is another run than an auto one.
  by_hand = config_lib.to_jsonable(config_lib.with_learning_rate(auto, 0.0123))
  assert config_lib.same_run_differences(by_hand, auto) == [
      "optimizer.lr: saved 0.0123, now 'auto'"]


def test_the_command_refuses_a_workdir_that_holds_a_training_run(tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "latest" / "3").mkdir(parents=True)
  with pytest.raises(train.WorkdirError, match="holds a training run"):
    driver.lr_range_test(tiny_config(str(tmp_path / "data")), str(workdir))
  assert os.listdir(workdir) == ["checkpoints"]


# ---------------------------------------------------------------------------------------------
# The real step.

@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("lrf") / "data")
  write_image_folder(root, per_class=12)   # 27 train / 9 val / 36 test: 3 steps an epoch
  return root


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  with rh.persistent_jax_cache(rh.shared_jax_cache(tmp_path_factory)):
    yield


def test_the_finder_writes_its_curve_and_a_suggestion_below_the_divergence(data, tmp_path,
                                                                          jax_cache):
  workdir = str(tmp_path / "lrf")
  result = driver.lr_range_test(tiny_config(data, **FINDER), workdir)
  with open(os.path.join(workdir, "lr_find.json")) as f:
    saved = json.load(f)
  assert saved == result
  assert set(saved) >= {"lrs", "losses", "smoothed", "suggested_lr", "method"}
  assert saved["method"] == lr_find.METHOD
  lrs = saved["lrs"]
  assert lrs == pytest.approx(list(lr_find.sweep_lrs(1e-4, 30.0, 24)[:len(lrs)]), rel=1e-12)
  assert saved["smoothed"] == pytest.approx(list(lr_find.smooth(saved["losses"], 0.9)))
  assert saved["stop_reason"].startswith(("diverged", "non-finite"))  # it went over the cliff
  assert len(lrs) < 24 and saved["smoothed"][-1] > 4 * min(saved["smoothed"])
  lowest = lrs[int(np.argmin(saved["smoothed"]))]
  assert lrs[0] <= saved["suggested_lr"] < lowest < lrs[-1]
  assert saved["suggested_lr"] == lr_find.suggest_lr(lrs, saved["smoothed"], 0.9)
  with open(os.path.join(workdir, "lr_find.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_training_split_smaller_than_a_batch_is_one_error_before_any_work(tmp_path):
  root = str(tmp_path / "small")
  write_image_folder(root, per_class=2, splits=("train",))  # 6 images: 3 train, 3 val
  workdir = tmp_path / "lrf"
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.batch_size=8 is larger than the training split \(3 "):
    driver.lr_range_test(tiny_config(root, **FINDER), str(workdir))
  assert not workdir.exists() or os.listdir(workdir) == []


def test_the_command_prints_one_error_line_for_a_split_smaller_than_a_batch(tmp_path):
  root = str(tmp_path / "small")
  write_image_folder(root, per_class=2, splits=("train",))
  args = [sys.executable, "-m", "jtl", "lr-find", "--config", "configs/partial_ft.py",
          "--workdir", str(tmp_path / "lrf"), f"--config.dataset=folder:{root}",
          "--config.pretrained=none", "--config.optimizer.lr=auto", "--config.batch_size=8",
          "--config.val_fraction=0.25"]
  done = subprocess.run(args, cwd=rh.REPO, env=rh.child_env(), capture_output=True, text=True,
                        timeout=240)
  assert done.returncode == 2, done.stderr[-2000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert errors == ["error: config.batch_size=8 is larger than the training split "
                    "(3 examples)"], done.stderr[-2000:]
  assert not os.path.exists(tmp_path / "lrf" / "lr_find.json")


# ---------------------------------------------------------------------------------------------
# optimizer.lr=auto.

def _export(workdir):
  return load_file(os.path.join(workdir, "export", "model.safetensors"))


def test_an_auto_run_trains_with_the_suggestion_stores_it_and_reuses_it_on_resume(
    data, tmp_path, caplog, jax_cache):
  caplog.set_level(logging.INFO)
  auto, fixed = str(tmp_path / "auto"), str(tmp_path / "fixed")
  # On cached features (stem and stage1 frozen): the finder and the run share the cache.
  config = tiny_config(data, num_epochs=3, freeze_depth=2, **{"optimizer.lr": "auto", **FINDER})
  assert train.train_and_evaluate(config, auto, extra_hooks=[StopAt(4)])["preempted"]
  assert "feature cache: " in caplog.text
  finder_json = os.path.join(auto, "lr_find", "lr_find.json")
  with open(finder_json) as f:
    suggested = json.load(f)["suggested_lr"]
  written = os.stat(finder_json).st_mtime_ns
  caplog.clear()
  final = train.train_and_evaluate(config, auto)  # the same command again: it resumes
  assert "resuming with the learning rate found before" in caplog.text
  assert os.stat(finder_json).st_mtime_ns == written  # the range test did not run again
  with open(os.path.join(auto, "config.json")) as f:
    saved = json.load(f)
  assert saved["optimizer"]["lr"] == saved["lr_find"]["suggested_lr"] == suggested
  assert final["suggested_lr"] == suggested
  rows = rh.read_jsonl(os.path.join(auto, "metrics.jsonl"))
  assert [r["learning_rate"] for r in rows if r["split"] == "train"] == [suggested] * 3
  # The same run with that rate given by hand: the same weights, so the sweep's steps did not
  # leak into the run and the resumed run went on with the stored rate.
  train.train_and_evaluate(tiny_config(data, num_epochs=3, freeze_depth=2,
                                       **{"optimizer.lr": suggested}), fixed)
  a, b = _export(auto), _export(fixed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
