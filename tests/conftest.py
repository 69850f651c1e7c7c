"""Shared fixtures: a tiny registered CNN and tiny image folders, so engine tests run in seconds."""
from __future__ import annotations

import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Feature caches of the tests' runs never go to the user's ~/.cache, and no test sees a cache
# that another one builds meanwhile: every pytest process (the controller, each pytest-xdist
# worker) makes a directory of its own, and each test gets its own (`own_feature_cache` below).
# A child run that a test starts inherits its test's directory (the variables say whose it is).
# XLA's persistent compilation cache likewise: one per pytest process, shared by its tests and
# the child runs they start. The tests compile the same tiny programs over and over; loading
# them saves most of a tiny run's time (a tiny_cnn run: 16 s compiled, 6 s loaded).
import tempfile  # noqa: E402
_PROCESS = os.environ.get("PYTEST_XDIST_WORKER", "controller")
if os.environ.get("JTL_TEST_CACHE_OF") != _PROCESS:
  os.environ["JTL_CACHE_DIR"] = tempfile.mkdtemp(prefix="jtl-test-features-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jtl-test-xla-")
  os.environ["JTL_TEST_CACHE_OF"] = _PROCESS
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import flax.linen as nn
import numpy as np
import pytest
from PIL import Image

from jtl.models import common, registry

# Test tiers, the markers registered in pyproject.toml: `fast` unit tests (`make test-fast` runs
# `-m fast`), `engine` tests that run train.train_and_evaluate in this process, `subprocess` tests
# that start child Python processes. A file's tiers are listed here (a file not named is fast); a
# test or file that carries a tier marker itself keeps only its own.
TIERS = ("fast", "engine", "subprocess")
FILE_TIERS = {
    "test_bad_images_run.py": ("engine",),
    "test_budget.py": ("engine",),
    "test_class_imbalance.py": ("engine",),  # its unit tests carry `fast` themselves
    "test_ema.py": ("engine",),  # its unit tests carry `fast` themselves
    "test_error_analysis.py": ("engine",),  # its unit tests carry `fast` themselves
    "test_experiments.py": ("engine",),
    # Model conversions (seconds each) rather than training; its unit tests carry `fast`.
    "test_export_formats.py": ("engine",),
    "test_feature_cache.py": ("engine",),
    "test_golden_run.py": ("engine", "subprocess"),
    "test_lock.py": ("subprocess",),
    "test_lr_find.py": ("engine", "subprocess"),
    "test_multidevice.py": ("engine", "subprocess"),
    "test_multihost.py": ("subprocess",),
    "test_multihost_feature_cache.py": ("engine", "subprocess"),
    "test_multihost_records.py": ("subprocess",),
    "test_nonfinite.py": ("engine",),
    "test_prune.py": ("engine",),
    "test_records_run.py": ("engine",),
    "test_reproducibility.py": ("engine", "subprocess"),
    "test_schedules.py": ("engine",),
    "test_train.py": ("engine", "subprocess"),
    "test_tta.py": ("engine",),  # its unit tests carry `fast` themselves
    "test_workdir_guard.py": ("engine", "subprocess"),
}


def pytest_collection_modifyitems(config, items):
  for item in items:
    if not any(item.get_closest_marker(tier) for tier in TIERS):
      for tier in FILE_TIERS.get(item.path.name, ("fast",)):
        item.add_marker(tier)


class TinyCNN(nn.Module):
  """stem -> stage1 -> stage2 -> head, with BatchNorm, like the real families but ~3k params."""
  head_pools_globally = True  # as EfficientNet's and ResNet's: the head is mean-pool + dense
  num_classes: int = 10
  width: int = 8
  image_size: int = 16

  @property
  def stage_names(self):
    return ("stem", "stage1", "stage2", "head")

  @nn.compact
  def __call__(self, x, train: bool = False, frozen_stages: int = 0, start_stage: int = 0,
               stop_stage: int | None = None):
    def conv_bn(name, features, stride):
      conv = nn.Conv(features, (3, 3), strides=stride, use_bias=False, name=f"{name}_conv")
      bn = common.BatchNorm(name=f"{name}_bn")
      return lambda x, t: nn.relu(bn(conv(x), use_running_average=not t))

    class Stage(nn.Module):
      features: int
      stride: int

      @nn.compact
      def __call__(self, x, train):
        return conv_bn("block", self.features, self.stride)(x, train)

    head = nn.Dense(self.num_classes, name="head")
    stages = [("stem", Stage(self.width, 1, name="stem")),
              ("stage1", Stage(self.width, 2, name="stage1")),
              ("stage2", Stage(2 * self.width, 2, name="stage2")),
              ("head", lambda x, t: head(x.mean(axis=(1, 2))))]
    return common.apply_stages(stages, x, train=train, frozen_stages=frozen_stages,
                               start_stage=start_stage, stop_stage=stop_stage)


# Registered for the whole session (subprocess runs import this file too, see run_helpers), once
# even when this file is imported both as pytest's conftest and as `conftest`.
if not registry.is_registered("tiny_cnn"):
  registry.register_model(registry.ModelEntry(
      name="tiny_cnn", family="test", build=TinyCNN,
      pretrained={"": registry.PretrainedCfg(image_size=16, crop_pct=1.0)}, default_tag=None,
      converters={}, published_params=None))


COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40)]


def write_image_folder(root, num_classes=3, per_class=12, size=20, splits=("train", "test"),
                       seed=0):
  """Solid-ish colour images, one colour per class (learnable in a few steps)."""
  rng = np.random.default_rng(seed)
  names = [f"class_{c}" for c in range(num_classes)]
  for split in splits:
    for c, name in enumerate(names):
      d = os.path.join(root, split, name)
      os.makedirs(d, exist_ok=True)
      for i in range(per_class):
        base = np.array(COLOURS[c % len(COLOURS)], np.float32)
        img = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"{i}.png"))
  return names


@pytest.fixture(autouse=True)
def own_feature_cache(tmp_path_factory, monkeypatch):
  """JTL_CACHE_DIR of this test alone (child processes it starts inherit it)."""
  monkeypatch.setenv("JTL_CACHE_DIR", str(tmp_path_factory.mktemp("features")))


@pytest.fixture
def image_folder(tmp_path):
  root = tmp_path / "data"
  write_image_folder(str(root))
  return str(root)


def tiny_config(dataset_root, **overrides):
  from jtl.config import default_config
  c = default_config()
  c.model = "tiny_cnn"
  c.pretrained = "none"
  c.dataset = f"folder:{dataset_root}"
  c.image_size = 16
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_epochs = 2
  c.val_fraction = 0.25
  c.progress_bar = False
  c.augment.random_resized_crop = False
  c.augment.hflip = False
  c.schedule.name = "constant"
  c.schedule.warmup_epochs = 0.0
  c.optimizer.lr = 0.03
  # The engine tests exercise the minibatch loop, feature extraction's too; the L-BFGS solve of
  # a linear head (the default, jtl.linear_probe) has tests of its own (test_linear_probe.py).
  c.probe.solver = "sgd"
  for key, value in overrides.items():
    target = c
    parts = key.split(".")
    for p in parts[:-1]:
      target = target[p]
    target[parts[-1]] = value
  return c
