"""Opening a data source ("folder:PATH", "records:DIR" or "tfds:NAME") into a Dataset of
train/val/test splits."""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from jtl.data import decode, folder, record_source, scan, splits, tfds_source
from jtl.data.errors import DataError
from jtl.data.images import SplitImages, SplitTable

SPLITS = ("train", "val", "test")

log = logging.getLogger(__name__)


def default_cache_budget_bytes() -> int:
  """Decoded images are kept in memory when they all fit in min(2 GiB, RAM / 8)."""
  try:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    ram = 16 * 2**30
  return min(2 * 2**30, ram // 8)


class Dataset:
  """One opened source: class names and up to three splits of (image, label) examples."""

  def __init__(self, name: str, class_names: tuple[str, ...], tables: dict[str, SplitTable],
               cache_decoded: bool | None = None):
    self.name = name
    self.class_names = tuple(class_names)
    self._tables = dict(tables)
    self._images: dict[str, SplitImages] = {}
    if cache_decoded is None:
      # Splits read by index (records, array_record tfds) stream unless asked otherwise: they
      # were converted so that no host reads more than its own batches.
      sizes = [t.decoded_bytes() for t in self._tables.values()]
      streamed = any(t.reader is not None for t in self._tables.values())
      cache_decoded = (not streamed and None not in sizes
                       and sum(sizes) <= default_cache_budget_bytes())
    self.cache_decoded = bool(cache_decoded)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def has_split(self, split: str) -> bool:
    return split in self._tables

  def num_examples(self, split: str) -> int:
    return len(self.table(split))

  def table(self, split: str) -> SplitTable:
    if split not in self._tables:
      raise DataError(f"dataset {self.name} has no {split!r} split (has {list(self._tables)})")
    return self._tables[split]

  def images(self, split: str) -> SplitImages:
    """TF access to a split's images, built (and, with caching, decoded) on first use."""
    if split not in self._images:
      self._images[split] = SplitImages(self.table(split), cache=self.cache_decoded)
    return self._images[split]

  def __repr__(self) -> str:
    counts = ", ".join(f"{s}={len(t)}" for s, t in self._tables.items())
    return f"Dataset({self.name!r}, {self.num_classes} classes, {counts})"


def _carve_and_subset(labels: np.ndarray, num_classes: int, has_val: bool, val_fraction: float,
                      seed: int, max_train_examples: int | None, val_min_per_class: int):
  """(train indices, carved val indices or None) into the original train list."""
  train_idx, val_idx = np.arange(len(labels)), None
  if not has_val and val_fraction > 0:
    train_idx, val_idx = splits.stratified_holdout(labels, num_classes, val_fraction, seed,
                                                   val_min_per_class)
  if max_train_examples is not None:
    keep = splits.stratified_subset(labels[train_idx], num_classes, max_train_examples, seed)
    train_idx = train_idx[keep]
  return train_idx, val_idx


def _open_folder(root: str, *, val_fraction, seed, max_train_examples, bad_images, report_dir,
                 options: DecodeOptions, val_min_per_class: int) -> Dataset:
  if bad_images not in scan.BAD_IMAGE_POLICIES:
    raise DataError(f"bad_images must be one of {scan.BAD_IMAGE_POLICIES}, got {bad_images!r}")
  listing = folder.list_folder(root)
  num_classes = len(listing.class_names)
  split_files = {s: (np.array([p for p, _ in f], object), np.array([l for _, l in f], np.int32))
                 for s, f in listing.files.items()}
  paths, labels = split_files["train"]
  train_idx, val_idx = _carve_and_subset(labels, num_classes, "val" in split_files, val_fraction,
                                         seed, max_train_examples, val_min_per_class)
  if val_idx is not None:
    split_files["val"] = (paths[val_idx], labels[val_idx])
  split_files["train"] = (paths[train_idx], labels[train_idx])

  # The scan covers only the files that will be used (a max_train_examples subset of a big
  # folder is not paid for in full); it is done before anything trains, each host of a
  # multi-host run probing its share.
  order = [s for s in SPLITS if s in split_files]
  all_paths = [p for s in order for p in split_files[s][0]]
  results = scan.scan_files_across_hosts(all_paths, options.max_image_pixels,
                                         options.scan_workers)
  bad = [(p, r) for p, r in zip(all_paths, results) if isinstance(r, str)]
  scan.apply_bad_image_policy(bad, policy=bad_images, root=root, report_dir=report_dir)

  tables, start = {}, 0
  for s in order:
    split_paths, split_labels = split_files[s]
    infos = results[start:start + len(split_paths)]
    start += len(split_paths)
    good = np.array([isinstance(r, decode.ImageInfo) for r in infos], bool).reshape(-1)
    infos = [r for r in infos if isinstance(r, decode.ImageInfo)]
    downscales = np.array([decode.jpeg_downscale(r.height, r.width, options.decode_min_side)
                           if r.kind == decode.KIND_JPEG else 1 for r in infos], np.int32)
    heights = np.array([r.height for r in infos], np.int32)
    widths = np.array([r.width for r in infos], np.int32)
    tables[s] = SplitTable(
        sources=split_paths[good], from_files=True, labels=split_labels[good],
        kinds=np.array([r.kind for r in infos], np.int8),
        orientations=np.array([r.orientation for r in infos], np.int8),
        # libjpeg rounds scaled sizes up.
        heights=(heights + downscales - 1) // downscales,
        widths=(widths + downscales - 1) // downscales,
        downscales=downscales.astype(np.int8))
  counts = np.bincount(tables["train"].labels, minlength=num_classes)
  if counts.min() == 0:
    empty = listing.class_names[int(np.argmin(counts))]
    raise DataError(f"class {empty!r} of {root} has no usable training image left "
                    f"(all of them were bad and skipped)")
  native = sum(int(np.sum(t.kinds != decode.KIND_PIL)) for t in tables.values())
  log.info("opened %s: %d classes, %s; %d of %d images decoded natively by TensorFlow", root,
           num_classes, {s: len(t) for s, t in tables.items()}, native,
           sum(len(t) for t in tables.values()))
  return Dataset(f"folder:{root}", listing.class_names, tables, options.cache_decoded)


def _carved(name: str, class_names, tables: dict[str, SplitTable], *, val_fraction, seed,
            max_train_examples, cache_decoded, val_min_per_class: int) -> Dataset:
  """The Dataset of opened tables, validation carved out of train as a folder's is."""
  train = tables["train"]
  train_idx, val_idx = _carve_and_subset(train.labels, len(class_names), "val" in tables,
                                         val_fraction, seed, max_train_examples,
                                         val_min_per_class)
  if val_idx is not None:
    tables["val"] = train.take(val_idx)
  tables["train"] = train.take(train_idx)
  ordered = {s: tables[s] for s in SPLITS if s in tables}
  return Dataset(name, class_names, ordered, cache_decoded)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How images are scanned, decoded and kept (see open_dataset)."""
  max_image_pixels: int = decode.DEFAULT_MAX_IMAGE_PIXELS
  cache_decoded: bool | None = None
  scan_workers: int | None = None
  decode_min_side: int = decode.DEFAULT_DECODE_MIN_SIDE


def open_dataset(spec: str, *, data_dir: str | None = None, val_fraction: float = 0.1,
                 seed: int = 0, max_train_examples: int | None = None, bad_images: str = "fail",
                 report_dir: str | None = None,
                 options: DecodeOptions = DecodeOptions(),
                 val_min_per_class: int = splits.DEFAULT_VAL_MIN_PER_CLASS) -> Dataset:
  """Open "folder:PATH", "records:DIR" (written by `jtl convert`) or "tfds:NAME".

  val_fraction: share of each class carved (seeded, stratified) out of train when the source has
    no validation split; 0 leaves it without one.
  val_min_per_class: the carve's floor per class, at most a quarter of the class
    (splits.holdout_size); 0: round(val_fraction * n) alone.
  max_train_examples: a seeded, stratified subset of train (taken after carving val).
  bad_images (folders): "fail" raises one DataError (a ValueError) listing every unusable file;
    "skip" drops them and writes report_dir/skipped_files.txt.
  options.max_image_pixels bounds width * height.
  options.cache_decoded: keep decoded images in memory; None decides by size
    (default_cache_budget_bytes) for folders and in-memory tfds, and streams records.
  options.decode_min_side (folders): JPEGs are decoded at 1/2, 1/4 or 1/8 scale when their short side
    stays >= this; 0 decodes everything at full size.
  """
  kind, _, target = spec.partition(":")
  carve = dict(val_fraction=val_fraction, seed=seed, max_train_examples=max_train_examples,
               cache_decoded=options.cache_decoded, val_min_per_class=val_min_per_class)
  if kind == "records" and target:
    name, class_names, tables = record_source.open_records(target, options.decode_min_side)
    return _carved(name, class_names, tables, **carve)
  if kind == "folder" and target:
    return _open_folder(os.path.abspath(os.path.expanduser(target)), val_fraction=val_fraction,
                        seed=seed, max_train_examples=max_train_examples, bad_images=bad_images,
                        report_dir=report_dir, options=options,
                        val_min_per_class=val_min_per_class)
  if kind == "tfds" and target:
    class_names, tables = tfds_source.open_tfds(target, data_dir)
    return _carved(f"tfds:{target}", class_names, tables, **carve)
  raise DataError(f"dataset spec must be 'folder:PATH', 'records:DIR' or 'tfds:NAME', "
                  f"got {spec!r}")
