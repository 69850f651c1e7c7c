"""Top-k classes for photos, with ImageNet weights, a fine-tuned run or an exported model; the
command is `jtl predict` (jtl/commands/predict.py).

Each image goes through `jtl.data.preprocess.load_eval_image`, the evaluation pipeline's own
decoding and eval transform, so the model is served the very pixels it was evaluated on; --tta
scores the very views (jtl.data.tta) the final evaluation's config.tta scored. Folders
are searched recursively for the extensions in jtl.data.IMAGE_EXTENSIONS (any case). A mistake
(a missing or unreadable image, an unknown model, a workdir without a finished run) raises a
UserError naming it.
"""
from __future__ import annotations

import concurrent.futures
import csv
import os
import sys
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from jtl import data as data_lib  # first: configures TensorFlow before anything else uses it
from jtl import export
from jtl.deploy import runtime
from jtl.errors import UserError
from jtl.data import folder, tta as tta_lib
from jtl.data.errors import DataError, DataFileNotFoundError
from jtl.data.preprocess import Preprocess, load_eval_image
from jtl.models import create_model, registry
from jtl.models.factory import HF_PREFIX
from jtl.models.labels import imagenet_class_names

DEFAULT_BATCH_SIZE = 32


# ---------------------------------------------------------------------------------------------
# What to predict on, and with what.

def image_paths(args: Sequence[str]) -> list[str]:
  """Files as given and the image files of folders, in order; every missing path is named."""
  paths, missing = [], []
  for arg in args:
    if os.path.isdir(arg):
      found, _ = folder.image_files(arg)  # the dataset reader's own listing
      if not found:
        raise DataError(f"{arg}: folder holds no image files "
                        f"({' '.join(data_lib.IMAGE_EXTENSIONS)}, any case)")
      paths += found
    elif os.path.isfile(arg):
      paths.append(arg)
    else:
      missing.append(arg)
  if missing:
    raise DataFileNotFoundError(f"no such image file or folder: {', '.join(missing)}")
  return paths


def check_model_source(model: str, workdir: str | None) -> None:
  """Fails on a model name or workdir that cannot work, before any image is read (and before
  seconds of weight loading)."""
  if workdir:
    if not os.path.isdir(workdir):
      raise export.NoFinishedRunError(f"{workdir}: no such workdir")
    if not os.path.isfile(os.path.join(workdir, export.EXPORT_DIR, "model.json")):
      raise export.NoFinishedRunError(f"{workdir}: no finished jtl run there (no "
                                      f"{export.EXPORT_DIR}/model.json; training writes it last)")
  elif not (model.startswith(HF_PREFIX) or os.path.isdir(model)):
    registry.get_entry(model)  # raises, naming the model and close matches


def load_model(model: str, workdir: str | None, pretrained: str | None):
  if workdir:
    return export.load_exported(workdir)
  return create_model(model, pretrained=pretrained or True)


# ---------------------------------------------------------------------------------------------
# Prediction.

class TTAError(UserError, ValueError):
  """--tta asks for views this model's preprocessing cannot make."""


def class_names_of(model) -> tuple[str, ...]:
  cfg = model.pretrained_cfg
  if cfg.label_names:
    return tuple(cfg.label_names)
  if cfg.num_classes == 1000:
    return imagenet_class_names()
  return tuple(str(i) for i in range(cfg.num_classes))


def _input_batches(paths: Sequence[str], pp: Preprocess, batch_size: int,
                   tta: str = "") -> Iterator[tuple[Sequence[str], np.ndarray]]:
  """(paths, float32 [n, S, S, 3], or [n, V, S, S, 3] with tta on) per batch; the next batch
  decodes in threads while the model runs on this one (TF's and Pillow's decoders release the
  GIL)."""
  load = (lambda p: tta_lib.load_views(p, pp, tta)) if tta_lib.is_on(tta) else (
      lambda p: load_eval_image(p, pp))
  chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
  try:
    ahead = [pool.submit(load, p) for p in chunks[0]] if chunks else []
    for i, chunk in enumerate(chunks):
      current = ahead
      if i + 1 < len(chunks):
        ahead = [pool.submit(load, p) for p in chunks[i + 1]]
      yield chunk, np.stack([f.result() for f in current])
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def _probabilities(model, x: np.ndarray, batch_shape: int) -> np.ndarray:
  """Softmax of the model on x, padded to batch_shape rows so that one compiled program serves
  every batch, the last short one included. Views x [n, V, S, S, 3] (tta) are scored by their
  mean logits, as the final evaluation's eval step scores them."""
  n = len(x)
  if n < batch_shape:
    x = np.concatenate([x, np.zeros((batch_shape - n,) + x.shape[1:], x.dtype)])
  logits = np.asarray(model.predict(x.reshape(-1, *x.shape[-3:])), np.float32)
  logits = logits.reshape(len(x), -1, logits.shape[-1]).mean(axis=1)[:n]
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  return probs / probs.sum(axis=1, keepdims=True)


