"""ResNet checkpoints onto jtl.models.resnet.ResNet.

Two layouts:
- torch: torchvision and timm share their names (conv1, bn1, layer1.0.conv1 ... downsample.0/.1,
  fc), so one converter serves both.
- hf: transformers ResNetForImageClassification / ResNetModel (resnet.embedder.embedder.*,
  resnet.encoder.stages.N.layers.M.layer.K / .shortcut, classifier.1).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from jtl.weights.mapping import StateMapper

BLOCK_CONVS = 3  # a bottleneck's; a basic block has two, and absent names are skipped


def convert_torch(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """torchvision / timm names -> ours."""
  m = StateMapper(state)
  m.strip_prefix("module.")  # checkpoints saved from DataParallel
  m.conv("conv1", "stem/conv")
  m.norm("bn1", "stem/bn")
  for stage, depth in enumerate(module.depths, 1):
    for index in range(depth):
      src, dst = f"layer{stage}.{index}", f"stage{stage}/block{index}"
      for k in range(1, BLOCK_CONVS + 1):
        m.conv(f"{src}.conv{k}", f"{dst}/conv{k}")
        m.norm(f"{src}.bn{k}", f"{dst}/bn{k}")
      m.conv(f"{src}.downsample.0", f"{dst}/shortcut_conv")
      m.norm(f"{src}.downsample.1", f"{dst}/shortcut_bn")
  m.dense("fc", "head")
  return m.result()


def convert_hf(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """transformers names -> ours; a bare ResNetModel (no "resnet." prefix, no head) works too."""
  m = StateMapper(state)
  m.strip_prefix("resnet.")
  conv_layer(m, "embedder.embedder", "stem/conv", "stem/bn")
  for stage, depth in enumerate(module.depths):
    for index in range(depth):
      src = f"encoder.stages.{stage}.layers.{index}"
      dst = f"stage{stage + 1}/block{index}"
      for k in range(BLOCK_CONVS):
        conv_layer(m, f"{src}.layer.{k}", f"{dst}/conv{k + 1}", f"{dst}/bn{k + 1}")
      conv_layer(m, f"{src}.shortcut", f"{dst}/shortcut_conv", f"{dst}/shortcut_bn")
  # classifier.0 is the parameterless Flatten.
  m.dense("classifier.1", "head")
  return m.result()


def conv_layer(m: StateMapper, src: str, conv_dst: str, norm_dst: str) -> None:
  """A transformers ResNetConvLayer / ResNetShortCut: .convolution then .normalization."""
  m.conv(f"{src}.convolution", conv_dst)
  m.norm(f"{src}.normalization", norm_dst)
