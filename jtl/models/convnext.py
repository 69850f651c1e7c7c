"""ConvNeXt (Liu et al. 2022) and ConvNeXt-V2 (Woo et al. 2023), as timm, torchvision and
transformers have them.

Stages: "stem" (4x4/4 convolution, LayerNorm), "stage1".."stage4" (stage1 keeps the stem's
resolution; the others begin with LayerNorm + 2x2/2 convolution), "norm" (global average pool,
then LayerNorm: pool-then-norm as in timm's head) and "head" (Dense). The final norm is a stage of
its own, as in ViT, so that the head stays the single Dense a new number of classes replaces,
and "freeze everything but the head" keeps the final norm frozen. A block is: 7x7 depthwise
convolution, LayerNorm, Dense 4x, exact GELU, (v2: global response norm), Dense back, (v1:
layer scale), residual.

timm's atto..nano models (and every V2 below tiny) run the MLP as 1x1 convolutions
("conv_mlp") with a channels-first LayerNorm; that is the same function with the same numbers
of parameters, so one module serves both and the converter reshapes the 1x1 kernels.

Licences: timm's ConvNeXt (V1) weights are Apache-2.0, torchvision's BSD-3-Clause; every
ConvNeXt-V2 weight set (Meta's, mirrored by timm as convnextv2_*.fcmae*) is CC-BY-NC-4.0: not for
commercial use. `jtl models` shows each default's licence (timm's table, timm_licenses.json).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jtl.models import common, registry
from jtl.models.registry import ModelEntry, PretrainedCfg
from jtl.weights import convert_convnext

# timm initialises every convolution and linear layer with trunc_normal(std=0.02).
_KERNEL_INIT = nn.initializers.truncated_normal(stddev=0.02)
# timm's ls_init_value; the pretrained weights replace it.
_LAYER_SCALE_INIT = 1e-6
# The GRN's epsilon in timm, Meta's code and transformers.
_GRN_EPSILON = 1e-6


def layer_norm(epsilon: float, name: str) -> nn.LayerNorm:
  # Two-pass variance, as torch computes it. flax's default E[x^2] - E[x]^2 cancels where a
  # pixel's mean over channels is large against their spread, which the residual stream (only
  # normalised on the side branch) allows in deep pretrained models; the tiny test fixtures
  # match timm to 1e-6 either way.
  return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, name=name)


class GlobalResponseNorm(nn.Module):
  """ConvNeXt-V2's GRN on (batch, pixels, channels): each channel's L2 norm over the pixels,
  divided by its mean over the channels, rescales the input; starts as the identity."""

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.zeros, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    spatial_norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=1, keepdims=True))
    relative = spatial_norm / (jnp.mean(spatial_norm, axis=-1, keepdims=True) + _GRN_EPSILON)
    return x + scale * (x * relative) + bias


class Block(nn.Module):
  """Depthwise conv, LayerNorm, inverted-bottleneck MLP, layer scale or GRN, residual."""
  kernel_size: int = 7
  mlp_ratio: int = 4
  layer_scale: bool = True          # V1: a learned per-channel scale on the branch
  grn: bool = False                 # V2: global response norm inside the MLP
  epsilon: float = 1e-6
  drop_path_rate: float = 0.0       # stochastic depth while training

  @nn.compact
  def __call__(self, x, train: bool):
    batch, height, width, channels = x.shape
    pad = self.kernel_size // 2
    y = common.DepthwiseConv((self.kernel_size, self.kernel_size), padding=((pad, pad), (pad, pad)),
                             use_bias=True, kernel_init=_KERNEL_INIT, name="conv_dw")(x)
    y = layer_norm(self.epsilon, "norm")(y)
    # The MLP acts per pixel: as 2-D matrix products, whose gradients XLA:CPU computes several
    # times faster than those of the same product over a 4-D tensor (see common.pointwise_conv_dot).
    y = y.reshape(batch * height * width, channels)
    y = nn.Dense(self.mlp_ratio * channels, kernel_init=_KERNEL_INIT, name="fc1")(y)
    y = nn.gelu(y, approximate=False)  # exact, as in timm, torchvision and transformers
    if self.grn:
      y = GlobalResponseNorm(name="grn")(y.reshape(batch, height * width, -1))
      y = y.reshape(batch * height * width, -1)
    y = nn.Dense(channels, kernel_init=_KERNEL_INIT, name="fc2")(y)
    y = y.reshape(x.shape)
    if self.layer_scale:
      y = y * self.param("layer_scale", nn.initializers.constant(_LAYER_SCALE_INIT), (channels,))
    # Dropout broadcast over everything but the batch drops whole samples' branches.
    y = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3), deterministic=not train)(y)
    return x + y


class Stem(nn.Module):
  """Non-overlapping patch_size x patch_size convolution, then LayerNorm: 224 px in, 56 out."""
  width: int
  patch_size: int
  epsilon: float

  @nn.compact
  def __call__(self, x, train: bool):
    x = common.Conv(self.width, self.patch_size, strides=self.patch_size, padding="VALID",
                    kernel_init=_KERNEL_INIT, name="conv")(x)
    return layer_norm(self.epsilon, "norm")(x)


class Stage(nn.Module):
  """Optional downsampling (LayerNorm, 2x2/2 convolution to `width`), then one block per
  drop-path rate."""
  width: int
  downsample: bool
  layer_scale: bool
  grn: bool
  epsilon: float
  drop_path_rates: tuple[float, ...]

  @nn.compact
  def __call__(self, x, train: bool):
    if self.downsample:
      x = layer_norm(self.epsilon, "downsample_norm")(x)
      x = common.Conv(self.width, 2, strides=2, padding="VALID", kernel_init=_KERNEL_INIT,
                      name="downsample_conv")(x)
    for i, rate in enumerate(self.drop_path_rates):
      x = Block(layer_scale=self.layer_scale, grn=self.grn, epsilon=self.epsilon,
                drop_path_rate=rate, name=f"block{i}")(x, train)
    return x


class ConvNeXt(nn.Module):
  """ConvNeXt V1 / V2 classifier; NHWC input, logits out (contract: jtl.models.common)."""
  num_classes: int = 1000
  depths: Sequence[int] = (3, 3, 9, 3)
  widths: Sequence[int] = (96, 192, 384, 768)
  layer_scale: bool = True              # V1; V2 has none
  grn: bool = False                     # V2
  patch_size: int = 4
  norm_epsilon: float = 1e-6            # every LayerNorm before the head
  head_norm_epsilon: float = 1e-6       # the final one; transformers: config.layer_norm_eps
  drop_path_rate: float = 0.0           # stochastic depth, rising linearly over the blocks
  image_size: int = 224                 # any size works; this is what the weights were made for

  def __post_init__(self):
    if len(self.depths) != len(self.widths):
      raise ValueError(f"ConvNeXt depths {tuple(self.depths)} and widths {tuple(self.widths)} "
                       "must have the same length")
    super().__post_init__()

  @property
  def stage_names(self) -> tuple[str, ...]:
    return ("stem", *(f"stage{i}" for i in range(1, len(self.depths) + 1)), "norm", "head")

  def _drop_path_rates(self) -> list[tuple[float, ...]]:
    """timm's linspace(0, drop_path_rate, blocks), split by stage."""
    total = sum(self.depths)
    rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    starts = [sum(self.depths[:i]) for i in range(len(self.depths))]
    return [tuple(rates[s:s + d]) for s, d in zip(starts, self.depths)]

  @nn.compact
  def __call__(self, x, train: bool = False, frozen_stages: int = 0, start_stage: int = 0,
               stop_stage: int | None = None):
    stages = [("stem", Stem(self.widths[0], self.patch_size, self.norm_epsilon, name="stem"))]
    for i, (width, rates) in enumerate(zip(self.widths, self._drop_path_rates())):
      name = f"stage{i + 1}"
      stages.append((name, Stage(width, i > 0, self.layer_scale, self.grn, self.norm_epsilon,
                                 rates, name=name)))
    norm = layer_norm(self.head_norm_epsilon, "norm")
    stages.append(("norm", lambda h, _: norm(jnp.mean(h, axis=(1, 2)))))
    head = nn.Dense(self.num_classes, kernel_init=_KERNEL_INIT, name="head")
    stages.append(("head", lambda h, _: head(h)))
    return common.apply_stages(stages, x, train=train, frozen_stages=frozen_stages,
                               start_stage=start_stage, stop_stage=stop_stage)


