"""Listing an image folder: classes, split folders and image files.

Two layouts:
  root/<class>/**/<image>                                  everything is "train"
  root/train/<class>/**/<image> [root/val|validation/...] [root/test/...]
The split layout is recognised by a `train` folder directly under root (names of split folders
are matched case-insensitively). Class names are the sorted folder names under train. Files are
found recursively inside a class folder, extensions case-insensitively; hidden files and folders
(".name") and macOS "__MACOSX" archive debris are ignored, as are files with other extensions.
"""
from __future__ import annotations

import dataclasses
import logging
import os

from jtl.data.decode import IMAGE_EXTENSIONS
from jtl.data.errors import DataError

SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FolderListing:
  class_names: tuple[str, ...]
  files: dict[str, list[tuple[str, int]]]  # split -> [(absolute path, label)] in sorted order
  split_layout: bool


def _ignored(name: str) -> bool:
  return name.startswith(".") or name == "__MACOSX"


def _subfolders(path: str) -> list[str]:
  with os.scandir(path) as entries:
    return sorted(e.name for e in entries if e.is_dir() and not _ignored(e.name))


def image_files(class_dir: str) -> tuple[list[str], int]:
  """Sorted image paths under class_dir (recursively) and the number of other files ignored."""
  found, other = [], 0
  for dirpath, dirnames, filenames in os.walk(class_dir):
    dirnames[:] = [d for d in dirnames if not _ignored(d)]
    for name in filenames:
      if _ignored(name):
        continue
      if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
        found.append(os.path.join(dirpath, name))
      else:
        other += 1
  return sorted(found), other


def _list_split(split_dir: str, class_names: tuple[str, ...], split: str):
  index = {name: i for i, name in enumerate(class_names)}
  files, ignored = [], 0
  for name in _subfolders(split_dir):
    class_dir = os.path.join(split_dir, name)
    if name not in index:
      raise DataError(f"class folder {class_dir} of the {split} split has no counterpart among "
                      f"the training classes {list(class_names)}")
    paths, other = image_files(class_dir)
    ignored += other
    if not paths:
      raise DataError(f"class folder {class_dir} holds no image files "
                      f"({' '.join(IMAGE_EXTENSIONS)}, any case)")
    files.extend((p, index[name]) for p in paths)
  if ignored:
    log.info("ignored %d non-image file(s) under %s", ignored, split_dir)
  return files


def list_folder(root: str) -> FolderListing:
  """Classes and files of an image folder; errors name the folder at fault."""
  if not os.path.isdir(root):
    raise DataError(f"image folder {root} does not exist or is not a directory")
  top = _subfolders(root)
  split_layout = any(name.lower() == "train" for name in top)
  by_split: dict[str, str] = {}  # our split name -> folder name
  for name in top if split_layout else ():
    split = SPLIT_FOLDERS.get(name.lower())
    if split is None:
      continue
    if split in by_split:
      raise DataError(f"{root} has two folders for the {split} split: "
                      f"{by_split[split]} and {name}")
    by_split[split] = name
  train_dir = os.path.join(root, by_split["train"]) if split_layout else root
  class_names = tuple(_subfolders(train_dir))
  if len(class_names) < 2:
    raise DataError(f"image folder {train_dir} needs at least 2 class folders, found "
                    f"{len(class_names)}: {list(class_names)}")
  if split_layout:
    others = [n for n in top if n not in by_split.values()]
    if others:
      log.warning("ignoring folder(s) %s next to the split folders in %s", others, root)
  files = {"train": _list_split(train_dir, class_names, "train")}
  for split in ("val", "test"):
    if split in by_split:
      files[split] = _list_split(os.path.join(root, by_split[split]), class_names, split)
  return FolderListing(class_names=class_names, files=files, split_layout=split_layout)
