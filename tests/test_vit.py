"""ViT: logits equal to timm's and transformers', converters that round-trip bit for bit,
position embeddings resampled as timm resamples them."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import jtl
from helpers import (FIXTURES, assert_logits_close, assert_same_variables, fixture_input,
                     variable_shapes, zeros_of)
from jtl import params as P
from jtl.models import registry, vit  # noqa: F401  (vit registers its models)
from jtl.weights import convert_vit, files, merge
from jtl.weights.merge import CheckpointMismatchError
from torch_writer import save_zip

# The sizes of tests/fixtures/make_vit.py's models, as overrides of a registered architecture.
TINY = dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64)
TIMM_FIXTURE = os.path.join(FIXTURES, "vit_timm_tiny.safetensors")


def tiny_module(num_classes=5, image_size=32, **overrides):
  entry = registry.get_entry("vit_tiny_patch16_224")
  return entry.build(num_classes=num_classes, image_size=image_size, **{**TINY, **overrides})


def zeros_template(module):
  """Zero variables of the module's shapes; eval_shape avoids compiling the initialisers."""
  return zeros_of(variable_shapes(module, module.image_size))


def random_variables(module, seed=0, zero_class_posemb=False):
  """Every leaf random, so that a swapped or transposed tensor shows."""
  rng = np.random.default_rng(seed)
  flat = {k: rng.standard_normal(v.shape).astype(np.float32) * 0.2
          for k, v in variable_shapes(module, module.image_size).items()}
  if zero_class_posemb:  # big_vision has no position embedding for the class token
    flat["params/embed/pos_embedding"][:, 0] = 0
  return P.unflatten(flat)


@functools.lru_cache(maxsize=None)
def _apply(module):
  return jax.jit(lambda variables, x: module.apply(variables, x))


def load(convert, path, module):
  """What create_model does once the module is initialised: read, convert, merge."""
  converted = convert(files.read_state_dict(path), module)
  return merge.merge(zeros_template(module), converted, source=path)


# --- each layout, written from our variables -------------------------------------------------

def _ours(variables):
  """Flat params without the "params/" prefix, and the depth."""
  flat = {k[len("params/"):]: np.asarray(v) for k, v in P.flatten(variables).items()}
  depth = len({k.split("/")[0] for k in flat if k.startswith("block")})
  return flat, depth


def _torch_conv(kernel):
  return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))


def _torch_dense(kernel):
  return np.ascontiguousarray(kernel.T)


