"""TFLite flatbuffers converted from the SavedModel's `crops` signature.

Input uint8 [N, S, S, 3], the eval view already cut (the TFLite builtin ops have no image decoder
and no antialiased resize, and Select TF ops would tie the file to the Flex delegate, which the
standalone LiteRT runtime lacks); output float32 [N, num_classes] probabilities. The batch
dimension stays dynamic: `interpreter.resize_tensor_input` before `allocate_tensors`.

Variants (format name -> what the converter is asked for):
  tflite          float32 weights and arithmetic;
  tflite_float16  weights stored as float16, dequantised to float32 when the model loads (half
                  the size, float32 speed on a CPU);
  tflite_int8     dynamic-range quantisation: int8 weights, activations quantised on the fly
                  (a quarter of the size; integer kernels where the op has them).
"""
from __future__ import annotations

import contextlib
import os
import warnings

from jtl.data.tf_setup import tf

VARIANTS = ("tflite", "tflite_float16", "tflite_int8")
SIGNATURE = "crops"


def convert(saved_model_dir: str, variant: str) -> bytes:
  """The flatbuffer of one variant."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown TFLite variant {variant!r}; one of {', '.join(VARIANTS)}")
  converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir,
                                                       signature_keys=[SIGNATURE])
  if variant != "tflite":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  if variant == "tflite_float16":
    converter.target_spec.supported_types = [tf.float16]
  with quiet_interpreter():  # the converter builds tf.lite.Interpreters of its own
    return converter.convert()


@contextlib.contextmanager
def quiet_interpreter():
  """Without tf.lite.Interpreter's deprecation warning, printed on every construction."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
    yield


def interpreter(path: str):
  """A TFLite interpreter for a file, on every core (like XLA and onnxruntime; TFLite's own
  default is one thread): ai_edge_litert's when installed, else TensorFlow's own (deprecated
  there, but the same runtime)."""
  threads = os.cpu_count() or 1
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:
    with quiet_interpreter():
      return tf.lite.Interpreter(model_path=path, num_threads=threads)
  return Interpreter(model_path=path, num_threads=threads)
