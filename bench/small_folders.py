"""Small image folders of real pictures that installed packages ship, for accuracy benches.

  .venv/bin/python bench/small_folders.py --out runs/bench/small

writes, as grayscale PNGs in <out>/<name>/{train,test}/<class>/<index>.png:
  lfw_faces  scikit-image's `data.lfw_subset()`: 200 crops of 25x25 px from Labeled Faces in
             the Wild, the first 100 faces and the last 100 background patches of the same
             photos: 2 classes, face / non_face
  digits     scikit-learn's `datasets.load_digits()`: 1,797 scans of handwritten digits,
             8x8 px with 17 grey levels (0..16, stretched here to 0..255): 10 classes
  fashion_mnist  the first 400 pictures of each class in Debian's Fashion-MNIST training file
             (dataset-fashion-mnist, as `make demo-data` installs it): 4,000 garments of
             28x28 px, 10 classes
each split 70/30 into train/test per class (stratified), seeded. <index> is the picture's
position in the package's array. A folder already written with the same recipe is left alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))  # jtl from this checkout

import numpy as np  # noqa: E402

from jtl.data.demo import encode_gray_png  # noqa: E402

TRAIN_FRACTION = 0.7
MARKER = ".bench_folder.json"  # hidden: the folder reader ignores it


def lfw_faces() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  """(uint8 images, labels, class names); the array holds faces first, then non-faces."""
  from skimage import data
  images = data.lfw_subset()  # float64 in [0, 1] (its docstring says uint8)
  if images.shape != (200, 25, 25):
    raise ValueError(f"skimage.data.lfw_subset() has shape {images.shape}, not (200, 25, 25)")
  labels = np.repeat([0, 1], 100)
  return np.round(images * 255).astype(np.uint8), labels, ("face", "non_face")


def digits() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  from sklearn.datasets import load_digits
  d = load_digits()
  images = np.round(d.images * (255 / 16)).astype(np.uint8)
  return images, d.target.astype(np.int64), tuple(str(i) for i in range(10))


FASHION_FILES = "/usr/share/datasets/fashion-mnist"
FASHION_PER_CLASS = 400


def fashion_mnist() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  from jtl.data import demo
  path = os.path.join(FASHION_FILES, "train-{}-idx{}-ubyte.gz")
  if not os.path.isfile(path.format("images", 3)):
    raise SystemExit(f"no Fashion-MNIST files in {FASHION_FILES}: run `make demo-data` "
                     "(installs Debian's dataset-fashion-mnist)")
  images, labels = demo.read_idx(path.format("images", 3)), demo.read_idx(path.format("labels", 1))
  keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:FASHION_PER_CLASS]
                                 for c in range(len(demo.CLASS_NAMES))]))
  return images[keep], labels[keep].astype(np.int64), tuple(demo.CLASS_NAMES)


SOURCES = {"lfw_faces": lfw_faces, "digits": digits, "fashion_mnist": fashion_mnist}


def stratified_split(labels: np.ndarray, train_fraction: float, seed: int) -> dict:
  """{"train": indices, "test": indices}: each class cut train_fraction / rest, seeded."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    cut = int(round(train_fraction * len(members)))
    train.extend(members[:cut])
    test.extend(members[cut:])
  return {"train": np.sort(train), "test": np.sort(test)}


def write_folder(root: str, images, labels, class_names, splits: dict) -> None:
  for split, indices in splits.items():
    for i in indices:
      directory = os.path.join(root, split, class_names[labels[i]])
      os.makedirs(directory, exist_ok=True)
      with open(os.path.join(directory, f"{i:04d}.png"), "wb") as f:
        f.write(encode_gray_png(images[i]))


def build(name: str, out: str, seed: int = 0) -> dict:
  """<out>/<name>, written unless a folder of the same recipe is there; its description."""
  root = os.path.abspath(os.path.join(out, name))
  recipe = {"source": name, "train_fraction": TRAIN_FRACTION, "seed": seed}
  marker = os.path.join(root, MARKER)
  if os.path.isfile(marker):
    with open(marker) as f:
      described = json.load(f)
    if described["recipe"] == recipe:
      return described
  images, labels, class_names = SOURCES[name]()
  splits = stratified_split(labels, TRAIN_FRACTION, seed)
  shutil.rmtree(root, ignore_errors=True)
  write_folder(root, images, labels, class_names, splits)
  described = {"recipe": recipe, "root": root, "image_side": int(images.shape[1]),
               "classes": list(class_names),
               "counts": {s: np.bincount(labels[ix], minlength=len(class_names)).tolist()
                          for s, ix in splits.items()}}
  with open(marker, "w") as f:
    json.dump(described, f, indent=1)
  return described


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(BENCH), "runs", "bench",
                                                    "small"))
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  for name in SOURCES:
    d = build(name, args.out, args.seed)
    print(f"{d['root']}: {len(d['classes'])} classes, train {sum(d['counts']['train'])}, "
          f"test {sum(d['counts']['test'])} images of {d['image_side']} px")
  return 0


if __name__ == "__main__":
  sys.exit(main())
