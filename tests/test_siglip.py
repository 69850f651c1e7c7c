"""SigLIP image towers: pooled features equal to timm's, transformers' and (through timm) a
big_vision file's, at the native size and with resampled position embeddings; feature
checkpoints that always get a new head; class-token checkpoints refused with one error."""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

import jtl
from helpers import FIXTURES, fixture_input
from jtl import params as P
from jtl.models import registry, siglip
from jtl.weights import convert_siglip
from jtl.weights.merge import CheckpointMismatchError

# The sizes of tests/fixtures/make_siglip.py's towers, as overrides of a registered architecture.
TINY = dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64)
ARCH = "vit_base_patch16_siglip_224"
TIMM_FILE = os.path.join(FIXTURES, "siglip_timm_tiny.safetensors")
BIG_VISION_FILE = os.path.join(FIXTURES, "siglip_bv_tiny.npz")


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
  """At 32 px as timm computes them; at 64 px as timm after its own bicubic resampling."""
  model = jtl.create_model(ARCH, pretrained=TIMM_FILE, image_size=size, **TINY)
  reference = np.load(os.path.join(FIXTURES, "siglip_timm_tiny.npz"))
  assert model.module.mlp_activation == "gelu"  # timm's B/16 runs the exact GELU
  assert model.variables["params"]["embed"]["pos_embedding"].shape == (1, (size // 8) ** 2, 32)
  assert_features_close(pooled(model, size), reference[f"eval_{size}"])


def test_open_clip_file_of_a_timm_tower(tmp_path):
  """open_clip keeps timm's tower under "visual.trunk." beside its text tower."""
  state = {f"visual.trunk.{k}": v for k, v in load_file(TIMM_FILE).items()}
  state["text.token_embedding.weight"] = np.zeros((10, 32), np.float32)
  path = str(tmp_path / "open_clip_model.safetensors")
  save_file(state, path)
  model = jtl.create_model(ARCH, pretrained=path, image_size=32, **TINY)
  reference = np.load(os.path.join(FIXTURES, "siglip_timm_tiny.npz"))
  assert_features_close(pooled(model, 32), reference["eval_32"])


@pytest.mark.parametrize("size", [32, 64])
def test_big_vision_npz_gives_its_features(size):
  """A big_vision two-tower file (scanned blocks, MAPHead_0, a text tower beside it) with
  big_vision's tanh GELU; at 64 px resampled linearly as big_vision's resample_posemb does."""
  model = jtl.create_model(ARCH, pretrained=BIG_VISION_FILE, image_size=size,
                           mlp_activation="gelu_tanh", **TINY)
  reference = np.load(os.path.join(FIXTURES, "siglip_bv_tiny_expected.npz"))
  assert_features_close(pooled(model, size), reference[f"eval_{size}"])


@pytest.mark.parametrize("size", [32, 64])
def test_transformers_directory_gives_its_features(size):
  """A SiglipVisionModel directory: sizes, epsilon and tanh GELU from config.json, the MAP
  head's fused in_proj split; at 64 px as interpolate_pos_encoding=True."""
  model = jtl.create_model(os.path.join(FIXTURES, "siglip_hf_tiny"), image_size=size)
  module = model.module
  assert (module.width, module.depth, module.num_heads, module.mlp_dim, module.patch_size,
          module.image_size) == (32, 2, 2, 64, 8, size)
  assert (module.layer_norm_epsilon, module.mlp_activation) == (1e-6, "gelu_tanh")
  reference = np.load(os.path.join(FIXTURES, "siglip_hf_tiny.npz"))
  assert_features_close(pooled(model, size), reference[f"eval_{size}"])


def test_transformers_two_tower_directory():
  """A SiglipModel (model_type "siglip"): the tower from config.vision_config, the weights
  under vision_model., the text tower and logit scale/bias left alone."""
  model = jtl.create_model(os.path.join(FIXTURES, "siglip_hf_pair_tiny"))
  reference = np.load(os.path.join(FIXTURES, "siglip_hf_tiny.npz"))
  assert_features_close(pooled(model, 32), reference["pair_32"])


def test_resampling_follows_each_library():
  """transformers: torch's bicubic (a=-0.75, no antialiasing); big_vision: scipy's linear zoom."""
  reference = np.load(os.path.join(FIXTURES, "siglip_resample.npz"))
  for layout in ("hf", "big_vision"):
    for side in (6, 3):
      resampled = convert_siglip.RESAMPLING[layout](reference["posemb_4x4"], (side, side), 0)
      np.testing.assert_allclose(resampled, reference[f"{layout}_{side}x{side}"], atol=1e-6)


def test_features_checkpoint_gets_a_new_head_for_classes():
  """The weights have no classifier: num_classes=0 by default (a head of zero outputs) and
  any number of classes a new head, every other tensor the checkpoint's."""
  features = jtl.create_model(ARCH, pretrained=TIMM_FILE, image_size=32, **TINY)
  assert features.pretrained_cfg.num_classes == 0
  assert features.predict(fixture_input(32)).shape == (2, 0)
  model = jtl.create_model(ARCH, pretrained=TIMM_FILE, image_size=32, num_classes=3, **TINY)
  assert model.pretrained_cfg.num_classes == 3
  assert model.predict(fixture_input(32)).shape == (2, 3)
  trained, loaded = P.flatten(model.variables), P.flatten(features.variables)
  assert trained["params/head/kernel"].shape == (32, 3)
  for name, value in loaded.items():
    if not name.startswith("params/head/"):
      np.testing.assert_array_equal(trained[name], value, err_msg=name)


def test_stages_end_in_the_pooled_vector():
  """Stages as the ViT's with the MAP head between the final norm and the head, so that a
  prefix ending at the head gives one vector per image (what the feature cache stores) and
  the head on it gives the logits."""
  model = jtl.create_model(ARCH, pretrained=TIMM_FILE, image_size=32, num_classes=3, **TINY)
  assert model.stage_names == ("embed", "block0", "block1", "norm", "pool", "head")
  assert not getattr(model.module, "head_pools_globally", False)
  head = len(model.stage_names) - 1
  vectors = pooled(model, 32)
  assert vectors.shape == (2, 32)
  logits = model.module.apply(model.variables, vectors, start_stage=head)
  np.testing.assert_allclose(logits, model.predict(fixture_input(32)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", [os.path.join(FIXTURES, "vit_timm_tiny.safetensors"),
                                  os.path.join(FIXTURES, "clip_timm_tiny.safetensors")])
def test_class_token_checkpoint_is_one_error(path):
  """A ViT or CLIP file into SigLIP: one error naming the file, the model and the class token."""
  with pytest.raises(CheckpointMismatchError) as error:
    jtl.create_model(ARCH, pretrained=path, image_size=32, **TINY)
  message = str(error.value)
  assert path in message and "cls_token" in message and "SigLIP" in message
  assert "a class token" in message


def test_vit_refuses_a_big_vision_siglip_tower():
  with pytest.raises(CheckpointMismatchError, match="SigLIP.*siglip"):
    jtl.create_model("vit_tiny_patch16_224", pretrained=BIG_VISION_FILE, image_size=32,
                     patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64)


def test_registry_metadata():
  entry = registry.get_entry(ARCH)
  assert entry.family == "siglip" and entry.default_tag == "v2_webli"
  cfg = entry.pretrained["webli"]
  assert cfg.hf_hub_id == "timm/vit_base_patch16_siglip_224.webli" and cfg.layout == "timm"
  assert (cfg.num_classes, cfg.image_size, cfg.crop_pct, cfg.interpolation, cfg.mean,
          cfg.std) == (0, 224, 1.0, "bicubic", (0.5,) * 3, (0.5,) * 3)
  # timm's activation per architecture: SigLIP 2's new ones the tanh form.
  for arch, activation in (("vit_so400m_patch14_siglip_224", "gelu"),
                           ("vit_so400m_patch16_siglip_384", "gelu_tanh"),
                           ("vit_large_patch16_siglip_512", "gelu_tanh")):
    assert registry.get_entry(arch).build(num_classes=0).mlp_activation == activation
  assert registry.get_entry("vit_so400m_patch14_siglip_384").pretrained["webli"].image_size == 384


@pytest.mark.parametrize("arch", ["vit_base_patch16_siglip_224", "vit_so400m_patch14_siglip_384"])
def test_parameter_count_is_timms(arch):
  """timm's count without a classifier (MAP head included); so400m/14 at 384 px drops the
  6 pixels past its 27 whole patches, as timm does. tests/test_models.py checks every arch."""
  entry = registry.get_entry(arch)
  module = entry.build(num_classes=entry.default_cfg.num_classes)
  size = module.image_size
  shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  assert P.count(shapes["params"]) == entry.published_params
  assert set(shapes["params"]) == set(module.stage_names)


def test_transformers_configs_that_do_not_fit(tmp_path):
  vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, image_size=32, patch_size=8)
  with pytest.raises(ValueError, match="vision_use_head"):
    siglip.from_hf_config(transformers.SiglipVisionConfig(vision_use_head=False, **vision))
  with pytest.raises(ValueError, match="hidden_act='relu'"):
    siglip.from_hf_config(transformers.SiglipVisionConfig(hidden_act="relu", **vision))
  build, cfg, _ = siglip.from_hf_config(transformers.SiglipVisionConfig(**vision), image_size=64)
  assert build(num_classes=0).image_size == 64 and cfg.layout == "hf" and cfg.num_classes == 0
  with open(os.path.join(FIXTURES, "siglip_hf_tiny", "config.json")) as f:
    assert json.load(f)["model_type"] == "siglip_vision_model"


def test_eval_resize_squashes_the_whole_image_as_transformers_processor():
  """SigLIP's weights are evaluated on the whole image stretched to the square: a 2:1 image
  through the registered preprocessing equals transformers' SiglipImageProcessor (PIL) within
  one pixel level, where a centre crop would drop a quarter of the image on each side."""
  import io

  from PIL import Image

  from jtl.data.preprocess import Preprocess, load_eval_image
  y, x = np.mgrid[0:60, 0:120]
  pixels = np.stack([x * 2, y * 4, x + y], -1).astype(np.uint8)
  encoded = io.BytesIO()
  Image.fromarray(pixels).save(encoded, "PNG")
  cfg = registry.get_entry(ARCH).default_cfg
  assert cfg.crop_mode == "squash"
  pp = Preprocess.from_pretrained_cfg(cfg, image_size=32)
  ours = load_eval_image(encoded.getvalue(), pp)
  processor = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
  reference = processor(Image.fromarray(pixels), return_tensors="np")["pixel_values"][0]
  one_level = 2 / 255  # (x / 255 - 0.5) / 0.5
  assert np.abs(ours - reference.transpose(1, 2, 0)).max() <= one_level + 1e-6
  centre = load_eval_image(encoded.getvalue(), dataclasses.replace(pp, crop_mode="center"))
  assert np.abs(centre - reference.transpose(1, 2, 0)).max() > 0.25
