"""Class imbalance: per-class loss weights, class-balanced epochs shared by the image pipeline and
the feature cache, balanced accuracy, and a 20:1 folder on which both remedies beat doing
nothing."""
import json
import os

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from conftest import tiny_config
from jtl import class_weights as class_weights_lib
from jtl import config as config_lib
from jtl import data as data_lib
from jtl import distributed, feature_cache, metrics, optim, steps, train
from jtl.models import create_model

CLASSES = ("cat", "dog", "eel")


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.fast
def test_auto_weights_are_inverse_frequency_averaging_one():
  labels = np.array([0] * 20 + [1] * 4 + [2] * 1)
  w = class_weights_lib.auto_class_weights(labels, 3)
  np.testing.assert_allclose(w, [25 / 60, 25 / 12, 25 / 3], rtol=1e-6)
  assert np.mean(w[labels]) == pytest.approx(1.0)
  explicit = class_weights_lib.resolve_class_weights("dog=3", labels, CLASSES)
  np.testing.assert_array_equal(explicit, [1, 3, 1])
  assert class_weights_lib.resolve_class_weights("none", labels, CLASSES) is None


@pytest.mark.fast
def test_weighted_loss_is_the_mean_of_weight_times_cross_entropy():
  logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 4.0]],
                    np.float32)
  labels = np.array([0, 2, 1, 2])
  w = np.array([0.5, 2.0, 4.0], np.float32)
  ce = -_log_softmax(logits.astype(np.float64))[np.arange(4), labels]
  got = steps.training_loss(logits, labels, 3, class_weights=w)
  assert float(got) == pytest.approx(np.mean(w[labels] * ce), rel=1e-6)
  assert float(steps.training_loss(logits, labels, 3)) == pytest.approx(ce.mean(), rel=1e-6)
  # Soft labels (mixup): the weight is the label's mix of class weights, before smoothing.
  soft = np.array([[0.7, 0.3, 0], [0, 0, 1], [0, 0.5, 0.5], [0.25, 0, 0.75]], np.float32)
  smoothed = soft * 0.9 + 0.1 / 3
  ce_soft = -(smoothed * _log_softmax(logits.astype(np.float64))).sum(-1)
  got = steps.training_loss(logits, soft, 3, label_smoothing=0.1, class_weights=w)
  assert float(got) == pytest.approx(np.mean((soft @ w) * ce_soft), rel=1e-6)


@pytest.mark.fast
def test_the_training_step_applies_the_weights():
  model = create_model("tiny_cnn", num_classes=3)
  plan = optim.make_freeze_plan(model.variables["params"], model.stage_names, [(".*", "train")])
  config = tiny_config("unused")
  batch = {"image": np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32),
           "label": np.array([0, 1, 2, 1], np.int32)}
  losses = {}
  for name, w in (("plain", None), ("twos", [2, 2, 2])):
    step = steps.make_train_step(model, plan, config, distributed.make_mesh(),
                                 schedule=optax.constant_schedule(0.0), num_classes=3,
                                 class_weights=None if w is None else np.float32(w))
    state = step.init_state(model.variables["params"], model.variables["batch_stats"], 0)
    _, out = step(state, batch)
    losses[name] = float(out["loss"])
  assert losses["twos"] == pytest.approx(2 * losses["plain"], rel=1e-6)


@pytest.mark.fast
def test_balanced_epochs_have_equal_class_counts_and_replay():
  labels = np.array([0] * 40 + [1] * 2 + [2] * 8)
  order = data_lib.epoch_order(len(labels), seed=3, epoch=1, labels=labels)
  counts = np.bincount(labels[order], minlength=3)
  assert len(order) == 50 and sorted(counts) == [16, 17, 17]
  # Minority examples recur as evenly as their quota allows; majority ones never repeat.
  assert set(np.unique(order[labels[order] == 1], return_counts=True)[1]) <= {8, 9}
  assert np.unique(order[labels[order] == 0], return_counts=True)[1].max() == 1
  np.testing.assert_array_equal(order, data_lib.epoch_order(50, 3, 1, labels))
  assert not np.array_equal(order, data_lib.epoch_order(50, 3, 2, labels))
  whole = data_lib.epoch_batches(50, 8, 3, 1, labels=labels)
  np.testing.assert_array_equal(whole.reshape(-1), order[:48])
  np.testing.assert_array_equal(data_lib.epoch_batches(50, 8, 3, 1, start_step=2,
                                                       labels=labels), whole[2:])
  halves = [data_lib.epoch_batches(50, 4, 3, 1, shard=data_lib.Shard(p, 2), labels=labels)
            for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate(halves, axis=1), whole)


def _write_indexed_folder(root, per_class):
  """Class c, image i: a flat grey of a value unique to the image, so a batch names its
  examples."""
  value = 0
  for c, n in enumerate(per_class):
    os.makedirs(os.path.join(root, "train", f"class_{c}"))
    for i in range(n):
      value += 7
      Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(
          os.path.join(root, "train", f"class_{c}", f"{value}.png"))


