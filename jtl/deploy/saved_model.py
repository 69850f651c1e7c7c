"""A jtl Model as a TensorFlow SavedModel: jax2tf's forward pass behind the evaluation transform.

Three signatures, each returning {"probabilities": float32 [N, num_classes]}:
  serving_default  images: tf.string [N], encoded JPEG or PNG files of any size: the in-graph
                   probe and decoders (graph_decode.py), then eval_pixels and normalize;
  pixels           images: uint8 [N, H, W, 3], decoded images of one (any) size: eval_pixels,
                   normalize (for files the graph cannot decode, decoded on the host);
  crops            images: uint8 [N, S, S, 3], the eval view already cut: normalize only; the
                   TFLite and ONNX files are converted from this one, since their runtimes have
                   no image decoders nor antialiased resize.
The transform is jtl.data.preprocess's own TF code, called inside the tf.function, so a served
image gets the pixels evaluation measured. The class names are the asset class_names.txt (one
per line, index i is output i).

jax2tf in JAX 0.10 serialises natively only (an XlaCallModule op holding StableHLO;
native_serialization=False and enable_xla=False are accepted, warned about and ignored). The
batch dimension is polymorphic, so one SavedModel serves any batch size. The weights are
tf.Variables passed to the converted function, so they are stored once, as variables.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np

from jtl.data.preprocess import Preprocess, eval_pixels, normalize
from jtl.data.tf_setup import tf
from jtl.deploy import graph_decode

CLASS_NAMES_ASSET = "class_names.txt"
OUTPUT_KEY = "probabilities"
SIGNATURES = ("serving_default", "pixels", "crops")


def probabilities_fn(model):
  """The JAX function (variables, normalised NHWC float32) -> softmax probabilities."""
  module = model.module

  def probabilities(variables, x):
    logits = module.apply(variables, x, train=False).astype(np.float32)
    return jax.nn.softmax(logits, axis=-1)
  return probabilities


class ServingModule(tf.Module):
  """The tf.Module that is saved: weights as variables, the three signatures as methods."""

  def __init__(self, model, pp: Preprocess, class_names_file: str):
    super().__init__(name="jtl_model")
    leaves, self._treedef = jax.tree_util.tree_flatten(model.variables)
    self.weights = [tf.Variable(np.asarray(v), trainable=False) for v in leaves]
    self.class_names = tf.saved_model.Asset(class_names_file)
    self._pp = pp
    size = pp.image_size
    self._forward = jax2tf_convert(probabilities_fn(model), size)
    # autograph=False: autograph would transpile JAX's own export code (~50 s, for nothing;
    # the transform's control flow is tf.cond / tf.while_loop already).
    self.crops = tf.function(self._crops, autograph=False, input_signature=[
        tf.TensorSpec([None, size, size, 3], tf.uint8, name="images")])
    self.pixels = tf.function(self._pixels, autograph=False, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    self.encoded = tf.function(self._encoded, autograph=False, input_signature=[
        tf.TensorSpec([None], tf.string, name="images")])

  def _crops(self, images):
    variables = jax.tree_util.tree_unflatten(self._treedef, self.weights)
    return {OUTPUT_KEY: self._forward(variables, normalize(images, self._pp))}

  def _cut(self, image):
    return eval_pixels(image, self._pp)

  def _pixels(self, images):
    size = self._pp.image_size
    crops = tf.map_fn(self._cut, images,
                      fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
    return self._crops(crops)

  def _encoded(self, images):
    size = self._pp.image_size
    crops = tf.map_fn(lambda data: self._cut(graph_decode.decode_graph(data)), images,
                      fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
    return self._crops(crops)


def jax2tf_convert(fn, image_size: int):
  from jax.experimental import jax2tf
  return jax2tf.convert(fn, polymorphic_shapes=[None, f"(b, {image_size}, {image_size}, 3)"],
                        with_gradient=False)


def write_class_names(path: str, class_names: Sequence[str]) -> None:
  bad = [n for n in class_names if "\n" in n or "\r" in n]
  if bad:
    raise ValueError(f"class names with a line break cannot be listed one per line: {bad!r}")
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(f"{n}\n" for n in class_names))


def save(model, pp: Preprocess, class_names: Sequence[str], out_dir: str, scratch_dir: str) -> str:
  """Writes the SavedModel to out_dir (which must not exist yet); returns out_dir."""
  names_file = os.path.join(scratch_dir, CLASS_NAMES_ASSET)
  write_class_names(names_file, class_names)
  module = ServingModule(model, pp, names_file)
  signatures = {"serving_default": module.encoded.get_concrete_function(),
                "pixels": module.pixels.get_concrete_function(),
                "crops": module.crops.get_concrete_function()}
  tf.saved_model.save(module, out_dir, signatures=signatures)
  return out_dir


def read_class_names(saved_model_dir: str) -> tuple[str, ...]:
  with open(os.path.join(saved_model_dir, "assets", CLASS_NAMES_ASSET), encoding="utf-8") as f:
    return tuple(line.rstrip("\n") for line in f)
