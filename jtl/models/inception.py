"""Inception-v3 (Szegedy et al. 2016) in the layout of torchvision and timm, without the aux head.

Submodules keep torchvision's names (Conv2d_1a_3x3, Mixed_5b/branch3x3dbl_2, ...), grouped into
five stages: "stem" (Conv2d_1a..Conv2d_4a with the two max pools), "mixed5" (5b-5d, 35x35 at
299 px), "mixed6" (6a-6e, 17x17), "mixed7" (7a-7c, 8x8) and "head" (global average pool,
dropout, Dense). The auxiliary classifier on Mixed_6e only shapes training from scratch, so it
is left out (the converter drops AuxLogits.*): the parameter count is timm's inception_v3,
23,834,568, not torchvision's 27,161,264 with the aux head.

The smallest input that survives every stride is 75 px (1x1 after Mixed_7a).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jtl.models import common, registry
from jtl.models.registry import (IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD,
                                 ModelEntry, PretrainedCfg)
from jtl.weights import convert_inception


class ConvBN(nn.Module):
  """Conv (no bias), BatchNorm, ReLU: torchvision's BasicConv2d."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  bn_epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x, train: bool):
    pad_h, pad_w = self.padding
    x = common.Conv(self.features, self.kernel, strides=(self.strides, self.strides),
                    padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False, name="conv")(x)
    x = common.BatchNorm(train=train, epsilon=self.bn_epsilon, name="bn")(x)
    return nn.relu(x)


def _max_pool(x):
  return common.max_pool(x, (3, 3), (2, 2), padding="VALID")


def _avg_pool(x):
  # torch's avg_pool2d(3, stride 1, padding 1) counts the zero padding.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)


class _Block(nn.Module):
  """A mixed block: `conv(name, features, kernel, strides, padding)` builds named ConvBNs."""
  bn_epsilon: float = 1e-3

  def conv(self, name: str, features: int, kernel: Sequence[int], strides: int = 1,
           padding: Sequence[int] = (0, 0)) -> ConvBN:
    return ConvBN(features, tuple(kernel), strides, tuple(padding), self.bn_epsilon, name=name)


