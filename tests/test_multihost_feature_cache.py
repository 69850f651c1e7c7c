"""The feature cache of a two-process run (gloo) on shared storage: each host writes only its
part, and the cache reads back, in one process, as the cache one process builds."""
import json
import os

import numpy as np
import pytest

import run_helpers as rh
from conftest import tiny_config, write_image_folder
from jtl import feature_cache, train
from test_multihost import CONFIG, HOSTS, _run_hosts

FEATURES = {**CONFIG, "strategy": "feature_extraction", "num_epochs": 1}


def _only_cache(root):
  (name,) = [d for d in os.listdir(root) if not d.startswith(".")]
  return os.path.join(root, name)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost_cache")
  folder = str(root / "folder")
  write_image_folder(folder, splits=("train", "test"))
  shared, alone = str(root / "shared_cache"), str(root / "alone_cache")
  env = rh.child_env(rh.shared_jax_cache(tmp_path_factory), JTL_CACHE_DIR=shared)
  _run_hosts(str(root / "two_hosts"), folder, FEATURES, str(root / "record"), env)
  two_hosts = _only_cache(shared)
  single = {k: v for k, v in FEATURES.items()
            if k not in ("distributed", "num_processes")}
  train.train_and_evaluate(tiny_config(folder, **single, **{"feature_cache.dir": alone}),
                           str(root / "one_host"))
  # One process reading the cache two processes wrote: reused, nothing built again.
  train.train_and_evaluate(tiny_config(folder, **single, **{"feature_cache.dir": shared}),
                           str(root / "reader"))
  return two_hosts, _only_cache(alone), shared


def test_each_host_wrote_only_its_part(caches):
  two_hosts, _, _ = caches
  with open(os.path.join(two_hosts, "done.json")) as f:
    assert json.load(f)["parts"] == HOSTS
  for split in ("train", "val", "test"):
    parts = [np.load(os.path.join(two_hosts, feature_cache.part_name(split, p, HOSTS)))
             for p in range(HOSTS)]
    total = sum(p.shape[1] for p in parts)
    assert all(p.shape[1] in (total // HOSTS, -(-total // HOSTS)) for p in parts)
  assert not os.path.exists(os.path.join(two_hosts, "train.npy"))


def test_the_parted_cache_reads_as_the_one_process_cache(caches):
  two_hosts, alone, shared = caches
  assert os.listdir(shared) == [os.path.basename(two_hosts)]  # the reader built nothing
  for split in ("train", "val", "test"):
    merged = feature_cache.load_split(two_hosts, split)
    single = feature_cache.load_split(alone, split)
    assert merged.shape == single.shape
    np.testing.assert_allclose(merged, single, rtol=1e-6, atol=1e-6, err_msg=split)
    # Memory-mapped parts (beyond the budget) index as the merged array does.
    parted = feature_cache.load_split(two_hosts, split, budget_bytes=0)
    assert isinstance(parted, feature_cache.PartedFeatures)
    index = np.arange(merged.shape[1])[::-1]
    np.testing.assert_array_equal(parted[0, index], merged[0, index])
