"""ResNet: logits equal to timm's and transformers', converters that round-trip bit for bit."""
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import save_file

import jtl
from helpers import (FIXTURES, TORCH_LEAVES, assert_logits_close, assert_same_variables,
                     fixture_input, random_variables, torch_layout)
from jtl import params as P
from jtl.models import registry, resnet  # noqa: F401  (registers the resnets)
from jtl.weights import merge
from jtl.weights.merge import CheckpointMismatchError
from torch_writer import save_zip

# Tiny versions of the registered architectures (the 64-wide stem kept, like timm's fixture).
TINY_BASIC = dict(depths=(1, 1, 1, 1), widths=(8, 16, 16, 24))
TINY_BOTTLENECK = dict(depths=(1, 2, 1, 1), widths=(16, 24, 32, 40), stem_width=8)


def train_logits(model, x):
  """Logits with BatchNorm on batch statistics (jitted: op-by-op dispatch is slower here)."""
  apply = jax.jit(functools.partial(model.module.apply, train=True, mutable=["batch_stats"]))
  return apply(model.variables, jnp.asarray(x))[0]


def test_transformers_fixture_resnet_v1_with_strided_first_stage():
  """A transformers save_pretrained directory: config read by AutoConfig, logits equal."""
  model = jtl.create_model(os.path.join(FIXTURES, "resnet_hf_tiny"), image_size=32)
  reference = np.load(os.path.join(FIXTURES, "resnet_hf_tiny.npz"))
  assert model.module.stride_in_1x1 and model.module.first_stage_stride == 2
  assert model.pretrained_cfg.label_names == tuple(f"class_{i}" for i in range(5))
  for size in (32, 64):
    assert_logits_close(model.predict(fixture_input(size)), reference[f"eval_{size}"])
  assert_logits_close(train_logits(model, fixture_input(64)), reference["train_64"])


def test_timm_fixture_basic_blocks():
  model = jtl.create_model("resnet18", pretrained=os.path.join(FIXTURES,
                                                               "resnet_timm_tiny.safetensors"),
                           image_size=32, **TINY_BASIC)
  reference = np.load(os.path.join(FIXTURES, "resnet_timm_tiny.npz"))
  assert model.pretrained_cfg.num_classes == 6
  for size in (32, 64):
    assert_logits_close(model.predict(fixture_input(size)), reference[f"eval_{size}"])
  assert_logits_close(train_logits(model, fixture_input(64)), reference["train_64"])


# Our flat names -> each layout's, with the tensor transposed back to torch's order.
TORCH_NAMES = [
    (r"stem/conv", "conv1"), (r"stem/bn", "bn1"), (r"head", "fc"),
    (r"stage(\d)/block(\d+)/conv(\d)", r"layer\1.\2.conv\3"),
    (r"stage(\d)/block(\d+)/bn(\d)", r"layer\1.\2.bn\3"),
    (r"stage(\d)/block(\d+)/shortcut_conv", r"layer\1.\2.downsample.0"),
    (r"stage(\d)/block(\d+)/shortcut_bn", r"layer\1.\2.downsample.1"),
]
HF_NAMES = [
    (r"stem/conv", "resnet.embedder.embedder.convolution"),
    (r"stem/bn", "resnet.embedder.embedder.normalization"), (r"head", "classifier.1"),
    (r"stage(\d)/block(\d+)/conv(\d)", lambda m: f"resnet.encoder.stages.{int(m[1]) - 1}."
                                                 f"layers.{m[2]}.layer.{int(m[3]) - 1}.convolution"),
    (r"stage(\d)/block(\d+)/bn(\d)", lambda m: f"resnet.encoder.stages.{int(m[1]) - 1}."
                                               f"layers.{m[2]}.layer.{int(m[3]) - 1}.normalization"),
    (r"stage(\d)/block(\d+)/shortcut_conv",
     lambda m: f"resnet.encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.convolution"),
    (r"stage(\d)/block(\d+)/shortcut_bn",
     lambda m: f"resnet.encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.normalization"),
]


def to_torch_layout(variables, names) -> dict[str, np.ndarray]:
  """Our variables as a torch state dict of the layout `names` describes."""
  state = {}
  for flat, value in P.flatten(variables).items():
    collection, *path, leaf = flat.split("/")
    module_path = "/".join(path)
    for pattern, replacement in names:
      if re.fullmatch(pattern, module_path):
        module = re.sub(pattern, replacement, module_path)
        break
    else:
      raise AssertionError(f"no torch name for {flat}")
    state[f"{module}.{TORCH_LEAVES[f'{collection}/{leaf}']}"] = torch_layout(value)
    if leaf == "mean":
      state[f"{module}.num_batches_tracked"] = np.array(7, np.int64)
  return state