def top_k(model, paths: Sequence[str], k: int = 5, *, batch_size: int = DEFAULT_BATCH_SIZE,
          progress: bool = False, tta: str = "") -> list[dict]:
  """[{"image": path, "top": [{"class", "name", "probability"}, ...]}] per path, most probable
  first, from batches of batch_size through the model's jitted forward. progress: a tqdm bar on
  stderr when there is more than one batch. tta: a jtl.data.tta mode, the final evaluation's
  test-time views averaged."""
  paths = list(paths)
  pp = Preprocess.from_pretrained_cfg(model.pretrained_cfg)
  if (problem := tta_lib.crop_problem(tta, pp)) is not None:
    raise TTAError(f"--tta {tta}: {problem}")
  names = class_names_of(model)
  batch_shape = min(batch_size, len(paths))
  results = []
  with tqdm(total=len(paths), unit="image", file=sys.stderr,
            disable=not progress or len(paths) <= batch_size) as bar:
    for chunk, x in _input_batches(paths, pp, batch_size, tta):
      for path, probs in zip(chunk, _probabilities(model, x, batch_shape)):
        results.append(ranked(path, probs, names, k))
      bar.update(len(chunk))
  return results


def ranked(path: str, probs: np.ndarray, names: Sequence[str], k: int) -> dict:
  """{"image": path, "top": the k most probable classes, most probable first}."""
  order = np.argsort(-probs, kind="stable")[:k]
  return {"image": path, "top": [
      {"class": int(i), "name": names[i], "probability": float(probs[i])} for i in order]}


def top_k_exported(runner, paths: Sequence[str], k: int = 5, *,
                   batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> list[dict]:
  """top_k's results from an exported model in its own runtime (a jtl.deploy.runtime.Runner)."""
  paths = list(paths)
  results = []
  with tqdm(total=len(paths), unit="image", file=sys.stderr,
            disable=not progress or len(paths) <= batch_size) as bar:
    for start in range(0, len(paths), batch_size):
      chunk = paths[start:start + batch_size]
      for path, probs in zip(chunk, runner.probabilities(chunk)):
        results.append(ranked(path, np.asarray(probs, np.float32), runner.class_names, k))
      bar.update(len(chunk))
  return results


def predict_with_model(model_name: str, workdir: str | None, pretrained: str | None,
                       images: Sequence[str], k: int = 5, *,
                       batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                       tta: str = "") -> list[dict]:
  """top_k for image files and folders, with the model `model_name` (weights `pretrained`) or
  a finished run's (`workdir`); both are checked before any image is read, and every image is
  found before seconds of weight loading."""
  check_model_source(model_name, workdir)
  paths = image_paths(images)
  model = load_model(model_name, workdir, pretrained)
  return top_k(model, paths, k, batch_size=batch_size, progress=progress, tta=tta)


def predict_exported(directory: str, fmt: str, images: Sequence[str], k: int = 5, *,
                     batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> list[dict]:
  """top_k_exported for image files and folders, with format `fmt` of what `jtl export` wrote
  in `directory` (checked first)."""
  runtime.check_exported(directory, fmt)
  paths = image_paths(images)
  return top_k_exported(runtime.open_exported(directory, fmt), paths, k, batch_size=batch_size,
                        progress=progress)


# ---------------------------------------------------------------------------------------------
# Output.

CSV_COLUMNS = ("image", "rank", "class", "name", "probability")


def write_table(results: list[dict], out) -> None:
  """One row per (image, rank); the image is named on its first row only, for readability."""
  width = max([len("image")] + [len(r["image"]) for r in results])
  out.write(f"{'image':<{width}}  rank  probability  class  name\n")
  for r in results:
    for rank, t in enumerate(r["top"], 1):
      image = r["image"] if rank == 1 else ""
      out.write(f"{image:<{width}}  {rank:>4}  {t['probability']:>11.2%}  {t['class']:>5}  "
                f"{t['name']}\n")


def write_csv(results: list[dict], out) -> None:
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(CSV_COLUMNS)
  for r in results:
    for rank, t in enumerate(r["top"], 1):
      writer.writerow([r["image"], rank, t["class"], t["name"], repr(t["probability"])])
