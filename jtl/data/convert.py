"""Converting an image folder or a prepared tfds dataset into sharded ArrayRecord files, once.

  jtl convert folder:PATH OUT
  jtl convert tfds:NAME OUT --data_dir DIR
  python -m jtl.data.convert ...                       (the same)

Then train with dataset="records:OUT" (jtl.data.record_source): a run on the records is the run
on the source (same splits, validation carve, batches and pixels), but no host holds the
dataset in memory and each host reads only the records of its own batches.

Every example is read and probed once (the bad-image policy applies here, as at a folder's open)
by a thread pool over every core: Pillow and file reads release the GIL. The records are
written in the source's order into `OUT.partial-<id>` beside OUT, which is renamed to OUT only
once every shard, column file and finally the manifest is written: an interrupted conversion
leaves no directory that opens as a dataset, and an existing OUT is never touched.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import os
import shutil
import sys
import uuid
import warnings
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from jtl.data import decode, folder, record_format, scan
from jtl.data.errors import DataError, DataFileExistsError

log = logging.getLogger(__name__)

DEFAULT_RECORDS_PER_SHARD = 10_000
_CHUNK = 64  # examples per probe task: amortises the pool's per-task cost on tiny images


@dataclasses.dataclass
class SourceSplit:
  """One split of a source, in its order: `chunks()` yields lists of (name, label, read), where
  read() returns the encoded bytes (or raises OSError)."""
  name: str
  num_examples: int
  chunks: Callable[[], Iterator[list[tuple[str, int, Callable[[], bytes]]]]]


@dataclasses.dataclass
class Source:
  spec: str
  root: str  # named in messages about bad files
  class_names: tuple[str, ...]
  splits: list[SourceSplit]


def _read_file(path: str) -> Callable[[], bytes]:
  def read():
    with open(path, "rb") as f:
      return f.read()
  return read


def _batched(items: Iterable, size: int) -> Iterator[list]:
  it = iter(items)
  while chunk := list(itertools.islice(it, size)):
    yield chunk


def folder_source(root: str) -> Source:
  root = os.path.abspath(os.path.expanduser(root))
  listing = folder.list_folder(root)

  def split(name, files):
    def chunks():
      return _batched(((os.path.relpath(p, root), label, _read_file(p)) for p, label in files),
                      _CHUNK)
    return SourceSplit(name, len(files), chunks)
  return Source(f"folder:{root}", root, listing.class_names,
                [split(name, files) for name, files in listing.files.items()])


def tfds_source(name: str, data_dir: str | None) -> Source:
  """A prepared tfds dataset in its own example order (shuffle_files=False, as the in-memory
  tfds path reads it), images kept encoded."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from jtl.data import tfds_source as tfds_lib  # pylint: disable=import-outside-toplevel
  builder = tfds.builder(name, data_dir=data_dir)
  info = builder.info
  image_key, label_key = tfds_lib.image_and_label_keys(info)
  class_names = tuple(info.features[label_key].names)

  def split(tfds_split, ours):
    def chunks():
      records = builder.as_dataset(split=tfds_split, shuffle_files=False,
                                   decoders={image_key: tfds.decode.SkipDecoding()})
      examples = ((f"{tfds_split}/{i}", int(ex[label_key]), (lambda b=ex[image_key]: b))
                  for i, ex in enumerate(records.as_numpy_iterator()))
      return _batched(examples, _CHUNK)
    return SourceSplit(ours, int(info.splits[tfds_split].num_examples), chunks)
  try:
    splits = [split(s, ours) for s, ours in tfds_lib.SPLIT_NAMES.items() if s in info.splits]
  except AssertionError as e:
    raise DataError(f"tfds dataset {name!r} is not prepared in data_dir={builder.data_dir!r}: "
                    f"`tfds build {name} --data_dir DIR` first ({e})") from e
  return Source(f"tfds:{name}", builder.data_dir, class_names, splits)


def open_source(spec: str, data_dir: str | None = None) -> Source:
  kind, _, target = spec.partition(":")
  if kind == "folder" and target:
    return folder_source(target)
  if kind == "tfds" and target:
    return tfds_source(target, data_dir)
  raise DataError(f"jtl convert reads 'folder:PATH' or 'tfds:NAME', got {spec!r}")


def _probe_chunk(chunk, max_pixels):
  out = []
  for name, label, read in chunk:
    try:
      data = read()
    except OSError as e:
      out.append((name, label, None, f"cannot read file: {e}"))
      continue
    out.append((name, label, data, decode.probe_bytes(data, max_pixels)))
  return out


def _probed(split: SourceSplit, pool, max_pixels: int, workers: int) -> Iterator[tuple]:
  """(name, label, bytes, ImageInfo or reason) in the split's order, probed in parallel with a
  bounded number of chunks in flight (memory stays flat on any dataset size)."""
  pending = []
  for chunk in split.chunks():
    pending.append(pool.submit(_probe_chunk, chunk, max_pixels))
    if len(pending) >= 4 * workers:
      yield from pending.pop(0).result()
  for future in pending:
    yield from future.result()


