"""DINOv2: pooled features and logits equal to timm's, Meta's and transformers', with and
without registers, at the fixtures' trained size and at a size each library resamples to;
converters that round-trip bit for bit; clear errors; the frozen prefix's pooled output."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import jtl
from helpers import FIXTURES, assert_same_variables, fixture_input, variable_shapes, zeros_of
from jtl import distributed, feature_cache, optim, steps
from jtl import params as P
from jtl.models import dinov2, registry
from jtl.run_record import RunRecord
from jtl.weights import convert_dinov2, files, merge
from jtl.weights.merge import CheckpointMismatchError
from torch_writer import save_zip

# tests/fixtures/make_dinov2.py's networks, as overrides of a registered architecture.
TINY = dict(width=16, depth=2, num_heads=2, mlp_dim=32, pos_grid_size=5)
NATIVE, OTHER = 70, 42
REFERENCE = os.path.join(FIXTURES, "dinov2_reference.npz")


def assert_close(ours, reference):
  """Within 1e-5 of the reference, relative to its largest value."""
  ours, reference = np.asarray(ours), np.asarray(reference)
  assert ours.shape == reference.shape
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def tiny_module(arch="vit_small_patch14_dinov2", num_classes=0, image_size=NATIVE, **overrides):
  return registry.get_entry(arch).build(num_classes=num_classes, image_size=image_size,
                                        **{**TINY, **overrides})


def random_variables(module, seed=0):
  """Every leaf random, so that a swapped or transposed tensor shows."""
  rng = np.random.default_rng(seed)
  return P.unflatten({k: rng.standard_normal(v.shape).astype(np.float32) * 0.2
                      for k, v in variable_shapes(module, module.image_size).items()})


def load(convert, path, module):
  """What create_model does once the module is built: read, convert, merge."""
  converted = convert(files.read_state_dict(path), module)
  return merge.merge(zeros_of(variable_shapes(module, module.image_size)), converted,
                     source=path)


@functools.lru_cache(maxsize=None)
def _apply(module):
  return jax.jit(lambda variables, x: module.apply(variables, x))


# --- the libraries' own numbers ---------------------------------------------------------------

@pytest.mark.parametrize("source, method", [
    ("timm", "bicubic_antialias"), ("hf", "bicubic"), ("hf_reg", "bicubic_antialias"),
    ("meta", "bicubic_offset"), ("meta_reg", "bicubic_antialias")])
def test_position_embeddings_resampled_as_each_library(source, method):
  """37x37 -> 16x16 (518 -> 224 px) and -> 39x39, as timm's resample_abs_pos_embed,
  transformers' and Meta's interpolate_pos_encoding compute it."""
  reference = np.load(REFERENCE)
  grid = reference["posemb"][0, 1:].reshape(37, 37, 2)
  for side in (16, 39):
    ours = dinov2.resample_grid(jnp.asarray(grid), (side, side), method)
    assert_close(np.asarray(ours).reshape(1, -1, 2), reference[f"resampled_{source}_{side}"][:, 1:])


@pytest.mark.parametrize("arch, fixture, key", [
    ("vit_small_patch14_dinov2", "dinov2_timm_tiny.safetensors", "timm"),
    ("vit_small_patch14_reg4_dinov2", "dinov2_timm_reg_tiny.safetensors", "timm_reg"),
    ("dinov2_vits14", "dinov2_meta_tiny.pth", "meta"),
    ("dinov2_vits14_reg", "dinov2_meta_reg_tiny.pth", "meta_reg"),
])
@pytest.mark.parametrize("size", [NATIVE, OTHER])
def test_pooled_features_equal_the_library(arch, fixture, key, size):
  """Headless weights of unknown layout: the layout is found, the head has no classes and the
  model gives the pooled features, timm's or Meta's, at 70 px and resampled at 42 px."""
  path = os.path.join(FIXTURES, fixture)
  model = jtl.create_model(arch, pretrained=path, image_size=size, **TINY)
  assert model.pretrained_cfg.num_classes == 0
  assert model.variables["params"]["head"]["kernel"].shape == (model.module.pooled_width, 0)
  assert_close(model.predict(fixture_input(size)), np.load(REFERENCE)[f"{key}_{size}"])


@pytest.mark.parametrize("directory, key, num_classes", [
    ("dinov2_hf_tiny", "hf", 5), ("dinov2_hf_reg_tiny", "hf_reg", 0)])
@pytest.mark.parametrize("size", [NATIVE, OTHER])
def test_transformers_directories(directory, key, num_classes, size):
  """Dinov2ForImageClassification's logits and Dinov2WithRegistersModel's pooled vector (class
  token and mean of the patch tokens) from save_pretrained directories."""
  model = jtl.create_model(os.path.join(FIXTURES, directory), image_size=size)
  module = model.module
  assert (module.width, module.depth, module.pos_grid_size, module.pooling) == (
      16, 2, 5, "class_mean")
  assert module.num_registers == (4 if key == "hf_reg" else 0)
  assert model.pretrained_cfg.num_classes == num_classes
  if num_classes:
    assert model.pretrained_cfg.label_names == tuple(f"class_{i}" for i in range(5))
  assert_close(model.predict(fixture_input(size)), np.load(REFERENCE)[f"{key}_{size}"])


def test_a_meta_file_in_the_timm_model_gives_metas_class_token():
  """At the trained size nothing is resampled: only the pooling differs between the two."""
  path = os.path.join(FIXTURES, "dinov2_meta_reg_tiny.pth")
  model = jtl.create_model("vit_small_patch14_reg4_dinov2", pretrained=path, image_size=NATIVE,
                           **TINY)
  assert_close(model.predict(fixture_input(NATIVE)), np.load(REFERENCE)["meta_reg_70"][:, :16])


def test_headless_weights_get_a_new_head_for_any_number_of_classes():
  path = os.path.join(FIXTURES, "dinov2_timm_tiny.safetensors")
  features = jtl.create_model("vit_small_patch14_dinov2", pretrained=path, image_size=NATIVE,
                              **TINY)
  for classes in (3, 1000):
    model = jtl.create_model("vit_small_patch14_dinov2", pretrained=path, num_classes=classes,
                             image_size=NATIVE, **TINY)
    assert model.pretrained_cfg.num_classes == classes
    assert model.variables["params"]["head"]["kernel"].shape == (16, classes)
    assert np.abs(model.variables["params"]["head"]["kernel"]).sum() > 0
    loaded = P.flatten(model.variables)
    for name, value in P.flatten(features.variables).items():
      if not name.startswith("params/head/"):
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_a_checkpoint_saved_with_another_position_grid_keeps_its_grid(tmp_path):
  """A timm file whose pos_embed holds a 3x3 grid (a model saved at 42 px) loads into the
  registered architecture (37x37 by default) by taking that grid, as timm would run it: the
  same outputs as a module built for the 3x3 grid, at 42 px and resampled at 70 px."""
  state = files.read_state_dict(os.path.join(FIXTURES, "dinov2_timm_tiny.safetensors"))
  rng = np.random.default_rng(0)
  state["pos_embed"] = rng.normal(size=(1, 1 + 9, 16)).astype(np.float32)
  path = str(tmp_path / "grid3.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
  overrides = {k: v for k, v in TINY.items() if k != "pos_grid_size"}
  for size in (OTHER, NATIVE):
    model = jtl.create_model("vit_small_patch14_dinov2", pretrained=path, image_size=size,
                             **overrides)
    assert model.module.pos_grid_size == 3
    explicit = jtl.create_model("vit_small_patch14_dinov2", pretrained=path, image_size=size,
                                **{**overrides, "pos_grid_size": 3})
    np.testing.assert_array_equal(np.asarray(model.predict(fixture_input(size))),
                                  np.asarray(explicit.predict(fixture_input(size))))


# --- round trips ---------------------------------------------------------------------------

def _torch_dense(kernel):
  return np.ascontiguousarray(kernel.T)


def _torch_conv(kernel):
  return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))


def _flat(variables):
  return {k[len("params/"):]: np.asarray(v) for k, v in P.flatten(variables).items()}


def _class_slot(p, registers):
  """Meta's and transformers' class token and position embeddings (always with a class slot)
  from ours (a slot only without registers)."""
  posemb = p["embed/pos_embedding"]
  if registers:
    posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
  return p["embed/cls"], posemb


def to_timm(variables, registers, meta=False):
  """timm's names, or (meta=True) Meta's, which differ in the tokens only."""
  p = _flat(variables)
  depth = len({k.split("/")[0] for k in p}) - 3  # embed, norm and head besides the blocks
  s = {"patch_embed.proj.weight": _torch_conv(p["embed/patch/kernel"]),
       "patch_embed.proj.bias": p["embed/patch/bias"], "norm.weight": p["norm/scale"],
       "norm.bias": p["norm/bias"]}
  if meta:
    s["cls_token"], s["pos_embed"] = _class_slot(p, registers)
    s["mask_token"] = np.zeros((1, p["embed/cls"].shape[-1]), np.float32)
    if registers:
      s["register_tokens"] = p["embed/registers"]
  else:
    s["cls_token"], s["pos_embed"] = p["embed/cls"], p["embed/pos_embedding"]
    if registers:
      s["reg_token"] = p["embed/registers"]
  for i in range(depth):
    b, t = f"block{i}", f"blocks.{i}"
    s[f"{t}.attn.qkv.weight"] = np.concatenate(
        [_torch_dense(p[f"{b}/attn/{n}/kernel"]) for n in ("query", "key", "value")])
    s[f"{t}.attn.qkv.bias"] = np.concatenate(
        [p[f"{b}/attn/{n}/bias"] for n in ("query", "key", "value")])
    for norm in ("norm1", "norm2"):
      s[f"{t}.{norm}.weight"], s[f"{t}.{norm}.bias"] = p[f"{b}/{norm}/scale"], p[f"{b}/{norm}/bias"]
    for ours, theirs in (("attn/out", "attn.proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
      s[f"{t}.{theirs}.weight"] = _torch_dense(p[f"{b}/{ours}/kernel"])
      s[f"{t}.{theirs}.bias"] = p[f"{b}/{ours}/bias"]
    s[f"{t}.ls1.gamma"], s[f"{t}.ls2.gamma"] = p[f"{b}/layer_scale1"], p[f"{b}/layer_scale2"]
  if p["head/kernel"].shape[-1]:
    s["head.weight"], s["head.bias"] = _torch_dense(p["head/kernel"]), p["head/bias"]
  return s


def to_hf(variables, registers, file_names=True):
  """transformers' names as its files hold them, or (file_names=False) as transformers 5 names
  its modules in memory; a head becomes Dinov2ForImageClassification's classifier."""
  p = _flat(variables)
  depth = len({k.split("/")[0] for k in p}) - 3
  prefix = "dinov2." if p["head/kernel"].shape[-1] else ""
  cls, posemb = _class_slot(p, registers)
  s = {"embeddings.patch_embeddings.projection.weight": _torch_conv(p["embed/patch/kernel"]),
       "embeddings.patch_embeddings.projection.bias": p["embed/patch/bias"],
       "embeddings.cls_token": cls, "embeddings.position_embeddings": posemb,
       "embeddings.mask_token": np.zeros((1, cls.shape[-1]), np.float32),
       "layernorm.weight": p["norm/scale"], "layernorm.bias": p["norm/bias"]}
  if registers:
    s["embeddings.register_tokens"] = p["embed/registers"]
  names = {"attn/query": "attention.attention.query", "attn/key": "attention.attention.key",
           "attn/value": "attention.attention.value", "attn/out": "attention.output.dense",
           "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
  if not file_names:
    names.update({"attn/query": "attention.q_proj", "attn/key": "attention.k_proj",
                  "attn/value": "attention.v_proj", "attn/out": "attention.o_proj"})
  for i in range(depth):
    b, t = f"block{i}", f"encoder.layer.{i}"
    for ours, theirs in names.items():
      s[f"{t}.{theirs}.weight"] = _torch_dense(p[f"{b}/{ours}/kernel"])
      s[f"{t}.{theirs}.bias"] = p[f"{b}/{ours}/bias"]
    for norm in ("norm1", "norm2"):
      s[f"{t}.{norm}.weight"], s[f"{t}.{norm}.bias"] = p[f"{b}/{norm}/scale"], p[f"{b}/{norm}/bias"]
    s[f"{t}.layer_scale1.lambda1"] = p[f"{b}/layer_scale1"]
    s[f"{t}.layer_scale2.lambda1"] = p[f"{b}/layer_scale2"]
  s = {prefix + k: v for k, v in s.items()}
  if prefix:
    s["classifier.weight"], s["classifier.bias"] = _torch_dense(p["head/kernel"]), p["head/bias"]
  return s


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("layout, writer, suffix", [
    ("timm", lambda v, r: to_timm(v, r), ".safetensors"),
    ("meta", lambda v, r: to_timm(v, r, meta=True), ".pth"),
    ("hf", lambda v, r: to_hf(v, r), ".safetensors"),
    ("hf", lambda v, r: to_hf(v, r, file_names=False), ".bin"),
])
def test_layouts_round_trip(tmp_path, layout, writer, suffix, registers):
  """Each layout written from random variables converts back bit for bit; with registers the
  zero class slot of Meta's and transformers' position embeddings folds into the class token."""
  arch = "dinov2_vits14_reg" if registers else "dinov2_vits14"
  for num_classes in (0, 7):
    module = tiny_module(arch, num_classes=num_classes)
    variables = random_variables(module, seed=num_classes)
    path = str(tmp_path / f"ckpt{num_classes}{suffix}")
    state = writer(variables, registers)
    save_file(state, path) if suffix == ".safetensors" else save_zip(state, path)
    converter = registry.get_entry(arch).converters[layout]
    assert_same_variables(load(converter, path, module), variables)


def test_class_position_folds_into_the_class_token_with_registers():
  """Meta's register checkpoints keep the class token's position embedding in a slot; the
  module, as timm, adds it to the class token, which changes no output."""
  state = files.read_state_dict(os.path.join(FIXTURES, "dinov2_meta_reg_tiny.pth"))
  converted = convert_dinov2.convert_meta(state, tiny_module("dinov2_vits14_reg"))
  np.testing.assert_allclose(converted["params/embed/cls"],
                             state["cls_token"] + state["pos_embed"][:, :1], rtol=1e-6)
  np.testing.assert_array_equal(converted["params/embed/pos_embedding"],
                                state["pos_embed"][:, 1:])
  assert "mask_token" not in converted


# --- errors ----------------------------------------------------------------------------------

def test_image_size_not_a_multiple_of_14_names_the_model_and_size():
  with pytest.raises(ValueError, match=r"vit_base_patch14_dinov2: image_size 100 is not a "
                                       r"multiple of the patch size 14; 98 or 112 is"):
    jtl.create_model("vit_base_patch14_dinov2", image_size=100)
  with pytest.raises(ValueError, match=r"transformers dinov2_with_registers: image_size 50"):
    jtl.create_model(os.path.join(FIXTURES, "dinov2_hf_reg_tiny"), image_size=50)
  module = tiny_module()
  with pytest.raises(ValueError, match="input of 50x50 px is not a multiple of the patch size"):
    jax.eval_shape(module.apply, zeros_of(variable_shapes(module, NATIVE)),
                   jax.ShapeDtypeStruct((1, 50, 50, 3), jnp.float32))


def test_a_checkpoint_of_another_family_names_the_model_the_file_and_what_does_not_fit():
  path = os.path.join(FIXTURES, "vit_timm_tiny.safetensors")
  with pytest.raises(CheckpointMismatchError) as error:
    jtl.create_model("vit_small_patch14_dinov2", pretrained=path, image_size=NATIVE, **TINY)
  message = str(error.value)
  assert f"checkpoint {path} does not fit the model vit_small_patch14_dinov2:" in message
  assert "missing from the checkpoint" in message and "params/block0/layer_scale1" in message
  assert "shape mismatches" in message and "checkpoint (32, 32) vs model (16, 16)" in message
  assert "another architecture" in message


def test_jtl_models_shows_the_weights_licence_where_the_registry_knows_it(capsys):
  from jtl.commands import models
  for name in ("vit_small_patch14_dinov2", "dinov2_vits14_reg"):
    assert registry.get_entry(name).default_cfg.license == "Apache-2.0"
  assert models.main(["vit_small_patch14_dinov2"]) == 0
  (line,) = capsys.readouterr().out.splitlines()
  assert line.split()[0] == "vit_small_patch14_dinov2" and " Apache-2.0 " in line
  assert "timm/vit_small_patch14_dinov2.lvd142m" in line
  # Licences from timm's records: CLIP's differ by who trained the weights.
  licences = {tag: cfg.weights_license for tag, cfg in
              registry.get_entry("vit_base_patch16_clip_224").pretrained.items()}
  assert (licences["laion2b"], licences["dfn2b"]) == ("Apache-2.0", "Apple-ASCL")
  assert registry.get_entry("vit_base_patch16_clip_quickgelu_224").pretrained[
      "metaclip_400m"].weights_license == "CC-BY-NC-4.0"
  assert registry.get_entry("convnextv2_tiny").default_cfg.weights_license == "CC-BY-NC-4.0"
  assert models.main(["convnextv2_tiny"]) == 0
  assert " CC-BY-NC-4.0 " in capsys.readouterr().out
  assert models.main(["tiny_cnn"]) == 0  # nothing recorded: a dash in the column
  assert capsys.readouterr().out.split()[3:5] == ["-", "-"]  # default weights, licence


# --- stages, the feature cache and the record -------------------------------------------------

def test_frozen_prefix_up_to_norm_gives_the_pooled_vector():
  """The feature cache keeps the norm stage's output: the class token and the mean of the patch
  tokens (registers excluded), from which the head alone gives the full model's logits."""
  module = tiny_module("dinov2_vits14_reg", num_classes=3, image_size=OTHER)
  variables = random_variables(module)
  model = jtl.models.Model("dinov2_vits14_reg", module, variables,
                           registry.get_entry("dinov2_vits14_reg").default_cfg)
  assert model.stage_names == ("embed", "block0", "block1", "norm", "head")
  stop = len(model.stage_names) - 1
  assert not feature_cache.pools_features(model, stop)
  features_fn = steps.make_features_fn(model, distributed.make_mesh(), stop_stage=stop)
  images = fixture_input(OTHER, batch=2)
  features = features_fn(variables["params"], {}, images)
  assert features.shape == (2, 32)
  logits = module.apply(variables, features, start_stage=stop)
  np.testing.assert_allclose(logits, _apply(module)(variables, images), rtol=1e-5, atol=1e-6)


def test_a_frozen_prefix_gets_no_gradient_and_its_stages_no_label():
  """freeze_depth=2 freezes the embedding (tokens and position grid included) and block0."""
  module = tiny_module("vit_small_patch14_reg4_dinov2", num_classes=3, image_size=28)
  params = random_variables(module)["params"]
  plan = optim.make_freeze_plan(params, module.stage_names,
                                optim.freeze_rules("partial", module.stage_names, 2))
  assert plan.frozen_stages == 2
  assert plan.trainable_stages == ("block1", "norm", "head")
  images = fixture_input(28)
  loss = lambda p: module.apply({"params": p}, images, train=True, frozen_stages=2).sum()
  for name, grad in P.flatten(jax.jit(jax.grad(loss))(params)).items():
    frozen = plan.labels[name] == optim.FROZEN
    assert frozen == (name.split("/")[0] in ("embed", "block0")), name
    assert (np.abs(grad).max() == 0) == frozen, name


def test_registered_metadata_and_recorded_conventions():
  for name, hub, conventions, crop in [
      ("vit_small_patch14_dinov2", "timm/vit_small_patch14_dinov2.lvd142m", dinov2.TIMM, 1.0),
      ("vit_large_patch14_reg4_dinov2", "timm/vit_large_patch14_reg4_dinov2.lvd142m",
       dinov2.TIMM, 1.0),
      ("dinov2_vitb14", "timm/vit_base_patch14_dinov2.lvd142m", dinov2.META, 0.875),
      ("dinov2_vitl14_reg", "timm/vit_large_patch14_reg4_dinov2.lvd142m",
       dinov2.META_REGISTERS, 0.875)]:
    entry = registry.get_entry(name)
    cfg = entry.default_cfg
    assert (entry.family, entry.default_tag, cfg.hf_hub_id, cfg.layout) == (
        "dinov2", "lvd142m", hub, "timm")
    assert (cfg.num_classes, cfg.image_size, cfg.crop_pct, cfg.interpolation) == (
        0, 224, crop, "bicubic")
    assert (cfg.mean, cfg.std) == (registry.IMAGENET_MEAN, registry.IMAGENET_STD)
    module = entry.build(num_classes=0)
    assert (module.pooling, module.pos_resample) == (conventions.pooling,
                                                     conventions.pos_resample)
    assert (cfg.pooling, cfg.pos_resample) == (module.pooling, module.pos_resample)
    assert (module.pos_grid_size, module.image_size) == (37, 224)
  model = jtl.create_model(os.path.join(FIXTURES, "dinov2_hf_tiny"))
  record = RunRecord.of_run("dinov2_hf_tiny", model, ("a", "b"), 224)
  recorded = json.loads(json.dumps(record.to_json()))["pretrained_cfg"]
  assert (recorded["pooling"], recorded["pos_resample"], recorded["layout"]) == (
      "class_mean", "bicubic", "hf")
