"""An ONNX model converted from the float32 TFLite file, run with onnxruntime.

Why from TFLite: jax2tf (JAX 0.10) writes the forward pass as one XlaCallModule op holding
StableHLO, which tf2onnx's SavedModel path cannot convert ("pass1 convert failed for name:
StatefulPartitionedCall/XlaCallModule ... ValueError: Could not infer the attribute type from the
elements of the passed Iterable value"), and jax2tf no longer has a non-native mode to avoid it.
The TFLite converter lowers that StableHLO to TFLite builtin ops, which tf2onnx's TFLite
front end does convert. jax2onnx (the direct path from JAX) needs orbax-checkpoint < 0.11.37,
which conflicts with our 0.12.8. tf2onnx 1.17.0, onnx 1.23.2 and onnxruntime 1.32.0 install
beside our pins (TF 2.21, protobuf 7, numpy 2.4) without changing any of them: the `export` extra.

Input and output are the TFLite file's: uint8 [N, S, S, 3] eval crops -> float32 probabilities.
"""
from __future__ import annotations

import logging

from jtl.deploy import tflite
from jtl.errors import UserError

OPSET = 17
INSTALL_HINT = "pip install 'jtl[export]' (tf2onnx, onnx, onnxruntime)"


class MissingDependencyError(UserError, ImportError):
  """A format needs a package that is not installed."""


def require(*modules: str) -> None:
  """Fails before any work when a module the ONNX format needs cannot be imported."""
  import importlib.util
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  if missing:
    raise MissingDependencyError(f"the onnx format needs {', '.join(missing)}: {INSTALL_HINT}")


def convert(tflite_path: str, out_path: str) -> None:
  """Writes the ONNX file for a float32 TFLite file."""
  require("tf2onnx", "onnx")
  from tf2onnx import convert as tf2onnx_convert
  logging.getLogger("tf2onnx").setLevel(logging.ERROR)  # its per-pass INFO lines
  with tflite.quiet_interpreter():  # tf2onnx reads the file with tf.lite.Interpreter
    tf2onnx_convert.from_tflite(tflite_path, opset=OPSET, output_path=out_path)


def session(path: str):
  """An onnxruntime CPU session for a file."""
  require("onnxruntime")
  import onnxruntime
  return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
