"""A TensorFlow Datasets source: "tfds:NAME" (NAME may carry a config and version, "a/b:1.0.0").

A dataset prepared in array_record format (`tfds build NAME --file_format array_record`, or
`tfds convert_format` for one prepared as TFRecord) is read by index through tfds.data_source:
nothing is loaded (jtl.data.record_source). One prepared only as TFRecord allows no random
access: each split is read once, with image decoding skipped, into memory as encoded bytes, and
the pipeline decodes by index like a folder. That suits the datasets transfer learning mostly
uses (fashion_mnist ~ 30 MiB, tf_flowers ~ 220 MiB encoded); above a memory budget the open
fails and names the command that converts the dataset.
Nothing is downloaded here: a dataset must have been prepared in data_dir beforehand.
"""
from __future__ import annotations

import os

import numpy as np

from jtl.data import decode, record_source
from jtl.data.errors import DataError
from jtl.data.images import SplitTable
from jtl.data.tf_setup import tf

# tfds split name -> ours
SPLIT_NAMES = {"train": "train", "validation": "val", "test": "test"}


def image_and_label_keys(info) -> tuple[str, str]:
  if info.supervised_keys and len(info.supervised_keys) == 2:
    image_key, label_key = info.supervised_keys
    if isinstance(image_key, str) and isinstance(label_key, str):
      return image_key, label_key
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  features = info.features
  images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
  if len(images) != 1 or len(labels) != 1:
    raise DataError(f"tfds dataset {info.name}: cannot tell the image and label features apart "
                    f"in {list(features)}")
  return images[0], labels[0]


def _read_split(builder, split: str, image_key: str, label_key: str, image_shape) -> SplitTable:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  records = builder.as_dataset(split=split, shuffle_files=False,
                               decoders={image_key: tfds.decode.SkipDecoding()})
  records = records.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))
  encoded, labels = [], []
  for images_batch, labels_batch in records.batch(4096).as_numpy_iterator():
    encoded.extend(images_batch.tolist())
    labels.append(labels_batch)
  n = len(encoded)
  sources = np.empty(n, object)
  sources[:] = encoded
  height, width = (image_shape[0], image_shape[1]) if image_shape else (None, None)
  return SplitTable(
      sources=sources, from_files=False,
      labels=np.concatenate(labels).astype(np.int32) if labels else np.zeros(0, np.int32),
      kinds=np.array([decode.sniff_kind(b) for b in encoded], np.int8).reshape(n),
      orientations=np.ones(n, np.int8),
      heights=np.full(n, height if height else -1, np.int32),
      widths=np.full(n, width if width else -1, np.int32))


def in_memory_budget_bytes() -> int:
  """The most encoded bytes a TFRecord-format dataset may hold to be read into memory: a quarter
  of the RAM (decoded images, the model and the feature cache need the rest)."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
  except (ValueError, OSError, AttributeError):
    return 4 * 2**30


def _columns_cache_dir() -> str:
  return os.path.expanduser(os.environ.get("JTL_CACHE_DIR")
                            or os.path.join("~", ".cache", "jtl", "features"))


def _is_array_record(info) -> bool:
  from tensorflow_datasets.core import file_adapters  # pylint: disable=import-outside-toplevel
  try:
    return bool(info.splits) and info.file_format == file_adapters.FileFormat.ARRAY_RECORD
  except (AttributeError, ValueError):
    return False


def _check_fits_in_memory(name: str, info, data_dir: str) -> None:
  size = sum(int(getattr(info.splits[s], "num_bytes", 0) or 0) for s in SPLIT_NAMES
             if info.splits and s in info.splits)
  budget = in_memory_budget_bytes()
  if size > budget:
    raise DataError(
        f"tfds dataset {name!r} is prepared as TFRecord ({size / 2**30:.1f} GiB), which jtl "
        f"can only read whole into memory, and that is more than the budget of "
        f"{budget / 2**30:.1f} GiB; convert it once for reading by index: "
        f"`tfds convert_format --root_data_dir {data_dir} --out_file_format array_record` "
        f"(then dataset=tfds:{name} streams), or `jtl convert tfds:{name} OUT --data_dir "
        f"{data_dir}` (then dataset=records:OUT)")


def open_tfds(name: str, data_dir: str | None) -> tuple[tuple[str, ...], dict[str, SplitTable]]:
  """(class names, {our split: table}): read by index when prepared as array_record, else
  loaded into memory (read_tfds) when it fits."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  builder = tfds.builder(name, data_dir=data_dir)
  info = builder.info
  if not _is_array_record(info):
    _check_fits_in_memory(name, info, builder.data_dir)
    return read_tfds(name, data_dir)
  image_key, label_key = image_and_label_keys(info)
  shape = info.features[image_key].shape
  static_shape = shape[:2] if shape and None not in shape[:2] else None
  splits = {s: ours for s, ours in SPLIT_NAMES.items() if s in info.splits}
  tables = record_source.open_tfds_array_record(builder, image_key, label_key, static_shape,
                                                splits, _columns_cache_dir())
  if "train" not in tables:
    raise DataError(f"tfds dataset {name!r} has no train split (has {list(info.splits)})")
  return tuple(info.features[label_key].names), tables


def read_tfds(name: str, data_dir: str | None) -> tuple[tuple[str, ...], dict[str, SplitTable]]:
  """(class names, {our split: table}) for the splits the dataset has."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  builder = tfds.builder(name, data_dir=data_dir)
  info = builder.info
  image_key, label_key = image_and_label_keys(info)
  class_names = tuple(info.features[label_key].names)
  shape = info.features[image_key].shape
  static_shape = shape if shape and None not in shape[:2] else None
  # A prepared dataset lists its splits; a mocked one (tfds.testing.mock_data) lists none and
  # answers for any name.
  available = [s for s in SPLIT_NAMES if not info.splits or s in info.splits]
  tables = {}
  for split in available:
    try:
      tables[SPLIT_NAMES[split]] = _read_split(builder, split, image_key, label_key, static_shape)
    except AssertionError as e:  # tfds's way of saying the data is not there
      raise DataError(
          f"tfds dataset {name!r} is not prepared in data_dir={builder.data_dir!r}: build it once "
          f"where the network is reachable (`tfds build {name} --data_dir DIR`) and pass that "
          f"data_dir ({e})") from e
  if "train" not in tables:
    raise DataError(f"tfds dataset {name!r} has no train split (has {list(info.splits)})")
  return class_names, tables
