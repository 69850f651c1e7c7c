"""The on-disk layout of a converted dataset ("records:DIR"), written by `jtl convert`.

  DIR/manifest.json                        classes, per split: shard files with record counts,
                                           bytes and digests; the conversion's id; format version
  DIR/{split}.columns.npz                  labels and probe metadata of every record, in order
  DIR/{split}.paths.txt                    each record's path relative to the source (reports)
  DIR/{split}-{i:05d}-of-{n:05d}.array_record

Shards are ArrayRecord files written with group_size:1 (one record per compressed chunk: random
access reads exactly one record; array_record's default grew to 65536 in later releases, which
would make each random read decompress a whole group) and uncompressed (encoded images do not
compress; zstd would only cost CPU on every read). Records keep the source's example order,
so opening records and opening the source give the same splits, validation carve and batches.

One record = a fixed header (magic, label, kind, orientation, height, width as decoded and
oriented), the path relative to the source, then the original encoded image bytes: the image is
never re-encoded or decoded. The JPEG decode scale is not stored: it follows from the size and
the run's decode_min_side, so one conversion serves any setting. A plain struct rather
than a tf.train.Example: the background reader slices the bytes out in Python without a
TensorFlow parse per record.

Opening checks only what is cheap (O(shards)): every shard exists, has the recorded size, the
recorded record count, and the recorded digest of its first and last 64 KiB (a shard copied
from another conversion differs there: its chunk offsets and contents differ).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct

import numpy as np

from jtl.data.errors import DataError, DataFileNotFoundError

FORMAT_NAME = "jtl-records"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WRITER_OPTIONS = "group_size:1,uncompressed"
# Random access: no readahead (each read is one record, not a sequential scan).
READER_OPTIONS = "readahead_buffer_size:0"

# magic, label, kind, orientation, height, width, length of the relative path that follows
_HEADER = struct.Struct("<4sibbiiH")
_MAGIC = b"JTR1"
_EDGE_BYTES = 64 * 1024

COLUMNS = ("labels", "kinds", "orientations", "heights", "widths")
_COLUMN_DTYPES = {"labels": np.int32, "kinds": np.int8, "orientations": np.int8,
                  "heights": np.int32, "widths": np.int32}


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def columns_name(split: str) -> str:
  return f"{split}.columns.npz"


def paths_name(split: str) -> str:
  return f"{split}.paths.txt"


def encode_record(image: bytes, label: int, kind: int, orientation: int, height: int,
                  width: int, path: str = "") -> bytes:
  name = path.encode("utf-8")[:65535]
  return _HEADER.pack(_MAGIC, label, kind, orientation, height, width, len(name)) + name + image


def record_image(record: bytes) -> bytes:
  """The encoded image bytes of one record."""
  if record[:4] != _MAGIC:
    raise DataError(f"not a jtl record (starts with {record[:4]!r})")
  return record[_HEADER.size + _HEADER.unpack_from(record)[-1]:]


def record_fields(record: bytes) -> dict:
  """Everything a record says of its image besides the bytes (a record is self-describing)."""
  _, label, kind, orientation, height, width, length = _HEADER.unpack_from(record)
  path = record[_HEADER.size:_HEADER.size + length].decode("utf-8", "replace")
  return dict(label=label, kind=kind, orientation=orientation, height=height, width=width,
              path=path)


def edge_digest(path: str) -> str:
  """SHA-256 of a file's first and last 64 KiB (with its size): cheap to check at every open."""
  size = os.path.getsize(path)
  h = hashlib.sha256(str(size).encode())
  with open(path, "rb") as f:
    h.update(f.read(_EDGE_BYTES))
    f.seek(max(0, size - _EDGE_BYTES))
    h.update(f.read(_EDGE_BYTES))
  return h.hexdigest()


def write_columns(path: str, columns: dict[str, np.ndarray]) -> None:
  with open(path, "wb") as f:
    np.savez(f, **{k: np.asarray(columns[k], _COLUMN_DTYPES[k]) for k in COLUMNS})


@dataclasses.dataclass(frozen=True)
class Shard:
  path: str
  num_records: int
  num_bytes: int
  edge_sha256: str


@dataclasses.dataclass(frozen=True)
class RecordSplit:
  """One split of a converted dataset: its shards and its columns (no record read)."""
  name: str
  shards: tuple[Shard, ...]
  columns: dict[str, np.ndarray]

  @property
  def num_records(self) -> int:
    return sum(s.num_records for s in self.shards)


@dataclasses.dataclass(frozen=True)
class Manifest:
  root: str
  source: str
  conversion_id: str
  class_names: tuple[str, ...]
  splits: dict[str, RecordSplit]


