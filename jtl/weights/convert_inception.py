"""torchvision / timm Inception-v3 checkpoints onto `jtl.models.inception`.

Both libraries name the layers alike (Conv2d_1a_3x3.conv, Mixed_5b.branch1x1.bn, fc), and our
module keeps those names inside its stages, so the mapping only adds the stage and turns torch
layouts into flax ones. The auxiliary classifier (AuxLogits.*, in torchvision's file) is
dropped on purpose: our module has no aux head.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from jtl.weights.mapping import StateMapper

# First name component -> our stage.
_STAGE_OF = (
    (re.compile(r"Conv2d_\w+"), "stem"),
    (re.compile(r"Mixed_5[a-z]"), "mixed5"),
    (re.compile(r"Mixed_6[a-z]"), "mixed6"),
    (re.compile(r"Mixed_7[a-z]"), "mixed7"),
)


def _stage(block: str) -> str | None:
  return next((stage for regex, stage in _STAGE_OF if regex.fullmatch(block)), None)


def convert(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  m = StateMapper(state)
  m.strip_prefix("module.")
  m.drop(r"AuxLogits\..*")
  layers = sorted({k[:-len(".conv.weight")] for k in m.state if k.endswith(".conv.weight")})
  for layer in layers:
    stage = _stage(layer.split(".")[0])
    if stage is None:
      continue
    dst = f"{stage}/{layer.replace('.', '/')}"
    m.conv(f"{layer}.conv", f"{dst}/conv")
    m.norm(f"{layer}.bn", f"{dst}/bn")
  m.dense("fc", "head")
  return m.result()
