"""What an export directory holds: the formats, their file names and inputs, and export.json.

  OUT/export.json            this manifest: model, class names, preprocessing, each format's
                             file, input, size and the check made when it was written
  OUT/saved_model/           format saved_model
  OUT/model.tflite           format tflite (float32); model_float16.tflite, model_int8.tflite
  OUT/model.onnx             format onnx
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jtl.errors import UserError

MANIFEST = "export.json"
FORMATS = ("saved_model", "tflite", "tflite_float16", "tflite_int8", "onnx")
DEFAULT_FORMAT = "saved_model"
QUANTISED = ("tflite_float16", "tflite_int8")
FILES = {"saved_model": "saved_model", "tflite": "model.tflite",
         "tflite_float16": "model_float16.tflite", "tflite_int8": "model_int8.tflite",
         "onnx": "model.onnx"}
_CROPS = "uint8 [N, S, S, 3]: the eval view (decode, resize, centre crop) cut on the host"
INPUTS = {"saved_model": "serving_default: tf.string [N] encoded JPEG/PNG files of any size; "
                         "pixels: uint8 [N, H, W, 3]; crops: " + _CROPS,
          "tflite": _CROPS, "tflite_float16": _CROPS, "tflite_int8": _CROPS, "onnx": _CROPS}


class UnknownFormatError(UserError, ValueError):
  """A format name that jtl.export does not write."""


class NotAnExportError(UserError, FileNotFoundError):
  """A directory that jtl.export did not write, or a format it does not hold."""


def parse_formats(text: str) -> tuple[str, ...]:
  """"saved_model,tflite" -> ("saved_model", "tflite"), in FORMATS order; every unknown name is
  named in one error."""
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in FORMATS]
  if unknown or not names:
    raise UnknownFormatError(f"--format: unknown format {', '.join(map(repr, unknown)) or '(none)'}"
                             f"; choose from {', '.join(FORMATS)}")
  return tuple(f for f in FORMATS if f in names)


@dataclasses.dataclass(frozen=True)
class Manifest:
  model: str                      # the run's architecture name
  source: str                     # the workdir it was exported from
  class_names: tuple[str, ...]    # index i is output i
  preprocess: dict[str, Any]      # jtl.data.preprocess.Preprocess fields
  formats: dict[str, dict]        # name -> {"path", "input", "bytes", "max_abs_diff", ...}

  def path_of(self, directory: str, fmt: str) -> str:
    if fmt not in self.formats:
      raise NotAnExportError(f"{directory}: holds no {fmt} export (it has "
                             f"{', '.join(self.formats) or 'none'}); export it with "
                             f"`jtl export --format {fmt}`")
    return os.path.join(directory, self.formats[fmt]["path"])

  def write(self, directory: str) -> None:
    with open(os.path.join(directory, MANIFEST), "w") as f:
      json.dump({**dataclasses.asdict(self), "class_names": list(self.class_names)}, f, indent=2)

  @classmethod
  def read(cls, directory: str) -> "Manifest":
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
      raise NotAnExportError(f"{directory}: no {MANIFEST} (is it a directory written by "
                             "`jtl export`?)")
    with open(path) as f:
      value = json.load(f)
    return cls(value["model"], value["source"], tuple(value["class_names"]), value["preprocess"],
               value["formats"])


def directory_size(path: str) -> int:
  """Bytes of a file, or of every file under a directory."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
