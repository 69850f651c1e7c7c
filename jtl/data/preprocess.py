"""Per-image preprocessing in TensorFlow: the eval transform and the training augmentations.

Images arrive as uint8 [H, W, 3]. `eval_pixels` / `train_pixels` return uint8 [S, S, 3] (rounded
like the PIL-based pipelines the pretrained weights were trained with, and 4x less to batch), and
`normalize` turns a batch into float32 (x / 255 - mean) / std in one XLA-fused pass (TF's unfused
cast-subtract-divide cost ~5x more CPU than the whole resize). All randomness is stateless, drawn
from a key (int64 [2]) derived from (seed, epoch, example), so an epoch replays exactly, whichever
worker thread runs which example.

`load_eval_image` is the same eval transform for one file outside tf.data; predict and exporters
call it, so that what a user is served is what evaluation measured.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import numpy as np

from jtl.data import decode, randaugment
from jtl.data.errors import DataError, DataFileNotFoundError
from jtl.data.image_ops import blend, grayscale, rotate
from jtl.data.tf_setup import tf

_RESIZE_METHODS = {"bilinear": tf.image.ResizeMethod.BILINEAR,
                   "bicubic": tf.image.ResizeMethod.BICUBIC}

CROP_MODES = ("center", "squash")

# Sub-streams of an example's key, one per random decision.
_CROP, _FLIP, _ROTATE, _JITTER, _RANDAUGMENT = 1, 2, 3, 4, 5
FLIP_STREAM = _FLIP  # the feature cache replays the flip draw (pipeline.hflip_decisions)


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """What a backbone expects: output side, eval crop, resampling and normalisation."""
  image_size: int            # output side (square)
  crop_pct: float = 0.875    # eval: resize short side to image_size / crop_pct, then centre crop
  interpolation: str = "bilinear"  # "bilinear" | "bicubic" (both antialiased when shrinking)
  mean: tuple = (0.485, 0.456, 0.406)  # on [0, 1] pixels
  std: tuple = (0.229, 0.224, 0.225)
  # "center": short side to image_size / crop_pct, then the central square (torchvision, timm);
  # "squash": both sides to image_size / crop_pct whatever the aspect, then the central square
  # (transformers' SigLIP processor: the whole image, stretched, with crop_pct 1).
  crop_mode: str = "center"

  def __post_init__(self):
    if self.crop_mode not in CROP_MODES:
      raise DataError(f"crop_mode must be one of {list(CROP_MODES)}, got {self.crop_mode!r}")
    if self.interpolation not in _RESIZE_METHODS:
      raise DataError(f"interpolation must be one of {sorted(_RESIZE_METHODS)}, "
                      f"got {self.interpolation!r}")
    if self.image_size <= 0 or not 0 < self.crop_pct <= 1.5:
      raise DataError(f"bad image_size {self.image_size} or crop_pct {self.crop_pct}")

  @classmethod
  def from_pretrained_cfg(cls, cfg: Any, image_size: int | None = None) -> "Preprocess":
    """From a jtl.models.PretrainedCfg; image_size overrides the weights' training size."""
    return cls(image_size=int(image_size or cfg.image_size), crop_pct=float(cfg.crop_pct),
               interpolation=cfg.interpolation, mean=tuple(cfg.mean), std=tuple(cfg.std),
               crop_mode=getattr(cfg, "crop_mode", "center"))


