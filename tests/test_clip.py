"""CLIP image towers: projected class tokens equal to timm's, open_clip's and transformers', at
the native size and with resampled position embeddings; the projection before a new head."""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jtl
from helpers import FIXTURES, fixture_input
from jtl import params as P
from jtl.models import clip, registry
from jtl.weights import files
from jtl.weights.merge import CheckpointMismatchError

# The sizes of tests/fixtures/make_clip.py's towers, as overrides of a registered architecture.
TINY = dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, projection_dim=16)
TIMM_FILE = os.path.join(FIXTURES, "clip_timm_tiny.safetensors")
OPEN_CLIP_FILE = os.path.join(FIXTURES, "clip_open_clip_tiny.bin")


def assert_features_close(ours, reference):
  """Within 1e-5 of the reference, relative to its largest magnitude."""
  ours, reference = np.asarray(ours), np.asarray(reference)
  assert ours.shape == reference.shape
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


@functools.lru_cache(maxsize=None)
def _tower(module):
  return jax.jit(functools.partial(module.apply, stop_stage=len(module.stage_names) - 1))


def pooled(model, size):
  """The tower's output for fixture_input(size): every stage but the head."""
  return _tower(model.module)(model.variables, fixture_input(size))


@pytest.mark.parametrize("size", [32, 64])
def test_timm_file_gives_timm_features(size):
  """LAION-style (exact GELU) tower whose timm head is the projection; at 64 px as timm after
  its own bicubic resampling."""
  model = jtl.create_model("vit_base_patch16_clip_224", pretrained=TIMM_FILE, image_size=size,
                           **TINY)
  assert model.module.mlp_activation == "gelu"
  reference = np.load(os.path.join(FIXTURES, "clip_timm_tiny.npz"))
  assert_features_close(pooled(model, size), reference[f"eval_{size}"])


@pytest.mark.parametrize("size", [32, 64])
def test_open_clip_file_gives_open_clip_features(size):
  """A whole open_clip CLIP in a torch file (text tower beside it), QuickGELU as OpenAI's;
  at 64 px as open_clip's resize_pos_embed."""
  model = jtl.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=OPEN_CLIP_FILE,
                           image_size=size, **TINY)
  assert model.module.mlp_activation == "quick_gelu"
  reference = np.load(os.path.join(FIXTURES, "clip_open_clip_tiny.npz"))
  assert_features_close(pooled(model, size), reference[f"eval_{size}"])


def test_timm_layout_reads_open_clip_files():
  """As timm's checkpoint_filter_fn: an open_clip file is converted as open_clip's."""
  entry = registry.get_entry("vit_base_patch16_clip_quickgelu_224")
  module = entry.build(num_classes=0, image_size=32, **TINY)
  state = files.read_state_dict(OPEN_CLIP_FILE)
  by_timm = entry.converters["timm"](state, module)
  by_open_clip = entry.converters["open_clip"](state, module)
  assert sorted(by_timm) == sorted(by_open_clip)
  assert all(np.array_equal(by_timm[k], by_open_clip[k]) for k in by_timm)


@pytest.mark.parametrize("size", [32, 64])
def test_transformers_directory_gives_its_features(size):
  """A CLIPVisionModelWithProjection directory: sizes, epsilon, QuickGELU and the projection
  from config.json; at 64 px as interpolate_pos_encoding=True."""
  model = jtl.create_model(os.path.join(FIXTURES, "clip_hf_tiny"), image_size=size)
  module = model.module
  assert (module.width, module.depth, module.num_heads, module.mlp_dim, module.projection_dim,
          module.patch_size, module.image_size) == (32, 2, 2, 64, 16, 8, size)
  assert (module.layer_norm_epsilon, module.mlp_activation) == (1e-5, "quick_gelu")
  reference = np.load(os.path.join(FIXTURES, "clip_hf_tiny.npz"))
  assert_features_close(pooled(model, size), reference[f"eval_{size}"])


def test_transformers_two_tower_directory():
  """A CLIPModel (model_type "clip", exact GELU): get_image_features."""
  model = jtl.create_model(os.path.join(FIXTURES, "clip_hf_pair_tiny"))
  assert model.module.mlp_activation == "gelu"
  reference = np.load(os.path.join(FIXTURES, "clip_hf_tiny.npz"))
  assert_features_close(pooled(model, 32), reference["pair_32"])