@pytest.mark.parametrize("arch, tiny, names, writer, suffix", [
    ("resnet34", TINY_BASIC, TORCH_NAMES, save_zip, ".pth"),
    ("resnet50", TINY_BOTTLENECK, HF_NAMES, save_file, ".safetensors"),
])
def test_round_trip(tmp_path, arch, tiny, names, writer, suffix):
  """A checkpoint written in a layout loads back bit-identical; the layout is detected."""
  variables = random_variables(arch, **tiny)
  path = str(tmp_path / f"ckpt{suffix}")
  writer(to_torch_layout(variables, names), path)
  loaded = jtl.create_model(arch, pretrained=path, image_size=32, **tiny)
  assert_same_variables(loaded.variables, variables)


def test_transformers_directory_with_basic_blocks(tmp_path):
  """from_config reads depths, hidden_sizes, embedding_size, layer_type and the labels."""
  config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 24],
                                     depths=[1, 2, 1, 1], layer_type="basic", num_labels=3,
                                     id2label={0: "cat", 1: "dog", 2: "owl"},
                                     label2id={"cat": 0, "dog": 1, "owl": 2})
  config.save_pretrained(str(tmp_path))
  tiny = dict(depths=(1, 2, 1, 1), widths=(8, 16, 16, 24), stem_width=8)
  variables = random_variables("resnet18", seed=1, num_classes=3, **tiny)
  save_file(to_torch_layout(variables, HF_NAMES), str(tmp_path / "model.safetensors"))
  loaded = jtl.create_model(str(tmp_path), image_size=32)
  assert loaded.module.block == "basic" and not loaded.module.stride_in_1x1
  assert loaded.pretrained_cfg.label_names == ("cat", "dog", "owl")
  assert_same_variables(loaded.variables, variables)


def test_torch_bottlenecks_into_a_new_head(tmp_path):
  """Another number of classes: the backbone loads bit-identical, the head is new."""
  variables = random_variables("resnet50", **TINY_BOTTLENECK)
  path = str(tmp_path / "ckpt.bin")
  save_zip(to_torch_layout(variables, TORCH_NAMES), path)
  loaded = jtl.create_model("resnet50", pretrained=path, num_classes=4, image_size=32,
                            **TINY_BOTTLENECK)
  assert loaded.variables["params"]["head"]["kernel"].shape == (40, 4)
  del variables["params"]["head"], loaded.variables["params"]["head"]
  assert_same_variables(loaded.variables, variables)


def test_missing_and_unknown_tensors_are_named(tmp_path):
  module = registry.get_entry("resnet50").build(num_classes=7, **TINY_BOTTLENECK)
  state = to_torch_layout(random_variables("resnet50", **TINY_BOTTLENECK), TORCH_NAMES)
  del state["layer2.1.bn2.running_var"]
  state["layer2.1.se.fc.weight"] = np.zeros((2, 2), np.float32)
  converted = resnet.CONVERTERS["timm"](state, module)
  with pytest.raises(CheckpointMismatchError) as error:
    merge.merge(random_variables("resnet50", **TINY_BOTTLENECK), converted, source="ckpt.pth")
  message = str(error.value)
  assert "ckpt.pth" in message
  assert "batch_stats/stage2/block1/bn2/var" in message and "layer2.1.se.fc.weight" in message


def test_stride_placement():
  """v1.5 strides the 3x3 convolution, v1 the first 1x1; the shortcut always strides."""
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  for stride_in_1x1 in (False, True):
    module = registry.get_entry("resnet50").build(num_classes=7, stride_in_1x1=stride_in_1x1,
                                                  **TINY_BOTTLENECK)
    init = functools.partial(module.init, train=False, capture_intermediates=True)
    block = jax.eval_shape(init, jax.random.PRNGKey(0), x)["intermediates"]["stage2"]["block0"]
    sides = {name: block[name]["__call__"][0].shape[1]
             for name in ("conv1", "conv2", "shortcut_conv")}
    # 32 px: the stem leaves 8, stage1 keeps it, stage2's first block halves it.
    assert sides == ({"conv1": 4, "conv2": 4, "shortcut_conv": 4} if stride_in_1x1 else
                     {"conv1": 8, "conv2": 4, "shortcut_conv": 4})


def test_registry_metadata():
  entry = registry.get_entry("resnet50")
  assert entry.default_tag == "tv_in1k"
  assert entry.pretrained["tv_in1k"].hf_hub_id == "timm/resnet50.tv_in1k"
  a1 = entry.pretrained["a1_in1k"]
  assert (a1.crop_pct, a1.interpolation) == (0.95, "bicubic")
  assert entry.pretrained["tv2_in1k"].crop_pct == 0.965
  assert "tv2_in1k" not in registry.get_entry("resnet18").pretrained