def to_timm(variables):
  p, depth = _ours(variables)
  s = {"patch_embed.proj.weight": _torch_conv(p["embed/patch/kernel"]),
       "patch_embed.proj.bias": p["embed/patch/bias"], "cls_token": p["embed/cls"],
       "pos_embed": p["embed/pos_embedding"], "norm.weight": p["norm/scale"],
       "norm.bias": p["norm/bias"], "head.weight": _torch_dense(p["head/kernel"]),
       "head.bias": p["head/bias"]}
  for i in range(depth):
    b, t = f"block{i}", f"blocks.{i}"
    s[f"{t}.attn.qkv.weight"] = np.concatenate(
        [_torch_dense(p[f"{b}/attn/{n}/kernel"]) for n in ("query", "key", "value")])
    s[f"{t}.attn.qkv.bias"] = np.concatenate(
        [p[f"{b}/attn/{n}/bias"] for n in ("query", "key", "value")])
    for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2")):
      s[f"{t}.{theirs}.weight"], s[f"{t}.{theirs}.bias"] = p[f"{b}/{ours}/scale"], p[f"{b}/{ours}/bias"]
    for ours, theirs in (("attn/out", "attn.proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
      s[f"{t}.{theirs}.weight"] = _torch_dense(p[f"{b}/{ours}/kernel"])
      s[f"{t}.{theirs}.bias"] = p[f"{b}/{ours}/bias"]
  return s


def to_torchvision(variables):
  """torchvision's names for the same tensors as timm's (its fused qkv is in_proj)."""
  state = {}
  for name, value in to_timm(variables).items():
    if name.startswith("blocks."):
      _, i, rest = name.split(".", 2)
      rest = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "self_attention.in_proj",
              "attn.proj": "self_attention.out_proj", "mlp.fc1": "mlp.0",
              "mlp.fc2": "mlp.3"}[rest.rsplit(".", 1)[0]] + "." + rest.rsplit(".", 1)[1]
      name = f"encoder.layers.encoder_layer_{i}.{rest}".replace("in_proj.", "in_proj_")
    else:
      module, leaf = name.rsplit(".", 1) if "." in name else (name, "")
      module = {"patch_embed.proj": "conv_proj", "cls_token": "class_token",
                "pos_embed": "encoder.pos_embedding", "norm": "encoder.ln",
                "head": "heads.head"}[module]
      name = f"{module}.{leaf}" if leaf else module
    state[name] = value
  return state


def to_hf(variables, file_names=True):
  """transformers ViTForImageClassification, as its files name it or (file_names=False) as
  transformers 5 names its modules in memory."""
  p, depth = _ours(variables)
  s = {"vit.embeddings.patch_embeddings.projection.weight": _torch_conv(p["embed/patch/kernel"]),
       "vit.embeddings.patch_embeddings.projection.bias": p["embed/patch/bias"],
       "vit.embeddings.cls_token": p["embed/cls"],
       "vit.embeddings.position_embeddings": p["embed/pos_embedding"],
       "vit.layernorm.weight": p["norm/scale"], "vit.layernorm.bias": p["norm/bias"],
       "classifier.weight": _torch_dense(p["head/kernel"]), "classifier.bias": p["head/bias"]}
  for i in range(depth):
    b = f"block{i}"
    if file_names:
      t = f"vit.encoder.layer.{i}"
      dense = {"attn/query": "attention.attention.query", "attn/key": "attention.attention.key",
               "attn/value": "attention.attention.value", "attn/out": "attention.output.dense",
               "fc1": "intermediate.dense", "fc2": "output.dense"}
    else:
      t = f"vit.layers.{i}"
      dense = {"attn/query": "attention.q_proj", "attn/key": "attention.k_proj",
               "attn/value": "attention.v_proj", "attn/out": "attention.o_proj",
               "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    for ours, theirs in dense.items():
      s[f"{t}.{theirs}.weight"] = _torch_dense(p[f"{b}/{ours}/kernel"])
      s[f"{t}.{theirs}.bias"] = p[f"{b}/{ours}/bias"]
    for ours, theirs in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
      s[f"{t}.{theirs}.weight"], s[f"{t}.{theirs}.bias"] = p[f"{b}/{ours}/scale"], p[f"{b}/{ours}/bias"]
  return s


def to_big_vision(variables, num_heads, names="big_vision", scanned=False, prefix=""):
  """big_vision (per-kind module numbers, no class-token position embedding) or vit_jax
  (numbers across kinds, posembed_input with the class token) .npz names."""
  p, depth = _ours(variables)
  width = p["embed/cls"].shape[-1]
  head_dim = width // num_heads
  w = {"embedding/kernel": p["embed/patch/kernel"], "embedding/bias": p["embed/patch/bias"],
       "Transformer/encoder_norm/scale": p["norm/scale"],
       "Transformer/encoder_norm/bias": p["norm/bias"],
       "head/kernel": p["head/kernel"], "head/bias": p["head/bias"]}
  posemb = p["embed/pos_embedding"]
  if names == "vit_jax":
    w["cls"] = p["embed/cls"]
    w["Transformer/posembed_input/pos_embedding"] = posemb
    ln1, mha, ln2, mlp = "LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"
  else:
    # big_vision adds position embeddings before prepending the class token.
    w["cls"] = p["embed/cls"] + posemb[:, :1]
    w["pos_embedding"] = posemb[:, 1:]
    ln1, mha, ln2, mlp = "LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"
  blocks = []
  for i in range(depth):
    b = f"block{i}"
    block = {f"{ln1}/scale": p[f"{b}/norm1/scale"], f"{ln1}/bias": p[f"{b}/norm1/bias"],
             f"{ln2}/scale": p[f"{b}/norm2/scale"], f"{ln2}/bias": p[f"{b}/norm2/bias"],
             f"{mlp}/Dense_0/kernel": p[f"{b}/fc1/kernel"], f"{mlp}/Dense_0/bias": p[f"{b}/fc1/bias"],
             f"{mlp}/Dense_1/kernel": p[f"{b}/fc2/kernel"], f"{mlp}/Dense_1/bias": p[f"{b}/fc2/bias"],
             f"{mha}/out/kernel": p[f"{b}/attn/out/kernel"].reshape(num_heads, head_dim, width),
             f"{mha}/out/bias": p[f"{b}/attn/out/bias"]}
    for n in ("query", "key", "value"):
      block[f"{mha}/{n}/kernel"] = p[f"{b}/attn/{n}/kernel"].reshape(width, num_heads, head_dim)
      block[f"{mha}/{n}/bias"] = p[f"{b}/attn/{n}/bias"].reshape(num_heads, head_dim)
    blocks.append(block)
  if scanned:
    for name in blocks[0]:
      w[f"Transformer/encoderblock/{name}"] = np.stack([block[name] for block in blocks])
  else:
    for i, block in enumerate(blocks):
      w.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in block.items()})
  return {prefix + k: v for k, v in w.items()}


