"""ResNet-18/34/50/101/152 (He et al. 2015), in the v1.5 form of torchvision and timm.

v1.5 puts a bottleneck's stride in its 3x3 convolution; `stride_in_1x1=True` gives the original
v1 (stride in the first 1x1 convolution), which some transformers checkpoints use. Stages:
stem (7x7 conv, BN, ReLU, 3x3 max-pool), stage1..stage4, head (global average pool + Dense).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jtl.models import common, registry
from jtl.models.registry import ModelEntry, PretrainedCfg
from jtl.weights import convert_resnet

BLOCK_TYPES = ("basic", "bottleneck")
# Bottleneck blocks compute at a quarter of their output width.
BOTTLENECK_REDUCTION = 4

# torchvision initialises convolutions with He-normal over fan-out.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, stride: int = 1, name: str | None = None) -> common.Conv:
  """A bias-free convolution padded like torch's (kernel // 2 on every side)."""
  pad = kernel // 2
  return common.Conv(features, (kernel, kernel), strides=(stride, stride),
                     padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=conv_init,
                     name=name)


class Stem(nn.Module):
  """7x7/2 convolution, BatchNorm, ReLU, 3x3/2 max-pool: 224 px in, 56 px out."""
  width: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = conv(self.width, 7, 2, name="conv")(x)
    x = common.BatchNorm(train=train, name="bn")(x)
    x = nn.relu(x)
    # torch pads max-pooling with -inf, as flax does.
    return common.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


class Block(nn.Module):
  """A residual block; the shortcut is projected when the shape changes."""
  features: int               # output channels
  stride: int = 1
  block: str = "basic"        # basic: two 3x3 convs; bottleneck: 1x1, 3x3, 1x1
  stride_in_1x1: bool = False
  # Output channels of the convolutions before the last (basic: conv1; bottleneck: conv1,
  # conv2), narrower after channel pruning; None: the architecture's own.
  inner: tuple[int, ...] | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(common.BatchNorm, train=train)
    if self.block == "basic":
      (first_width,) = self.inner or (self.features,)
      layers = [(first_width, 3, self.stride), (self.features, 3, 1)]
    else:
      inner = self.features // BOTTLENECK_REDUCTION
      widths = self.inner or (inner, inner)
      first, middle = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
      layers = [(widths[0], 1, first), (widths[1], 3, middle), (self.features, 1, 1)]
    y = x
    for i, (features, kernel, stride) in enumerate(layers, 1):
      y = conv(features, kernel, stride, name=f"conv{i}")(y)
      y = norm(name=f"bn{i}")(y)
      if i < len(layers):
        y = nn.relu(y)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.stride, name="shortcut_conv")(x)
      shortcut = norm(name="shortcut_bn")(shortcut)
    return nn.relu(y + shortcut)


class Stage(nn.Module):
  """`depth` blocks; the first one changes width and resolution."""
  features: int
  depth: int
  stride: int
  block: str
  stride_in_1x1: bool = False
  inner: tuple[tuple[int, ...], ...] | None = None  # Block.inner of each block

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.depth):
      x = Block(self.features, self.stride if i == 0 else 1, self.block, self.stride_in_1x1,
                self.inner[i] if self.inner else None, name=f"block{i}")(x, train)
    return x


class ResNet(nn.Module):
  """ResNet classifier; NHWC input, logits out (see jtl.models.common for the contract)."""
  # The head begins with a global average pool, so a feature-extraction cache may hold the
  # pooled features (see jtl.feature_cache); a plain class attribute, not a field.
  head_pools_globally = True
  num_classes: int = 1000
  depths: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)   # output channels of each stage
  block: str = "basic"
  stem_width: int = 64
  stride_in_1x1: bool = False                   # True: ResNet v1 bottlenecks
  first_stage_stride: int = 1                   # 2: stage1 halves the resolution as well
  image_size: int = 224
  # Channel pruning (jtl.pruning.channels): the inner widths of every block in order, one per
  # basic block (conv1), two per bottleneck (conv1, conv2); None: the architecture's own.
  inner_widths: Sequence[int] | None = None

  def __post_init__(self):
    if self.block not in BLOCK_TYPES:
      raise ValueError(f"ResNet block must be one of {BLOCK_TYPES}, got {self.block!r}")
    if len(self.depths) != len(self.widths):
      raise ValueError(f"ResNet depths {tuple(self.depths)} and widths {tuple(self.widths)} "
                       "must have the same length")
    expected = sum(self.depths) * self.inner_per_block
    if self.inner_widths is not None and len(self.inner_widths) != expected:
      raise ValueError(f"ResNet inner_widths: {len(self.inner_widths)} given, {expected} needed "
                       f"({self.inner_per_block} per {self.block} block)")
    super().__post_init__()

  @property
  def inner_per_block(self) -> int:
    return 1 if self.block == "basic" else 2

  def _stage_inner(self, stage: int) -> tuple[tuple[int, ...], ...] | None:
    """Block.inner of each block of stage `stage` (0-based), from inner_widths."""
    if self.inner_widths is None:
      return None
    n, start = self.inner_per_block, sum(self.depths[:stage]) * self.inner_per_block
    flat = tuple(int(w) for w in self.inner_widths)
    return tuple(flat[start + b * n:start + (b + 1) * n] for b in range(self.depths[stage]))

  @property
  def stage_names(self) -> tuple[str, ...]:
    return ("stem",) + tuple(f"stage{i}" for i in range(1, len(self.depths) + 1)) + ("head",)

  @nn.compact
  def __call__(self, x, train: bool = False, frozen_stages: int = 0, start_stage: int = 0,
               stop_stage: int | None = None):
    stem = Stem(self.stem_width, name="stem")
    stages = [("stem", stem)]
    for i, (depth, width) in enumerate(zip(self.depths, self.widths)):
      stride = self.first_stage_stride if i == 0 else 2
      name = f"stage{i + 1}"
      stages.append((name, Stage(width, depth, stride, self.block, self.stride_in_1x1,
                                 self._stage_inner(i), name=name)))
    head = nn.Dense(self.num_classes, name="head")
    stages.append(("head", lambda x, train: head(jnp.mean(x, axis=(1, 2)))))
    return common.apply_stages(stages, x, train=train, frozen_stages=frozen_stages,
                               start_stage=start_stage, stop_stage=stop_stage)


