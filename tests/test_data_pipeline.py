"""Splits, shards, determinism, resuming, eval padding, mixing and the tfds source."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from jtl import data
from jtl.data import randaugment
from jtl.data.tf_setup import tf

# Identity preprocessing for 8x8 images: the output is x / 255, so each pixel can be read back.
IDENTITY = data.Preprocess(image_size=8, crop_pct=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
NO_AUGMENT = data.Augment(random_resized_crop=False, hflip=False)
HEAVY = data.Augment(rotation_degrees=15, color_jitter=0.4, randaugment=(2, 9), mixup_alpha=0.4,
                     cutmix_alpha=1.0)


def write_indexed_folder(root, counts, split=None, start=0):
  """8x8 PNGs whose colour encodes a unique id (R = id % 256, G = id // 256); returns next id."""
  next_id = start
  for c, count in enumerate(counts):
    directory = os.path.join(root, *(split,) if split else (), f"class_{c}")
    os.makedirs(directory, exist_ok=True)
    for _ in range(count):
      colour = (next_id % 256, next_id // 256, 40 * c)
      Image.new("RGB", (8, 8), colour).save(os.path.join(directory, f"{next_id:05d}.png"))
      next_id += 1
  return next_id


def ids_of(images):
  """The ids encoded in a batch produced with IDENTITY preprocessing."""
  pixels = np.round(images[:, 0, 0, :2] * 255).astype(int)
  return pixels[:, 0] + 256 * pixels[:, 1]


def file_ids(ds, split):
  return np.array([int(os.path.basename(p)[:5]) for p in ds.table(split).sources])


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("indexed"))
  write_indexed_folder(root, [10, 20, 31])
  return root


def test_stratified_val_is_seeded_disjoint_and_proportional(indexed):
  # val_fraction alone (no per-class minimum, which tests/test_val_carve.py covers).
  proportional = dict(val_fraction=0.2, val_min_per_class=0)
  first = data.open_dataset(f"folder:{indexed}", seed=1, **proportional)
  again = data.open_dataset(f"folder:{indexed}", seed=1, **proportional)
  other = data.open_dataset(f"folder:{indexed}", seed=2, **proportional)
  train, val = file_ids(first, "train"), file_ids(first, "val")
  assert not set(train) & set(val) and sorted([*train, *val]) == list(range(61))
  assert np.bincount(first.table("val").labels).tolist() == [2, 4, 6]
  np.testing.assert_array_equal(val, file_ids(again, "val"))
  assert set(val) != set(file_ids(other, "val"))
  assert not first.has_split("test")

  subset = data.open_dataset(f"folder:{indexed}", seed=1, max_train_examples=20, **proportional)
  np.testing.assert_array_equal(file_ids(subset, "val"), val)  # carved before subsetting
  assert set(file_ids(subset, "train")) <= set(train)
  # Train counts 8, 16, 25 -> quotas 3.27, 6.53, 10.2 -> 3, 7, 10 by largest remainder.
  assert np.bincount(subset.table("train").labels).tolist() == [3, 7, 10]


def test_split_folders_are_used_as_given(tmp_path):
  root = str(tmp_path / "data")
  next_id = write_indexed_folder(root, [6, 6], split="train")
  next_id = write_indexed_folder(root, [2, 2], split="Validation", start=next_id)
  write_indexed_folder(root, [3, 3], split="test", start=next_id)
  ds = data.open_dataset(f"folder:{root}", val_fraction=0.5)
  assert [ds.num_examples(s) for s in ("train", "val", "test")] == [12, 4, 6]
  assert ds.class_names == ("class_0", "class_1")


def _epoch(ds, augment, **kwargs):
  args = dict(batch_size=4, preprocess=IDENTITY, augment=augment, seed=3, epoch=0)
  args.update(kwargs)
  return list(data.train_batches(ds, **args))


def test_batches_are_deterministic_and_resume_exactly(indexed):
  ds = data.open_dataset(f"folder:{indexed}", val_fraction=0.0,
                         options=data.DecodeOptions(cache_decoded=False))
  full = _epoch(ds, HEAVY)
  assert len(full) == data.steps_per_epoch(ds, 4) == 15
  assert full[0]["image"].dtype == np.float32 and full[0]["label"].shape == (4, 3)
  again = _epoch(ds, HEAVY)
  resumed = _epoch(ds, HEAVY, start_step=11)
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert len(resumed) == 4
  for a, b in zip(full[11:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  next_epoch = _epoch(ds, HEAVY, epoch=1)
  assert not np.array_equal(full[0]["image"], next_epoch[0]["image"])


def test_process_shards_are_disjoint_and_cover_the_epoch(indexed):
  ds = data.open_dataset(f"folder:{indexed}", val_fraction=0.0)
  shards = [np.concatenate([ids_of(b["image"]) for b in
                            _epoch(ds, NO_AUGMENT, shard=data.Shard(p, 3))])
            for p in range(3)]
  steps = data.steps_per_epoch(ds, 12)
  assert steps == 5 and all(len(s) == steps * 4 for s in shards)
  seen = np.concatenate(shards)
  assert len(set(seen)) == len(seen)
  order = data.epoch_order(ds.num_examples("train"), 3, 0)[:steps * 12]
  assert set(seen) == set(file_ids(ds, "train")[order])
  labels = np.concatenate([b["label"] for b in _epoch(ds, NO_AUGMENT,
                                                      shard=data.Shard(1, 3))])
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels, (shards[1] >= 10).astype(int) + (shards[1] >= 30))


def test_eval_batches_pad_and_mask(tmp_path):
  root = str(tmp_path / "data")
  next_id = write_indexed_folder(root, [4, 4], split="train")
  write_indexed_folder(root, [5, 5], split="test", start=next_id)
  ds = data.open_dataset(f"folder:{root}")
  seen, padded = [], 0
  for p in range(3):
    batches = list(data.eval_batches(ds, "test", batch_size=3, preprocess=IDENTITY,
                                     shard=data.Shard(p, 3)))
    assert len(batches) == 2  # ceil(ceil(10 / 3) / 3): the same count on every process
    for b in batches:
      assert b["image"].shape == (3, 8, 8, 3) and b["mask"].dtype == bool
      ids = ids_of(b["image"])[b["mask"]]
      np.testing.assert_array_equal(b["label"][b["mask"]], (ids >= 13).astype(int))
      seen.extend(ids)
      padded += int((~b["mask"]).sum())
  assert sorted(seen) == list(range(8, 18)) and padded == 3 * 2 * 3 - 10


def test_mixup_and_cutmix_labels_match_the_mixed_pixels(indexed):
  ds = data.open_dataset(f"folder:{indexed}", val_fraction=0.0)
  plain = _epoch(ds, NO_AUGMENT)[:3]
  for augment in (data.Augment(random_resized_crop=False, hflip=False, mixup_alpha=0.4),
                  data.Augment(random_resized_crop=False, hflip=False, cutmix_alpha=1.0)):
    mixed = _epoch(ds, augment)[:3]
    for p, m in zip(plain, mixed):
      soft = m["label"]
      assert soft.shape == (4, 3) and soft.dtype == np.float32
      np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
      onehot = np.eye(3)[p["label"]]
      own = np.sum(soft * onehot, axis=1)  # weight on the example's own label
      for i in range(4):
        partner = 3 - i
        if p["label"][i] == p["label"][partner]:
          continue
        if augment.mixup_alpha:
          expected = own[i] * p["image"][i] + (1 - own[i]) * p["image"][partner]
          np.testing.assert_allclose(m["image"][i], expected, atol=1e-5)
        else:
          kept = np.mean(np.all(m["image"][i] == p["image"][i], axis=-1))
          np.testing.assert_allclose(kept, own[i], atol=1e-6)


def test_eval_geometry_resizes_the_short_side_and_centre_crops():
  ramp = (np.arange(20 * 40 * 3) % 251).astype(np.uint8).reshape(20, 40, 3)
  pp = data.Preprocess(image_size=10, crop_pct=0.5, mean=(0, 0, 0), std=(1, 1, 1))
  out = data.preprocess.eval_image(tf.constant(ramp), pp).numpy()
  # floor(10 / 0.5) = 20 = the short side already: no resampling, the crop is rows 5:15, 15:25.
  np.testing.assert_allclose(out * 255, ramp[5:15, 15:25], atol=1e-3)
  tall = data.preprocess.eval_image(tf.zeros([90, 30, 3], tf.uint8), pp)
  assert tall.shape == (10, 10, 3)


def test_every_randaugment_op_stays_in_range_and_is_deterministic():
  image = tf.constant(np.random.default_rng(0).uniform(0, 255, (16, 16, 3)), tf.float32)
  key = tf.constant([4, 2], tf.int64)
  outputs = []
  for op in randaugment._ops(image, key, 0.9):
    out = op().numpy()
    assert out.shape == (16, 16, 3) and out.min() >= 0 and out.max() <= 255
    np.testing.assert_array_equal(out, op().numpy())
    outputs.append(out)
  assert len(outputs) == randaugment.NUM_OPS
  changed = sum(not np.allclose(o, image.numpy()) for o in outputs[1:])
  assert changed == randaugment.NUM_OPS - 1


def test_tfds_source_under_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=24):
    ds = data.open_dataset("tfds:fashion_mnist", data_dir=str(tmp_path), max_train_examples=16)
    assert len(ds.class_names) == 10 and ds.class_names[0] == "T-shirt/top"
    assert ds.num_examples("train") == 16 and ds.has_split("test")
    pp = data.Preprocess(image_size=16, crop_pct=1.0)
    batch = next(data.train_batches(ds, batch_size=8, preprocess=pp, augment=data.Augment(),
                                    seed=0, epoch=0))
    assert batch["image"].shape == (8, 16, 16, 3) and batch["label"].dtype == np.int32
    eval_batch = next(data.eval_batches(ds, "test", batch_size=8, preprocess=pp))
    assert eval_batch["mask"].all()
