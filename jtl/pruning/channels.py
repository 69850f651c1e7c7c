"""Structured pruning: channels inside blocks removed, leaving a smaller dense model.

Only channels whose removal changes nothing outside their block are pruned: a ResNet block's
inner channels (basic: conv1's; bottleneck: conv1's and conv2's), every VGG convolution's (the
last one's also leave fc6's rows), an EfficientNet block's expanded channels (expand conv,
depthwise conv, the squeeze-excite gates and the projection's inputs). Each such set is a
`ChannelGroup`: the variables that make the channels (their last axis) and the kernels that
read them (axis -2). Channels are ranked by |BatchNorm scale| (or the L2 norm of the kernel
that makes them, where there is no BatchNorm) and the same fraction is dropped in every group.
The narrower model is the module built with `inner_widths` = the kept count of each group, in
group order, the order the families' modules read them in.

The pruned model computes exactly what the full model computes with the dropped channels'
readers zeroed (`zero_dropped`): the tests hold the two to each other.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from jtl import params as P
from jtl.errors import UserError
from jtl.models import efficientnet, registry, resnet, vgg

FAMILIES = ("resnet", "vgg", "efficientnet")
RANKINGS = ("bn_scale", "kernel_norm")


class UnsupportedModelError(UserError, ValueError):
  """Channel pruning was asked of a model family that has no narrower form."""


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
  """The channels of one block that can go together."""
  outputs: tuple[str, ...]              # flat variable names whose last axis is these channels
  inputs: tuple[tuple[str, int], ...]   # (flat kernel name, repeats): axis -2 reads the channels
                                        # `repeats` times over (fc6 reads a flattened 7x7 map)
  norm: str | None                      # the BatchNorm (path) right after them, None without

  def width(self, flat: Mapping[str, Any]) -> int:
    return int(np.shape(flat[self.outputs[0]])[-1])

  def scores(self, flat: Mapping[str, Any], rank: str) -> np.ndarray:
    if rank == "bn_scale" and self.norm is not None:
      return np.abs(np.asarray(flat[f"params/{self.norm}/scale"], np.float64))
    kernel = np.asarray(flat[self.outputs[0]], np.float64)
    return np.sqrt(np.sum(kernel.reshape(-1, kernel.shape[-1]) ** 2, axis=0))


def family_of(model_name: str) -> str:
  """The registry family of a run's model name ("" for transformers / hub models)."""
  try:
    return registry.get_entry(model_name).family
  except ValueError:
    return ""


def check_supported(model_name: str) -> None:
  family = family_of(model_name)
  if family not in FAMILIES:
    raise UnsupportedModelError(
        f"--method channels: model {model_name!r} (family {family or 'unregistered'!r}) has no "
        f"narrower form; channel pruning supports the {', '.join(FAMILIES)} families "
        "(--method magnitude works for every model)")


def _with_norm(outputs: list[str], norm: str | None, present) -> tuple[str, ...]:
  if norm is not None:
    outputs += [f"params/{norm}/scale", f"params/{norm}/bias",
                f"batch_stats/{norm}/mean", f"batch_stats/{norm}/var"]
  return tuple(n for n in outputs if n in present)


def _resnet_groups(module: resnet.ResNet, present) -> list[ChannelGroup]:
  groups = []
  convs = 2 if module.block == "basic" else 3
  for s, depth in enumerate(module.depths, 1):
    for b in range(depth):
      block = f"stage{s}/block{b}"
      for i in range(1, convs):
        groups.append(ChannelGroup(
            _with_norm([f"params/{block}/conv{i}/kernel"], f"{block}/bn{i}", present),
            ((f"params/{block}/conv{i + 1}/kernel", 1),), f"{block}/bn{i}"))
  return groups


def _vgg_groups(module: vgg.VGG, present) -> list[ChannelGroup]:
  convs = [f"stage{s}/conv{i}" for s, channels in enumerate(module.stage_channels, 1)
           for i in range(1, len(channels) + 1)]
  groups = []
  for index, conv in enumerate(convs):
    stage = conv.split("/")[0]
    norm = f"{stage}/bn{conv.split('conv')[-1]}" if module.batch_norm else None
    reader = ((f"params/{convs[index + 1]}/kernel", 1) if index + 1 < len(convs)
              else ("params/classifier/fc6/kernel", module.pool_size ** 2))
    groups.append(ChannelGroup(
        _with_norm([f"params/{conv}/kernel", f"params/{conv}/bias"], norm, present),
        (reader,), norm))
  return groups


