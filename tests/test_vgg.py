"""VGG: torchvision's logits (adaptive 7x7 pooling, NCHW flatten) and bit-exact converters."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import jtl
from helpers import FIXTURES, assert_same_variables, fixture_input, random_variables
from jtl import params as P
from jtl.models import registry, vgg
from jtl.weights import convert_vgg
from torch_writer import save_zip

# tests/fixtures/make_vgg.py's torchvision configuration: [8, M, 8, 8, M, 16, M, 16, M, 16, 16, M].
TINY = dict(stage_channels=((8,), (8, 8), (16,), (16,), (16, 16)), fc_width=16)


def test_torchvision_fixture_at_three_input_sizes():
  """32, 96 and 288 px leave 1x1, 3x3 and 9x9 maps for the 7x7 adaptive pooling."""
  model = jtl.create_model("vgg11_bn", pretrained=os.path.join(FIXTURES,
                                                               "vgg_tv_tiny_bn.safetensors"),
                           image_size=32, **TINY)
  reference = np.load(os.path.join(FIXTURES, "vgg_tv_tiny_bn.npz"))
  assert model.pretrained_cfg.num_classes == 6
  for size in (32, 96, 288):
    want = reference[f"eval_{size}"]
    np.testing.assert_allclose(np.asarray(model.predict(fixture_input(size))), want,
                               rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=f"{size} px")


def reference_adaptive_pool(x: np.ndarray, out: int) -> np.ndarray:
  """PyTorch's definition, loop by loop: bin i spans [floor(i*n/out), ceil((i+1)*n/out))."""
  _, height, width, _ = x.shape
  result = np.zeros((x.shape[0], out, out, x.shape[3]), np.float64)
  for i in range(out):
    rows = slice(math.floor(i * height / out), math.ceil((i + 1) * height / out))
    for j in range(out):
      cols = slice(math.floor(j * width / out), math.ceil((j + 1) * width / out))
      result[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))
  return result


@pytest.mark.parametrize("height, width", [(1, 1), (2, 5), (3, 3), (6, 8), (7, 7), (9, 9),
                                           (10, 13), (14, 14), (15, 22)])
def test_adaptive_pool_matches_numpy_reference(height, width):
  x = np.random.default_rng(height * 100 + width).standard_normal((2, height, width, 3))
  got = np.asarray(vgg.adaptive_avg_pool(jnp.asarray(x, jnp.float32), 7))
  np.testing.assert_allclose(got, reference_adaptive_pool(x, 7), rtol=1e-5, atol=1e-6)


def test_fc6_kernel_reads_nhwc_flatten_like_torch_reads_nchw():
  rng = np.random.default_rng(0)
  channels, out = 5, 4
  pooled = rng.standard_normal((2, 7, 7, channels)).astype(np.float32)   # NHWC
  linear = rng.standard_normal((out, channels * 49)).astype(np.float32)   # torchvision fc6
  torch_result = pooled.transpose(0, 3, 1, 2).reshape(2, -1) @ linear.T
  ours = pooled.reshape(2, -1) @ convert_vgg.fc6_kernel(linear, 7)
  np.testing.assert_allclose(ours, torch_result, rtol=1e-5)
  # timm's fc6 is the same weight as a 7x7 convolution.
  np.testing.assert_array_equal(convert_vgg.fc6_kernel(linear.reshape(out, channels, 7, 7), 7),
                                convert_vgg.fc6_kernel(linear, 7))
  # A plain transpose would read the wrong features: the permutation is needed.
  assert not np.allclose(pooled.reshape(2, -1) @ linear.T, torch_result, rtol=1e-3)


def features_indices(stage_channels, batch_norm):
  """torchvision make_layers' Sequential indices: (conv, BN or None) per convolution."""
  layers = [c for stage in stage_channels for c in (*stage, "M")]
  index, found = 0, []
  for layer in layers:
    if layer == "M":
      index += 1
      continue
    found.append((index, index + 1 if batch_norm else None))
    index += 3 if batch_norm else 2
  return found


