"""The Fashion-MNIST demo converter, on tiny idx files written here (the real ones come from
Debian's dataset-fashion-mnist package, which tests do not need)."""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
from PIL import Image

from jtl import data
from jtl.data import demo


def _write_idx(path, array):
  header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def source(tmp_path):
  rng = np.random.default_rng(0)
  directory = tmp_path / "source"
  directory.mkdir()
  arrays = {}
  for split, count in (("train", 30), ("test", 10)):
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = np.arange(count) % 10
    images_name, labels_name = demo.SOURCE_FILES[split]
    _write_idx(directory / images_name, images)
    _write_idx(directory / labels_name, labels)
    arrays[split] = (images, labels)
  return str(directory), arrays


def test_converts_to_an_image_folder_idempotently(tmp_path, source):
  directory, arrays = source
  out = str(tmp_path / "data" / "fashion_mnist")
  assert demo.main(["--out", out, "--source", directory]) == 0
  images, labels = arrays["train"]
  for i in (0, 7, 29):
    path = os.path.join(out, "train", demo.CLASS_NAMES[labels[i]], f"{i:05d}.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), images[i])
  stamp = os.stat(os.path.join(out, "train", "Bag", "00008.png")).st_mtime_ns
  assert demo.convert(out, directory) == out          # complete: left alone
  assert os.stat(os.path.join(out, "train", "Bag", "00008.png")).st_mtime_ns == stamp
  assert sorted(os.listdir(tmp_path / "data")) == ["fashion_mnist"]  # no staging left behind

  ds = data.open_dataset(f"folder:{out}", val_fraction=0.0)
  assert ds.class_names == tuple(sorted(demo.CLASS_NAMES))
  assert (ds.num_examples("train"), ds.num_examples("test")) == (30, 10)


def test_missing_package_says_how_to_install(tmp_path, capsys):
  assert demo.main(["--out", str(tmp_path / "out"), "--source", str(tmp_path / "nowhere")]) == 1
  assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_failure_leaves_nothing_behind(tmp_path, source):
  directory, _ = source
  _write_idx(os.path.join(directory, demo.SOURCE_FILES["test"][1]), np.zeros(3))  # wrong count
  out = tmp_path / "data" / "fashion_mnist"
  with pytest.raises(ValueError, match="matching images and labels"):
    demo.convert(str(out), directory)
  assert os.listdir(tmp_path / "data") == []
