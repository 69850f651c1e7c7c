"""Helpers the model tests share: the fixtures' input, logits and variables compared, and
variables of a module's shapes made without compiling its initialisers.

Fixtures for engine runs (tiny_config, write_image_folder) are in conftest.py; subprocess runs are
in run_helpers.py.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jtl import params as P
from jtl.hooks import Checkpointing
from jtl.loop import Hook
from jtl.models import registry

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


# final_metrics.json fields that time the run: they differ between two otherwise identical runs.
TIMING_KEYS = ("train_seconds", "wall_seconds", "step_seconds", "images_per_second",
               "feature_cache_seconds")


def without_timings(final: dict) -> dict:
  return {k: v for k, v in final.items() if k not in TIMING_KEYS}


def fixture_input(size: int, batch: int = 2) -> np.ndarray:
  """The NHWC input that tests/fixtures/make_{resnet,vgg,vit}.py fed the reference models."""
  n = batch * size * size * 3
  return np.sin(np.arange(n, dtype=np.float64) * 1.618034).astype(np.float32).reshape(
      batch, size, size, 3)


def assert_logits_close(ours, reference):
  ours, reference = np.asarray(ours), np.asarray(reference)
  assert ours.shape == reference.shape
  np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def assert_same_variables(loaded, expected):
  """The same names and bit-identical values; either tree may be nested or already flat."""
  loaded, expected = P.flatten(loaded), P.flatten(expected)
  assert sorted(loaded) == sorted(expected)
  for name in expected:
    np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(expected[name]),
                                  err_msg=name)


# Our collection/leaf -> the torch state-dict name of the same tensor (BatchNorm included).
TORCH_LEAVES = {"params/kernel": "weight", "params/bias": "bias", "params/scale": "weight",
                "batch_stats/mean": "running_mean", "batch_stats/var": "running_var"}


def torch_layout(value) -> np.ndarray:
  """Our tensor in torch's layout: HWIO conv kernels as OIHW, (in, out) dense kernels as
  (out, in), everything else as it is."""
  value = np.asarray(value)
  if value.ndim == 4:
    value = value.transpose(3, 2, 0, 1)
  elif value.ndim == 2:
    value = value.T
  return np.ascontiguousarray(value)


def variable_shapes(module, size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat shapes of the module's variables for a size x size input (eval_shape: nothing runs)."""
  shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return P.flatten(dict(shapes))


def zeros_of(shapes: dict[str, jax.ShapeDtypeStruct]) -> dict:
  """Nested zero variables of the flat shapes: the template a checkpoint is merged into."""
  return P.unflatten({k: np.zeros(s.shape, s.dtype) for k, s in shapes.items()})


def random_leaves(shapes: dict[str, jax.ShapeDtypeStruct], seed: int = 0,
                  scale: float = 0.5) -> dict[str, np.ndarray]:
  """Flat float32 values of the flat shapes, every leaf random so that a swapped tensor shows.

  Kernels are scaled by 1/sqrt(fan-in), other leaves by `scale`; BatchNorm variances are positive.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for name, leaf in shapes.items():
    kernel = name.endswith("/kernel")
    value = rng.standard_normal(leaf.shape) * (1 / np.sqrt(np.prod(leaf.shape[:-1])) if kernel
                                               else scale)
    flat[name] = (np.abs(value) + 0.5 if name.endswith("/var") else value).astype(np.float32)
  return flat


def random_variables(arch: str, seed: int = 0, num_classes: int = 7, size: int = 32,
                     **overrides) -> dict:
  """Nested random variables of the registered `arch` built with `overrides` (random_leaves)."""
  module = registry.get_entry(arch).build(num_classes=num_classes, **overrides)
  return P.unflatten(random_leaves(variable_shapes(module, size), seed))


def save_and_stop(loop) -> None:
  """What Preemption does on SIGTERM: a checkpoint now, through the run's own Checkpointing
  hook, then the loop stopped."""
  saving, = (h for h in loop.hooks if isinstance(h, Checkpointing))
  saving.save(loop)
  loop.interrupt()


class StopAt(Hook):
  """What Preemption does on SIGTERM (save, then stop the loop), at a chosen step."""

  def __init__(self, step: int):
    self.step = step

  def after_step(self, loop, step):
    if step == self.step:
      save_and_stop(loop)


class CrashAtBatch(Hook):
  """A loop hook: a crash (KeyboardInterrupt) as the n-th batch of the run is about to be fed."""

  def __init__(self, n: int):
    self.n, self.seen = n, 0

  def on_batch(self, loop, batch):
    self.seen += 1
    if self.seen == self.n:
      raise KeyboardInterrupt("simulated crash")
    return batch
