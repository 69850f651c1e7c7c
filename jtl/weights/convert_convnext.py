"""ConvNeXt V1 / V2 checkpoints onto jtl.models.convnext.ConvNeXt.

Four layouts:
- timm: stem.0/.1, stages.N.downsample.0/.1, stages.N.blocks.M.{conv_dw, norm, mlp.fc1,
  mlp.grn, mlp.fc2, gamma}, head.norm, head.fc. Models built with conv_mlp (atto..nano, and
  every small V2) store fc1/fc2 as (out, in, 1, 1) 1x1 convolutions instead of (out, in) linears.
- meta: the original facebookresearch/ConvNeXt(-V2) names that timm's checkpoint_filter_fn
  remaps: downsample_layers.0 (stem) and .N (downsampling), stages.N.M.{dwconv, norm, pwconv1,
  grn.gamma/beta (1, 1, 1, C), pwconv2, gamma}, norm, head.
- torchvision: features.0 (stem), features.2N (downsampling), features.2N+1.M.block.{0 dw conv,
  2 norm, 3 fc1, 5 fc2} with layer_scale (C, 1, 1), classifier.0 (norm) and .2 (linear).
- hf: transformers ConvNextModel / ConvNextV2Model and their ForImageClassification ("convnext."
  / "convnextv2." prefix, classifier).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import numpy as np

from jtl.weights.mapping import StateMapper


def pointwise_kernel(w: np.ndarray) -> np.ndarray:
  """A linear (out, in) or 1x1 convolution (out, in, 1, 1) weight as a Dense kernel (in, out)."""
  w = np.asarray(w)
  return np.transpose(w.reshape(w.shape[0], -1))


def channel_vector(v: np.ndarray) -> np.ndarray:
  """(C,), (C, 1, 1) or (1, 1, 1, C) per-channel parameters as (C,)."""
  return np.asarray(v).reshape(-1)


def block(m: StateMapper, src: str, dst: str, names: Mapping[str, str]) -> None:
  """One ConvNeXt block whose parts are named `names` under `src`."""
  m.conv(f"{src}.{names['conv_dw']}", f"{dst}/conv_dw")
  m.norm(f"{src}.{names['norm']}", f"{dst}/norm")
  for fc in ("fc1", "fc2"):
    m.take(f"{src}.{names[fc]}.weight", f"params/{dst}/{fc}/kernel", pointwise_kernel)
    m.take(f"{src}.{names[fc]}.bias", f"params/{dst}/{fc}/bias")
  m.take(f"{src}.{names['layer_scale']}", f"params/{dst}/layer_scale", channel_vector)
  if "grn_scale" in names:
    m.take(f"{src}.{names['grn_scale']}", f"params/{dst}/grn/scale", channel_vector)
    m.take(f"{src}.{names['grn_bias']}", f"params/{dst}/grn/bias", channel_vector)


TIMM_BLOCK = dict(conv_dw="conv_dw", norm="norm", fc1="mlp.fc1", fc2="mlp.fc2",
                  layer_scale="gamma", grn_scale="mlp.grn.weight", grn_bias="mlp.grn.bias")
META_BLOCK = dict(conv_dw="dwconv", norm="norm", fc1="pwconv1", fc2="pwconv2",
                  layer_scale="gamma", grn_scale="grn.gamma", grn_bias="grn.beta")
TORCHVISION_BLOCK = dict(conv_dw="block.0", norm="block.2", fc1="block.3", fc2="block.5",
                         layer_scale="layer_scale")
HF_BLOCK = dict(conv_dw="dwconv", norm="layernorm", fc1="pwconv1", fc2="pwconv2",
                layer_scale="layer_scale_parameter", grn_scale="grn.weight", grn_bias="grn.bias")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where one source keeps each part of a ConvNeXt (the four differ in names alone)."""
  prefixes: tuple[str, ...]             # stripped from every key first
  stem_conv: str
  stem_norm: str
  downsample: Callable[[int], str]      # stage 1..3 -> its downsampling's prefix (.0 norm, .1 conv)
  block: Callable[[int, int], str]      # (stage, index) -> the block's prefix
  block_names: Mapping[str, str]        # the block's parts, as `block` reads them
  norm: str
  head: str


TIMM = Layout(("module.",), "stem.0", "stem.1", lambda s: f"stages.{s}.downsample",
              lambda s, i: f"stages.{s}.blocks.{i}", TIMM_BLOCK, "head.norm", "head.fc")
# facebookresearch/ConvNeXt(-V2): downsample_layers.0 is the stem (the {"model": ...} wrapper
# of their .pth files is unwrapped by the reader).
META = Layout(("module.",), "downsample_layers.0.0", "downsample_layers.0.1",
              lambda s: f"downsample_layers.{s}", lambda s, i: f"stages.{s}.{i}", META_BLOCK,
              "norm", "head")
# torchvision convnext_tiny..large: features.0 is the stem, features.2N / 2N+1 stage N.
TORCHVISION = Layout((), "features.0.0", "features.0.1", lambda s: f"features.{2 * s}",
                     lambda s, i: f"features.{2 * s + 1}.{i}", TORCHVISION_BLOCK,
                     "classifier.0", "classifier.2")
# transformers; a bare ConvNextModel / ConvNextV2Model (no prefix, no classifier) works too.
HF = Layout(("convnextv2.", "convnext."), "embeddings.patch_embeddings", "embeddings.layernorm",
            lambda s: f"encoder.stages.{s}.downsampling_layer",
            lambda s, i: f"encoder.stages.{s}.layers.{i}", HF_BLOCK, "layernorm", "classifier")


def convert(state: Mapping[str, np.ndarray], module, layout: Layout) -> dict[str, np.ndarray]:
  """`layout`'s names -> ours."""
  m = StateMapper(state)
  for prefix in layout.prefixes:
    m.strip_prefix(prefix)
  m.conv(layout.stem_conv, "stem/conv")
  m.norm(layout.stem_norm, "stem/norm")
  for stage, depth in enumerate(module.depths):
    dst = f"stage{stage + 1}"
    if stage:  # the first stage has no downsampling: the stem's stride 4 is its own
      m.norm(f"{layout.downsample(stage)}.0", f"{dst}/downsample_norm")
      m.conv(f"{layout.downsample(stage)}.1", f"{dst}/downsample_conv")
    for index in range(depth):
      block(m, layout.block(stage, index), f"{dst}/block{index}", layout.block_names)
  m.norm(layout.norm, "norm")
  m.dense(layout.head, "head")
  return m.result()


convert_timm = functools.partial(convert, layout=TIMM)
convert_meta = functools.partial(convert, layout=META)
convert_torchvision = functools.partial(convert, layout=TORCHVISION)
convert_hf = functools.partial(convert, layout=HF)
