"""Datasets read by index, never held in memory: "records:DIR" (written by `jtl convert`) and a
tfds dataset prepared in array_record format (read through `tfds.data_source`).

Opening reads only the manifest and the small per-split columns (labels and probe metadata):
O(shards), no record. A split's table then carries a reader instead of its encoded images, and
the pipeline fetches each batch's records by index in a background thread (jtl.data.reading)
while tf.data decodes and augments them exactly as it does a folder's files. Since the batch
order is the pure function of (seed, epoch, step, process) of `pipeline.epoch_batches`, each
host reads only the records of its own slice of each global batch, and a resumed run needs no
reader state.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading

import numpy as np

from jtl.data import decode, record_format
from jtl.data.errors import DataError
from jtl.data.images import SplitTable
from jtl.data.tf_setup import tf

log = logging.getLogger(__name__)

class RecordReader:
  """Encoded images of one split by record id, through array_record's random-access source
  over all of the split's shards. `records_read` counts what was fetched (for the tests and
  the benchmark: a host reads only its share)."""

  def __init__(self, shard_paths, identity: str):
    self._paths = [str(p) for p in shard_paths]
    self._source = None
    self._lock = threading.Lock()
    self.identity = identity  # names the data for the feature cache's fingerprint
    self.records_read = 0

  def _data_source(self):
    with self._lock:
      if self._source is None:
        from array_record.python import array_record_data_source  # pylint: disable=import-outside-toplevel
        # It opens its readers for random access (no readahead) and checks group_size:1.
        self._source = array_record_data_source.ArrayRecordDataSource(self._paths)
      return self._source

  def read(self, record_ids) -> list[bytes]:
    records = self._data_source().__getitems__([int(i) for i in record_ids])
    self.records_read += len(records)
    return [record_format.record_image(r) for r in records]


class TfdsReader:
  """The same interface over `tfds.data_source` (a tfds dataset in array_record format)."""

  def __init__(self, source, image_key: str, identity: str):
    self._source, self._image_key, self.identity = source, image_key, identity
    self.records_read = 0

  def read(self, record_ids) -> list[bytes]:
    items = self._source.__getitems__([int(i) for i in record_ids])
    self.records_read += len(items)
    return [item[self._image_key] for item in items]


def _downscaled(heights, widths, kinds, decode_min_side: int):
  downscales = np.where(kinds == decode.KIND_JPEG,
                        decode.jpeg_downscales(heights, widths, decode_min_side), 1)
  # libjpeg rounds scaled sizes up.
  return ((heights + downscales - 1) // downscales, (widths + downscales - 1) // downscales,
          downscales.astype(np.int8))


def open_records(root: str, decode_min_side: int) -> tuple[str, tuple[str, ...],
                                                            dict[str, SplitTable]]:
  """(name, class names, {split: table}) of a converted dataset; the tables read by index."""
  manifest = record_format.read_manifest(root)
  tables = {}
  for name, split in manifest.splits.items():
    c = split.columns
    heights, widths, downscales = _downscaled(c["heights"], c["widths"], c["kinds"],
                                              decode_min_side)
    reader = RecordReader([s.path for s in split.shards],
                          identity=f"{manifest.conversion_id}/{name}")
    tables[name] = SplitTable(
        sources=np.arange(split.num_records, dtype=np.int64), from_files=False,
        labels=c["labels"], kinds=c["kinds"], orientations=c["orientations"],
        heights=heights, widths=widths, downscales=downscales, reader=reader)
  log.info("opened records %s: %d classes, %s (converted from %s)", manifest.root,
           len(manifest.class_names), {s: len(t) for s, t in tables.items()}, manifest.source)
  return f"records:{manifest.root}", manifest.class_names, tables


def _tfds_columns(source, image_key: str, label_key: str, cache_path: str):
  """Labels and decoder kinds of every example: one pass over the records, kept in the jtl
  cache (tfds stores labels inside the records, beside the images)."""
  if os.path.exists(cache_path):
    with np.load(cache_path) as f:
      return f["labels"], f["kinds"]
  labels, kinds = [], []
  for start in range(0, len(source), 1024):
    for item in source.__getitems__(list(range(start, min(start + 1024, len(source))))):
      labels.append(int(item[label_key]))
      kinds.append(decode.sniff_kind(item[image_key]))
  labels, kinds = np.asarray(labels, np.int32), np.asarray(kinds, np.int8)
  os.makedirs(os.path.dirname(cache_path), exist_ok=True)
  tmp = f"{cache_path}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    np.savez(f, labels=labels, kinds=kinds)
  os.replace(tmp, cache_path)
  return labels, kinds


def open_tfds_array_record(builder, image_key: str, label_key: str, static_shape,
                           splits: dict[str, str], cache_dir: str) -> dict[str, SplitTable]:
  """{our split: table} read by index through tfds.data_source (no split loaded)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  tables = {}
  for tfds_split, ours in splits.items():
    # What tfds.data_source returns, from the builder already opened.
    source = builder.as_data_source(split=tfds_split,
                                    decoders={image_key: tfds.decode.SkipDecoding()})
    n = len(source)
    key = hashlib.sha256(f"{builder.data_dir}\0{builder.info.full_name}\0{tfds_split}\0{n}"
                         .encode()).hexdigest()[:24]
    labels, kinds = _tfds_columns(source, image_key, label_key,
                                  os.path.join(cache_dir, "tfds_columns", f"{key}.npz"))
    height, width = static_shape if static_shape else (-1, -1)
    tables[ours] = SplitTable(
        sources=np.arange(n, dtype=np.int64), from_files=False, labels=labels, kinds=kinds,
        orientations=np.ones(n, np.int8), heights=np.full(n, height, np.int32),
        widths=np.full(n, width, np.int32),
        reader=TfdsReader(source, image_key, identity=f"tfds:{builder.info.full_name}/{key}"))
  return tables