# Depths and widths: timm's convnext.py (Liu et al. 2022 table 9; atto..nano are timm's own,
# which ConvNeXt-V2 adopted).
SIZES = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}

# Exact parameter counts with a 1000-class head: sum of parameter sizes of
# timm.create_model(name) (timm 1.0.31); torchvision's docs give the same four V1 figures.
PUBLISHED_PARAMS = {
    "convnext_tiny": 28_589_128,
    "convnext_small": 50_223_688,
    "convnext_base": 88_591_464,
    "convnext_large": 197_767_336,
    "convnext_xlarge": 350_196_968,
    "convnextv2_atto": 3_708_400,
    "convnextv2_femto": 5_233_240,
    "convnextv2_pico": 9_066_280,
    "convnextv2_nano": 15_623_800,
    "convnextv2_tiny": 28_635_496,
    "convnextv2_base": 88_717_800,
    "convnextv2_large": 197_956_840,
}

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# timm's 1000-class tags as (tag, image size, crop_pct), in timm's order, the first the default.
# All bicubic. 224 px tags also list test_input_size 288 with crop 1.0, which scores higher;
# the 384 px ones resize without cropping. clip_* tags take CLIP's mean and std.
_FB = (("fb_in22k_ft_in1k", 224, 0.875), ("fb_in1k", 224, 0.875),
       ("fb_in22k_ft_in1k_384", 384, 1.0))