@dataclasses.dataclass(frozen=True)
class Augment:
  """Training augmentation; every field optional. Field meanings follow torchvision/timm."""
  random_resized_crop: bool = True   # else the eval resize + centre crop
  scale: tuple = (0.08, 1.0)         # crop area as a fraction of the image area
  ratio: tuple = (3 / 4, 4 / 3)      # crop width / height
  hflip: bool = True
  rotation_degrees: float = 0.0      # uniform in [-d, d], reflected borders
  color_jitter: float = 0.0          # brightness, contrast, saturation factors in [1-j, 1+j]
  randaugment: tuple | None = None   # (num_ops, magnitude 0-10), e.g. (2, 9)
  mixup_alpha: float = 0.0           # per batch; labels become soft
  cutmix_alpha: float = 0.0          # per batch; with mixup too, one of the two per batch

  @classmethod
  def from_config(cls, a) -> "Augment":
    """From a config's `augment` section (see jtl/config.py)."""
    return cls(random_resized_crop=a.random_resized_crop, scale=(a.scale_min, 1.0),
               hflip=a.hflip, rotation_degrees=a.rotation_degrees, color_jitter=a.color_jitter,
               randaugment=((a.randaugment_ops, a.randaugment_magnitude) if a.randaugment_ops
                            else None),
               mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha)

  @property
  def mixes(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def sub_key(key: tf.Tensor, stream: int) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(key, stream)


@tf.function(jit_compile=True)
def _normalize(pixels, mean255, inv_std255):
  return (tf.cast(pixels, tf.float32) - mean255) * inv_std255


def normalize(pixels: tf.Tensor, pp: Preprocess) -> tf.Tensor:
  """Pixels in [0, 255] (any shape ending in 3 channels) -> (x / 255 - mean) / std, float32."""
  mean255 = tf.constant(pp.mean, tf.float32) * 255.0
  inv_std255 = 1.0 / (tf.constant(pp.std, tf.float32) * 255.0)
  return _normalize(pixels, mean255, inv_std255)


def to_pixels(image: tf.Tensor) -> tf.Tensor:
  """float [0, 255] (bicubic may overshoot) -> uint8, rounded and clipped."""
  return tf.saturate_cast(tf.round(image), tf.uint8)


def _resize(image: tf.Tensor, size, pp: Preprocess) -> tf.Tensor:
  method = _RESIZE_METHODS[pp.interpolation]
  size = tf.convert_to_tensor(size, tf.int32)
  shape = tf.shape(image)
  shrinks = tf.logical_or(size[0] < shape[0], size[1] < shape[1])
  # Antialiasing only matters when shrinking; when enlarging, TF's antialiased kernel gives the
  # plain result (to < 0.2 / 255 for bicubic) at a quarter of the speed, and small images
  # enlarged to the backbone's size are the common case here.
  return tf.cond(shrinks, lambda: tf.image.resize(image, size, method=method, antialias=True),
                 lambda: tf.image.resize(image, size, method=method, antialias=False))


def eval_resize_side(pp: Preprocess) -> int:
  """The short side the eval transform resizes to before its S x S crop."""
  return max(pp.image_size, int(math.floor(pp.image_size / pp.crop_pct)))


def resize_and_centre_crop(image: tf.Tensor, pp: Preprocess) -> tf.Tensor:
  """Short side to floor(S / crop_pct) (at least S), then the central S x S; float ~[0, 255]."""
  resized = eval_resize(image, pp)
  top, left = centre_offsets(resized, pp.image_size)
  return square_crop(resized, top, left, pp.image_size)


def centre_offsets(resized: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(top, left) of the central size x size window of `resized`."""
  shape = tf.shape(resized)
  top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float32) / 2.0), tf.int32)
  return top, left


def square_crop(resized: tf.Tensor, top, left, size: int) -> tf.Tensor:
  return tf.ensure_shape(resized[top:top + size, left:left + size, :], [size, size, 3])


def eval_resize(image: tf.Tensor, pp: Preprocess) -> tf.Tensor:
  """The eval transform's resize: short side to eval_resize_side, the long side in proportion
  (at least S), or with crop_mode "squash" both sides to eval_resize_side; float ~[0, 255]. The
  eval view and the test-time views are crops of it."""
  size = pp.image_size
  scale_size = eval_resize_side(pp)
  if pp.crop_mode == "squash":
    return _resize(image, [scale_size, scale_size], pp)
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
  short = tf.minimum(h, w)
  # The long side is truncated like torchvision's Resize(int).
  new_h = tf.cast(tf.maximum(tf.floor(h * scale_size / short), size), tf.int32)
  new_w = tf.cast(tf.maximum(tf.floor(w * scale_size / short), size), tf.int32)
  new_h = tf.where(h <= w, scale_size, new_h)
  new_w = tf.where(w < h, scale_size, new_w)
  return _resize(image, tf.stack([new_h, new_w]), pp)


def eval_pixels(image: tf.Tensor, pp: Preprocess) -> tf.Tensor:
  """uint8 [H, W, 3] -> the eval view, uint8 [S, S, 3]."""
  return to_pixels(resize_and_centre_crop(image, pp))


def eval_image(image: tf.Tensor, pp: Preprocess) -> tf.Tensor:
  return normalize(eval_pixels(image, pp), pp)


def random_resized_crop(image: tf.Tensor, key: tf.Tensor, pp: Preprocess,
                        aug: Augment) -> tf.Tensor:
  """A random area/aspect crop resized to S x S (torchvision's RandomResizedCrop, whole image as
  the fallback after 10 failed attempts)."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4], tf.float32), seed=key,
      min_object_covered=0.0, aspect_ratio_range=aug.ratio, area_range=aug.scale,
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, crop_size)
  resized = _resize(crop, [pp.image_size, pp.image_size], pp)
  return tf.ensure_shape(resized, [pp.image_size, pp.image_size, 3])


def color_jitter(image: tf.Tensor, key: tf.Tensor, strength: float) -> tf.Tensor:
  """Brightness, contrast, saturation, each by a factor uniform in [max(0, 1-j), 1+j]."""
  factors = tf.random.stateless_uniform([3], key, max(0.0, 1.0 - strength), 1.0 + strength)
  image = blend(image, tf.zeros_like(image), factors[0])
  image = blend(image, tf.reduce_mean(grayscale(image)), factors[1])
  return blend(image, grayscale(image), factors[2])


def train_pixels(image: tf.Tensor, key: tf.Tensor, pp: Preprocess, aug: Augment) -> tf.Tensor:
  """uint8 [H, W, 3] -> an augmented view, uint8 [S, S, 3]."""
  if aug.random_resized_crop:
    x = random_resized_crop(image, sub_key(key, _CROP), pp, aug)
  else:
    x = resize_and_centre_crop(image, pp)
  if aug.hflip:
    flip = tf.random.stateless_uniform([], sub_key(key, _FLIP)) < 0.5
    x = tf.cond(flip, lambda: tf.reverse(x, [1]), lambda: x)
  if aug.rotation_degrees:
    limit = math.radians(aug.rotation_degrees)
    angle = tf.random.stateless_uniform([], sub_key(key, _ROTATE), -limit, limit)
    x = rotate(x, angle)
  if aug.color_jitter:
    x = color_jitter(x, sub_key(key, _JITTER), aug.color_jitter)
  if aug.randaugment:
    num_ops, magnitude = aug.randaugment
    x = randaugment.randaugment(x, sub_key(key, _RANDAUGMENT), int(num_ops), float(magnitude))
  return tf.ensure_shape(to_pixels(x), [pp.image_size, pp.image_size, 3])


def train_image(image: tf.Tensor, key: tf.Tensor, pp: Preprocess, aug: Augment) -> tf.Tensor:
  return normalize(train_pixels(image, key, pp, aug), pp)


# ---------------------------------------------------------------------------------------------
# One file through the eval transform, outside tf.data.

@functools.lru_cache(maxsize=16)
def _file_eval_pixels(pp: Preprocess, pixels=eval_pixels):
  """decode_tf + eval_pixels (or another per-image eval transform, `pixels`) as one graph per
  Preprocess, as eval_batches runs them inside tf.data; traced once, then each image costs one
  graph call instead of dozens of eager ops."""
  def run(data, kind, orientation, downscale):
    return pixels(decode.decode_tf(data, kind, orientation, downscale), pp)
  scalar = tf.TensorSpec([], tf.int32)
  return tf.function(run, input_signature=[tf.TensorSpec([], tf.string), scalar, scalar, scalar])


def _read_source(source) -> tuple[bytes, str]:
  """(encoded bytes, the name errors use) of a path or of bytes already in memory."""
  if isinstance(source, (bytes, bytearray, memoryview)):
    return bytes(source), "<encoded image bytes>"
  path = os.fspath(source)
  try:
    with open(path, "rb") as f:
      return f.read(), path
  except FileNotFoundError:
    raise DataFileNotFoundError(f"{path}: no such image file") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read file: {e.strerror or e}") from None


def load_eval_image(source: str | os.PathLike | bytes, pp: Preprocess, *,
                    decode_min_side: int = decode.DEFAULT_DECODE_MIN_SIDE,
                    max_pixels: int = decode.DEFAULT_MAX_IMAGE_PIXELS,
                    pixels=eval_pixels) -> np.ndarray:
  """An image file (its path, or its encoded bytes) -> the model's input, float32 [S, S, 3].

  pixels: the per-image transform, (uint8 image, pp) -> uint8 [..., S, S, 3]; the eval view by
  default, jtl.data.tta's views (a function kept per mode, so one graph is traced per mode).

  Bit for bit what `eval_batches` feeds the model for that file in a "folder:" dataset opened
  with the same decode_min_side and max_image_pixels (the defaults are open_dataset's, which
  training uses): the scan's Pillow probe, the pipeline's decoders (EXIF orientation,
  transparency composited on white, 16-bit scaled, CMYK, large JPEGs decoded at 1/2-1/8 scale
  with their short side >= decode_min_side; see jtl.data.decode), then eval_pixels and normalize.
  A tfds split decodes its records at full size: pass decode_min_side=0 to match one.
  Raises DataError (a ValueError) naming the file when it cannot be read or is not a usable
  image.
  """
  out = load_eval_pixels(source, pp, decode_min_side=decode_min_side, max_pixels=max_pixels,
                         pixels=pixels)
  return normalize(out, pp).numpy()


def load_eval_pixels(source: str | os.PathLike | bytes, pp: Preprocess, *,
                     decode_min_side: int = decode.DEFAULT_DECODE_MIN_SIDE,
                     max_pixels: int = decode.DEFAULT_MAX_IMAGE_PIXELS,
                     pixels=eval_pixels) -> np.ndarray:
  """load_eval_image before `normalize`: uint8 [S, S, 3], what exported TFLite and ONNX models
  take (jtl.deploy)."""
  data, name = _read_source(source)
  info = decode.probe_bytes(data, max_pixels)
  if isinstance(info, str):
    raise DataError(f"{name}: {info}")
  downscale = 1
  if info.kind == decode.KIND_JPEG:
    downscale = decode.jpeg_downscale(info.height, info.width, decode_min_side)
  try:
    out = _file_eval_pixels(pp, pixels)(tf.constant(data), info.kind, info.orientation,
                                        downscale)
  except tf.errors.OpError as e:
    # Pillow accepted the file but TensorFlow's decoder did not; the pipeline would fail too.
    raise DataError(f"{name}: TensorFlow cannot decode it: {e.message}") from None
  return out.numpy()
