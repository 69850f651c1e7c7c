"""ConvNeXt V1 / V2: logits equal to timm's, Meta's names (through timm's filter), torchvision's
and transformers', foreign checkpoints refused, freezing by stage names."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import jtl
from helpers import FIXTURES, fixture_input, variable_shapes, zeros_of
from jtl import optim
from jtl.models import common, convnext, registry
from jtl.weights import convert_convnext
from jtl.weights.merge import CheckpointMismatchError

# The sizes of tests/fixtures/make_convnext.py's models, as overrides of a registered
# architecture; every fixture of one version then builds one module, compiled once per size.
TINY = dict(depths=(1, 1, 2, 1), widths=(8, 16, 24, 32), image_size=32)
# (input side, CPU formulations on): the fixtures' native size and one that leaves odd maps to
# downsample. V1 runs the native size through the CPU path (depthwise taps) and the other through
# XLA's grouped convolution, the GPU / TPU path; V2's blocks hold the same depthwise layer, so
# they take the XLA path at both sizes, which compiles in half the time.
V1_SIZES = ((32, True), (56, False))
V2_SIZES = ((32, False), (56, False))


def assert_logits_match(ours, reference):
  """Within 1e-5 relative, with a floor of 1e-5 of the largest logit for those near zero."""
  ours, reference = np.asarray(ours), np.asarray(reference)
  assert ours.shape == reference.shape
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def fixture(name):
  return os.path.join(FIXTURES, name)


def load(name, **kwargs):
  """create_model; loading traces only shapes, which the XLA convolutions trace faster."""
  with common.cpu_paths(False):
    return jtl.create_model(name, **kwargs)


@functools.lru_cache(maxsize=None)
def _jitted_apply(module, cpu_path: bool):
  return jax.jit(lambda variables, x: module.apply(variables, x))


def assert_library_logits(model, reference_file):
  expected = np.load(fixture(reference_file))
  for size, cpu_path in V2_SIZES if model.module.grn else V1_SIZES:
    with common.cpu_paths(cpu_path):  # read while tracing, so one jitted function per path
      logits = _jitted_apply(model.module, cpu_path)(model.variables, fixture_input(size))
    assert_logits_match(logits, expected[f"eval_{size}"])


@pytest.mark.parametrize("arch, weights, reference", [
    ("convnext_tiny", "convnext_timm_v1.safetensors", "convnext_timm_v1.npz"),
    ("convnext_tiny", "convnext_tv.safetensors", "convnext_tv.npz"),
    ("convnextv2_atto", "convnext_timm_v2.safetensors", "convnext_timm_v2.npz"),
    ("convnextv2_atto", "convnext_meta_v2.pth", "convnext_meta_v2.npz"),
])
def test_checkpoint_file_gives_the_library_logits(arch, weights, reference):
  """timm V1, torchvision, timm V2 with 1x1-convolution MLPs, Meta's original names inside
  {"model": ...}: each layout detected from its names, logits as the library computes them."""
  model = load(arch, pretrained=fixture(weights), **TINY)
  assert model.pretrained_cfg.num_classes == 5
  assert_library_logits(model, reference)


@pytest.mark.parametrize("directory, v2", [("convnext_hf_v1", False), ("convnext_hf_v2", True)])
def test_transformers_directory_gives_the_library_logits(directory, v2):
  """A save_pretrained directory: architecture, epsilon and labels from config.json."""
  model = load(fixture(directory))
  module = model.module
  assert (tuple(module.depths), tuple(module.widths), module.image_size) == (
      TINY["depths"], TINY["widths"], 32)
  assert (module.grn, module.layer_scale) == (v2, not v2)
  assert module.head_norm_epsilon == 1e-6  # the fixture's, not transformers' default
  assert model.pretrained_cfg.label_names == tuple(f"class_{i}" for i in range(5))
  assert_library_logits(model, f"{directory}.npz")


def test_transformers_configs():
  """from_config reads both model_types, layer scale on or off, and transformers' epsilon."""
  v1 = registry.hf_arch("convnext")
  build, cfg, convert = v1(transformers.ConvNextConfig(), image_size=None)
  module = build(num_classes=cfg.num_classes)
  assert convert is convert_convnext.convert_hf
  assert (tuple(module.depths), tuple(module.widths)) == ((3, 3, 9, 3), (96, 192, 384, 768))
  assert module.layer_scale and not module.grn and module.head_norm_epsilon == 1e-12
  assert (cfg.image_size, cfg.crop_pct, cfg.interpolation) == (224, 0.875, "bicubic")
  build, _, _ = v1(transformers.ConvNextConfig(layer_scale_init_value=0.0))
  assert not build(num_classes=3).layer_scale
  build, cfg, _ = registry.hf_arch("convnextv2")(transformers.ConvNextV2Config(), image_size=384)
  module = build(num_classes=cfg.num_classes)
  assert module.grn and not module.layer_scale and cfg.crop_pct == 1.0
  with pytest.raises(ValueError, match="hidden_act"):
    v1(transformers.ConvNextConfig(hidden_act="relu"))


