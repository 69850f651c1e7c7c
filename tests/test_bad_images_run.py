"""Bad files in a user's folder, through the whole engine: found before training, by policy."""
import os

import pytest

from conftest import tiny_config, write_image_folder
from image_corpus import write_bad_images
from jtl import train


@pytest.fixture(scope="module")
def folder_with_bad_files(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("bad") / "data")
  write_image_folder(root)
  reasons = write_bad_images(os.path.join(root, "train", "class_1"))
  return root, reasons


def test_fail_policy_lists_every_bad_file_before_training(folder_with_bad_files, tmp_path):
  root, reasons = folder_with_bad_files
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(tiny_config(root), str(workdir))
  message = str(e.value)
  for name, reason in reasons.items():
    assert name in message and reason in message, (name, reason)
  assert not (workdir / "checkpoints").exists()  # nothing started


def test_skip_policy_trains_and_records_the_skipped_files(folder_with_bad_files, tmp_path,
                                                         caplog):
  root, reasons = folder_with_bad_files
  workdir = tmp_path / "run"
  with caplog.at_level("INFO"):
    final = train.train_and_evaluate(tiny_config(root, bad_images="skip", num_epochs=1),
                                     str(workdir))
  skipped = (workdir / "skipped_files.txt").read_text()
  for name in reasons:
    assert name in skipped
  assert len([l for l in skipped.splitlines() if l.strip()]) == len(reasons)
  assert f"{len(reasons)}" in caplog.text and "skip" in caplog.text.lower()
  assert final["num_test_examples"] == 36
