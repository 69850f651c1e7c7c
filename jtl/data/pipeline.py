"""tf.data pipelines: one training epoch, and one pass over an evaluation split.

Training order is a permutation of the train split keyed by (seed, epoch), cut into global
batches of batch_size * process_count; process p takes slice p of each global batch, so the
processes read disjoint shards that together cover the epoch (the remainder that does not fill a
global batch is dropped). All randomness is keyed by (seed, epoch, example index) for the per-image
augmentation and by (seed, epoch, step, process) for batch mixing, so a run resumed with
start_step=k yields exactly the batches k, k+1, ... of the uninterrupted epoch; skipping costs
nothing because the order is sliced before anything is read.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from jtl.data import mixing
from jtl.data.dataset import Dataset
from jtl.data.preprocess import Augment, Preprocess, eval_pixels, normalize, train_pixels
from jtl.data.tf_setup import tf

_ORDER_STREAM, _EXAMPLE_STREAM, _BATCH_STREAM = 0x0D, 0xE7, 0xBA


def steps_per_epoch(ds: Dataset, batch_size_global: int) -> int:
  """Full global batches in one epoch of the train split (the remainder is dropped)."""
  steps = ds.num_examples("train") // batch_size_global
  if steps == 0:
    raise ValueError(f"the train split of {ds.name} has {ds.num_examples('train')} examples, "
                     f"fewer than one global batch of {batch_size_global}")
  return steps


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The permutation of the train split used in epoch `epoch`."""
  return np.random.default_rng([seed, epoch, _ORDER_STREAM]).permutation(num_examples)


def _base_key(seed: int, epoch: int, stream: int) -> tf.Tensor:
  key = tf.constant([seed, epoch], tf.int64)
  return tf.random.experimental.stateless_fold_in(key, stream)


def _traced(images, name: str, config: tuple, signature: list, build):
  """A tf.function per (split, config), traced once and reused by every later epoch: tracing
  the augmentation graph (RandAugment's 14 branches) costs seconds, and tf.data would otherwise
  repeat it for each new epoch's pipeline. Epoch-dependent values are arguments, not captures."""
  cache = images.traced_functions
  if (name, config) not in cache:
    cache[(name, config)] = tf.function(build(), input_signature=signature)
  return cache[(name, config)]


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def train_batches(ds: Dataset, *, batch_size: int, preprocess: Preprocess, augment: Augment,
                  seed: int, epoch: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, num_classes: int) -> Iterator[dict]:
  """One epoch of training batches for this process, from batch `start_step` on.

  Yields dict(image=float32 [B, S, S, 3], label=int32 [B]), or label=float32 [B, num_classes]
  soft labels when mixup or cutmix is on. B is the per-process batch_size.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  images = ds.images("train")
  global_batch = batch_size * process_count
  steps = steps_per_epoch(ds, global_batch)
  order = epoch_order(images.size, seed, epoch)[:steps * global_batch]
  mine = order.reshape(steps, process_count, batch_size)[start_step:, process_index].reshape(-1)
  example_key = _base_key(seed, epoch, _EXAMPLE_STREAM)
  batch_key = _base_key(seed, epoch, _BATCH_STREAM)
  key_spec = tf.TensorSpec([2], example_key.dtype)

  def build_load():
    def load(index, epoch_key):
      key = tf.random.experimental.stateless_fold_in(epoch_key, index)
      pixels = train_pixels(images.image(index), key, preprocess, augment)
      return pixels, tf.gather(images.labels, index)
    return load

  def build_finish():
    def finish(step, pixels, label, epoch_key):
      image = normalize(pixels, preprocess)
      if not augment.mixes:
        return image, label
      key = tf.random.experimental.stateless_fold_in(epoch_key,
                                                     step * process_count + process_index)
      return mixing.mix_batch(image, label, key, num_classes=num_classes,
                              mixup_alpha=augment.mixup_alpha, cutmix_alpha=augment.cutmix_alpha)
    return finish

  load = _traced(images, "train_load", (preprocess, augment),
                 [tf.TensorSpec([], tf.int64), key_spec], build_load)
  finish = _traced(images, "train_finish",
                   (preprocess, augment, num_classes, process_index, process_count),
                   [tf.TensorSpec([], tf.int64),
                    tf.TensorSpec([None, preprocess.image_size, preprocess.image_size, 3],
                                  tf.uint8),
                    tf.TensorSpec([None], tf.int32), key_spec], build_finish)
  data = (tf.data.Dataset.from_tensor_slices(mine.astype(np.int64))
          .map(lambda index: load(index, example_key), num_parallel_calls=tf.data.AUTOTUNE,
               deterministic=True)
          .batch(batch_size, drop_remainder=True)
          .enumerate(start=start_step)
          .map(lambda step, batch: finish(step, *batch, batch_key),
               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .prefetch(tf.data.AUTOTUNE).with_options(_options()))
  for image, label in data.as_numpy_iterator():
    yield {"image": image, "label": label}


def eval_batches(ds: Dataset, split: str, *, batch_size: int, preprocess: Preprocess,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Every example of `split` exactly once across processes, in a fixed order.

  Process p takes examples p, p + P, p + 2P, ...; every process yields the same number of
  batches (collectives need that), the last ones padded with black images whose mask is False.
  Yields dict(image=float32 [B, S, S, 3], label=int32 [B], mask=bool [B]).
  """
  images = ds.images(split)
  n = images.size
  if n == 0:
    return
  per_process = -(-n // process_count)
  num_batches = -(-per_process // batch_size)
  indices = np.arange(num_batches * batch_size, dtype=np.int64) * process_count + process_index
  indices[indices >= n] = -1
  size = preprocess.image_size

  def build_load():
    def load(index):
      def real():
        return (eval_pixels(images.image(index), preprocess),
                tf.gather(images.labels, index), tf.constant(True))

      def padding():
        return tf.zeros([size, size, 3], tf.uint8), tf.constant(0, tf.int32), tf.constant(False)
      return tf.cond(index >= 0, real, padding)
    return load

  load = _traced(images, "eval_load", (preprocess,), [tf.TensorSpec([], tf.int64)], build_load)

  data = (tf.data.Dataset.from_tensor_slices(indices)
          .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .batch(batch_size)
          .map(lambda pixels, label, mask: (normalize(pixels, preprocess), label, mask),
               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .prefetch(tf.data.AUTOTUNE).with_options(_options()))
  for image, label, mask in data.as_numpy_iterator():
    yield {"image": image, "label": label, "mask": mask}

