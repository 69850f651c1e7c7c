"""Inception-v3: torchvision/timm checkpoints round-trip bit for bit (the aux head dropped), at
the smallest input the network takes (75 px).

Inception has no tiny configuration in any reference library, so there is no logits fixture;
initialising the full network costs ~45 s of XLA compilation on 2 cores, so the variables
come from eval_shape and the checkpoints are loaded through the converter and the merge, as
create_model does after its init.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import (TORCH_LEAVES, assert_same_variables, random_leaves, torch_layout,
                     variable_shapes, zeros_of)
from jtl import params as P
from jtl.models import inception, registry  # noqa: F401  (inception registers its model)
from jtl.weights import convert_inception, files, merge
from torch_writer import save_zip

SIZE = 75
NUM_CLASSES = 7


@functools.lru_cache(maxsize=None)
def module_and_shapes():
  module = registry.get_entry("inception_v3").build(num_classes=NUM_CLASSES, image_size=SIZE)
  return module, variable_shapes(module, SIZE)


def random_variables(seed=0):
  """Flat variables, every leaf random (variances positive), so that a swapped tensor shows."""
  return random_leaves(module_and_shapes()[1], seed, scale=1.0)


def to_torch(flat, prefix=""):
  """Our flat variables in torchvision's (and timm's) names and layouts."""
  state = {}
  for name, value in flat.items():
    collection, stage, *path, leaf = name.split("/")
    module = "fc" if stage == "head" else ".".join(path)
    state[f"{prefix}{module}.{TORCH_LEAVES[f'{collection}/{leaf}']}"] = torch_layout(value)
    if leaf == "mean":
      state[f"{prefix}{module}.num_batches_tracked"] = np.array(3, np.int64)
  return state


def load(path):
  module, shapes = module_and_shapes()
  return merge.merge(zeros_of(shapes),
                     convert_inception.convert(files.read_state_dict(path), module), source=path)


def test_torchvision_pth_with_aux_head_round_trip(tmp_path):
  """torchvision's file carries AuxLogits.*; they are dropped, everything else lands."""
  expected = random_variables()
  state = to_torch(expected)
  rng = np.random.default_rng(1)
  for name, shape in (("AuxLogits.conv0.conv.weight", (128, 768, 1, 1)),
                      ("AuxLogits.conv0.bn.running_var", (128,)),
                      ("AuxLogits.conv1.conv.weight", (768, 128, 5, 5)),
                      ("AuxLogits.fc.weight", (NUM_CLASSES, 768)),
                      ("AuxLogits.fc.bias", (NUM_CLASSES,))):
    state[name] = rng.standard_normal(shape).astype(np.float32)
  path = str(tmp_path / "inception_v3_google.pth")
  save_zip(state, path)
  loaded = load(path)
  assert_same_variables(loaded, expected)
  module = module_and_shapes()[0]
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, SIZE, SIZE, 3), np.float32))
  # Train mode with stem, mixed5 and mixed6 frozen: their BatchNorms keep their statistics,
  # mixed7's move.
  train = jax.jit(lambda v, x: module.apply(v, x, train=True, frozen_stages=3,
                                            mutable=["batch_stats"]))
  logits, updates = train(loaded, x)
  assert logits.shape == (2, NUM_CLASSES) and np.isfinite(np.asarray(logits)).all()
  for name, value in P.flatten(updates["batch_stats"]).items():
    frozen = not name.startswith("mixed7/")
    assert np.array_equal(value, expected[f"batch_stats/{name}"]) == frozen, name


def test_timm_safetensors_with_module_prefix_round_trip(tmp_path):
  expected = random_variables(seed=3)
  path = str(tmp_path / "model.safetensors")
  save_file(to_torch(expected, prefix="module."), path)
  assert_same_variables(load(path), expected)


def test_unknown_tensor_and_missing_tensor_are_reported(tmp_path):
  state = to_torch(random_variables(seed=4))
  del state["Mixed_6c.branch7x7dbl_4.bn.running_var"]
  state["Mixed_8a.branch1x1.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  path = str(tmp_path / "broken.safetensors")
  save_file(state, path)
  with pytest.raises(merge.CheckpointMismatchError) as error:
    load(path)
  message = str(error.value)
  assert path in message
  assert "batch_stats/mixed6/Mixed_6c/branch7x7dbl_4/bn/var" in message
  assert "Mixed_8a.branch1x1.conv.weight" in message


def test_smallest_input():
  module, shapes = module_and_shapes()
  template = zeros_of(shapes)
  out = jax.eval_shape(module.apply, template, jax.ShapeDtypeStruct((1, SIZE, SIZE, 3),
                                                                     jnp.float32))
  assert out.shape == (1, NUM_CLASSES)
  with pytest.raises(ValueError, match="at least 75x75"):
    jax.eval_shape(module.apply, template, jax.ShapeDtypeStruct((1, 74, 74, 3), jnp.float32))


def test_registry_metadata():
  entry = registry.get_entry("inception_v3")
  assert entry.default_tag == "tv_in1k"
  cfg = entry.default_cfg
  assert cfg.hf_hub_id == "timm/inception_v3.tv_in1k"
  assert (cfg.image_size, cfg.crop_pct, cfg.interpolation) == (299, 0.875, "bicubic")
  # timm feeds torchvision's weights [-1, 1] pixels instead of using transform_input.
  assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5)
  assert set(entry.converters) == {"timm", "torchvision"}
