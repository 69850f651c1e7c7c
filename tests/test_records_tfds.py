"""tfds datasets without loading their splits: one prepared in array_record format is read by
index through tfds.data_source and gives the batches of the same dataset prepared as TFRecord
(read into memory) and of its `jtl convert` records; a TFRecord one above the memory budget
fails at open naming the commands that convert it."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jtl import data
from jtl.data import convert, tfds_source
from jtl.data.errors import DataError

PP = data.Preprocess(image_size=12)


class JtlTinyImages(tfds.core.GeneratorBasedBuilder):
  """Three classes of small random PNG-encoded images of mixed sizes."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["a", "b", "c"])}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 30), "test": self._generate_examples(1, 7)}

  def _generate_examples(self, seed, count):
    rng = np.random.default_rng(seed)
    for i in range(count):
      side = int(rng.integers(10, 20))
      yield i, {"image": rng.integers(0, 255, (side, side + 3, 3), np.uint8), "label": i % 3}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  dirs = {}
  for file_format in ("array_record", "tfrecord"):
    dirs[file_format] = str(root / file_format)
    JtlTinyImages(data_dir=dirs[file_format], file_format=file_format).download_and_prepare()
  return dirs


def _open(spec, data_dir=None):
  return data.open_dataset(spec, data_dir=data_dir, val_fraction=0.2, seed=1,
                           options=data.DecodeOptions(cache_decoded=False))


def _batches(ds):
  return list(data.train_batches(ds, batch_size=4, preprocess=PP, augment=data.Augment(),
                                 seed=2, epoch=0))


def test_array_record_tfds_streams_the_batches_of_the_in_memory_path(prepared, tmp_path):
  streamed = _open("tfds:jtl_tiny_images", prepared["array_record"])
  in_memory = _open("tfds:jtl_tiny_images", prepared["tfrecord"])
  assert streamed.table("train").reader is not None
  assert in_memory.table("train").reader is None
  converted = convert.convert("tfds:jtl_tiny_images", str(tmp_path / "records"),
                              data_dir=prepared["tfrecord"], show_progress=False)
  records = _open(f"records:{converted}")
  for ds in (streamed, records):
    assert ds.class_names == ("a", "b", "c")
    for split in ("train", "val", "test"):
      np.testing.assert_array_equal(ds.table(split).labels, in_memory.table(split).labels)
  for a, b, c in zip(_batches(streamed), _batches(in_memory), _batches(records), strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(c["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_tfrecord_dataset_above_the_memory_budget_names_the_convert_commands(prepared,
                                                                              monkeypatch):
  monkeypatch.setattr(tfds_source, "in_memory_budget_bytes", lambda: 100)
  with pytest.raises(DataError, match=r"prepared as TFRecord.*tfds convert_format.*jtl convert "
                     r"tfds:jtl_tiny_images"):
    _open("tfds:jtl_tiny_images", prepared["tfrecord"])
  assert _open("tfds:jtl_tiny_images", prepared["array_record"]).num_examples("train") == 24
