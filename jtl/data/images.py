"""Random access, inside tf.data, to one split's images by example index.

`examples(indices)` is the dataset of (index, data) a pipeline starts from: data is empty for a
folder or an in-memory split (`image` reads the file or the bytes by index) and the encoded
bytes for a split read by index from records (jtl.data.reading's background reader fetches
them). Without a cache each access reads and decodes the file (or the in-memory encoded record). With a
cache the split is decoded once, in order, by the very same decoder, into one flat uint8 tensor,
and each access is a slice: decoding and file reads leave the epoch loop, and cached and uncached
runs give identical pixels.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from jtl.data import decode, reading
from jtl.data.errors import DataError
from jtl.data.tf_setup import tf

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SplitTable:
  """One split, as numpy columns in a stable order."""
  sources: np.ndarray       # object: file paths (str) or encoded images (bytes); int64 record
                            # ids when `reader` is set
  from_files: bool          # sources are paths to read
  labels: np.ndarray        # int32
  kinds: np.ndarray         # int8, decode.KIND_*
  orientations: np.ndarray  # int8, EXIF 1-8
  heights: np.ndarray       # int32 as decoded (oriented, downscaled); -1 when unknown
  widths: np.ndarray
  downscales: np.ndarray | None = None  # int8, JPEG decode scale denominator; None: all 1
  reader: object | None = None  # read(record ids) -> [encoded bytes] (jtl.data.record_source)

  def __post_init__(self):
    if self.downscales is None:
      self.downscales = np.ones(len(self.labels), np.int8)

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices: np.ndarray) -> "SplitTable":
    return SplitTable(self.sources[indices], self.from_files, self.labels[indices],
                      self.kinds[indices], self.orientations[indices], self.heights[indices],
                      self.widths[indices], self.downscales[indices], self.reader)

  def decoded_bytes(self) -> int | None:
    if len(self) and (self.heights.min() < 0 or self.widths.min() < 0):
      return None
    return int(np.sum(self.heights.astype(np.int64) * self.widths * 3))


class SplitImages:
  """TF-side view of a SplitTable: `image(i)` -> uint8 [H, W, 3], `labels` int32 [N]."""

  def __init__(self, table: SplitTable, cache: bool):
    self.size = len(table)
    self._reader = table.reader
    self._record_ids = np.asarray(table.sources, np.int64) if table.reader else None
    self._sources = (tf.constant(list(table.sources), tf.string)
                     if self.size and table.reader is None else None)
    self._from_files = table.from_files
    self._kinds = tf.constant(table.kinds.astype(np.int32))
    self._orientations = tf.constant(table.orientations.astype(np.int32))
    self._downscales = tf.constant(table.downscales.astype(np.int32))
    self.labels = tf.constant(table.labels.astype(np.int32))
    self._flat = self._offsets = self._shapes = None
    self.traced_functions: dict = {}  # pipeline functions over this split, see pipeline._traced
    if cache and self.size:
      self._build_cache(table)

  def examples(self, indices: np.ndarray) -> tf.data.Dataset:
    """(index, data) for each of `indices` in order (-1: a padding slot, data empty)."""
    indices = np.asarray(indices, np.int64)
    if self._reader is not None and self._flat is None:
      return reading.background_examples(self._reader, self._record_ids, indices)
    return tf.data.Dataset.from_tensor_slices((indices, np.full(len(indices), b"", object)))

  def encoded(self, index: int) -> bytes:
    """One example's encoded bytes, read eagerly (error analysis, tests)."""
    if self._reader is not None:
      return self._reader.read(self._record_ids[[index]])[0]
    source = self._sources[index].numpy()
    return tf.io.read_file(source).numpy() if self._from_files else source

  def decode(self, index: tf.Tensor, data: tf.Tensor) -> tf.Tensor:
    if self._sources is not None:
      source = self._sources[index]
      data = tf.io.read_file(source) if self._from_files else source
    return decode.decode_tf(data, self._kinds[index], self._orientations[index],
                            self._downscales[index])

  def image(self, index: tf.Tensor, data: tf.Tensor | None = None) -> tf.Tensor:
    """The decoded image of example `index`; `data` is what `examples` paired with it (needed
    only for a split read by index: a folder's or an in-memory split's image is found by
    index alone)."""
    if data is None:
      if self._reader is not None and self._flat is None:
        raise ValueError("a split read by index decodes the bytes `examples` paired with the "
                         "index: pass them as data")
      data = tf.constant(b"")
    if self._flat is None:
      return self.decode(index, data)
    start, stop = self._offsets[index], self._offsets[index + 1]
    shape = tf.concat([self._shapes[index], [3]], axis=0)
    return tf.reshape(self._flat[start:stop], shape)

  def _build_cache(self, table: SplitTable) -> None:
    sizes = table.heights.astype(np.int64) * table.widths * 3
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    flat = np.empty(int(offsets[-1]), np.uint8)
    log.info("decoding %d images once into memory (%.1f MiB)", self.size, flat.nbytes / 2**20)
    decoded = (self.examples(np.arange(self.size))
               .map(lambda i, data: tf.reshape(self.decode(i, data), [-1]),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .ragged_batch(512).prefetch(2))
    done = 0
    for batch in decoded:
      lengths = batch.row_lengths().numpy()
      expected = sizes[done:done + len(lengths)]
      if not np.array_equal(lengths, expected):
        bad = done + int(np.flatnonzero(lengths != expected)[0])
        raise DataError(f"{table.sources[bad]!r} decoded to a different size than the scan "
                        f"read from its header ({table.heights[bad]}x{table.widths[bad]})")
      values = batch.flat_values.numpy()
      flat[offsets[done]:offsets[done] + len(values)] = values
      done += len(lengths)
    self._flat = tf.constant(flat)
    self._offsets = tf.constant(offsets)
    self._shapes = tf.constant(np.stack([table.heights, table.widths], axis=1).astype(np.int32))