def to_source_layout(variables, stage_channels, batch_norm, layout) -> dict[str, np.ndarray]:
  """Our tiny VGG variables as a torchvision or timm state dict."""
  flat = P.flatten(variables)
  ours = [f"stage{s}/conv{k}" for s, stage in enumerate(stage_channels, 1)
          for k in range(1, len(stage) + 1)]
  state = {}
  for name, (conv, norm) in zip(ours, features_indices(stage_channels, batch_norm)):
    state[f"features.{conv}.weight"] = flat[f"params/{name}/kernel"].transpose(3, 2, 0, 1)
    state[f"features.{conv}.bias"] = flat[f"params/{name}/bias"]
    if norm is not None:
      bn = name.replace("conv", "bn")
      state[f"features.{norm}.weight"] = flat[f"params/{bn}/scale"]
      state[f"features.{norm}.bias"] = flat[f"params/{bn}/bias"]
      state[f"features.{norm}.running_mean"] = flat[f"batch_stats/{bn}/mean"]
      state[f"features.{norm}.running_var"] = flat[f"batch_stats/{bn}/var"]
      state[f"features.{norm}.num_batches_tracked"] = np.array(3, np.int64)
  fc6 = flat["params/classifier/fc6/kernel"]         # (7*7*C, O), rows in (h, w, c) order
  channels = stage_channels[-1][-1]
  fc6 = fc6.reshape(7, 7, channels, -1).transpose(3, 2, 0, 1)   # (O, C, 7, 7)
  fc7 = flat["params/classifier/fc7/kernel"].T
  if layout == "torchvision":
    names = ("classifier.0", "classifier.3", "classifier.6")
    fc6 = fc6.reshape(fc6.shape[0], -1)
  else:
    names = ("pre_logits.fc1", "pre_logits.fc2", "head.fc")
    fc7 = fc7[:, :, None, None]
  for src, weight, bias in zip(names, (fc6, fc7, flat["params/head/kernel"].T),
                               ("classifier/fc6", "classifier/fc7", "head")):
    state[f"{src}.weight"] = weight
    state[f"{src}.bias"] = flat[f"params/{bias}/bias"]
  return {k: np.ascontiguousarray(v) for k, v in state.items()}


@pytest.mark.parametrize("arch, layout, writer, suffix", [
    ("vgg13", "torchvision", save_zip, ".pth"),
    ("vgg16_bn", "timm", save_file, ".safetensors"),
])
def test_round_trip(tmp_path, arch, layout, writer, suffix):
  """A checkpoint in either layout loads back bit-identical; the layout is detected."""
  variables = random_variables(arch, num_classes=5, **TINY)
  batch_norm = arch.endswith("_bn")
  path = str(tmp_path / f"ckpt{suffix}")
  writer(to_source_layout(variables, TINY["stage_channels"], batch_norm, layout), path)
  loaded = jtl.create_model(arch, pretrained=path, image_size=32, **TINY)
  assert_same_variables(loaded.variables, variables)

  # Dropout runs only in a classifier that trains, and only with the "dropout" rng.
  x = jnp.asarray(fixture_input(32))
  module = loaded.module
  apply = jax.jit(module.apply, static_argnames=("train", "frozen_stages"))
  frozen = apply(loaded.variables, x, train=True, frozen_stages=len(module.stage_names) - 1)
  np.testing.assert_allclose(np.asarray(frozen), np.asarray(loaded.predict(x)), rtol=1e-4,
                             atol=1e-5)
  dropped = [apply(loaded.variables, x, train=True, frozen_stages=5,
                   rngs={"dropout": jax.random.PRNGKey(seed)}) for seed in (0, 1)]
  assert not np.allclose(np.asarray(dropped[0]), np.asarray(dropped[1]))


def test_registry_metadata():
  entry = registry.get_entry("vgg16_bn")
  assert entry.default_tag == "tv_in1k"
  assert entry.pretrained["tv_in1k"].hf_hub_id == "timm/vgg16_bn.tv_in1k"
  assert entry.pretrained["tv_in1k"].layout == "timm"
  assert entry.build(num_classes=3).stage_names == (
      "stage1", "stage2", "stage3", "stage4", "stage5", "classifier", "head")
