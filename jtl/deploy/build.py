"""Writing an export directory: every requested format from a finished run, checked, then moved
into place in one rename, so OUT is either complete or absent.

The model comes from jtl.export.load_exported (its module and variables, nothing else), so a
pruned run exports with its own smaller shapes. The SavedModel is the source of the TFLite files and
the float32 TFLite file the source of the ONNX one; a source that was not asked for is built in
a scratch directory and dropped. Each format is checked against jtl's own forward pass on a fixed
batch of crops before anything is moved: a float format off by more than TOLERANCE is an error.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Sequence

import numpy as np

from jtl.data.preprocess import Preprocess, normalize
from jtl.deploy import layout, onnx_model, runtime, saved_model, tflite
from jtl.errors import UserError

TOLERANCE = 1e-4  # max |probability difference| of a float format from jtl's
CHECK_BATCH = 4


class ExportCheckError(RuntimeError):
  """An exported format does not reproduce jtl's probabilities."""


class DestinationExistsError(UserError, FileExistsError):
  """--out names a non-empty directory or a file."""


def check_destination(formats: Sequence[str], out: str) -> None:
  """The mistakes a user can make about OUT and the formats, found before seconds of loading and
  converting (the run itself is checked by jtl.export.check_finished_run)."""
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
    raise DestinationExistsError(f"--out {out}: already exists; remove it or choose another")
  if "onnx" in formats:
    onnx_model.require("tf2onnx", "onnx", "onnxruntime")


def write_export(model, formats: Sequence[str], out: str, source: str) -> layout.Manifest:
  """Writes OUT with the formats (names from layout.FORMATS) of `model`, a jtl Model as
  jtl.export.load_exported rebuilds it from the run in `source`."""
  check_destination(formats, out)
  pp = Preprocess.from_pretrained_cfg(model.pretrained_cfg)
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  # Staging beside OUT (same file system, so the final rename is atomic); scratch for sources
  # that were not asked for.
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.partial-",
                             dir=parent)
  scratch = tempfile.mkdtemp(prefix="jtl-export-")
  try:
    written = _write_formats(model, pp, formats, staging, scratch)
    entries = check_formats(model, pp, staging, written)
    manifest = layout.Manifest(model.name, os.path.abspath(source),
                               tuple(model.pretrained_cfg.label_names), dataclasses.asdict(pp),
                               entries)
    manifest.write(staging)
    os.replace(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return manifest


def _write_formats(model, pp: Preprocess, formats, staging: str, scratch: str) -> dict[str, str]:
  """{format: path relative to staging} for the formats asked for."""
  def place(fmt):
    return os.path.join(staging if fmt in formats else scratch, layout.FILES[fmt])

  names = model.pretrained_cfg.label_names
  saved_model.save(model, pp, names, place("saved_model"), scratch)
  wants_float_tflite = "tflite" in formats or "onnx" in formats
  for variant in tflite.VARIANTS:
    if variant in formats or (variant == "tflite" and wants_float_tflite):
      with open(place(variant), "wb") as f:
        f.write(tflite.convert(place("saved_model"), variant))
  if "onnx" in formats:
    onnx_model.convert(place("tflite"), place("onnx"))
  return {fmt: layout.FILES[fmt] for fmt in formats}


def check_formats(model, pp: Preprocess, directory: str, written: dict[str, str]) -> dict:
  """Each format's manifest entry, after running it on a fixed batch of random crops."""
  size = pp.image_size
  crops = np.random.default_rng(0).integers(0, 256, (CHECK_BATCH, size, size, 3), np.uint8)
  logits = np.asarray(model.predict(normalize(crops, pp).numpy()), np.float32)
  expected = np.exp(logits - logits.max(axis=1, keepdims=True))
  expected /= expected.sum(axis=1, keepdims=True)
  draft = layout.Manifest(model.name, "", tuple(model.pretrained_cfg.label_names),
                          dataclasses.asdict(pp), {f: {"path": p} for f, p in written.items()})
  entries = {}
  for fmt, path in written.items():
    got = runtime.RUNNERS[fmt](directory, draft, fmt).crops_probabilities(crops)
    diff = float(np.abs(got - expected).max())
    if fmt not in layout.QUANTISED and not diff <= TOLERANCE:
      raise ExportCheckError(f"{fmt}: probabilities differ from jtl's by {diff:.3g} "
                             f"(> {TOLERANCE}) on the check batch")
    entries[fmt] = {"path": path, "input": layout.INPUTS[fmt],
                    "bytes": layout.directory_size(os.path.join(directory, path)),
                    "max_abs_diff_vs_jtl": diff}
  return entries
