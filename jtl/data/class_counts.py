"""Training images per class of a source that would have validation carved out of it, read
without scanning or decoding a single image: what a check before a study's first run needs."""
from __future__ import annotations

import os

import numpy as np

from jtl.data import folder, record_format


def carved_class_counts(spec: str) -> dict[str, int] | None:
  """{class name: training images} of "folder:PATH" or "records:DIR" when the source has no
  validation split of its own (jtl carves one); None when it has one, or for tfds (whose
  labels are only known once its split is read)."""
  kind, _, target = spec.partition(":")
  if kind == "folder" and target:
    listing = folder.list_folder(os.path.abspath(os.path.expanduser(target)))
    if "val" in listing.files:
      return None
    labels = np.array([label for _, label in listing.files["train"]], np.int64)
    names = listing.class_names
  elif kind == "records" and target:
    manifest = record_format.read_manifest(target)
    if "val" in manifest.splits:
      return None
    labels = np.asarray(manifest.splits["train"].columns["labels"], np.int64)
    names = manifest.class_names
  else:
    return None
  counts = np.bincount(labels, minlength=len(names))
  return {name: int(count) for name, count in zip(names, counts)}
