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

from typing import Mapping

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


def convert_timm(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """timm names -> ours."""
  m = StateMapper(state)
  m.strip_prefix("module.")
  m.conv("stem.0", "stem/conv")
  m.norm("stem.1", "stem/norm")
  for stage, depth in enumerate(module.depths):
    dst = f"stage{stage + 1}"
    m.norm(f"stages.{stage}.downsample.0", f"{dst}/downsample_norm")
    m.conv(f"stages.{stage}.downsample.1", f"{dst}/downsample_conv")
    for index in range(depth):
      block(m, f"stages.{stage}.blocks.{index}", f"{dst}/block{index}", TIMM_BLOCK)
  m.norm("head.norm", "norm")
  m.dense("head.fc", "head")
  return m.result()


def convert_meta(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """facebookresearch/ConvNeXt and ConvNeXt-V2 names -> ours (the {"model": ...} wrapper of
  their .pth files is unwrapped by the reader)."""
  m = StateMapper(state)
  m.strip_prefix("module.")
  m.conv("downsample_layers.0.0", "stem/conv")
  m.norm("downsample_layers.0.1", "stem/norm")
  for stage, depth in enumerate(module.depths):
    dst = f"stage{stage + 1}"
    if stage:  # downsample_layers.0 is the stem
      m.norm(f"downsample_layers.{stage}.0", f"{dst}/downsample_norm")
      m.conv(f"downsample_layers.{stage}.1", f"{dst}/downsample_conv")
    for index in range(depth):
      block(m, f"stages.{stage}.{index}", f"{dst}/block{index}", META_BLOCK)
  m.norm("norm", "norm")
  m.dense("head", "head")
  return m.result()


def convert_torchvision(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """torchvision convnext_tiny..large names -> ours."""
  m = StateMapper(state)
  m.conv("features.0.0", "stem/conv")
  m.norm("features.0.1", "stem/norm")
  for stage, depth in enumerate(module.depths):
    dst = f"stage{stage + 1}"
    if stage:  # features.0 is the stem
      m.norm(f"features.{2 * stage}.0", f"{dst}/downsample_norm")
      m.conv(f"features.{2 * stage}.1", f"{dst}/downsample_conv")
    for index in range(depth):
      block(m, f"features.{2 * stage + 1}.{index}", f"{dst}/block{index}", TORCHVISION_BLOCK)
  m.norm("classifier.0", "norm")
  m.dense("classifier.2", "head")
  return m.result()


def convert_hf(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """transformers names -> ours; a bare ConvNextModel / ConvNextV2Model (no prefix, no
  classifier) works too."""
  m = StateMapper(state)
  m.strip_prefix("convnextv2.")
  m.strip_prefix("convnext.")
  m.conv("embeddings.patch_embeddings", "stem/conv")
  m.norm("embeddings.layernorm", "stem/norm")
  for stage, depth in enumerate(module.depths):
    src, dst = f"encoder.stages.{stage}", f"stage{stage + 1}"
    m.norm(f"{src}.downsampling_layer.0", f"{dst}/downsample_norm")
    m.conv(f"{src}.downsampling_layer.1", f"{dst}/downsample_conv")
    for index in range(depth):
      block(m, f"{src}.layers.{index}", f"{dst}/block{index}", HF_BLOCK)
  m.norm("layernorm", "norm")
  m.dense("classifier", "head")
  return m.result()
