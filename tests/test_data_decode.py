"""Decoding odd files to the right pixels, and the scan's verdicts on bad ones."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image, ImageOps

import image_corpus
from jtl import data
from jtl.data import decode
from jtl.data.tf_setup import tf


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("odd"))
  return directory, image_corpus.write_odd_images(directory)


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("bad"))
  return directory, image_corpus.write_bad_images(directory)


def _decode_file(path):
  info = decode.probe_file(path)
  assert isinstance(info, decode.ImageInfo), f"{path}: {info}"
  with open(path, "rb") as f:
    image = decode.decode_tf(tf.constant(f.read()), info.kind, info.orientation).numpy()
  assert (info.height, info.width) == image.shape[:2], "scan and decoder disagree on the size"
  return info, image


def test_every_odd_image_decodes_to_its_expected_pixels(odd_dir):
  directory, odd = odd_dir
  failures = []
  for item in odd:
    _, image = _decode_file(os.path.join(directory, item.name))
    if image.shape != item.expected.shape:
      failures.append(f"{item.name}: shape {image.shape} != {item.expected.shape}")
      continue
    error = int(np.abs(image.astype(int) - item.expected.astype(int)).max())
    if error > item.tolerance:
      failures.append(f"{item.name}: max error {error} > {item.tolerance}")
  assert not failures, "\n".join(failures)


def test_common_files_take_tensorflow_decoders(odd_dir):
  directory, _ = odd_dir
  kinds = {name: decode.probe_file(os.path.join(directory, name)).kind
           for name in ("gray_L.png", "UPPER_CASE.PNG", "phone_orientation_6.jpg", "gray16.png",
                        "rgba.png", "cmyk.jpg", "rgb_lossless.webp")}
  assert kinds == {"gray_L.png": decode.KIND_PNG, "UPPER_CASE.PNG": decode.KIND_PNG,
                   "phone_orientation_6.jpg": decode.KIND_JPEG,
                   "gray16.png": decode.KIND_PNG_SCALED, "rgba.png": decode.KIND_PNG_ALPHA,
                   "cmyk.jpg": decode.KIND_PIL, "rgb_lossless.webp": decode.KIND_PIL}


def test_orientation_matches_pillows_exif_transpose(odd_dir):
  directory, _ = odd_dir
  for orientation in range(1, 9):
    path = os.path.join(directory, f"exif_orientation_{orientation}.png")
    info, image = _decode_file(path)
    assert info.orientation == orientation
    with Image.open(path) as img:
      reference = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    np.testing.assert_array_equal(image, reference, err_msg=f"orientation {orientation}")
    np.testing.assert_array_equal(image, image_corpus.upright())


def test_alpha_is_composited_onto_white_and_16_bit_is_scaled(odd_dir):
  directory, _ = odd_dir
  _, rgba = _decode_file(os.path.join(directory, "rgba.png"))
  assert tuple(rgba[0, 0]) == (255, 255, 255)       # alpha 0 -> white
  _, rgba16 = _decode_file(os.path.join(directory, "rgba16.png"))
  assert tuple(rgba16[0, 0]) == (255, 255, 255)
  _, rgb16 = _decode_file(os.path.join(directory, "rgb16.png"))
  assert tuple(rgb16[0, 0]) == (255, 1, 0)           # 65535, 257, 0: scaled, not truncated
  _, gray16 = _decode_file(os.path.join(directory, "gray16.png"))
  # 0, 1, 128, 129, 257, 32767, 32896, 65534 -> round(v / 257)
  assert list(gray16[0, :, 0]) == [0, 0, 0, 1, 1, 127, 128, 255]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_files_get_reasons(bad_dir):
  directory, expected = bad_dir
  for name, words in expected.items():
    verdict = decode.probe_file(os.path.join(directory, name))
    assert isinstance(verdict, str) and words in verdict.lower(), f"{name}: {verdict}"


def test_pixel_limit_is_configurable(odd_dir):
  directory, _ = odd_dir
  verdict = decode.probe_file(os.path.join(directory, "gray_L.png"), max_pixels=47)
  assert "decompression bomb" in verdict and "6x8" not in verdict and "8x6 = 48" in verdict


def _folder_with(root, odd_directory, bad_directory=None, bad_names=()):
  """Two classes: the odd images split between them, bad files in class b."""
  names = sorted(os.listdir(odd_directory))
  for i, name in enumerate(names):
    target = os.path.join(root, "a" if i % 2 == 0 else "b")
    os.makedirs(target, exist_ok=True)
    shutil.copy(os.path.join(odd_directory, name), target)
  for name in bad_names:
    shutil.copy(os.path.join(bad_directory, name), os.path.join(root, "b"))
  return root


def test_fail_policy_raises_once_listing_every_bad_file(tmp_path, odd_dir, bad_dir):
  root = _folder_with(str(tmp_path / "data"), odd_dir[0], bad_dir[0], bad_dir[1])
  with pytest.raises(ValueError) as error:
    data.open_dataset(f"folder:{root}", val_fraction=0.0)
  message = str(error.value)
  assert f"{len(bad_dir[1])} unusable" in message
  for name, words in bad_dir[1].items():
    bad_path = os.path.join(root, "b", name)
    line = next(l for l in message.splitlines() if l.strip().startswith(bad_path))
    assert words in line.lower(), line


def test_skip_policy_drops_and_reports(tmp_path, odd_dir, bad_dir):
  root = _folder_with(str(tmp_path / "data"), odd_dir[0], bad_dir[0], bad_dir[1])
  report_dir = str(tmp_path / "report")
  ds = data.open_dataset(f"folder:{root}", val_fraction=0.0, bad_images="skip",
                         report_dir=report_dir)
  assert ds.num_examples("train") == len(odd_dir[1])
  with open(os.path.join(report_dir, "skipped_files.txt"), encoding="utf-8") as f:
    lines = [l.rstrip("\n").split("\t") for l in f]
  assert sorted(os.path.basename(p) for p, _ in lines) == sorted(bad_dir[1])
  assert all(reason for _, reason in lines)


def test_decoded_through_the_dataset_with_and_without_cache(tmp_path, odd_dir):
  """The cache stores what the decoder gives: both paths yield the same pixels."""
  root = _folder_with(str(tmp_path / "data"), odd_dir[0])
  expected = {item.name: item for item in odd_dir[1]}
  for cache in (False, True):
    ds = data.open_dataset(f"folder:{root}", val_fraction=0.0,
                           options=data.DecodeOptions(cache_decoded=cache))
    table, images = ds.table("train"), ds.images("train")
    for i, path in enumerate(table.sources):
      item = expected[os.path.basename(path)]
      image = images.image(tf.constant(i, tf.int64)).numpy()
      assert np.abs(image.astype(int) - item.expected).max() <= item.tolerance, (cache, path)


def test_folder_rules(tmp_path):
  pixel = Image.new("RGB", (4, 4), (9, 9, 9))
  root = tmp_path / "data"
  for name in ("cat/x.JPG", "cat/deeper/y.png", "dog/z.WebP", "dog/.hidden.png",
               ".hidden_dir/w.png", "dog/notes.txt"):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".txt"):
      path.write_text("not an image")
    else:
      pixel.save(path, format={"JPG": "JPEG", "WebP": "WEBP"}.get(name.rsplit(".", 1)[1], "PNG"))
  ds = data.open_dataset(f"folder:{root}", val_fraction=0.0)
  assert ds.class_names == ("cat", "dog")
  assert sorted(os.path.relpath(p, root) for p in ds.table("train").sources) == [
      "cat/deeper/y.png", "cat/x.JPG", "dog/z.WebP"]

  (root / "empty_class").mkdir()
  with pytest.raises(ValueError, match=f"{root / 'empty_class'}.*no image files"):
    data.open_dataset(f"folder:{root}")
  single = tmp_path / "single"
  (single / "only").mkdir(parents=True)
  pixel.save(single / "only" / "a.png")
  with pytest.raises(ValueError, match=f"{single}.*at least 2 class folders"):
    data.open_dataset(f"folder:{single}")


def test_tensorflow_sees_no_accelerator():
  assert tf.config.get_visible_devices("GPU") == []


def test_large_jpegs_are_decoded_downscaled_to_the_recorded_size(tmp_path):
  # ceil(short / r) >= 512 for the largest r in 1, 2, 4, 8
  assert [decode.jpeg_downscale(h, 5000, 512) for h in (4096, 3000, 2045, 2044, 1023, 1022)] == [
      8, 4, 4, 2, 2, 1]
  assert decode.jpeg_downscale(3000, 4000, 0) == 1
  photo = np.kron(image_corpus.upright(), np.ones((200, 200, 1), np.uint8))  # 1200 x 1600
  for cls in ("a", "b"):
    (tmp_path / cls).mkdir()
    Image.fromarray(photo).save(tmp_path / cls / "photo.jpg", quality=95,
                                exif=image_corpus.exif_bytes(6))
  ds = data.open_dataset(f"folder:{tmp_path}", val_fraction=0.0,
                         options=data.DecodeOptions(decode_min_side=500))
  table = ds.table("train")
  # Stored 1200 x 1600, shown rotated: 1600 x 1200; 1200 / 2 = 600 >= 500 > 1200 / 4.
  assert (table.downscales[0], table.heights[0], table.widths[0]) == (2, 800, 600)
  image = ds.images("train").image(tf.constant(0, tf.int64)).numpy()
  assert image.shape == (800, 600, 3)
  rotated = np.rot90(photo, k=-1)[::2, ::2]  # orientation 6 undone, then halved
  assert np.abs(image.astype(int) - rotated).mean() < 3