TORCHVISION_URL = "https://download.pytorch.org/models/"

# Parameter counts from the torchvision model docs (pytorch.org/vision/stable/models), which
# timm and transformers (microsoft/resnet-*) share. tv/tv2: torchvision's IMAGENET1K_V1/V2 files.
ARCHS = {
    "resnet18": dict(depths=(2, 2, 2, 2), block="basic", published=11_689_512,
                     tv="resnet18-f37072fd.pth"),
    "resnet34": dict(depths=(3, 4, 6, 3), block="basic", published=21_797_672,
                     tv="resnet34-b627a593.pth"),
    "resnet50": dict(depths=(3, 4, 6, 3), block="bottleneck", published=25_557_032,
                     tv="resnet50-0676ba61.pth", tv2="resnet50-11ad3fa6.pth"),
    "resnet101": dict(depths=(3, 4, 23, 3), block="bottleneck", published=44_549_160,
                      tv="resnet101-63fe2227.pth", tv2="resnet101-cd907fc2.pth"),
    "resnet152": dict(depths=(3, 8, 36, 3), block="bottleneck", published=60_192_808,
                      tv="resnet152-394f9c45.pth", tv2="resnet152-f82ba261.pth"),
}
WIDTHS = {"basic": (64, 128, 256, 512), "bottleneck": (256, 512, 1024, 2048)}


def pretrained_cfgs(arch: str, tv_file: str, tv2_file: str | None) -> dict[str, PretrainedCfg]:
  """The timm hub weights of `arch`; hub ids follow timm's "arch.tag" naming."""
  hub = lambda tag: f"timm/{arch}.{tag}"
  cfgs = {
      # torchvision's original weights, as timm mirrors them: 224 px, crop 0.875, bilinear.
      "tv_in1k": PretrainedCfg("tv_in1k", "timm", hub("tv_in1k"), url=TORCHVISION_URL + tv_file),
      # timm's "ResNet strikes back" A1 recipe; timm's pretrained_cfg: 224 px, crop 0.95,
      # bicubic (it also lists test_input_size 288 with crop 1.0, which scores a little higher).
      "a1_in1k": PretrainedCfg("a1_in1k", "timm", hub("a1_in1k"), crop_pct=0.95,
                               interpolation="bicubic"),
  }
  if tv2_file:
    # Trained at 176 px, evaluated at 224 px after a resize to 232 px (timm: test_input_size
    # 224, test_crop_pct 0.965, bilinear).
    cfgs["tv2_in1k"] = PretrainedCfg("tv2_in1k", "timm", hub("tv2_in1k"), crop_pct=0.965,
                                     url=TORCHVISION_URL + tv2_file)
  return cfgs


CONVERTERS = {"timm": convert_resnet.convert_torch, "torchvision": convert_resnet.convert_torch,
              "hf": convert_resnet.convert_hf}

for _name, _arch in ARCHS.items():
  registry.register_model(ModelEntry(
      name=_name, family="resnet",
      build=functools.partial(ResNet, depths=_arch["depths"], widths=WIDTHS[_arch["block"]],
                              block=_arch["block"]),
      pretrained=pretrained_cfgs(_name, _arch["tv"], _arch.get("tv2")),
      default_tag="tv_in1k", converters=CONVERTERS, published_params=_arch["published"]))


def from_hf_config(config, image_size: int | None = None):
  """(build, PretrainedCfg, converter) for a transformers ResNetConfig."""
  if config.layer_type not in BLOCK_TYPES:
    raise ValueError(f"transformers ResNet layer_type {config.layer_type!r} is not supported")
  if getattr(config, "hidden_act", "relu") != "relu":
    raise ValueError(f"transformers ResNet hidden_act {config.hidden_act!r} is not supported "
                     "(only relu)")
  if getattr(config, "num_channels", 3) != 3:
    raise ValueError(f"transformers ResNet num_channels={config.num_channels}: only RGB (3)")
  size = image_size or 224
  build = functools.partial(
      ResNet, depths=tuple(config.depths), widths=tuple(config.hidden_sizes),
      block=config.layer_type, stem_width=config.embedding_size,
      stride_in_1x1=bool(getattr(config, "downsample_in_bottleneck", False)),
      first_stage_stride=2 if getattr(config, "downsample_in_first_stage", False) else 1,
      image_size=size)
  labels = tuple(str(config.id2label[i]) for i in range(config.num_labels))
  # microsoft/resnet-* preprocess with ConvNextImageProcessor: crop_pct 0.875, resample=3
  # (bicubic); the factory takes mean/std from preprocessor_config.json when present.
  cfg = PretrainedCfg(tag="hf", layout="hf", num_classes=config.num_labels, image_size=size,
                      crop_pct=0.875, interpolation="bicubic",
                      label_names=labels)
  return build, cfg, convert_resnet.convert_hf


registry.register_hf_arch("resnet", from_hf_config)