def _load_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise DataFileNotFoundError(
        f"{path} does not exist: {os.path.dirname(path)} is not a converted dataset (or its "
        f"conversion did not finish); write one with `jtl convert SOURCE "
        f"{os.path.dirname(path)}`") from None
  except (OSError, ValueError) as e:
    raise DataError(f"{path} is not a readable manifest: {e}") from e


def _load_columns(path: str, count: int) -> dict[str, np.ndarray]:
  try:
    with np.load(path) as f:
      columns = {k: np.asarray(f[k], _COLUMN_DTYPES[k]) for k in COLUMNS}
  except FileNotFoundError:
    raise DataFileNotFoundError(f"the columns file {path} is missing; convert the dataset "
                                f"again") from None
  except (OSError, ValueError, KeyError) as e:
    raise DataError(f"the columns file {path} is damaged ({e}); convert the dataset "
                    f"again") from e
  for k, v in columns.items():
    if len(v) != count:
      raise DataError(f"the columns file {path} holds {len(v)} {k} for the manifest's {count} "
                      f"records; convert the dataset again")
  return columns


def _check_shard(shard: Shard, conversion_id: str) -> None:
  if not os.path.exists(shard.path):
    raise DataFileNotFoundError(f"shard {shard.path} is missing (the manifest lists it with "
                                f"{shard.num_records} records)")
  size = os.path.getsize(shard.path)
  if size != shard.num_bytes:
    raise DataError(f"shard {shard.path} has {size} bytes, the manifest says "
                    f"{shard.num_bytes}: it is truncated or was replaced")
  if edge_digest(shard.path) != shard.edge_sha256:
    raise DataError(f"shard {shard.path} is not the one conversion {conversion_id} wrote (its "
                    f"digest differs): it comes from another conversion or was modified")


def _check_record_count(shard: Shard) -> None:
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  try:
    reader = array_record_module.ArrayRecordReader(shard.path, READER_OPTIONS)
  except Exception as e:  # pylint: disable=broad-except  (array_record raises plain errors)
    raise DataError(f"shard {shard.path} cannot be opened as an ArrayRecord file: {e}") from e
  try:
    found = reader.num_records()
  finally:
    reader.close()
  if found != shard.num_records:
    raise DataError(f"shard {shard.path} holds {found} records, the manifest says "
                    f"{shard.num_records}")


def read_manifest(root: str) -> Manifest:
  """The manifest and columns of a converted dataset, every shard checked (no record read)."""
  root = os.path.abspath(os.path.expanduser(root))
  path = os.path.join(root, MANIFEST_NAME)
  raw = _load_json(path)
  if raw.get("format") != FORMAT_NAME or raw.get("version") != FORMAT_VERSION:
    raise DataError(f"{path} is not a {FORMAT_NAME} manifest of version {FORMAT_VERSION} "
                    f"(format={raw.get('format')!r}, version={raw.get('version')!r})")
  conversion_id = raw["conversion_id"]
  splits = {}
  for name, entry in raw["splits"].items():
    shards = tuple(Shard(os.path.join(root, s["file"]), int(s["num_records"]),
                         int(s["num_bytes"]), s["edge_sha256"]) for s in entry["shards"])
    for shard in shards:
      _check_shard(shard, conversion_id)
      _check_record_count(shard)
    count = sum(s.num_records for s in shards)
    if count != int(entry["num_records"]):
      raise DataError(f"{path}: the {name} split's shards hold {count} records, its total says "
                      f"{entry['num_records']}")
    columns = _load_columns(os.path.join(root, columns_name(name)), count)
    splits[name] = RecordSplit(name, shards, columns)
  if "train" not in splits:
    raise DataError(f"{path} has no train split (has {list(splits)})")
  return Manifest(root=root, source=raw.get("source", ""), conversion_id=conversion_id,
                  class_names=tuple(raw["classes"]), splits=splits)


def write_manifest(root: str, *, source: str, conversion_id: str, class_names, splits: dict,
                   bad_images: dict) -> None:
  """splits: {name: [Shard with paths relative to root]}; written last, so its presence marks a
  complete conversion."""
  manifest = {
      "format": FORMAT_NAME, "version": FORMAT_VERSION, "conversion_id": conversion_id,
      "source": source, "classes": list(class_names), "bad_images": bad_images,
      "writer_options": WRITER_OPTIONS,
      "splits": {name: {"num_records": sum(s.num_records for s in shards),
                        "shards": [{"file": os.path.basename(s.path),
                                    "num_records": s.num_records, "num_bytes": s.num_bytes,
                                    "edge_sha256": s.edge_sha256} for s in shards]}
                 for name, shards in splits.items()},
  }
  with open(os.path.join(root, MANIFEST_NAME), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