class _ShardWriter:
  """Writes one split's records into shards of consecutive source examples."""

  def __init__(self, out: str, split: str, num_examples: int, records_per_shard: int):
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    self._module = array_record_module
    self._out, self._split = out, split
    self._count = max(1, -(-num_examples // records_per_shard))
    self._per_shard = max(1, -(-num_examples // self._count))
    self._index, self._writer, self._records, self.shards = -1, None, 0, []

  def _close(self):
    if self._writer is not None:
      self._writer.close()
      path = os.path.join(self._out, record_format.shard_name(self._split, self._index,
                                                               self._count))
      self.shards.append(record_format.Shard(path, self._records, os.path.getsize(path),
                                             record_format.edge_digest(path)))
      self._writer = None

  def _advance_to(self, index: int) -> None:
    # A shard whose examples were all skipped is still written (empty): the names stay
    # "i-of-n" for every i.
    while self._index < index:
      self._close()
      self._index += 1
      path = os.path.join(self._out, record_format.shard_name(self._split, self._index,
                                                               self._count))
      self._writer = self._module.ArrayRecordWriter(path, record_format.WRITER_OPTIONS)
      self._records = 0

  def write(self, position: int, record: bytes) -> None:
    """position: the example's place in the source split (decides its shard)."""
    self._advance_to(min(position // self._per_shard, self._count - 1))
    self._writer.write(record)
    self._records += 1

  def finish(self) -> list[record_format.Shard]:
    self._advance_to(self._count - 1)
    self._close()
    return self.shards


def _convert_split(split: SourceSplit, tmp: str, pool, *, max_pixels, workers,
                   records_per_shard, progress) -> tuple[list, list]:
  """Writes the split's shards, columns and paths into tmp; returns (shards, bad files)."""
  writer = _ShardWriter(tmp, split.name, split.num_examples, records_per_shard)
  columns = {k: [] for k in record_format.COLUMNS}
  bad = []
  with open(os.path.join(tmp, record_format.paths_name(split.name)), "w",
            encoding="utf-8") as paths:
    for position, (name, label, data, info) in enumerate(
        _probed(split, pool, max_pixels, workers)):
      progress.update(1)
      if not isinstance(info, decode.ImageInfo):
        bad.append((name, info))
        continue
      writer.write(position, record_format.encode_record(
          data, label, info.kind, info.orientation, info.height, info.width, name))
      paths.write(name.replace("\n", " ") + "\n")
      for key, value in zip(record_format.COLUMNS, (label, info.kind, info.orientation,
                                                    info.height, info.width)):
        columns[key].append(value)
  shards = writer.finish()
  record_format.write_columns(os.path.join(tmp, record_format.columns_name(split.name)),
                              {k: np.asarray(v) for k, v in columns.items()})
  return shards, bad


def convert(spec: str, out: str, *, data_dir: str | None = None, bad_images: str = "fail",
            records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
            max_image_pixels: int = decode.DEFAULT_MAX_IMAGE_PIXELS,
            workers: int | None = None, show_progress: bool = True) -> str:
  """Converts `spec` into OUT (which must not exist); returns OUT's absolute path."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  out = os.path.abspath(os.path.expanduser(out))
  if bad_images not in scan.BAD_IMAGE_POLICIES:
    raise DataError(f"--bad_images must be one of {scan.BAD_IMAGE_POLICIES}, got {bad_images!r}")
  if records_per_shard < 1:
    raise DataError(f"--records_per_shard must be at least 1, got {records_per_shard}")
  if os.path.lexists(out):
    raise DataFileExistsError(f"{out} already exists; jtl convert writes a new directory and "
                              f"never replaces one (remove it, or choose another OUT)")
  source = open_source(spec, data_dir)
  workers = workers or min(32, 2 * (os.cpu_count() or 1))
  conversion_id = uuid.uuid4().hex
  tmp = f"{out}.partial-{conversion_id[:8]}"
  os.makedirs(tmp)
  try:
    total = sum(s.num_examples for s in source.splits)
    written, all_bad = {}, []
    # The probe applies its own pixel limit and reports oversized files; Pillow's warning about
    # them would only repeat it (as in jtl.data.scan).
    with warnings.catch_warnings(), \
        concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jtl-convert") as pool, \
        tqdm(total=total, unit="img", desc=f"convert {spec}", disable=not show_progress,
             file=sys.stderr) as progress:
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      for split in source.splits:
        shards, bad = _convert_split(split, tmp, pool, max_pixels=max_image_pixels,
                                     workers=workers, records_per_shard=records_per_shard,
                                     progress=progress)
        written[split.name] = shards
        all_bad.extend(bad)
    # "fail" raises here listing every bad file, and the partial directory is removed below.
    scan.apply_bad_image_policy(all_bad, policy=bad_images, root=source.root, report_dir=tmp)
    for name, shards in written.items():
      if not sum(s.num_records for s in shards):
        raise DataError(f"the {name} split of {spec} has no usable image")
    record_format.write_manifest(
        tmp, source=source.spec, conversion_id=conversion_id, class_names=source.class_names,
        splits=written, bad_images={"policy": bad_images, "skipped": len(all_bad)})
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  counts = {name: sum(s.num_records for s in shards) for name, shards in written.items()}
  log.info("converted %s into %s: %s records", spec, out, counts)
  return out


if __name__ == "__main__":
  # `python -m jtl.data.convert` is `jtl convert`: the command's parser and one-line errors,
  # run as a script (the library itself never depends on the command layer).
  import runpy
  runpy.run_module("jtl.commands.convert", run_name="__main__", alter_sys=True)
