"""VGG-11/13/16/19 (Simonyan & Zisserman 2014), with and without BatchNorm, as torchvision has them.

Stages: stage1..stage5 (3x3 convolutions, each stage ending in a 2x2 max-pool), classifier
(fc6, fc7: Dense + ReLU + dropout 0.5), head (fc8). Before fc6 the feature map is average-pooled
to 7x7 with PyTorch's adaptive bins, so any input size gives the torchvision logits; fc6 reads
the pooled map flattened in NHWC order (the converters permute torch's NCHW order to match).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jtl.models import common, registry
from jtl.models.registry import ModelEntry, PretrainedCfg
from jtl.weights import convert_vgg

# torchvision initialises convolutions with He-normal over fan-out and linears with N(0, 0.01).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_init = nn.initializers.normal(0.01)


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) averaging weights of torch's adaptive_avg_pool along one axis.

  Output bin i averages inputs floor(i * in / out) .. ceil((i + 1) * in / out) - 1; bins may
  overlap or repeat an input (when in < out), exactly as in PyTorch.
  """
  weights = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    weights[i, start:end] = 1.0 / (end - start)
  return weights


def adaptive_avg_pool(x, out_size: int):
  """torch.nn.AdaptiveAvgPool2d((out_size, out_size)) on an NHWC batch."""
  height, width = x.shape[1], x.shape[2]
  if height == out_size and width == out_size:
    return x
  rows = jnp.asarray(adaptive_pool_matrix(height, out_size))
  cols = jnp.asarray(adaptive_pool_matrix(width, out_size))
  return jnp.einsum("ih,jw,nhwc->nijc", rows, cols, x)


class ConvStage(nn.Module):
  """3x3 convolutions (+ BatchNorm) + ReLU, then a 2x2/2 max-pool."""
  channels: Sequence[int]
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    for i, features in enumerate(self.channels, 1):
      x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init,
                  name=f"conv{i}")(x)
      if self.batch_norm:
        x = common.BatchNorm(train=train, name=f"bn{i}")(x)
      x = nn.relu(x)
    return common.max_pool(x, (2, 2), (2, 2))


class Classifier(nn.Module):
  """Adaptive average pool to pool_size^2, flatten (NHWC), fc6 and fc7 with ReLU and dropout."""
  fc_width: int
  pool_size: int
  dropout_rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    x = adaptive_avg_pool(x, self.pool_size)
    x = x.reshape(x.shape[0], -1)
    for name in ("fc6", "fc7"):
      x = nn.relu(nn.Dense(self.fc_width, kernel_init=dense_init, name=name)(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return x


class VGG(nn.Module):
  """VGG classifier; NHWC input, logits out (see jtl.models.common for the contract)."""
  num_classes: int = 1000
  # Output channels of each convolution, per stage.
  stage_channels: Sequence[Sequence[int]] = ((64,), (128,), (256, 256), (512, 512), (512, 512))
  batch_norm: bool = False
  fc_width: int = 4096
  pool_size: int = 7
  dropout_rate: float = 0.5
  image_size: int = 224
  # Channel pruning (jtl.pruning.channels): every convolution's output channels in order,
  # replacing stage_channels' widths (its layout into stages stays); None: stage_channels.
  inner_widths: Sequence[int] | None = None

  def __post_init__(self):
    convs = sum(len(c) for c in self.stage_channels)
    if self.inner_widths is not None and len(self.inner_widths) != convs:
      raise ValueError(f"VGG inner_widths: {len(self.inner_widths)} given, one per "
                       f"convolution ({convs}) needed")
    super().__post_init__()

  @property
  def stage_names(self) -> tuple[str, ...]:
    convs = tuple(f"stage{i}" for i in range(1, len(self.stage_channels) + 1))
    return convs + ("classifier", "head")

  def conv_widths(self) -> tuple[tuple[int, ...], ...]:
    """The output channels of each convolution, per stage, after any inner_widths."""
    if self.inner_widths is None:
      return tuple(tuple(c) for c in self.stage_channels)
    flat, out = [int(w) for w in self.inner_widths], []
    for channels in self.stage_channels:
      out.append(tuple(flat[:len(channels)]))
      flat = flat[len(channels):]
    return tuple(out)

  @nn.compact
  def __call__(self, x, train: bool = False, frozen_stages: int = 0, start_stage: int = 0,
               stop_stage: int | None = None):
    stages = []
    for i, channels in enumerate(self.conv_widths(), 1):
      name = f"stage{i}"
      stages.append((name, ConvStage(tuple(channels), self.batch_norm, name=name)))
    stages.append(("classifier", Classifier(self.fc_width, self.pool_size, self.dropout_rate,
                                            name="classifier")))
    head = nn.Dense(self.num_classes, kernel_init=dense_init, name="head")
    stages.append(("head", lambda x, train: head(x)))
    return common.apply_stages(stages, x, train=train, frozen_stages=frozen_stages,
                               start_stage=start_stage, stop_stage=stop_stage)


# Convolution widths of configurations A, B, D and E of the paper.
STAGE_CHANNELS = {
    "vgg11": ((64,), (128,), (256,) * 2, (512,) * 2, (512,) * 2),
    "vgg13": ((64,) * 2, (128,) * 2, (256,) * 2, (512,) * 2, (512,) * 2),
    "vgg16": ((64,) * 2, (128,) * 2, (256,) * 3, (512,) * 3, (512,) * 3),
    "vgg19": ((64,) * 2, (128,) * 2, (256,) * 4, (512,) * 4, (512,) * 4),
}
# Parameter counts from the torchvision model docs (pytorch.org/vision/stable/models).
PUBLISHED_PARAMS = {
    "vgg11": 132_863_336, "vgg11_bn": 132_868_840,
    "vgg13": 133_047_848, "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544, "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240, "vgg19_bn": 143_678_248,
}
CONVERTERS = {"torchvision": convert_vgg.convert_torchvision, "timm": convert_vgg.convert_timm}

for _name, _published in PUBLISHED_PARAMS.items():
  _base = _name.split("_")[0]
  registry.register_model(ModelEntry(
      name=_name, family="vgg",
      build=functools.partial(VGG, stage_channels=STAGE_CHANNELS[_base],
                              batch_norm=_name.endswith("_bn")),
      # torchvision's weights as timm mirrors them (timm layout): 224 px, crop 0.875, bilinear.
      pretrained={"tv_in1k": PretrainedCfg("tv_in1k", "timm", f"timm/{_name}.tv_in1k")},
      default_tag="tv_in1k", converters=CONVERTERS, published_params=_published))
