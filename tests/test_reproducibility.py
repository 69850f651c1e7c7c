"""Two CPU runs with the same seed are bit-identical, whatever the process (another Python hash
seed, a child process or this one); another seed gives another model. Every random path is on:
random resized crops, flips, rotation, colour jitter, RandAugment, mixup and cutmix.
"""
import os

import numpy as np
import pytest

import run_helpers as rh
from conftest import tiny_config, write_image_folder
from jtl import train

CONFIG = {"num_epochs": 2, "label_smoothing": 0.1, "augment.random_resized_crop": True,
          "augment.hflip": True, "augment.rotation_degrees": 15.0, "augment.color_jitter": 0.3,
          "augment.randaugment_ops": 2, "augment.mixup_alpha": 0.2, "augment.cutmix_alpha": 0.5}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("reproducibility")
  data = str(root / "data")
  write_image_folder(data, splits=("train",))
  cache = rh.shared_jax_cache(tmp_path_factory)
  child = rh.start(str(root / "child"), data, CONFIG, env=rh.child_env(cache, PYTHONHASHSEED=1))
  try:
    with rh.persistent_jax_cache(cache):
      train.train_and_evaluate(tiny_config(data, **CONFIG), str(root / "here"))
      train.train_and_evaluate(tiny_config(data, **CONFIG, seed=1), str(root / "other_seed"))
    output, _ = child.communicate(timeout=300)
  finally:
    child.kill()
  assert child.returncode == 0, output[-3000:]
  return {name: str(root / name) for name in ("here", "child", "other_seed")}


def test_the_same_seed_gives_bit_identical_runs(runs):
  a, meta_a = rh.checkpoint_arrays(runs["here"])
  b, meta_b = rh.checkpoint_arrays(runs["child"])
  assert a.keys() == b.keys() and any("opt_state" in k for k in a)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  meta_a.pop("train_seconds"), meta_b.pop("train_seconds")
  assert meta_a == meta_b
  with open(os.path.join(runs["here"], "metrics.jsonl")) as f1, \
       open(os.path.join(runs["child"], "metrics.jsonl")) as f2:
    assert f1.read() == f2.read()


def test_another_seed_gives_another_model(runs):
  a, _ = rh.checkpoint_arrays(runs["here"])
  c, _ = rh.checkpoint_arrays(runs["other_seed"])
  assert not np.array_equal(a["params/head/kernel"], c["params/head/kernel"])
