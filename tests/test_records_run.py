"""A run on converted records is the run on the folder it came from, and a records run
interrupted mid-epoch and at an epoch boundary resumes to bit-identical parameters."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import tiny_config, write_image_folder
from helpers import CrashAtBatch
from jtl import train
from jtl.data import convert

# 36 training images, 3 classes: 27 after the carve, 3 steps of 8 per epoch.
CONFIG = dict(num_epochs=3, checkpoint_every_steps=2, val_fraction=0.25)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("records_run")
  folder = str(root / "folder")
  write_image_folder(folder, splits=("train", "test"))
  records = convert.convert(f"folder:{folder}", str(root / "records"), records_per_shard=10,
                            show_progress=False)
  return folder, records


def _params(workdir):
  return load_file(os.path.join(workdir, "export", "model.safetensors"))


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def _config(folder, records=None):
  config = tiny_config(folder, **CONFIG)
  if records:
    config.dataset = f"records:{records}"
  return config


def _assert_same_run(a, b):
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
  assert _losses(a) == _losses(b)


def test_records_train_like_their_folder_and_resume_bit_identically(sources, tmp_path):
  folder, records = sources
  on_folder, on_records = str(tmp_path / "folder"), str(tmp_path / "records")
  train.train_and_evaluate(_config(folder), on_folder)
  train.train_and_evaluate(_config(folder, records), on_records)
  _assert_same_run(on_folder, on_records)
  with open(os.path.join(on_records, "config.json")) as f:
    assert json.load(f)["dataset"] == f"records:{records}"

  # Checkpoints every 2 steps, 3 steps an epoch: the 6th batch crashes after step 4's
  # checkpoint (mid-epoch 2); after resuming there, the 3rd batch crashes after step 6's
  # (the end of epoch 2, a boundary).
  resumed = str(tmp_path / "resumed")
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(_config(folder, records), resumed, extra_hooks=[CrashAtBatch(6)])
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(_config(folder, records), resumed, extra_hooks=[CrashAtBatch(4)])
  train.train_and_evaluate(_config(folder, records), resumed)
  _assert_same_run(on_records, resumed)
