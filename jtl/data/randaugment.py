"""A compact RandAugment (Cubuk et al. 2020) in TensorFlow ops, stateless.

No maintained TF2 implementation is installed (keras_cv is not), so this is our own: the 14 ops
of the paper's list, `num_ops` of them drawn uniformly per image, each at strength
magnitude / 10 of its range (ranges as in torchvision's RandAugment: rotate 30 degrees, shear
0.3, translate 45% of the side, enhance factors 1 +- 0.9, posterize down to 4 bits, solarize down
to threshold 0). Signed ops flip sign with probability 1/2. Images are float [S, S, 3] in [0, 255].
"""
from __future__ import annotations

import math

from jtl.data.image_ops import blend, grayscale, projective, rotate
from jtl.data.tf_setup import tf

_GRAY_FILL = 128.0  # geometric ops fill uncovered pixels with mid-gray, like timm


def _signed(key: tf.Tensor, value: float) -> tf.Tensor:
  sign = tf.where(tf.random.stateless_uniform([], key) < 0.5, -1.0, 1.0)
  return sign * value


def _quantize(x: tf.Tensor) -> tf.Tensor:
  """The uint8 values PIL-based ops would see."""
  return tf.clip_by_value(tf.round(x), 0.0, 255.0)


def _auto_contrast(x):
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-6), 1.0)
  return tf.clip_by_value(tf.where(hi > lo, (x - lo) * scale, x), 0.0, 255.0)


def _equalize_channel(channel):
  values = tf.cast(_quantize(channel), tf.int32)
  hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
  # PIL's ImageOps.equalize: spread the cumulative histogram, ignoring the last occupied bin.
  last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)[:, 0]))
  step = (tf.reduce_sum(hist) - last) // 255
  safe_step = tf.maximum(step, 1)
  lut = tf.minimum((tf.cumsum(hist, exclusive=True) + safe_step // 2) // safe_step, 255)
  return tf.where(step > 0, tf.cast(tf.gather(lut, values), tf.float32), channel)


def _equalize(x):
  return tf.stack([_equalize_channel(x[..., c]) for c in range(3)], axis=-1)


def _affine(x, a0, a1, a2, b0, b1, b2):
  return projective(x, tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0]), "CONSTANT", _GRAY_FILL)


def _rotate(x, degrees):
  return rotate(x, degrees * (math.pi / 180.0), "CONSTANT", _GRAY_FILL)


def _shear(x, amount, horizontal):
  h, w = tf.cast(tf.shape(x)[0], tf.float32), tf.cast(tf.shape(x)[1], tf.float32)
  one, zero = tf.constant(1.0), tf.constant(0.0)
  if horizontal:  # sheared about the centre row
    return _affine(x, one, amount, -amount * (h - 1.0) / 2.0, zero, one, zero)
  return _affine(x, one, zero, zero, amount, one, -amount * (w - 1.0) / 2.0)


def _translate(x, fraction, horizontal):
  side = tf.cast(tf.shape(x)[1 if horizontal else 0], tf.float32)
  one, zero = tf.constant(1.0), tf.constant(0.0)
  shift = -fraction * side
  if horizontal:
    return _affine(x, one, zero, shift, zero, one, zero)
  return _affine(x, one, zero, zero, zero, one, shift)


def _sharpness(x, factor):
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0]
  # PIL keeps the border pixels unfiltered.
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  inner = tf.pad(tf.ones_like(smooth[1:-1, 1:-1, :1]), [[1, 1], [1, 1], [0, 0]])
  smooth = inner * smooth + (1.0 - inner) * x
  return blend(x, smooth, factor)


def _posterize(x, bits):
  shift = tf.pow(2.0, 8.0 - bits)
  return tf.floor(_quantize(x) / shift) * shift


def _solarize(x, threshold):
  return tf.where(x >= threshold, 255.0 - x, x)


def _ops(x, key, strength):
  """Branches for tf.switch_case; strength in [0, 1]."""
  def enhance(other):
    return lambda: blend(x, other(), 1.0 + _signed(key, 0.9 * strength))
  return [
      lambda: x,                                                          # identity
      lambda: _auto_contrast(x),
      lambda: _equalize(x),
      lambda: _rotate(x, _signed(key, 30.0 * strength)),
      lambda: _solarize(x, 255.0 * (1.0 - strength)),
      enhance(lambda: grayscale(x)),                                          # color
      lambda: _posterize(x, 8.0 - round(4.0 * strength)),
      enhance(lambda: tf.reduce_mean(grayscale(x))),                          # contrast
      enhance(lambda: tf.zeros_like(x)),                                  # brightness
      lambda: _sharpness(x, 1.0 + _signed(key, 0.9 * strength)),
      lambda: _shear(x, _signed(key, 0.3 * strength), horizontal=True),
      lambda: _shear(x, _signed(key, 0.3 * strength), horizontal=False),
      lambda: _translate(x, _signed(key, 0.45 * strength), horizontal=True),
      lambda: _translate(x, _signed(key, 0.45 * strength), horizontal=False),
  ]


NUM_OPS = 14


def randaugment(image: tf.Tensor, key: tf.Tensor, num_ops: int, magnitude: float) -> tf.Tensor:
  """Apply num_ops randomly chosen ops at magnitude (0-10) to a float [S, S, 3] image."""
  strength = min(max(magnitude, 0.0), 10.0) / 10.0
  x = image
  for i in range(num_ops):
    op_key = tf.random.experimental.stateless_fold_in(key, i)
    choice = tf.random.stateless_uniform([], op_key, 0, NUM_OPS, dtype=tf.int32)
    arg_key = tf.random.experimental.stateless_fold_in(op_key, 1)
    x = tf.ensure_shape(tf.switch_case(choice, _ops(x, arg_key, strength)), image.shape)
  return x