@pytest.mark.fast
def test_the_image_pipeline_and_the_cache_draw_the_same_examples(tmp_path):
  root = str(tmp_path / "data")
  _write_indexed_folder(root, (20, 3))
  ds = data_lib.open_dataset(f"folder:{root}", val_fraction=0)
  pp = data_lib.Preprocess(image_size=16, crop_pct=1.0)
  value_of = np.array([int(os.path.basename(s)[:-4]) for s in ds.table("train").sources])
  labels = np.asarray(ds.table("train").labels)
  # A cache whose "feature" of example i is i.
  cache = feature_cache.FeatureCache(
      feature_cache.CachePlan(stop_stage=1, views=1, augmented=False),
      {"train": np.arange(len(labels), dtype=np.float32).reshape(1, -1, 1)},
      {"train": labels.astype(np.int32)}, "")
  cached = feature_cache.CachedBatches(cache, seed=5, balanced=True)
  augment = data_lib.Augment(random_resized_crop=False, hflip=False)
  for epoch in (0, 1):
    images = data_lib.train_batches(ds, batch_size=4, preprocess=pp, augment=augment, seed=5,
                                    epoch=epoch, start_step=1, balanced=True)
    seen = [np.rint((b["image"][:, 0, 0, 0] * pp.std[0] + pp.mean[0]) * 255) for b in images]
    from_cache = [b["image"][:, 0].astype(int) for b in cached.train_epoch(
        batch_size=4, epoch=epoch, start_step=1)]
    assert len(seen) == len(from_cache) == 23 // 4 - 1
    for pixels, indices in zip(seen, from_cache):
      np.testing.assert_array_equal(pixels, value_of[indices])
    drawn = np.concatenate(from_cache)
    assert np.mean(labels[drawn] == 1) > 0.3  # 3 of 23 examples, drawn about half the time


@pytest.mark.fast
def test_balanced_accuracy_is_the_mean_recall_of_present_classes():
  labels = np.array([0, 0, 0, 0, 1, 1])
  preds = np.array([0, 0, 0, 1, 1, 0])
  report = metrics.classification_report(labels, preds, np.ones(6), np.zeros(6), CLASSES)
  assert report["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)
  assert report["macro_recall"] == pytest.approx((3 / 4 + 1 / 2) / 3)  # eel has no support


@pytest.mark.fast
@pytest.mark.parametrize("spec, message", [
    ("cat=2,cow=1", "unknown class cow"), ("1,2", "2 weights for 3 classes"),
    ("cat=2,dog=-1", "must be positive"), ("1,0,1", "must be positive"),
    ("cat=2,3", "not both")])
def test_bad_class_weights_name_the_key_and_the_classes(spec, message):
  config = config_lib.default_config()
  config.class_weights = spec
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
    config_lib.validate_for_data(config, CLASSES)
  assert f"config.class_weights={spec!r}" in str(e.value) and message in str(e.value)
  if "class" in message:
    assert str(CLASSES) in str(e.value)


def test_bad_class_weights_stop_a_run_before_training(tmp_path):
  root = str(tmp_path / "data")
  _write_indexed_folder(root, (8, 8))
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError, match="config.class_weights.*class_0"):
    train.train_and_evaluate(tiny_config(root, class_weights="class_0=2,class_9=1"),
                             str(workdir))
  assert not (workdir / "metrics.jsonl").exists() and not (workdir / "checkpoints").exists()


def _write_imbalanced_folder(root, seed=0):
  """Two classes 20:1 in train, balanced in test: the minority colour differs from the
  majority's, but a model can score 95% on train by ignoring it."""
  rng = np.random.default_rng(seed)
  colours = {"common": (120, 120, 120), "rare": (145, 108, 120)}
  sizes = {"train": {"common": 100, "rare": 5}, "test": {"common": 20, "rare": 20}}
  for split, per_class in sizes.items():
    for name, n in per_class.items():
      d = os.path.join(root, split, name)
      os.makedirs(d)
      for i in range(n):
        img = np.clip(np.array(colours[name]) + rng.normal(0, 30, (16, 16, 3)), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(os.path.join(d, f"{i}.png"))


def _imbalanced_run(root, workdir, **overrides):
  # Two epochs: the unweighted run has learnt to say "common" (balanced accuracy 0.5) and not
  # yet the rare colour (it does after a few more: measured 0.825 after three).
  config = tiny_config(root, num_epochs=2, batch_size=15, val_fraction=0.0, seed=1,
                       strategy="full", **{"optimizer.lr": 0.01, **overrides})
  final = train.train_and_evaluate(config, str(workdir))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return final, rows


def test_weighting_and_balanced_sampling_lift_balanced_accuracy_on_a_20_to_1_folder(tmp_path):
  root = str(tmp_path / "data")
  _write_imbalanced_folder(root)
  plain, _ = _imbalanced_run(root, tmp_path / "plain")
  weighted, rows = _imbalanced_run(root, tmp_path / "weighted", class_weights="auto",
                                   **{"early_stopping.metric": "val_balanced_accuracy"})
  balanced, _ = _imbalanced_run(root, tmp_path / "balanced", balanced_sampling=True)
  print({name: (r["test_accuracy"], r["test_balanced_accuracy"])
         for name, r in (("plain", plain), ("weighted", weighted), ("balanced", balanced))})
  assert plain["steps"] == weighted["steps"] == balanced["steps"] == 2 * (105 // 15)
  assert weighted["test_balanced_accuracy"] > plain["test_balanced_accuracy"] + 0.2
  assert balanced["test_balanced_accuracy"] > plain["test_balanced_accuracy"] + 0.2
  # balanced accuracy, as reported, from the confusion matrix; in every val row.
  cm = np.asarray(weighted["confusion_matrix"], float)
  assert weighted["test_balanced_accuracy"] == pytest.approx(np.mean(np.diag(cm) / cm.sum(1)))
  val = [r for r in rows if r["split"] == "val"]
  assert val and all(0 <= r["balanced_accuracy"] <= 1 for r in val)
  assert weighted["best_val_metric"] == "val_balanced_accuracy"
