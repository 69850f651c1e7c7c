"""Input data: sources (image folders, tfds, the Fashion-MNIST demo), decoding, augmentation and
the tf.data pipelines that feed the JAX training loop.

Importing this package first configures TensorFlow for CPU only (see tf_setup).
"""
from jtl.data import tf_setup  # noqa: F401  (must precede any other TensorFlow use)
from jtl.data.dataset import Dataset, DecodeOptions, open_dataset
from jtl.data.decode import (DEFAULT_DECODE_MIN_SIDE, DEFAULT_MAX_IMAGE_PIXELS,
                             IMAGE_EXTENSIONS)
from jtl.data.pipeline import (epoch_batches, epoch_order, eval_batches, eval_example_indices,
                               hflip_decisions, Shard, steps_per_epoch, train_batches)
from jtl.data.preprocess import Augment, Preprocess

__all__ = ["Augment", "Dataset", "DecodeOptions", "DEFAULT_DECODE_MIN_SIDE",
           "DEFAULT_MAX_IMAGE_PIXELS", "IMAGE_EXTENSIONS", "Preprocess", "Shard", "epoch_batches",
           "epoch_order", "eval_batches", "eval_example_indices", "hflip_decisions",
           "open_dataset", "steps_per_epoch", "train_batches"]
