"""What every jtl model module promises, and the one helper that keeps the promise.

Contract (tested for every registered model in tests/test_models.py):
- NHWC float32 input, already normalised; output logits (batch, num_classes).
- `module.stage_names`: the top-level parameter names in forward order, head last
  (for example ("stem", "stage1", ..., "stage4", "head")). Every parameter lives under one.
- `module.apply(variables, x, train=False, frozen_stages=0)`: the first `frozen_stages` stages
  run in inference mode (BatchNorm uses and keeps its running statistics, no dropout) and their
  output passes through stop_gradient, so backpropagation never enters the frozen prefix and
  a frozen stage costs only its forward pass.
- The classifier is a single nn.Dense named "head" (so that a new head for another number of
  classes replaces exactly "params/head/...").
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Torch BatchNorm defaults (momentum 0.1 on the new value == flax momentum 0.9 on the old).
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


def apply_stages(stages: Sequence[tuple[str, Callable]], x, *, train: bool, frozen_stages: int):
  """Runs (name, fn(x, train)) stages in order; the first `frozen_stages` frozen."""
  for i, (_, stage) in enumerate(stages):
    frozen = i < frozen_stages
    x = stage(x, train and not frozen)
    if frozen:
      x = jax.lax.stop_gradient(x)
  return x


def _pad_amounts(size: int, kernel: int, stride: int, padding) -> tuple[int, int]:
  if padding == "SAME":  # TensorFlow's rule: the extra row/column goes after
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2
  return padding


def depthwise_conv_taps(x, kernel, strides: tuple[int, int], padding):
  """Depthwise convolution as a sum of k*k shifted, scaled copies of the input.

  XLA's CPU backend runs grouped convolutions (feature_group_count == channels) far below its
  dense-convolution speed: 7x slower than this formulation for a 3x3 depthwise layer at batch 64
  (measured on the 2-core CPU machine, see README). GPUs and TPUs have fast native kernels, so
  this path is only taken on CPU. Results equal lax.conv_general_dilated's up to float rounding.
  """
  kh, kw = kernel.shape[:2]
  sh, sw = strides
  if isinstance(padding, str):
    pads = [_pad_amounts(x.shape[1], kh, sh, padding), _pad_amounts(x.shape[2], kw, sw, padding)]
  else:
    pads = [tuple(p) for p in padding]
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  out_h = (xp.shape[1] - kh) // sh + 1
  out_w = (xp.shape[2] - kw) // sw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      window = jax.lax.slice(xp, (0, i, j, 0),
                             (xp.shape[0], i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1,
                              xp.shape[3]), (1, sh, sw, 1))
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """A depthwise nn.Conv (same parameter names and shapes: kernel (kh, kw, 1, C), bias (C,))
  that uses `depthwise_conv_taps` on CPU."""
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Any = "SAME"
  use_bias: bool = False
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, 1, channels), jnp.float32)
    kernel = kernel.astype(x.dtype)
    if jax.default_backend() == "cpu":
      y = depthwise_conv_taps(x, kernel, self.strides, self.padding)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, self.strides, self.padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=channels)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (channels,), jnp.float32).astype(y.dtype)
    return y
