"""ImageNet-1k class names, in class-index order.

imagenet_classes.txt holds the 1000 names as torchvision publishes them
(torchvision/models/_meta.py, _IMAGENET_CATEGORIES): one per line, the WordNet synsets sorted by
id, with the two duplicated names made unique ("crane bird" 134 vs "crane" 517, "maillot" 638 vs
"maillot tank suit" 639). A PretrainedCfg with 1000 classes and label_names=None means these.
"""
from __future__ import annotations

import functools
import os

_CLASSES_FILE = os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")
NUM_IMAGENET_CLASSES = 1000


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
  """The 1000 ImageNet-1k class names; index i is the name of logit i."""
  with open(_CLASSES_FILE, encoding="utf-8") as f:
    names = tuple(line.rstrip("\n") for line in f if line.strip())
  if len(names) != NUM_IMAGENET_CLASSES:
    raise ValueError(f"{_CLASSES_FILE}: expected {NUM_IMAGENET_CLASSES} class names, "
                     f"found {len(names)}")
  return names
