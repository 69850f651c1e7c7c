"""An exported model run by its own runtime: TensorFlow for the SavedModel, the TFLite
interpreter, onnxruntime. jtl.predict --exported uses it, so a user checks what they ship.

Every runner maps image files to probabilities [N, num_classes]. The SavedModel gets the encoded
files themselves (decode and transform inside it); a file its graph cannot decode (see
graph_decode.py) is decoded on the host by jtl's decoders and sent to its `pixels` signature.
TFLite and ONNX get the eval crops that jtl.data.preprocess.load_eval_pixels cuts on the host.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from jtl.data import decode
from jtl.data.errors import DataError
from jtl.data.preprocess import Preprocess, load_eval_pixels
from jtl.data.tf_setup import tf
from jtl.deploy import layout, onnx_model, saved_model, tflite


class Runner:
  """One format of an export directory, loaded."""

  def __init__(self, directory: str, manifest: layout.Manifest, fmt: str):
    self.format = fmt
    self.path = manifest.path_of(directory, fmt)
    self.class_names = manifest.class_names
    self.preprocess = Preprocess(**{k: (tuple(v) if isinstance(v, list) else v)
                                    for k, v in manifest.preprocess.items()})

  def crops_probabilities(self, crops: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] eval crops -> float32 [N, num_classes]."""
    raise NotImplementedError

  def probabilities(self, paths: Sequence[str]) -> np.ndarray:
    crops = np.stack([load_eval_pixels(p, self.preprocess) for p in paths])
    return self.crops_probabilities(crops)


class SavedModelRunner(Runner):

  def __init__(self, directory, manifest, fmt):
    super().__init__(directory, manifest, fmt)
    self._signatures = tf.saved_model.load(self.path).signatures

  def call_signature(self, signature: str, images) -> np.ndarray:
    """The probabilities one of saved_model.SIGNATURES returns for a batch of its input."""
    out = self._signatures[signature](images=tf.constant(images))
    return out[saved_model.OUTPUT_KEY].numpy()

  def crops_probabilities(self, crops):
    return self.call_signature("crops", crops)

  def probabilities(self, paths):
    encoded, on_host = [], []  # (row, bytes), (row, decoded pixels)
    for row, path in enumerate(paths):
      data = _read(path)
      info = decode.probe_bytes(data)  # the same validation and errors as jtl.predict
      if isinstance(info, str):
        raise DataError(f"{path}: {info}")
      if info.kind == decode.KIND_PIL:
        pixels = decode.decode_tf(tf.constant(data), info.kind, info.orientation).numpy()
        on_host.append((row, pixels))
      else:
        encoded.append((row, data))
    out = [None] * len(paths)
    if encoded:
      probs = self.call_signature("serving_default", [data for _, data in encoded])
      for (row, _), p in zip(encoded, probs):
        out[row] = p
    for row, pixels in on_host:  # one call each: decoded images differ in size
      out[row] = self.call_signature("pixels", pixels[None])[0]
    return np.stack(out)


class TFLiteRunner(Runner):

  def __init__(self, directory, manifest, fmt):
    super().__init__(directory, manifest, fmt)
    self._interpreter = tflite.interpreter(self.path)
    self._input = self._interpreter.get_input_details()[0]["index"]
    self._output = self._interpreter.get_output_details()[0]["index"]
    self._batch = None

  def crops_probabilities(self, crops):
    if self._batch != len(crops):  # the batch dimension is dynamic; shapes are set per size
      self._interpreter.resize_tensor_input(self._input, crops.shape)
      self._interpreter.allocate_tensors()
      self._batch = len(crops)
    self._interpreter.set_tensor(self._input, np.ascontiguousarray(crops, np.uint8))
    self._interpreter.invoke()
    return np.array(self._interpreter.get_tensor(self._output))


class OnnxRunner(Runner):

  def __init__(self, directory, manifest, fmt):
    super().__init__(directory, manifest, fmt)
    self._session = onnx_model.session(self.path)
    self._input = self._session.get_inputs()[0].name

  def crops_probabilities(self, crops):
    return self._session.run(None, {self._input: np.ascontiguousarray(crops, np.uint8)})[0]


RUNNERS = {"saved_model": SavedModelRunner, "tflite": TFLiteRunner,
           "tflite_float16": TFLiteRunner, "tflite_int8": TFLiteRunner, "onnx": OnnxRunner}


def check_exported(directory: str, fmt: str) -> layout.Manifest:
  """Fails before any work on a directory that is not an export or lacks the format."""
  if fmt not in layout.FORMATS:
    raise layout.UnknownFormatError(f"--format: unknown format {fmt!r}; choose from "
                                    f"{', '.join(layout.FORMATS)}")
  if not os.path.isdir(directory):
    raise layout.NotAnExportError(f"{directory}: no such export directory")
  manifest = layout.Manifest.read(directory)
  manifest.path_of(directory, fmt)
  if fmt == "onnx":
    onnx_model.require("onnxruntime")
  return manifest


def open_exported(directory: str, fmt: str = layout.DEFAULT_FORMAT) -> Runner:
  """The runner of format fmt of an export directory written by jtl.export."""
  manifest = check_exported(directory, fmt)
  return RUNNERS[fmt](directory, manifest, fmt)


def _read(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read file: {e.strerror or e}") from None