def variables_from_timm_fixture():
  """The timm fixture's weights as our variables (through the timm converter)."""
  module = tiny_module()
  return load(convert_vit.convert_timm, TIMM_FIXTURE, module), module


# --- fixtures from the real implementations ------------------------------------------------

def test_timm_fixture_and_resampled_position_embeddings():
  """Logits equal timm's at 32 px, and at 64 px equal those of timm's own resampling."""
  reference = np.load(os.path.join(FIXTURES, "vit_timm_tiny.npz"))
  model = jtl.create_model("vit_tiny_patch16_224", pretrained=TIMM_FIXTURE, image_size=32, **TINY)
  assert model.pretrained_cfg.num_classes == 5
  assert_logits_close(model.predict(fixture_input(32)), reference["eval_32"])
  model = jtl.create_model("vit_tiny_patch16_224", pretrained=TIMM_FIXTURE, image_size=64, **TINY)
  assert model.variables["params"]["embed"]["pos_embedding"].shape == (1, 1 + 8 * 8, 32)
  assert_logits_close(model.predict(fixture_input(64)), reference["eval_64"])


def test_transformers_fixture_directory():
  """A save_pretrained directory: architecture, epsilon and labels from config.json."""
  model = jtl.create_model(os.path.join(FIXTURES, "vit_hf_tiny"))
  reference = np.load(os.path.join(FIXTURES, "vit_hf_tiny.npz"))
  module = model.module
  assert (module.width, module.depth, module.num_heads, module.mlp_dim, module.patch_size,
          module.image_size) == (32, 2, 2, 64, 8, 32)
  assert module.layer_norm_epsilon == 1e-12
  assert model.pretrained_cfg.label_names == tuple(f"class_{i}" for i in range(5))
  assert_logits_close(model.predict(fixture_input(32)), reference["eval_32"])


@pytest.mark.parametrize("names, scanned, prefix", [
    ("vit_jax", False, ""),
    ("big_vision", False, "params/"),
    ("big_vision", True, "params/img/"),
    ("vit_jax", False, "opt/target/"),
])
def test_big_vision_layouts_give_timm_logits(tmp_path, names, scanned, prefix):
  """The timm fixture rewritten in big_vision / vit_jax names gives timm's logits."""
  variables, module = variables_from_timm_fixture()
  path = str(tmp_path / "ckpt.npz")
  np.savez(path, **to_big_vision(variables, module.num_heads, names, scanned, prefix))
  loaded = load(convert_vit.convert_big_vision, path, module)
  reference = np.load(os.path.join(FIXTURES, "vit_timm_tiny.npz"))
  assert_logits_close(_apply(module)(loaded, fixture_input(32)), reference["eval_32"])


def test_big_vision_npz_through_create_model(tmp_path):
  """An .npz of unknown layout is recognised as vit_jax's and resampled to 64 px."""
  variables, module = variables_from_timm_fixture()
  path = str(tmp_path / "ckpt.npz")
  # Without a prefix: create_model's layout detection counts converted names that do not
  # start with "params/", so a "params/"-prefixed file needs layout="big_vision" (tag) today.
  np.savez(path, **to_big_vision(variables, module.num_heads, "vit_jax"))
  model = jtl.create_model("vit_tiny_patch16_224", pretrained=path, image_size=64, **TINY)
  reference = np.load(os.path.join(FIXTURES, "vit_timm_tiny.npz"))
  assert_logits_close(model.predict(fixture_input(64)), reference["eval_64"])


# --- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout, writer, suffix", [
    ("timm", lambda v: to_timm(v), ".safetensors"),
    ("torchvision", lambda v: to_torchvision(v), ".pth"),
    ("hf", lambda v: to_hf(v), ".safetensors"),
    ("hf", lambda v: to_hf(v, file_names=False), ".bin"),
])
def test_torch_layouts_round_trip(tmp_path, layout, writer, suffix):
  module = tiny_module(num_classes=7)
  variables = random_variables(module)
  path = str(tmp_path / f"ckpt{suffix}")
  state = writer(variables)
  if suffix == ".safetensors":
    save_file(state, path)
  else:
    save_zip(state, path)
  converter = registry.get_entry("vit_tiny_patch16_224").converters[layout]
  assert_same_variables(load(converter, path, module), variables)


@pytest.mark.parametrize("names, scanned, prefix", [
    ("vit_jax", False, ""), ("vit_jax", False, "params/"),
    ("big_vision", False, ""), ("big_vision", True, "params/"),
])
def test_big_vision_round_trip(tmp_path, names, scanned, prefix):
  module = tiny_module(num_classes=7)
  variables = random_variables(module, zero_class_posemb=names == "big_vision")
  path = str(tmp_path / "ckpt.npz")
  np.savez(path, **to_big_vision(variables, module.num_heads, names, scanned, prefix))
  assert_same_variables(load(convert_vit.convert_big_vision, path, module), variables)