_IN12K = (("in12k_ft_in1k", 224, 0.95), ("in12k_ft_in1k_384", 384, 1.0))
_FCMAE = (("fcmae_ft_in22k_in1k", 224, 0.875), ("fcmae_ft_in22k_in1k_384", 384, 1.0),
          ("fcmae_ft_in1k", 224, 0.875))
TIMM_TAGS = {
    "convnext_tiny": _IN12K + _FB,
    "convnext_small": _IN12K + _FB,
    "convnext_base": _FB + (("clip_laion2b_augreg_ft_in12k_in1k", 256, 1.0),
                            ("clip_laion2b_augreg_ft_in12k_in1k_384", 384, 1.0),
                            ("clip_laion2b_augreg_ft_in1k", 256, 1.0),
                            ("clip_laiona_augreg_ft_in1k_384", 384, 1.0)),
    "convnext_large": _FB,
    "convnext_xlarge": (("fb_in22k_ft_in1k", 224, 0.875), ("fb_in22k_ft_in1k_384", 384, 1.0)),
    "convnextv2_atto": (("fcmae_ft_in1k", 224, 0.875),),
    "convnextv2_femto": (("fcmae_ft_in1k", 224, 0.875),),
    "convnextv2_pico": (("fcmae_ft_in1k", 224, 0.875),),
    "convnextv2_nano": _FCMAE,
    "convnextv2_tiny": _FCMAE,
    "convnextv2_base": _FCMAE,
    "convnextv2_large": _FCMAE,
}

# torchvision's IMAGENET1K_V1 files: resize to 236 / 230 / 232 / 232, crop 224, bilinear. The
# crop fractions make floor(224 / crop_pct) those sides. torchvision's files are not on the hub:
# download the url, then create_model("convnext_tiny.tv_in1k", pretrained=that_file).
TORCHVISION_URL = "https://download.pytorch.org/models/"
TORCHVISION_FILES = {
    "convnext_tiny": ("convnext_tiny-983f1562.pth", 0.949),
    "convnext_small": ("convnext_small-0c510722.pth", 0.9739),
    "convnext_base": ("convnext_base-6075fbad.pth", 0.9655),
    "convnext_large": ("convnext_large-ea097f82.pth", 0.9655),
}

