"""The feature cache: the frozen prefix run once per split, training on its outputs equal to
training through it, and a cache that is reused exactly when nothing it depends on changed."""
import logging
import os
import types

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from conftest import tiny_config, write_image_folder
from jtl import feature_cache, train
from jtl import params as P
from jtl.models import create_model
from jtl.models.vgg import VGG
from jtl.models.vit import ViT


@pytest.fixture
def data(tmp_path):
  root = str(tmp_path / "data")
  write_image_folder(root, per_class=16)
  return root


def _run(data, workdir, caplog=None, **overrides):
  config = tiny_config(data, **{"strategy": "feature_extraction", **overrides})
  final = train.train_and_evaluate(config, str(workdir))
  return final, load_file(os.path.join(workdir, "export", "model.safetensors"))


def _cache_dirs():
  root = os.environ["JTL_CACHE_DIR"]
  return {d for d in os.listdir(root) if not d.startswith(".")} if os.path.isdir(root) else set()


@pytest.mark.parametrize("hflip", [False, True])
def test_cached_and_uncached_training_reach_the_same_parameters(data, tmp_path, hflip):
  cached, cached_params = _run(data, tmp_path / "cached", **{"augment.hflip": hflip})
  plain, plain_params = _run(data, tmp_path / "plain", **{"augment.hflip": hflip,
                                                            "feature_cache.mode": "off"})
  assert cached["feature_cache"] and not plain["feature_cache"]
  assert cached["steps"] == plain["steps"] > 0
  for name, value in plain_params.items():
    np.testing.assert_allclose(cached_params[name], value, rtol=2e-4, atol=2e-5, err_msg=name)
  head = "params/head/kernel"
  assert not np.allclose(cached_params[head],
                         create_model("tiny_cnn", num_classes=3).variables["params"]["head"]
                         ["kernel"])
  assert cached["test_accuracy"] == plain["test_accuracy"]


def test_the_cache_is_reused_and_invalidated_by_what_it_depends_on(data, tmp_path, caplog):
  caplog.set_level(logging.INFO)
  before = _cache_dirs()
  _run(data, tmp_path / "a")
  first = _cache_dirs() - before
  assert len(first) == 1 and "feature cache built" in caplog.text
  caplog.clear()
  _run(data, tmp_path / "b", **{"optimizer.lr": 0.01})  # a learning-rate sweep point
  assert _cache_dirs() - before == first and "feature cache reused" in caplog.text
  # Another preprocessing (image size) -> another cache; feature extraction's holds the
  # pooled features [views, examples, 1, 1, channels] (the head averages stage2's map first).
  _run(data, tmp_path / "c", image_size=20)
  assert len(_cache_dirs() - before) == 2
  (second,) = _cache_dirs() - before - first
  train_features = np.load(os.path.join(os.environ["JTL_CACHE_DIR"], second, "train.npy"),
                           mmap_mode="r")
  assert train_features.shape[2:] == (1, 1, 16)
  # One image edited -> another cache.
  victim = os.path.join(data, "train", "class_0", "3.png")
  Image.fromarray(np.full((20, 20, 3), 7, np.uint8)).save(victim)
  caplog.clear()
  _run(data, tmp_path / "d")
  assert len(_cache_dirs() - before) == 3 and "feature cache built" in caplog.text


def test_another_weights_file_invalidates_the_cache(data, tmp_path, caplog):
  caplog.set_level(logging.INFO)
  variables = create_model("tiny_cnn", num_classes=3, seed=3).variables
  weights = str(tmp_path / "weights.safetensors")
  save_file({k: np.asarray(v) for k, v in P.flatten(variables).items()}, weights)
  _run(data, tmp_path / "a", pretrained=weights)
  caplog.clear()
  _run(data, tmp_path / "b", pretrained=weights)
  assert "feature cache reused" in caplog.text
  flat = load_file(weights)
  flat["params/stage1/block_conv/kernel"] = flat["params/stage1/block_conv/kernel"] * 1.5
  save_file(flat, weights)
  caplog.clear()
  _run(data, tmp_path / "c", pretrained=weights)
  assert "feature cache built" in caplog.text


def test_random_augmentation_turns_the_cache_off_unless_fixed_views_are_asked(data, tmp_path,
                                                                               caplog):
  caplog.set_level(logging.INFO)
  final, _ = _run(data, tmp_path / "random", **{"augment.random_resized_crop": True})
  assert not final["feature_cache"]
  assert "feature cache not used: random augmentation (random_resized_crop)" in caplog.text
  final, _ = _run(data, tmp_path / "views", **{"augment.random_resized_crop": True,
                                               "feature_cache.views": 3})
  assert final["feature_cache"] and "3 fixed views of random_resized_crop" in caplog.text
  final, _ = _run(data, tmp_path / "nothing_frozen", strategy="full")
  assert not final["feature_cache"]


def test_views_are_picked_per_epoch_and_replay_on_resume():
  plan = feature_cache.CachePlan(stop_stage=1, views=3, augmented=True)
  features = np.arange(3 * 10, dtype=np.float32).reshape(3, 10, 1)  # view v of example i
  cache = feature_cache.FeatureCache(plan, {"train": features},
                                     {"train": np.arange(10, dtype=np.int32)}, "")
  batches = feature_cache.CachedBatches(cache, seed=0)
  whole = list(batches.train_epoch(batch_size=2, epoch=4))
  resumed = list(batches.train_epoch(batch_size=2, epoch=4, start_step=2))
  assert len(whole) == 5
  for a, b in zip(whole[2:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
  seen = np.concatenate([b["image"][:, 0] for b in whole])
  labels = np.concatenate([b["label"] for b in whole])
  np.testing.assert_array_equal(seen % 10, labels)       # the features of the labelled example
  assert len(set((seen // 10).astype(int))) > 1           # from more than one view
  other = np.concatenate([b["image"][:, 0] for b in batches.train_epoch(batch_size=2, epoch=5)])
  assert not np.array_equal(seen, other)


def test_large_caches_are_memory_mapped(tmp_path):
  path = str(tmp_path / "train.npy")
  np.save(path, np.ones((2, 100, 4), np.float32))
  assert isinstance(feature_cache.load_features(path, budget_bytes=10**6), np.ndarray)
  mapped = feature_cache.load_features(path, budget_bytes=100)
  assert isinstance(mapped, np.memmap) and float(mapped.sum()) == 800.0



def test_only_a_pooling_head_left_gets_pooled_features():
  tiny = create_model("tiny_cnn", num_classes=3)
  assert feature_cache.pools_features(tiny, 3)  # feature extraction: the head alone is left
  assert not feature_cache.pools_features(tiny, 1)  # partial: stage1 needs the stem's map
  # VGG's classifier flattens a 7x7 map; ViT's head reads tokens (modules only, no weights).
  for module in (VGG(num_classes=3), ViT(num_classes=3)):
    model = types.SimpleNamespace(module=module, stage_names=module.stage_names)
    assert not feature_cache.pools_features(model, len(module.stage_names) - 1)
