"""Small TensorFlow image ops shared by the augmentations; images are float [H, W, C], 0-255."""
from __future__ import annotations

from jtl.data.tf_setup import tf


def projective(image: tf.Tensor, transform: tf.Tensor, fill_mode: str = "REFLECT",
               fill_value: float = 0.0) -> tf.Tensor:
  """Resample through a projective map [a0 a1 a2 b0 b1 b2 c0 c1] from output to input pixels."""
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.reshape(tf.cast(transform, tf.float32), [1, 8]),
      output_shape=tf.shape(image)[:2], fill_value=tf.constant(fill_value, tf.float32),
      interpolation="BILINEAR", fill_mode=fill_mode)
  return out[0]


def rotate(image: tf.Tensor, radians: tf.Tensor, fill_mode: str = "REFLECT",
           fill_value: float = 0.0) -> tf.Tensor:
  """Rotate about the image centre, bilinear."""
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  cos, sin = tf.cos(radians), tf.sin(radians)
  cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
  transform = tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                        sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])
  return projective(image, transform, fill_mode, fill_value)


def blend(image: tf.Tensor, other: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """other + factor * (image - other), clipped: PIL ImageEnhance's rule."""
  return tf.clip_by_value(other + factor * (image - other), 0.0, 255.0)


def grayscale(image: tf.Tensor) -> tf.Tensor:
  """ITU-R 601 luma, [H, W, 1]."""
  return tf.image.rgb_to_grayscale(image)