def test_checkpoint_of_another_family_or_version_is_refused():
  """One error naming the file, our names missing and theirs left over."""
  resnet_file = fixture("resnet_timm_tiny.safetensors")
  v1_file = fixture("convnext_timm_v1.safetensors")
  with pytest.raises(CheckpointMismatchError) as error:
    load("convnext_tiny", pretrained=resnet_file, **TINY)
  message = str(error.value)
  assert resnet_file in message and "another architecture" in message
  assert "missing from the checkpoint" in message and "not in the model" in message
  assert "params/stage1/block0/conv_dw/kernel" in message and "layer1.0.conv1.weight" in message
  # V1 weights (layer scale) into a V2 model (GRN): the difference is named, nothing else.
  with pytest.raises(CheckpointMismatchError) as error:
    load("convnextv2_atto", pretrained=v1_file, **TINY)
  message = str(error.value)
  assert v1_file in message
  assert "missing from the checkpoint (10)" in message and "not in the model (5)" in message
  assert "params/stage1/block0/grn/scale" in message
  assert "params/stage1/block0/layer_scale" in message
  assert "another architecture" not in message


def test_freezing_the_first_stages():
  """Stage names cover every parameter; freeze_depth K freezes stem..stage(K-1); the prefix the
  feature cache keeps under feature extraction is the pooled, normalised features."""
  module = registry.get_entry("convnext_tiny").build(num_classes=5, **TINY)
  assert module.stage_names == ("stem", "stage1", "stage2", "stage3", "stage4", "norm", "head")
  with common.cpu_paths(False):  # only shapes are traced; the cheaper trace
    variables = zeros_of(variable_shapes(module, 32))
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    features = jax.eval_shape(functools.partial(module.apply, stop_stage=6), variables, x)
    logits = jax.eval_shape(functools.partial(module.apply, start_stage=6), variables, features)
  assert features.shape == (2, 32) and logits.shape == (2, 5)
  params = variables["params"]
  assert set(params) == set(module.stage_names)
  plan = optim.make_freeze_plan(params, module.stage_names,
                                optim.freeze_rules("partial", module.stage_names, 3))
  assert plan.frozen_stages == 3
  for name, label in plan.labels.items():
    stage = name.split("/")[0]
    assert (label == optim.FROZEN) == (stage in ("stem", "stage1", "stage2")), name
  probe = optim.make_freeze_plan(params, module.stage_names,
                                 optim.freeze_rules("feature_extraction", module.stage_names, 0))
  assert probe.frozen_stages == len(module.stage_names) - 1  # the final norm too


def test_registry_parameter_counts_and_tags():
  """Every size registered with timm's count (tests/test_models.py's
  test_parameter_count_and_stages holds each to it through jax.eval_shape), timm's tags and
  preprocessing, torchvision's files, and V2's non-commercial licence."""
  entries = {n: e for n, e in registry.entries().items() if e.family == "convnext"}
  assert {n: e.published_params for n, e in entries.items()} == convnext.PUBLISHED_PARAMS
  assert entries["convnext_large"].published_params == 197_767_336  # torchvision's docs too

  tiny = entries["convnext_tiny"]
  assert tiny.default_tag == "in12k_ft_in1k"
  cfg = tiny.pretrained["fb_in22k_ft_in1k_384"]
  assert (cfg.hf_hub_id, cfg.layout) == ("timm/convnext_tiny.fb_in22k_ft_in1k_384", "timm")
  assert (cfg.image_size, cfg.crop_pct, cfg.interpolation) == (384, 1.0, "bicubic")
  tv = tiny.pretrained["tv_in1k"]
  assert (tv.layout, tv.hf_hub_id, tv.interpolation) == ("torchvision", None, "bilinear")
  assert int(224 / tv.crop_pct) == 236 and tv.url.endswith("convnext_tiny-983f1562.pth")
  clip = entries["convnext_base"].pretrained["clip_laion2b_augreg_ft_in12k_in1k"]
  assert (clip.image_size, clip.mean) == (256, convnext.OPENAI_CLIP_MEAN)
  assert entries["convnextv2_atto"].default_tag == "fcmae_ft_in1k"
  assert entries["convnextv2_tiny"].default_tag == "fcmae_ft_in22k_in1k"
  assert "tv_in1k" not in entries["convnextv2_tiny"].pretrained
  # Licences as timm records them, shown by `jtl models`: V2 weights are non-commercial.
  assert entries["convnextv2_base"].default_cfg.weights_license == "CC-BY-NC-4.0"
  assert entries["convnext_base"].default_cfg.weights_license == "Apache-2.0"
  assert tv.weights_license == "BSD-3-Clause"
  # timm evaluates its 384 px fine-tunes on the whole image squashed to the square.
  assert (cfg.crop_mode, tiny.pretrained["fb_in1k"].crop_mode) == ("squash", "center")
  assert entries["convnext_base"].pretrained["clip_laiona_augreg_ft_in1k_384"].crop_mode == (
      "center")
  # Stochastic depth rises linearly over the blocks, as timm's linspace.
  module = tiny.build(num_classes=5, drop_path_rate=0.4, **TINY)
  rates = [r for stage in module._drop_path_rates() for r in stage]
  assert [len(stage) for stage in module._drop_path_rates()] == list(TINY["depths"])
  assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