class InceptionA(_Block):
  """35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x, train: bool):
    b1 = self.conv("branch1x1", 64, (1, 1))(x, train)
    b5 = self.conv("branch5x5_1", 48, (1, 1))(x, train)
    b5 = self.conv("branch5x5_2", 64, (5, 5), padding=(2, 2))(b5, train)
    b3 = self.conv("branch3x3dbl_1", 64, (1, 1))(x, train)
    b3 = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(b3, train)
    b3 = self.conv("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(b3, train)
    bp = self.conv("branch_pool", self.pool_features, (1, 1))(_avg_pool(x), train)
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """35x35 -> 17x17 reduction."""

  @nn.compact
  def __call__(self, x, train: bool):
    b3 = self.conv("branch3x3", 384, (3, 3), strides=2)(x, train)
    bd = self.conv("branch3x3dbl_1", 64, (1, 1))(x, train)
    bd = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(bd, train)
    bd = self.conv("branch3x3dbl_3", 96, (3, 3), strides=2)(bd, train)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(_Block):
  """17x17 block with factorised 7x7 convolutions (1x7 then 7x1)."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x, train: bool):
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192, (1, 1))(x, train)
    b7 = self.conv("branch7x7_1", c7, (1, 1))(x, train)
    b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7, train)
    b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7, train)
    bd = self.conv("branch7x7dbl_1", c7, (1, 1))(x, train)
    bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd, train)
    bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd, train)
    bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd, train)
    bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd, train)
    bp = self.conv("branch_pool", 192, (1, 1))(_avg_pool(x), train)
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """17x17 -> 8x8 reduction."""

  @nn.compact
  def __call__(self, x, train: bool):
    b3 = self.conv("branch3x3_1", 192, (1, 1))(x, train)
    b3 = self.conv("branch3x3_2", 320, (3, 3), strides=2)(b3, train)
    b7 = self.conv("branch7x7x3_1", 192, (1, 1))(x, train)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7, train)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7, train)
    b7 = self.conv("branch7x7x3_4", 192, (3, 3), strides=2)(b7, train)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(_Block):
  """8x8 block whose 3x3 branches split into parallel 1x3 and 3x1 convolutions."""

  @nn.compact
  def __call__(self, x, train: bool):
    b1 = self.conv("branch1x1", 320, (1, 1))(x, train)
    b3 = self.conv("branch3x3_1", 384, (1, 1))(x, train)
    b3 = jnp.concatenate([
        self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3, train),
        self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3, train)], axis=-1)
    bd = self.conv("branch3x3dbl_1", 448, (1, 1))(x, train)
    bd = self.conv("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(bd, train)
    bd = jnp.concatenate([
        self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd, train),
        self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd, train)], axis=-1)
    bp = self.conv("branch_pool", 192, (1, 1))(_avg_pool(x), train)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Stem(_Block):
  """299 -> 35x35x192: five convolutions and two max pools."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = self.conv("Conv2d_1a_3x3", 32, (3, 3), strides=2)(x, train)
    x = self.conv("Conv2d_2a_3x3", 32, (3, 3))(x, train)
    x = self.conv("Conv2d_2b_3x3", 64, (3, 3), padding=(1, 1))(x, train)
    x = _max_pool(x)
    x = self.conv("Conv2d_3b_1x1", 80, (1, 1))(x, train)
    x = self.conv("Conv2d_4a_3x3", 192, (3, 3))(x, train)
    return _max_pool(x)


class MixedStage(nn.Module):
  """Mixed blocks of one resolution, run in order."""
  blocks: tuple[tuple[str, type, dict], ...]
  bn_epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x, train: bool):
    for name, block, kwargs in self.blocks:
      x = block(bn_epsilon=self.bn_epsilon, name=name, **kwargs)(x, train)
    return x


_MIXED5 = (("Mixed_5b", InceptionA, {"pool_features": 32}),
           ("Mixed_5c", InceptionA, {"pool_features": 64}),
           ("Mixed_5d", InceptionA, {"pool_features": 64}))
_MIXED6 = (("Mixed_6a", InceptionB, {}),
           ("Mixed_6b", InceptionC, {"channels_7x7": 128}),
           ("Mixed_6c", InceptionC, {"channels_7x7": 160}),
           ("Mixed_6d", InceptionC, {"channels_7x7": 160}),
           ("Mixed_6e", InceptionC, {"channels_7x7": 192}))
_MIXED7 = (("Mixed_7a", InceptionD, {}),
           ("Mixed_7b", InceptionE, {}),
           ("Mixed_7c", InceptionE, {}))


class InceptionV3(nn.Module):
  """Inception-v3 classifier; NHWC input, 299 px by default, at least 75 px."""
  # The head begins with a global average pool, so a feature-extraction cache may hold the
  # pooled features (see jtl.feature_cache); a plain class attribute, not a field.
  head_pools_globally = True
  num_classes: int = 1000
  image_size: int = 299
  dropout_rate: float = 0.0       # before the head, while training (torchvision trains with 0.5)
  bn_epsilon: float = 1e-3        # TF's value, kept by torchvision and timm

  @property
  def stage_names(self) -> tuple[str, ...]:
    return ("stem", "mixed5", "mixed6", "mixed7", "head")

  @nn.compact
  def __call__(self, x, train: bool = False, frozen_stages: int = 0, start_stage: int = 0,
               stop_stage: int | None = None):
    if start_stage == 0 and min(x.shape[1:3]) < 75:
      raise ValueError(f"Inception-v3 needs inputs of at least 75x75 px, got "
                       f"{x.shape[1]}x{x.shape[2]}")
    eps = self.bn_epsilon
    head = nn.Dense(self.num_classes, name="head")
    dropout = nn.Dropout(self.dropout_rate)

    def classify(h, train):
      h = jnp.mean(h, axis=(1, 2))
      return head(dropout(h, deterministic=not train))

    stages = [
        ("stem", Stem(bn_epsilon=eps, name="stem")),
        ("mixed5", MixedStage(_MIXED5, eps, name="mixed5")),
        ("mixed6", MixedStage(_MIXED6, eps, name="mixed6")),
        ("mixed7", MixedStage(_MIXED7, eps, name="mixed7")),
        ("head", classify),
    ]
    return common.apply_stages(stages, x, train=train, frozen_stages=frozen_stages,
                               start_stage=start_stage, stop_stage=stop_stage)


def _cfg(tag: str, mean=INCEPTION_MEAN, std=INCEPTION_STD) -> PretrainedCfg:
  # timm's inception_v3 _cfg: 299 px, crop 0.875, bicubic, mean = std = 0.5 (timm feeds the
  # torchvision weights [-1, 1] pixels directly instead of torchvision's transform_input).
  return PretrainedCfg(tag=tag, layout="timm", hf_hub_id=f"timm/inception_v3.{tag}",
                       image_size=299, crop_pct=0.875, interpolation="bicubic", mean=mean,
                       std=std)


registry.register_model(ModelEntry(
    name="inception_v3",
    family="inception",
    build=functools.partial(InceptionV3),
    pretrained={
        "tv_in1k": _cfg("tv_in1k"),       # torchvision's weights (ported from TF)
        "tf_in1k": _cfg("tf_in1k"),       # TF-slim weights, timm's port
        "gluon_in1k": _cfg("gluon_in1k", IMAGENET_MEAN, IMAGENET_STD),
    },
    default_tag="tv_in1k",
    converters={"timm": convert_inception.convert, "torchvision": convert_inception.convert},
    # timm: sum of parameter sizes of timm.create_model("inception_v3") (no aux head), which
    # is torchvision's published 27,161,264 less the aux head's 3,326,696.
    published_params=23_834_568,
))
