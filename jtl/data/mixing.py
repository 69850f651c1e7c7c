"""Mixup and CutMix on a batch, with soft labels; stateless, keyed per batch.

Each image is mixed with its mirror in the batch (image i with image B-1-i), as timm does: no
extra permutation to store, and every image still meets a different partner each epoch because
the batch composition changes. With both alphas set, each batch uses one of the two with
probability 1/2. The label of a mixed image is lam * onehot(a) + (1 - lam) * onehot(b), where for
CutMix lam is the exact fraction of pixels kept after the box is clipped to the image.
"""
from __future__ import annotations

from jtl.data.tf_setup import tf


def _beta(key: tf.Tensor, alpha: float) -> tf.Tensor:
  """Beta(alpha, alpha) as a ratio of two stateless gammas."""
  keys = tf.random.experimental.stateless_split(key, 2)
  g1 = tf.random.stateless_gamma([], keys[0], alpha)
  g2 = tf.random.stateless_gamma([], keys[1], alpha)
  return g1 / tf.maximum(g1 + g2, 1e-12)


@tf.function(jit_compile=True)
def _blend_with_mirror(images, weight):
  """weight * images + (1 - weight) * images reversed along the batch, in one fused pass."""
  return weight * images + (1.0 - weight) * tf.reverse(images, [0])


def _mixup(images, onehot, key, alpha):
  lam = _beta(key, alpha)
  return (_blend_with_mirror(images, tf.reshape(lam, [1, 1, 1, 1])),
          lam * onehot + (1.0 - lam) * tf.reverse(onehot, [0]))


def _cutmix(images, onehot, key, alpha):
  keys = tf.random.experimental.stateless_split(key, 2)
  lam = _beta(keys[0], alpha)
  shape = tf.shape(images)
  h, w = shape[1], shape[2]
  cut = tf.sqrt(1.0 - lam)
  cut_h = tf.cast(tf.cast(h, tf.float32) * cut, tf.int32)
  cut_w = tf.cast(tf.cast(w, tf.float32) * cut, tf.int32)
  centre = tf.random.stateless_uniform([2], keys[1], 0.0, 1.0)
  cy = tf.cast(centre[0] * tf.cast(h, tf.float32), tf.int32)
  cx = tf.cast(centre[1] * tf.cast(w, tf.float32), tf.int32)
  top, bottom = tf.clip_by_value(cy - cut_h // 2, 0, h), tf.clip_by_value(cy + cut_h // 2, 0, h)
  left, right = tf.clip_by_value(cx - cut_w // 2, 0, w), tf.clip_by_value(cx + cut_w // 2, 0, w)
  rows, cols = tf.range(h), tf.range(w)
  in_rows = (rows >= top) & (rows < bottom)
  in_cols = (cols >= left) & (cols < right)
  box = (in_rows[:, None] & in_cols[None, :])[None, :, :, None]
  images = _blend_with_mirror(images, 1.0 - tf.cast(box, tf.float32))
  kept = 1.0 - tf.cast((bottom - top) * (right - left), tf.float32) / tf.cast(h * w, tf.float32)
  return images, kept * onehot + (1.0 - kept) * tf.reverse(onehot, [0])


def mix_batch(images: tf.Tensor, labels: tf.Tensor, key: tf.Tensor, *, num_classes: int,
              mixup_alpha: float, cutmix_alpha: float) -> tuple[tf.Tensor, tf.Tensor]:
  """(images [B, H, W, C], int labels [B]) -> (mixed images, float32 soft labels [B, classes])."""
  onehot = tf.one_hot(labels, num_classes, dtype=tf.float32)
  choose_key, mix_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = tf.random.stateless_uniform([], choose_key) < 0.5
    return tf.cond(use_cutmix, lambda: _cutmix(images, onehot, mix_key, cutmix_alpha),
                   lambda: _mixup(images, onehot, mix_key, mixup_alpha))
  if cutmix_alpha > 0:
    return _cutmix(images, onehot, mix_key, cutmix_alpha)
  if mixup_alpha > 0:
    return _mixup(images, onehot, mix_key, mixup_alpha)
  return images, onehot
