"""Converted datasets ("records:DIR", `jtl convert`): the same batches as the source, each host
reading only its share, conversions that never leave a half-written dataset, and one clear
error for every kind of damage."""
import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

import image_corpus
from conftest import write_image_folder
from jtl import data
from jtl.data import convert, record_format
from jtl.data.errors import DataError

PP = data.Preprocess(image_size=16, crop_pct=0.875)
AUGMENT = data.Augment(rotation_degrees=10, color_jitter=0.2)  # crop, flip and more


def _mixed_folder(root):
  """PNG classes from the usual generator plus JPEGs, EXIF-rotated JPEGs, RGBA/16-bit PNGs and
  one JPEG large enough to be decoded at reduced scale."""
  write_image_folder(root, splits=("train", "test"), per_class=8)
  odd = os.path.join(root, "train", "class_0", "odd")
  os.makedirs(odd)
  image_corpus.write_odd_images(odd)
  rng = np.random.default_rng(1)
  big = rng.integers(0, 255, (300, 420, 3), np.uint8)
  Image.fromarray(big).save(os.path.join(root, "train", "class_1", "big.jpg"), quality=80)
  return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("records")
  folder = _mixed_folder(str(root / "folder"))
  out = convert.convert(f"folder:{folder}", str(root / "records"), records_per_shard=9,
                        show_progress=False)
  return folder, out


def _open(spec, **kwargs):
  return data.open_dataset(spec, val_fraction=0.25, seed=3,
                           options=data.DecodeOptions(cache_decoded=False, decode_min_side=64),
                           **kwargs)


def _epochs(ds, shard=data.Shard(), start_step=0, epochs=(0, 1)):
  return [b for epoch in epochs for b in data.train_batches(
      ds, batch_size=4, preprocess=PP, augment=AUGMENT, seed=5, epoch=epoch,
      start_step=start_step, shard=shard)]