def test_transformers_tower_without_projection(tmp_path):
  """A CLIPVisionModel (no visual_projection): no "proj" stage, features its pooler output."""
  directory = tmp_path / "clip_vision"
  shutil.copytree(os.path.join(FIXTURES, "clip_hf_tiny"), directory)
  with open(directory / "config.json") as f:
    config = json.load(f)
  config["architectures"] = ["CLIPVisionModel"]
  with open(directory / "config.json", "w") as f:
    json.dump(config, f)
  state = load_file(str(directory / "model.safetensors"))
  del state["visual_projection.weight"]
  save_file(state, str(directory / "model.safetensors"))
  model = jtl.create_model(str(directory))
  assert model.stage_names[-2:] == ("norm", "head") and model.module.projection_dim is None
  reference = np.load(os.path.join(FIXTURES, "clip_hf_tiny.npz"))
  assert_features_close(pooled(model, 32), reference["pooled_32"])


def test_projected_feature_gets_a_new_head():
  """Stages as the ViT's with the projection before the head: a prefix ending at the head
  gives the CLIP embedding (what the feature cache stores); classes get a new head on it."""
  model = jtl.create_model("vit_base_patch16_clip_224", pretrained=TIMM_FILE, image_size=32,
                           num_classes=3, **TINY)
  assert model.stage_names == ("embed", "block0", "block1", "norm", "proj", "head")
  assert model.pretrained_cfg.num_classes == 3
  assert model.variables["params"]["head"]["kernel"].shape == (16, 3)
  vectors = pooled(model, 32)
  reference = np.load(os.path.join(FIXTURES, "clip_timm_tiny.npz"))
  assert_features_close(vectors, reference["eval_32"])
  logits = model.module.apply(model.variables, vectors, start_stage=len(model.stage_names) - 1)
  np.testing.assert_allclose(logits, model.predict(fixture_input(32)), rtol=1e-6, atol=1e-6)
  features = jtl.create_model("vit_base_patch16_clip_224", pretrained=TIMM_FILE, image_size=32,
                              **TINY)
  assert features.pretrained_cfg.num_classes == 0
  assert P.count(features.variables["params"]["head"]) == 0


def test_timm_head_with_a_bias_is_not_a_projection(tmp_path):
  state = load_file(TIMM_FILE)
  state["head.bias"] = np.full_like(state["head.bias"], 0.5)
  path = str(tmp_path / "classifier.safetensors")
  save_file(state, path)
  with pytest.raises(CheckpointMismatchError) as error:
    jtl.create_model("vit_base_patch16_clip_224", pretrained=path, image_size=32, **TINY)
  assert path in str(error.value) and "head.bias (not zero" in str(error.value)


def test_registry_metadata():
  openai = registry.get_entry("vit_base_patch16_clip_quickgelu_224")
  assert openai.family == "clip" and openai.default_tag == "openai"
  cfg = openai.pretrained["openai"]
  assert cfg.hf_hub_id == "timm/vit_base_patch16_clip_224.openai" and cfg.layout == "timm"
  assert (cfg.num_classes, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std) == (
      0, 1.0, "bicubic", clip.CLIP_MEAN, clip.CLIP_STD)
  assert openai.build(num_classes=0).mlp_activation == "quick_gelu"
  laion = registry.get_entry("vit_large_patch14_clip_224")
  assert laion.build(num_classes=0).mlp_activation == "gelu"
  assert laion.pretrained["laion2b"].mean == (0.5,) * 3  # LAION's L/14 trained on [-1, 1]
  assert "openai" not in laion.pretrained  # OpenAI's weights only on QuickGELU architectures
  assert registry.get_entry("vit_large_patch14_clip_quickgelu_336").default_cfg.image_size == 336


@pytest.mark.parametrize("arch", ["vit_base_patch32_clip_quickgelu_224",
                                  "vit_large_patch14_clip_quickgelu_336"])
def test_parameter_count_is_open_clips(arch):
  """open_clip's image tower with its projection (timm's num_classes=0 count plus the
  projection). tests/test_models.py checks every architecture."""
  entry = registry.get_entry(arch)
  module = entry.build(num_classes=entry.default_cfg.num_classes)
  size = module.image_size
  shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  assert P.count(shapes["params"]) == entry.published_params
  assert set(shapes["params"]) == set(module.stage_names)