CONVERTERS = {"timm": convert_convnext.convert_timm, "meta": convert_convnext.convert_meta,
              "torchvision": convert_convnext.convert_torchvision,
              "hf": convert_convnext.convert_hf}


def pretrained_cfgs(arch: str) -> dict[str, PretrainedCfg]:
  cfgs = {}
  for tag, size, crop_pct in TIMM_TAGS[arch]:
    clip = tag.startswith("clip_")
    # timm evaluates its 384 px fine-tunes on the whole image squashed to the square (all
    # but the one LAION-A tag).
    squash = size == 384 and not tag.startswith("clip_laiona")
    cfgs[tag] = PretrainedCfg(
        tag, "timm", f"timm/{arch}.{tag}", image_size=size, crop_pct=crop_pct,
        interpolation="bicubic", crop_mode="squash" if squash else "center",
        **(dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) if clip else {}))
  if arch in TORCHVISION_FILES:
    filename, crop_pct = TORCHVISION_FILES[arch]
    cfgs["tv_in1k"] = PretrainedCfg("tv_in1k", "torchvision", url=TORCHVISION_URL + filename,
                                    crop_pct=crop_pct, interpolation="bilinear")
  return cfgs


def _register() -> None:
  for arch, published in PUBLISHED_PARAMS.items():
    version, size = arch.split("_")
    depths, widths = SIZES[size]
    v2 = version == "convnextv2"
    tags = pretrained_cfgs(arch)
    registry.register_model(ModelEntry(
        name=arch, family="convnext",
        build=functools.partial(ConvNeXt, depths=depths, widths=widths, layer_scale=not v2,
                                grn=v2),
        pretrained=tags, default_tag=TIMM_TAGS[arch][0][0], converters=CONVERTERS,
        published_params=published))


def from_hf_config(config, image_size: int | None = None):
  """(build, PretrainedCfg, converter) for a transformers ConvNextConfig / ConvNextV2Config."""
  if getattr(config, "num_channels", 3) != 3:
    raise ValueError(f"transformers ConvNeXt num_channels={config.num_channels}: only RGB (3)")
  if getattr(config, "hidden_act", "gelu") != "gelu":
    raise ValueError(f"transformers ConvNeXt hidden_act {config.hidden_act!r} is not supported "
                     "(only gelu)")
  if len(config.depths) != len(config.hidden_sizes):
    raise ValueError(f"transformers ConvNeXt depths {config.depths} and hidden_sizes "
                     f"{config.hidden_sizes} differ in length")
  v2 = config.model_type == "convnextv2"
  size = int(image_size or getattr(config, "image_size", 224) or 224)
  build = functools.partial(
      ConvNeXt, depths=tuple(config.depths), widths=tuple(config.hidden_sizes),
      layer_scale=not v2 and float(getattr(config, "layer_scale_init_value", 0.0)) > 0,
      grn=v2, patch_size=int(config.patch_size), head_norm_epsilon=float(config.layer_norm_eps),
      image_size=size)
  labels = tuple(str(config.id2label[i]) for i in range(config.num_labels))
  # ConvNextImageProcessor: below 384 px resize to size / crop_pct (0.875) and centre-crop,
  # from 384 px resize straight to the size (squash); facebook/convnext-* use resample=3
  # (bicubic). The factory takes mean/std from preprocessor_config.json when present.
  cfg = PretrainedCfg(tag="hf", layout="hf", num_classes=config.num_labels, image_size=size,
                      crop_pct=0.875 if size < 384 else 1.0, interpolation="bicubic",
                      crop_mode="center" if size < 384 else "squash",
                      label_names=labels)
  return build, cfg, convert_convnext.convert_hf


_register()
registry.register_hf_arch("convnext", from_hf_config)
registry.register_hf_arch("convnextv2", from_hf_config)
