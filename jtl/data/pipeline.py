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

import dataclasses
from typing import Iterator

import numpy as np

from jtl.data import mixing, sampling, tta as tta_lib
from jtl.data.dataset import Dataset
from jtl.data.errors import DataError
from jtl.data.preprocess import Augment, Preprocess, eval_pixels, normalize, train_pixels
from jtl.data.tf_setup import tf

_ORDER_STREAM, _EXAMPLE_STREAM, _BATCH_STREAM, _VIEW_STREAM = 0x0D, 0xE7, 0xBA, 0x7E
_BALANCED_STREAM = 0xB1


def steps_per_epoch(ds: Dataset, batch_size_global: int) -> int:
  """Full global batches in one epoch of the train split (the remainder is dropped)."""
  steps = ds.num_examples("train") // batch_size_global
  if steps == 0:
    raise DataError(f"the train split of {ds.name} has {ds.num_examples('train')} examples, "
                    f"fewer than one global batch of {batch_size_global}")
  return steps


def epoch_order(num_examples: int, seed: int, epoch: int,
                labels: np.ndarray | None = None) -> np.ndarray:
  """The examples of the train split drawn in epoch `epoch`, in order: a permutation, or with
  the split's `labels` given (balanced_sampling) a class-balanced draw of the same length
  (jtl.data.sampling), keyed by (seed, epoch) alike so a resumed epoch replays it."""
  if labels is not None:
    if len(labels) != num_examples:
      raise ValueError(f"{len(labels)} labels for {num_examples} examples")
    return sampling.balanced_order(labels, np.random.default_rng([seed, epoch, _BALANCED_STREAM]))
  return np.random.default_rng([seed, epoch, _ORDER_STREAM]).permutation(num_examples)


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int,
                  start_step: int = 0, shard: "Shard | None" = None,
                  labels: np.ndarray | None = None) -> np.ndarray:
  """The example indices of this process's batches of `epoch` from batch `start_step` on,
  [steps left, batch_size]: the one rule the image pipeline and the feature cache share.
  labels: the train split's labels, to draw class-balanced epochs (see epoch_order)."""
  shard = shard or Shard()
  global_batch = batch_size * shard.count
  steps = num_examples // global_batch
  order = epoch_order(num_examples, seed, epoch, labels)[:steps * global_batch]
  return order.reshape(steps, shard.count, batch_size)[start_step:, shard.index]


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


def _options(*, autotune: bool) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  # Evaluation passes run without autotuning: with it, an iterator whose consumer computes
  # between batches (the feature cache's prefix pass, an evaluation) often took ~5 s to report
  # its end (TF 2.21, 2 cores: the last next() of 4 test-split passes took 0.06, 0.01, 5.02,
  # 5.04 s; 0.08, 0.07, 0.07, 0.00 without), once per split. AUTOTUNE parallelism then means
  # one call per core. Training keeps it: no such stall was measured there (a 125-step run on
  # images took 70.5 s with it, 70.9 without), and heavy augmentation on a many-core host is
  # where tuning the parallelism and buffers pays.
  options.autotune.enabled = autotune
  return options


@dataclasses.dataclass(frozen=True)
class Shard:
  """This process's part of every global batch: process `index` of `count`."""
  index: int = 0
  count: int = 1


