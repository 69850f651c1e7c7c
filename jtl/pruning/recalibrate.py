"""BatchNorm statistics re-estimated after pruning.

Removing channels (or zeroing most weights) changes what every later layer sees, but its
BatchNorm running mean and variance still describe the unpruned network; in inference mode
they then shift and scale the activations wrongly, layer after layer (a channel-pruned Lite0 fell
to chance accuracy this way). A short fine-tune does not repair them: with momentum 0.99 (the TF
ports) 60 steps leave 55% of the stale value. So the starting weights of a pruned run get
statistics measured on training images first: the average over `num_batches` batches of each
BatchNorm's batch statistics, in the eval transform (no augmentation).

flax's BatchNorm only reports `momentum * old + (1 - momentum) * batch`, and the momentum is a
property of each layer; feeding zeros and then ones as `old` recovers both the batch statistic
and the momentum of every layer, whatever the family.
"""
from __future__ import annotations

import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jtl import data as data_lib

log = logging.getLogger(__name__)


def _batch_statistics_fn(module):
  """(params, running stats, images) -> the running stats after one train-mode batch."""

  @jax.jit
  def after_batch(params, batch_stats, images):
    _, new = module.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                          mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})
    return new["batch_stats"]
  return after_batch


def recalibrated(model, dataset, preprocess, *, batch_size: int, num_batches: int = 32) -> dict:
  """The model's variables with every BatchNorm's statistics measured on `num_batches` batches
  of the training split (all of it when smaller)."""
  variables = model.variables
  if not variables.get("batch_stats"):
    return variables
  after_batch = _batch_statistics_fn(model.module)
  params = variables["params"]
  zeros = jax.tree_util.tree_map(jnp.zeros_like, variables["batch_stats"])
  ones = jax.tree_util.tree_map(jnp.ones_like, variables["batch_stats"])
  batches = data_lib.eval_batches(dataset, "train", batch_size=batch_size, preprocess=preprocess)
  total, count, keep = None, 0, None
  for batch in itertools.islice(batches, num_batches):
    if not np.asarray(batch["mask"]).all():
      break  # the padded last batch: black images would bias the statistics
    images = jnp.asarray(batch["image"])
    from_zeros = after_batch(params, zeros, images)              # (1 - m) * batch statistic
    if keep is None:  # 1 - m, per layer (the same for every batch)
      keep = jax.tree_util.tree_map(lambda z, o: 1.0 - (o - z), from_zeros,
                                    after_batch(params, ones, images))
    stats = jax.tree_util.tree_map(lambda z, k: z / k, from_zeros, keep)
    total = stats if total is None else jax.tree_util.tree_map(jnp.add, total, stats)
    count += 1
  if not count:
    log.warning("BatchNorm statistics not recalibrated: no full batch of %d training images",
                batch_size)
    return variables
  measured = jax.tree_util.tree_map(lambda t, old: np.asarray(t / count, old.dtype), total,
                                    variables["batch_stats"])
  log.info("BatchNorm statistics recalibrated on %d training images", count * batch_size)
  return {**variables, "batch_stats": measured}
