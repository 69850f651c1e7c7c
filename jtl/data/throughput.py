"""Input-pipeline speed: scan time and images per second, per decoding path (not a test).

  python -m jtl.data.throughput                           # synthetic JPEG / WebP / PNG folders
  python -m jtl.data.throughput --spec folder:data/fashion_mnist --image-size 224

Synthetic folders are written to a temporary directory: 640x480 photos-like JPEGs (TF's decoder),
the same pictures as WebP (the Pillow path through tf.numpy_function) and as EXIF-rotated JPEGs
(TF's decoder plus a transpose), so the cost of each path is seen side by side.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from jtl import data


def _photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """Smooth gradients plus noise: compresses like a photograph, unlike pure noise."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
  return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def write_synthetic(root: str, fmt: str, count: int, size=(480, 640)) -> str:
  rng = np.random.default_rng(0)
  exif = Image.Exif()
  exif[0x0112] = 6
  for i in range(count):
    class_dir = os.path.join(root, f"class_{i % 2}")
    os.makedirs(class_dir, exist_ok=True)
    img = Image.fromarray(_photo(rng, *size))
    if fmt == "jpeg":
      img.save(os.path.join(class_dir, f"{i}.jpg"), quality=90)
    elif fmt == "jpeg_exif6":
      img.save(os.path.join(class_dir, f"{i}.jpg"), quality=90, exif=exif.tobytes())
    elif fmt == "webp":
      img.save(os.path.join(class_dir, f"{i}.webp"), quality=90)
    elif fmt == "png":
      img.save(os.path.join(class_dir, f"{i}.png"), compress_level=1)
  return root


def measure(spec: str, *, image_size: int, batch_size: int, max_batches: int,
            cache_decoded: bool | None, augment: data.Augment, decode_min_side: int) -> dict:
  start = time.perf_counter()
  ds = data.open_dataset(spec, val_fraction=0.0, options=data.DecodeOptions(
      cache_decoded=cache_decoded, decode_min_side=decode_min_side))
  open_s = time.perf_counter() - start
  pp = data.Preprocess(image_size=image_size)
  batches = data.train_batches(ds, batch_size=batch_size, preprocess=pp, augment=augment, seed=0,
                               epoch=0)
  next(batches)  # the first batch pays for tracing (and for filling the cache)
  first_s = time.perf_counter() - start - open_s
  start, cpu_start, images = time.perf_counter(), time.process_time(), 0
  for i, batch in enumerate(batches):
    images += len(batch["image"])
    if i + 1 >= max_batches:
      break
  # CPU time per image is the figure that survives a busy machine; images per second is what
  # this machine gave just now.
  return {"spec": spec, "examples": ds.num_examples("train"), "open_s": open_s,
          "first_batch_s": first_s, "cached": ds.cache_decoded,
          "train_images_per_s": images / (time.perf_counter() - start),
          "cpu_ms_per_image": 1e3 * (time.process_time() - cpu_start) / images}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--spec", action="append", help="dataset spec(s); default: synthetic")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--count", type=int, default=600, help="images per synthetic folder")
  parser.add_argument("--cache", choices=["auto", "on", "off"], default="off")
  parser.add_argument("--photo-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
  parser.add_argument("--formats", default="jpeg,jpeg_exif6,webp,png")
  parser.add_argument("--decode-min-side", type=int, default=data.DEFAULT_DECODE_MIN_SIDE)
  args = parser.parse_args()
  cache = {"auto": None, "on": True, "off": False}[args.cache]
  augment = data.Augment()
  with tempfile.TemporaryDirectory() as tmp:
    specs = args.spec or [
        f"folder:{write_synthetic(os.path.join(tmp, fmt), fmt, args.count, args.photo_size)}"
        for fmt in args.formats.split(",")]
    for spec in specs:
      result = measure(spec, image_size=args.image_size, batch_size=args.batch_size,
                       max_batches=args.batches, cache_decoded=cache, augment=augment,
                       decode_min_side=args.decode_min_side)
      print(f"{os.path.basename(result['spec'])[:40]:40s} n={result['examples']:6d} "
            f"open+scan {result['open_s']:6.1f} s  first batch {result['first_batch_s']:5.1f} s  "
            f"cached={result['cached']!s:5s} train {result['train_images_per_s']:7.0f} img/s "
            f"{result['cpu_ms_per_image']:5.2f} cpu-ms/img")


if __name__ == "__main__":
  main()