def train_batches(ds: Dataset, *, batch_size: int, preprocess: Preprocess, augment: Augment,
                  seed: int, epoch: int, start_step: int = 0, shard: Shard = Shard(),
                  balanced: bool = False) -> Iterator[dict]:
  """One epoch of training batches for this process, from batch `start_step` on.

  Yields dict(image=float32 [B, S, S, 3], label=int32 [B]), or label=float32 [B, num_classes]
  soft labels when mixup or cutmix is on. B is the per-process batch_size. balanced: a
  class-balanced draw (epoch_order); an example drawn twice in one epoch is augmented alike
  both times (its key is its example index, as the feature cache's flip replay needs).
  """
  process_index, process_count, num_classes = shard.index, shard.count, ds.num_classes
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  images = ds.images("train")
  steps_per_epoch(ds, batch_size * process_count)  # raises when not one global batch fits
  labels = np.asarray(ds.table("train").labels) if balanced else None
  mine = epoch_batches(images.size, batch_size, seed, epoch, start_step, shard,
                       labels).reshape(-1)
  example_key = _base_key(seed, epoch, _EXAMPLE_STREAM)
  batch_key = _base_key(seed, epoch, _BATCH_STREAM)
  key_spec = tf.TensorSpec([2], example_key.dtype)

  def build_load():
    def load(index, data, epoch_key):
      key = tf.random.experimental.stateless_fold_in(epoch_key, index)
      pixels = train_pixels(images.image(index, data), key, preprocess, augment)
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
                 [tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string), key_spec],
                 build_load)
  finish = _traced(images, "train_finish",
                   (preprocess, augment, num_classes, process_index, process_count),
                   [tf.TensorSpec([], tf.int64),
                    tf.TensorSpec([None, preprocess.image_size, preprocess.image_size, 3],
                                  tf.uint8),
                    tf.TensorSpec([None], tf.int32), key_spec], build_finish)
  data = (images.examples(mine)
          .map(lambda index, encoded: load(index, encoded, example_key),
               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .batch(batch_size, drop_remainder=True)
          .enumerate(start=start_step)
          .map(lambda step, batch: finish(step, *batch, batch_key),
               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .prefetch(tf.data.AUTOTUNE).with_options(_options(autotune=True)))
  for image, label in data.as_numpy_iterator():
    yield {"image": image, "label": label}


def eval_batches(ds: Dataset, split: str, *, batch_size: int, preprocess: Preprocess,
                 shard: Shard = Shard(), view: int = 0, augment: Augment | None = None,
                 seed: int = 0, tta: str = "") -> Iterator[dict]:
  """Every example of `split` exactly once across processes, in a fixed order.

  Process p takes examples p, p + P, p + 2P, ... (see `eval_example_indices`); every process
  yields the same number of batches (collectives need that), the last ones padded with black
  images whose mask is False. Yields dict(image=float32 [B, S, S, 3], label=int32 [B],
  mask=bool [B]).

  view (the feature cache's fixed views): 0 is the eval transform; without `augment`, view 1 is
  its horizontal flip (what training with hflip as the only augmentation sees); with `augment`,
  view v is the training augmentation drawn with the key (seed, v, example).

  tta (a jtl.data.tta mode, on): image is float32 [B, V, S, S, 3], the V test-time views of
  each example (tta.view_pixels; padding all black).
  """
  images = ds.images(split)
  n = images.size
  if n == 0:
    return
  indices = eval_example_indices(n, batch_size, shard.index, shard.count)
  size = preprocess.image_size
  view_key = _base_key(seed, view, _VIEW_STREAM)
  tta = tta if tta_lib.is_on(tta) else ""
  shape = [tta_lib.num_views(tta), size, size, 3] if tta else [size, size, 3]

  def build_load():
    def pixels(index, data):
      image = images.image(index, data)
      if tta:
        return tta_lib.view_pixels(image, preprocess, tta)
      if augment is not None:
        key = tf.random.experimental.stateless_fold_in(view_key, index)
        return train_pixels(image, key, preprocess, augment)
      x = eval_pixels(image, preprocess)
      return tf.reverse(x, [1]) if view == 1 else x

    def load(index, data):
      def real():
        return pixels(index, data), tf.gather(images.labels, index), tf.constant(True)

      def padding():
        return tf.zeros(shape, tf.uint8), tf.constant(0, tf.int32), tf.constant(False)
      return tf.cond(index >= 0, real, padding)
    return load

  load = _traced(images, "eval_load", (preprocess, view, augment, seed, tta),
                 [tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string)], build_load)

  data = (images.examples(indices)
          .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .batch(batch_size)
          .map(lambda pixels, label, mask: (normalize(pixels, preprocess), label, mask),
               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .prefetch(tf.data.AUTOTUNE).with_options(_options(autotune=False)))
  for image, label, mask in data.as_numpy_iterator():
    yield {"image": image, "label": label, "mask": mask}


def eval_example_indices(num_examples: int, batch_size: int, process_index: int = 0,
                         process_count: int = 1) -> np.ndarray:
  """The example index of every slot of this process's evaluation batches (-1: padding)."""
  per_process = -(-num_examples // process_count)
  num_batches = -(-per_process // batch_size)
  indices = np.arange(num_batches * batch_size, dtype=np.int64) * process_count + process_index
  indices[indices >= num_examples] = -1
  return indices


def hflip_decisions(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
  """Whether training flips each of these examples in `epoch`: the very draw `train_pixels`
  makes, so that training on cached (identity, flip) views replays the uncached run."""
  from jtl.data.preprocess import sub_key, FLIP_STREAM
  example_key = _base_key(seed, epoch, _EXAMPLE_STREAM)

  def flip(index):
    key = tf.random.experimental.stateless_fold_in(example_key, index)
    return tf.random.stateless_uniform([], sub_key(key, FLIP_STREAM)) < 0.5
  if len(indices) == 0:
    return np.zeros((0,), bool)
  decide = tf.function(lambda idx: tf.map_fn(flip, idx, fn_output_signature=tf.bool))
  return decide(tf.constant(np.asarray(indices, np.int64))).numpy()