def test_records_give_the_folders_splits_batches_and_pixels(converted):
  folder, out = converted
  from_folder, from_records = _open(f"folder:{folder}"), _open(f"records:{out}")
  assert from_records.class_names == from_folder.class_names
  for split in ("train", "val", "test"):
    a, b = from_folder.table(split), from_records.table(split)
    for column in ("labels", "kinds", "orientations", "heights", "widths", "downscales"):
      np.testing.assert_array_equal(getattr(a, column), getattr(b, column), err_msg=column)
  assert from_records.table("train").downscales.max() > 1  # the big JPEG is decoded scaled
  for x, y in zip(_epochs(from_folder), _epochs(from_records), strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  evaluate = dict(batch_size=5, preprocess=PP)
  for x, y in zip(data.eval_batches(from_folder, "test", **evaluate),
                  data.eval_batches(from_records, "test", **evaluate), strict=True):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(x[key], y[key])


def test_decoded_cache_of_records_gives_the_same_pixels(converted):
  _, out = converted
  streamed = _open(f"records:{out}")
  cached = data.open_dataset(f"records:{out}", val_fraction=0.25, seed=3,
                             options=data.DecodeOptions(cache_decoded=True, decode_min_side=64))
  for x, y in zip(_epochs(streamed, epochs=(0,)), _epochs(cached, epochs=(0,)), strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_each_process_reads_only_its_share_and_resumes_without_state(converted):
  _, out = converted
  hosts = [_open(f"records:{out}") for _ in range(2)]
  read = [[], []]
  for p, ds in enumerate(hosts):
    reader = ds.table("train").reader
    original = reader.read

    def logged(ids, original=original, p=p):
      read[p].extend(int(i) for i in ids)
      return original(ids)
    reader.read = logged
    batches = _epochs(ds, shard=data.Shard(p, 2), epochs=(0,))
    assert len(batches) == ds.num_examples("train") // 8
  assert not set(read[0]) & set(read[1])
  train_ids = hosts[0].table("train").sources
  epoch = data.epoch_batches(len(train_ids), 4, 5, 0, shard=data.Shard(0, 1)).reshape(-1)
  expected = train_ids[epoch[:len(train_ids) // 8 * 8]]
  assert sorted(read[0] + read[1]) == sorted(expected.tolist())  # exactly the epoch, once
  # A process resumed at step 2 reads from there on and yields the uninterrupted batches.
  straight = _epochs(hosts[0], shard=data.Shard(1, 2), epochs=(0,))
  resumed = _epochs(hosts[0], shard=data.Shard(1, 2), start_step=2, epochs=(0,))
  assert len(resumed) == len(straight) - 2
  for x, y in zip(straight[2:], resumed, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_the_reader_stays_a_bounded_distance_ahead(converted):
  """The block reads run at most (depth + 2) blocks ahead of what is taken from them: the
  block being unbatched, `depth` prefetched, one in the map. (What tf.data's AUTOTUNE'd maps
  and prefetch downstream hold on top of that is theirs to size, as for any source.)"""
  import tensorflow as tf
  from jtl.data import reading
  _, out = converted
  ds = _open(f"records:{out}")
  reader = ds.table("train").reader
  ids = ds.table("train").sources
  indices = np.arange(len(ids))
  block, depth = 2, 1
  source = reading.background_examples(reader, ids, indices, block=block, depth=depth)
  # tf.data would otherwise add an AUTOTUNE'd prefetch after the unbatch, whose examples
  # pull more blocks: downstream buffering, not the reader's (seen: 14 records read for 5).
  options = tf.data.Options()
  options.experimental_optimization.inject_prefetch = False
  options.autotune.enabled = False
  examples = iter(source.with_options(options))
  taken_so_far = 0
  for taken in (1, 5):
    while taken_so_far < taken:
      index, _ = next(examples)
      assert int(index) == taken_so_far
      taken_so_far += 1
    time.sleep(0.3)  # let the reads run as far ahead as they may
    assert taken <= reader.records_read <= taken + block * (depth + 2)
  assert reader.records_read < len(ids)


def test_a_record_describes_its_image(converted):
  folder, out = converted
  from array_record.python import array_record_module
  manifest = record_format.read_manifest(out)
  test = manifest.splits["test"]
  reader = array_record_module.ArrayRecordReader(test.shards[0].path,
                                                 record_format.READER_OPTIONS)
  first = reader.read([0])[0]
  reader.close()
  fields = record_format.record_fields(first)
  with open(os.path.join(out, record_format.paths_name("test"))) as f:
    path = f.readline().strip()
  assert fields["path"] == path and path.startswith(os.path.join("test", "class_0"))
  for column in ("label", "kind", "orientation", "height", "width"):
    assert fields[column] == test.columns[column + "s"][0], column
  with open(os.path.join(folder, path), "rb") as f:
    assert record_format.record_image(first) == f.read()  # the original bytes, not re-encoded


def test_conversion_refuses_to_replace_an_existing_directory(converted, tmp_path):
  folder, out = converted
  before = sorted(os.listdir(out))
  with pytest.raises(FileExistsError, match="already exists"):
    convert.convert(f"folder:{folder}", out, show_progress=False)
  assert sorted(os.listdir(out)) == before


def test_an_interrupted_conversion_leaves_nothing_that_looks_complete(converted, tmp_path,
                                                                       monkeypatch):
  folder, _ = converted
  calls = []
  real = convert._probe_chunk

  def interrupted(chunk, max_pixels):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(chunk, max_pixels)
  monkeypatch.setattr(convert, "_probe_chunk", interrupted)
  out = str(tmp_path / "out")
  with pytest.raises(KeyboardInterrupt):
    convert.convert(f"folder:{folder}", out, show_progress=False, workers=1)
  assert os.listdir(tmp_path) == []
  # What a SIGKILL leaves (a partial directory without its manifest) does not open.
  partial = tmp_path / "out.partial-0000"
  partial.mkdir()
  with pytest.raises(FileNotFoundError, match="manifest.json does not exist.*jtl convert"):
    data.open_dataset(f"records:{partial}")


def test_bad_images_fail_the_conversion_listing_every_one_or_are_skipped(tmp_path):
  folder = str(tmp_path / "folder")
  write_image_folder(folder, splits=("train",), per_class=4)
  bad = image_corpus.write_bad_images(os.path.join(folder, "train", "class_2"))
  with pytest.raises(DataError) as failed:
    convert.convert(f"folder:{folder}", str(tmp_path / "out"), show_progress=False)
  for name in bad:
    assert name in str(failed.value)
  assert os.listdir(tmp_path) == ["folder"]
  out = convert.convert(f"folder:{folder}", str(tmp_path / "out"), bad_images="skip",
                        show_progress=False)
  with open(os.path.join(out, "skipped_files.txt")) as f:
    skipped = {os.path.basename(line.split("\t")[0]) for line in f}
  assert skipped == set(bad)
  ds = data.open_dataset(f"records:{out}", val_fraction=0)
  assert ds.num_examples("train") == 12


def _damaged_copy(converted, tmp_path, damage):
  _, out = converted
  copy = str(tmp_path / "copy")
  shutil.copytree(out, copy)
  damage(copy)
  return copy


def _shard(root, index=1):
  with open(os.path.join(root, record_format.MANIFEST_NAME)) as f:
    return os.path.join(root, json.load(f)["splits"]["train"]["shards"][index]["file"])


def _flip_a_byte(path):
  with open(path, "r+b") as f:
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 0xFF]))


def _edit_manifest(root, edit):
  path = os.path.join(root, record_format.MANIFEST_NAME)
  with open(path) as f:
    manifest = json.load(f)
  edit(manifest)
  with open(path, "w") as f:
    json.dump(manifest, f)


@pytest.mark.parametrize("damage, message", [
    (lambda r: os.remove(_shard(r)), r"shard .*train-00001-of-\d+.array_record is missing"),
    (lambda r: os.truncate(_shard(r), os.path.getsize(_shard(r)) - 10),
     r"train-00001-of-\d+.array_record has \d+ bytes, the manifest says \d+: it is truncated"),
    (lambda r: _flip_a_byte(_shard(r)),
     r"train-00001-of-\d+.array_record is not the one conversion \w+ wrote"),
    (lambda r: _edit_manifest(r, lambda m: m["splits"]["train"]["shards"][0].update(
        num_records=m["splits"]["train"]["shards"][0]["num_records"] + 1)),
     r"train-00000-of-\d+.array_record holds \d+ records, the manifest says"),
    (lambda r: os.remove(os.path.join(r, "test.columns.npz")), r"test.columns.npz is missing"),
])
def test_damaged_records_fail_at_open_naming_the_file(converted, tmp_path, damage, message):
  copy = _damaged_copy(converted, tmp_path, damage)
  with pytest.raises(DataError, match=message):
    data.open_dataset(f"records:{copy}")


def test_jtl_convert_command_writes_records_and_reports_mistakes_in_one_line(tmp_path, capsys):
  from jtl import cli
  folder = str(tmp_path / "folder")
  write_image_folder(folder, splits=("train",), per_class=3)
  out = str(tmp_path / "out")
  assert cli.main(["convert", f"folder:{folder}", out]) == 0
  assert f"records:{out}" in capsys.readouterr().out
  assert data.open_dataset(f"records:{out}", val_fraction=0).num_examples("train") == 9
  with pytest.raises(SystemExit) as exited:
    cli.main(["convert", f"folder:{tmp_path / 'nowhere'}", str(tmp_path / "out2")])
  assert exited.value.code == 2
  err = capsys.readouterr().err
  assert err.count("error:") == 1 and "nowhere" in err and "Traceback" not in err


def test_vectorised_decode_scales_equal_the_per_image_rule():
  from jtl.data import decode
  heights, widths = np.arange(1, 3000, 7), np.arange(1, 3000, 7)[::-1]
  for min_side in (0, 1, 64, 224, 512, 1000):
    expected = [decode.jpeg_downscale(h, w, min_side) for h, w in zip(heights, widths)]
    np.testing.assert_array_equal(decode.jpeg_downscales(heights, widths, min_side), expected)
