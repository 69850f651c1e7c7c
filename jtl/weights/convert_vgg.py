"""VGG checkpoints onto jtl.models.vgg.VGG.

Both torchvision and timm keep the convolutions in one nn.Sequential `features` (conv, [BN],
ReLU per convolution, a max-pool after each stage), so a layer's index there follows from the
configuration. They differ after it:
- torchvision: classifier.0 (fc6, Linear over the NCHW-flattened 7x7 map), classifier.3 (fc7),
  classifier.6 (fc8);
- timm: pre_logits.fc1 (fc6 as a 7x7 Conv2d), pre_logits.fc2 (fc7 as a 1x1 Conv2d), head.fc.
Our fc6 flattens the pooled map in NHWC order, so its kernel rows are permuted from (C, H, W)
to (H, W, C) order.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from jtl.weights.mapping import StateMapper


def feature_layers(module) -> Iterator[tuple[int, int | None, str]]:
  """(conv index, BN index or None, our stage/conv prefix) for each convolution in `features`."""
  index = 0
  for stage, channels in enumerate(module.stage_channels, 1):
    for k in range(1, len(channels) + 1):
      norm_index = index + 1 if module.batch_norm else None
      yield index, norm_index, f"stage{stage}/conv{k}"
      index += 3 if module.batch_norm else 2  # conv, [BN], ReLU
    index += 1  # the max-pool


def fc6_kernel(w: np.ndarray, pool_size: int) -> np.ndarray:
  """torch fc6 weight, (O, C*P*P) Linear or (O, C, P, P) Conv2d -> our (P*P*C, O) kernel."""
  out = w.shape[0]
  w = np.asarray(w).reshape(out, -1, pool_size, pool_size)
  return np.transpose(w, (2, 3, 1, 0)).reshape(-1, out)


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch (O, I) Linear or (O, I, 1, 1) Conv2d weight -> our (I, O) kernel."""
  w = np.asarray(w)
  return w.reshape(w.shape[0], -1).T


def map_features(m: StateMapper, module) -> None:
  for conv_index, norm_index, dst in feature_layers(module):
    m.conv(f"features.{conv_index}", dst)
    if norm_index is not None:
      m.norm(f"features.{norm_index}", dst.replace("/conv", "/bn"))


def map_fc(m: StateMapper, src: str, dst: str, kernel_fn) -> None:
  m.take(f"{src}.weight", f"params/{dst}/kernel", kernel_fn)
  m.take(f"{src}.bias", f"params/{dst}/bias")


def convert_torchvision(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """torchvision names (features.N, classifier.0/3/6) -> ours."""
  m = StateMapper(state)
  m.strip_prefix("module.")
  map_features(m, module)
  map_fc(m, "classifier.0", "classifier/fc6", lambda w: fc6_kernel(w, module.pool_size))
  map_fc(m, "classifier.3", "classifier/fc7", linear_kernel)
  map_fc(m, "classifier.6", "head", linear_kernel)
  return m.result()


def convert_timm(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """timm names (features.N, pre_logits.fc1/fc2 convolutions, head.fc) -> ours."""
  m = StateMapper(state)
  m.strip_prefix("module.")
  map_features(m, module)
  map_fc(m, "pre_logits.fc1", "classifier/fc6", lambda w: fc6_kernel(w, module.pool_size))
  map_fc(m, "pre_logits.fc2", "classifier/fc7", linear_kernel)
  map_fc(m, "head.fc", "head", linear_kernel)
  return m.result()
