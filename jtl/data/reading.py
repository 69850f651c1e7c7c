"""Feeding tf.data from a random-access reader: a background thread fetches the records of the
examples to come, a block per call, and stays a bounded distance ahead of what tf.data takes.

array_record reads a block's records in parallel and without the GIL, so the thread overlaps
file reads with TensorFlow's decoding; the bound keeps memory flat on any dataset size.
"""
from __future__ import annotations

import queue
import threading

import numpy as np

from jtl.data.errors import DataError
from jtl.data.tf_setup import tf

# Records fetched per read call and read calls kept ready ahead of tf.data: the reader runs at
# most READ_BLOCK * READ_AHEAD_BLOCKS examples ahead of what tf.data has taken.
READ_BLOCK = 64
READ_AHEAD_BLOCKS = 4


def background_examples(reader, record_ids: np.ndarray, indices: np.ndarray,
                        block: int | None = None, depth: int | None = None) -> tf.data.Dataset:
  """(index, encoded bytes) for each of `indices` in order (index -1: padding, empty bytes),
  read `block` records per call (READ_BLOCK) by a background thread that stays at most `depth`
  blocks (READ_AHEAD_BLOCKS) ahead of what tf.data has taken."""
  indices = np.asarray(indices, np.int64)
  block, depth = block or READ_BLOCK, depth or READ_AHEAD_BLOCKS

  def produce(out: queue.Queue, stop: threading.Event):
    try:
      for start in range(0, len(indices), block):
        chunk = indices[start:start + block]
        real = chunk >= 0
        data = iter(reader.read(record_ids[chunk[real]]) if real.any() else ())
        encoded = np.empty(len(chunk), object)
        encoded[:] = [next(data) if ok else b"" for ok in real]
        item = (chunk, encoded)
        while not stop.is_set():
          try:
            out.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      out.put(None)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      out.put(e)

  def generate():
    out, stop = queue.Queue(maxsize=depth), threading.Event()
    thread = threading.Thread(target=produce, args=(out, stop), daemon=True,
                              name="jtl-record-reader")
    thread.start()
    try:
      while (item := out.get()) is not None:
        if isinstance(item, BaseException):
          raise DataError(f"reading records failed: {item}") from item
        yield item
    finally:
      stop.set()

  # A block per generator call, split into examples by TensorFlow: one Python round trip per
  # block rather than per example.
  return tf.data.Dataset.from_generator(
      generate, output_signature=(tf.TensorSpec([None], tf.int64),
                                  tf.TensorSpec([None], tf.string))).unbatch()