def _efficientnet_groups(module: efficientnet.EfficientNet, present) -> list[ChannelGroup]:
  groups = []
  for s, stage in enumerate(module.block_specs(), 1):
    for b, spec in enumerate(stage):
      if spec.expand_ratio == 1:  # the depthwise conv reads the block's input: not inner
        continue
      block = f"stage{s}/block{b}"
      outputs = _with_norm([f"params/{block}/expand_conv/kernel"], f"{block}/expand_bn",
                           present)
      outputs += _with_norm([f"params/{block}/dw_conv/kernel", f"params/{block}/se/expand/kernel",
                             f"params/{block}/se/expand/bias"], f"{block}/dw_bn", present)
      inputs = tuple((n, 1) for n in (f"params/{block}/se/reduce/kernel",
                                      f"params/{block}/project_conv/kernel") if n in present)
      groups.append(ChannelGroup(outputs, inputs, f"{block}/dw_bn"))
  return groups


def channel_groups(model) -> list[ChannelGroup]:
  """The groups of `model` in its family's inner_widths order."""
  present = set(P.flatten(model.variables))
  module = model.module
  if isinstance(module, resnet.ResNet):
    return _resnet_groups(module, present)
  if isinstance(module, vgg.VGG):
    return _vgg_groups(module, present)
  if isinstance(module, efficientnet.EfficientNet):
    return _efficientnet_groups(module, present)
  raise UnsupportedModelError(f"channel pruning supports the {', '.join(FAMILIES)} families, "
                              f"not {type(module).__name__}")


def choose_channels(model, fraction: float, rank: str = "bn_scale") -> list[np.ndarray]:
  """Per group, the sorted indices of the channels kept: the best-ranked
  max(1, round((1 - fraction) * width)) of them."""
  if rank not in RANKINGS:
    raise ValueError(f"channel ranking must be one of {RANKINGS}, got {rank!r}")
  flat = P.flatten(model.variables)
  kept = []
  for group in channel_groups(model):
    scores = group.scores(flat, rank)
    count = max(1, int(round((1.0 - fraction) * len(scores))))
    best = np.argsort(-scores, kind="stable")[:count]
    kept.append(np.sort(best))
  return kept


def _take_inputs(kernel: np.ndarray, keep: np.ndarray, width: int, repeats: int) -> np.ndarray:
  shape = kernel.shape
  blocks = kernel.reshape(*shape[:-2], repeats, width, shape[-1])
  return blocks[..., keep, :].reshape(*shape[:-2], repeats * len(keep), shape[-1])


def narrow_variables(model, groups: Sequence[ChannelGroup], kept: Sequence[np.ndarray]) -> dict:
  """The variables of the narrower model: every group's kept channels only."""
  flat = {k: np.asarray(v) for k, v in P.flatten(model.variables).items()}
  for group, keep in zip(groups, kept):
    width = group.width(flat)
    for name, repeats in group.inputs:
      flat[name] = _take_inputs(flat[name], keep, width, repeats)
    for name in group.outputs:
      flat[name] = flat[name][..., keep]
  return P.unflatten(flat)


def zero_dropped(model, groups: Sequence[ChannelGroup], kept: Sequence[np.ndarray]) -> dict:
  """The full model's variables with the readers of every dropped channel zeroed: what the
  narrower model computes, at the full width."""
  flat = {k: np.array(v) for k, v in P.flatten(model.variables).items()}
  for group, keep in zip(groups, kept):
    width = group.width(flat)
    dropped = np.setdiff1d(np.arange(width), keep)
    for name, repeats in group.inputs:
      kernel = flat[name]
      blocks = kernel.reshape(*kernel.shape[:-2], repeats, width, kernel.shape[-1])
      blocks[..., dropped, :] = 0
      flat[name] = blocks.reshape(kernel.shape)
  return P.unflatten(flat)


def prune_channels(model, fraction: float, rank: str = "bn_scale"
                   ) -> tuple[tuple[int, ...], dict]:
  """(inner_widths, variables) of `model` with `fraction` of every group's channels gone."""
  groups = channel_groups(model)
  kept = choose_channels(model, fraction, rank)
  return tuple(len(k) for k in kept), narrow_variables(model, groups, kept)
