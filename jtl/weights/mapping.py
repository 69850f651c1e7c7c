"""Building blocks for converters: move a checkpoint's tensors onto our parameter names.

PyTorch stores convolutions as OIHW and linear weights as (out, in); flax wants HWIO and
(in, out). BatchNorm's running statistics go to the "batch_stats" collection.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """OIHW -> HWIO (a depthwise (C, 1, kh, kw) becomes (kh, kw, 1, C), as flax wants)."""
  return np.transpose(w, (2, 3, 1, 0))


def dense_kernel(w: np.ndarray) -> np.ndarray:
  """(out, in) -> (in, out)."""
  return np.transpose(w)


class StateMapper:
  """Pops tensors from a source state dict onto flat "collection/path" names.

  Source names that are absent are skipped silently: the merge step reports every target name
  left unfilled. Whatever is never popped is returned unchanged by `result()` so the merge step
  can report it as a name the model does not have.
  """

  def __init__(self, state: Mapping[str, np.ndarray]):
    self.state = dict(state)
    self.out: dict[str, np.ndarray] = {}

  def take(self, src: str, dst: str, fn: Callable[[np.ndarray], np.ndarray] = np.asarray):
    if src in self.state:
      self.out[dst] = fn(self.state.pop(src))

  def conv(self, src: str, dst: str):
    """A torch Conv2d at `src` (weight, optional bias) onto an nn.Conv at `dst`."""
    self.take(f"{src}.weight", f"params/{dst}/kernel", conv_kernel)
    self.take(f"{src}.bias", f"params/{dst}/bias")

  def dense(self, src: str, dst: str):
    self.take(f"{src}.weight", f"params/{dst}/kernel", dense_kernel)
    self.take(f"{src}.bias", f"params/{dst}/bias")

  def norm(self, src: str, dst: str):
    """BatchNorm or LayerNorm: affine parameters, and running statistics when present."""
    self.take(f"{src}.weight", f"params/{dst}/scale")
    self.take(f"{src}.bias", f"params/{dst}/bias")
    self.take(f"{src}.running_mean", f"batch_stats/{dst}/mean")
    self.take(f"{src}.running_var", f"batch_stats/{dst}/var")
    self.state.pop(f"{src}.num_batches_tracked", None)

  def drop(self, pattern: str):
    """Discards source names fully matching `pattern` (things we deliberately do not load)."""
    regex = re.compile(pattern)
    for key in [k for k in self.state if regex.fullmatch(k)]:
      del self.state[key]

  def strip_prefix(self, prefix: str):
    """Removes a common prefix ("module.", "model.") from every remaining source name."""
    self.state = {(k[len(prefix):] if k.startswith(prefix) else k): v
                  for k, v in self.state.items()}

  def result(self) -> dict[str, np.ndarray]:
    leftover = {k: v for k, v in self.state.items() if not k.endswith("num_batches_tracked")}
    return {**self.out, **leftover}