def test_torchvision_pth_through_create_model(tmp_path):
  """A .pth of unknown layout is recognised as torchvision's; the head is replaced on request."""
  module = tiny_module(num_classes=7)
  variables = random_variables(module, seed=3)
  path = str(tmp_path / "vit.pth")
  save_zip(to_torchvision(variables), path)
  model = jtl.create_model("vit_tiny_patch16_224", pretrained=path, num_classes=3,
                           image_size=32, **TINY)
  loaded = P.flatten(model.variables)
  assert loaded["params/head/kernel"].shape == (32, 3)
  for name, value in P.flatten(variables).items():
    if not name.startswith("params/head/"):
      np.testing.assert_array_equal(loaded[name], value, err_msg=name)


# --- position embeddings ---------------------------------------------------------------------

def test_resample_matches_timm():
  """2x2 -> 4x4 as timm's resample_abs_pos_embed; the class token's embedding untouched."""
  reference = np.load(os.path.join(FIXTURES, "vit_timm_tiny.npz"))
  resampled = convert_vit.resample_position_embeddings(reference["posemb_2x2"], (4, 4))
  assert resampled.shape == (1, 17, 4)
  np.testing.assert_array_equal(resampled[:, 0], reference["posemb_2x2"][:, 0])
  np.testing.assert_allclose(resampled, reference["posemb_4x4"], atol=1e-5)


def test_resample_keeps_constant_grid_and_same_size():
  grid = np.full((1, 1 + 9, 3), 0.25, np.float32)
  grid[:, 0] = 7.0
  np.testing.assert_allclose(convert_vit.resample_position_embeddings(grid, (6, 6))[:, 1:], 0.25,
                             rtol=1e-6)
  assert convert_vit.resample_position_embeddings(grid, (3, 3)) is grid


def test_checkpoint_of_another_depth_is_reported(tmp_path):
  source = tiny_module(depth=3)
  path = str(tmp_path / "deeper.safetensors")
  save_file(to_timm(random_variables(source)), path)
  with pytest.raises(CheckpointMismatchError) as error:
    load(convert_vit.convert_timm, path, tiny_module())
  assert path in str(error.value) and "blocks.2.attn.qkv.weight" in str(error.value)


def test_input_of_another_size_is_refused():
  module = tiny_module()
  with pytest.raises(ValueError, match="build the model with that image_size"):
    jax.eval_shape(lambda v, x: module.apply(v, x), zeros_template(module),
                   jax.ShapeDtypeStruct((1, 48, 48, 3), jnp.float32))


def test_registry_metadata():
  entry = registry.get_entry("vit_base_patch16_224")
  assert entry.default_tag == "augreg2_in21k_ft_in1k"
  cfg = entry.pretrained["augreg_in21k_ft_in1k"]
  assert cfg.hf_hub_id == "timm/vit_base_patch16_224.augreg_in21k_ft_in1k"
  assert (cfg.mean, cfg.std, cfg.crop_pct, cfg.interpolation) == ((0.5,) * 3, (0.5,) * 3, 0.9,
                                                                   "bicubic")
  assert registry.get_entry("vit_large_patch32_224").default_tag is None
  assert "vit_tiny_patch32_224" not in registry.list_models()


@pytest.mark.parametrize("batch, tq, tk, heads, dtype", [
    (3, 17, 17, 2, jnp.float32),    # self-attention, an odd number of (example, head) pairs
    (2, 1, 50, 4, jnp.float32),     # one query (SigLIP's MAP probe)
    (2, 300, 300, 3, jnp.float32),  # scores larger than a group's budget: one pair at a time
    (2, 9, 9, 2, jnp.bfloat16)])
def test_cpu_attention_equals_jaxs_in_value_and_gradient(batch, tq, tk, heads, dtype):
  """The grouped CPU attention computes jax.nn.dot_product_attention's function: outputs and
  the gradients with respect to q, k and v."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(batch, t, heads, 8)), dtype) for t in (tq, tk, tk))
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  ours, reference = vit.dot_product_attention(q, k, v), jax.nn.dot_product_attention(q, k, v)
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(reference, np.float32),
                             atol=tolerance, rtol=tolerance)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v).astype(jnp.float32)))
  for g_ours, g_ref in zip(jax.grad(loss(vit.dot_product_attention), (0, 1, 2))(q, k, v),
                           jax.grad(loss(jax.nn.dot_product_attention), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(g_ours, np.float32), np.asarray(g_ref, np.float32),
                               atol=tolerance, rtol=tolerance)
