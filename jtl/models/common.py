"""What every jtl model module promises, and the one helper that keeps the promise.

Contract (tested for every registered model in tests/test_models.py):
- NHWC float32 input, already normalised; output logits (batch, num_classes).
- `module.stage_names`: the top-level parameter names in forward order, head last
  (for example ("stem", "stage1", ..., "stage4", "head")). Every parameter lives under one.
- `module.apply(variables, x, train=False, frozen_stages=0, start_stage=0, stop_stage=None)`:
  the first `frozen_stages` stages run in inference mode (BatchNorm uses and keeps its running
  statistics, no dropout) and their output passes through stop_gradient, so backpropagation
  never enters the frozen prefix and a frozen stage costs only its forward pass. Only stages
  start_stage..stop_stage-1 run: the feature cache runs the frozen prefix once
  (stop_stage=K) and then trains on its outputs (start_stage=K).
- BatchNorm goes through `common.BatchNorm`, so that the training step can hold chosen layers
  in inference mode (`batchnorm_inference`) wherever they sit.
- The classifier is a single nn.Dense named "head" (so that a new head for another number of
  classes replaces exactly "params/head/...").
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Collection, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

EVERY_LAYER = "*"
# Layers ("/"-joined module paths) whose BatchNorm runs in inference mode while training. It is
# a property of the training step, not of the model: the step sets it around `module.apply`
# while it is traced, so the compiled program holds the choice and nothing changes at run time.
_inference_layers: contextvars.ContextVar[Collection[str]] = contextvars.ContextVar(
    "jtl_batchnorm_inference_layers", default=frozenset())


@contextlib.contextmanager
def batchnorm_inference(layers: Collection[str]):
  """BatchNorm layers at (or under) these module paths use and keep their running statistics;
  EVERY_LAYER in `layers` means all of them (bn_mode="eval_everywhere")."""
  token = _inference_layers.set(frozenset(layers))
  try:
    yield
  finally:
    _inference_layers.reset(token)


def _held_in_inference(path: tuple[str, ...]) -> bool:
  layers = _inference_layers.get()
  if not layers:
    return False
  if EVERY_LAYER in layers:
    return True
  return any("/".join(path[:i]) in layers for i in range(1, len(path) + 1))


class BatchNorm(nn.BatchNorm):
  """nn.BatchNorm with torch's defaults (momentum 0.1 on the new value == flax 0.9 on the old)
  and a `train` field; in inference mode when not training or when the step holds its layer."""
  momentum: float = 0.9
  epsilon: float = 1e-5
  train: bool = False

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if use_running_average is None:
      use_running_average = not self.train
    use_running_average = use_running_average or _held_in_inference(self.path)
    return super().__call__(x, use_running_average=use_running_average, mask=mask)


def apply_stages(stages: Sequence[tuple[str, Callable]], x, *, train: bool, frozen_stages: int,
                 start_stage: int = 0, stop_stage: int | None = None):
  """Runs (name, fn(x, train)) stages start_stage..stop_stage-1 in order; the first
  `frozen_stages` of the whole network are frozen."""
  stop = len(stages) if stop_stage is None else stop_stage
  if not 0 <= start_stage <= stop <= len(stages):
    raise ValueError(f"stages {start_stage}..{stop} out of range for {len(stages)} stages")
  for i in range(start_stage, stop):
    frozen = i < frozen_stages
    x = stages[i][1](x, train and not frozen)
    if frozen:
      x = jax.lax.stop_gradient(x)
  return x


# None: the CPU formulations of DepthwiseConv and Conv are used when JAX's default backend is
# the CPU; True / False force them on / off on any backend (tests compare both on one machine).
_cpu_paths: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "jtl_cpu_paths", default=None)


@contextlib.contextmanager
def cpu_paths(enabled: bool | None):
  """Forces the CPU formulations (depthwise taps, 1x1 convolutions as dots) on or off, or back
  to automatic (None). Read when a model is traced: a function jitted before keeps its path."""
  token = _cpu_paths.set(enabled)
  try:
    yield
  finally:
    _cpu_paths.reset(token)


def cpu_paths_enabled() -> bool:
  enabled = _cpu_paths.get()
  return jax.default_backend() == "cpu" if enabled is None else enabled


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
  if padding == "VALID":
    pads = ((0, 0), (0, 0))
  elif isinstance(padding, str):
    pads = (_pad_amounts(x.shape[1], kh, strides[0], padding),
            _pad_amounts(x.shape[2], kw, strides[1], padding))
  else:
    pads = tuple(tuple(int(v) for v in p) for p in padding)
  if tuple(strides) == (1, 1) and all(lo < k and hi < k for (lo, hi), k in zip(pads, (kh, kw))):
    return _depthwise_stride1(x, kernel, pads)
  return _taps(jnp.pad(x, ((0, 0), *pads, (0, 0))), kernel, strides)


def _taps(xp, kernel, strides: tuple[int, int]):
  """The depthwise convolution of the already padded `xp`: one scaled slice per tap."""
  kh, kw = kernel.shape[:2]
  sh, sw = strides
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


# Stride 1 gets its own gradient. Autodiff of `_taps` makes the kernel's gradient one reduction
# per tap over the whole batch: 49 passes over the input and the output gradient for a 7x7
# kernel, which in a real network no longer sit in cache. Here they are taken a cache-sized group
# of examples at a time (lax.scan), and the input's gradient is itself a stride-1 depthwise
# convolution (the output gradient, the kernel flipped, the complementary padding). ConvNeXt-T
# block at 4x4x384, batch 32, forward + backward on the 2-core CPU: 47 -> 28 ms (16x16x96:
# 105 -> 90 ms; the layer without depthwise convolution: 14 and 60 ms).
_KERNEL_GRAD_GROUP_BYTES = 512 * 1024


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_stride1(x, kernel, pads):
  return _taps(jnp.pad(x, ((0, 0), *pads, (0, 0))), kernel, (1, 1))


def _depthwise_stride1_forward(x, kernel, pads):
  return _depthwise_stride1(x, kernel, pads), (x, kernel)


def _depthwise_stride1_backward(pads, saved, grad):
  x, kernel = saved
  kh, kw = kernel.shape[:2]
  flipped = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]), (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))
  grad_x = _taps(jnp.pad(grad, ((0, 0), *flipped, (0, 0))), kernel[::-1, ::-1], (1, 1))
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  batch, out_h, out_w = grad.shape[:3]
  group = max(1, min(batch, _KERNEL_GRAD_GROUP_BYTES // (xp[0].size * xp.dtype.itemsize)))
  while batch % group:
    group -= 1

  def add_group(total, group_arrays):
    xg, gg = group_arrays
    return total + jnp.stack([
        jnp.sum(xg[:, i:i + out_h, j:j + out_w] * gg, axis=(0, 1, 2), dtype=jnp.float32)
        for i in range(kh) for j in range(kw)]), None

  grad_kernel, _ = jax.lax.scan(
      add_group, jnp.zeros((kh * kw, kernel.shape[-1]), jnp.float32),
      (xp.reshape(batch // group, group, *xp.shape[1:]),
       grad.reshape(batch // group, group, *grad.shape[1:])))
  return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


_depthwise_stride1.defvjp(_depthwise_stride1_forward, _depthwise_stride1_backward)


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
    if cpu_paths_enabled():
      y = depthwise_conv_taps(x, kernel, self.strides, self.padding)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, self.strides, self.padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=channels)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (channels,), jnp.float32).astype(y.dtype)
    return y


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


def _explicit_padding(padding):
  """lax's padding argument: "SAME" / "VALID", or one (low, high) pair per spatial axis."""
  if isinstance(padding, str):
    return padding
  if isinstance(padding, int):
    return ((padding, padding),) * 2
  return tuple(_pair(p) for p in padding)


def pointwise_conv_dot(x, kernel, strides: tuple[int, int], precision=None):
  """A 1x1 convolution without padding as a strided slice and one (pixels, cin) @ (cin, cout)
  matrix product.

  XLA:CPU computes the weight gradient of a 1x1 convolution 3-7.5x slower than the same product
  through jnp.dot; as dots, ResNet-50 full fine-tuning went from 18.2 to 10.2 s/step on the
  2-core CPU machine (README, Speed). Flattening to 2-D first keeps both gradients plain matrix
  products: the weight gradient of a 4-D dot ran up to 3x slower in our measurements.
  """
  sh, sw = strides
  if (sh, sw) != (1, 1):
    x = jax.lax.slice(x, (0, 0, 0, 0), x.shape, (1, sh, sw, 1))
  y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel[0, 0], precision=precision)
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


class Conv(nn.Module):
  """nn.Conv for NHWC images, with its parameters ("kernel" (kh, kw, cin // groups, cout) and
  "bias" (cout,)) and its dtype promotion, that computes 1x1 convolutions without padding as
  `pointwise_conv_dot` on CPU (see `cpu_paths`); every other convolution, and every convolution
  elsewhere, is nn.Conv's lax.conv_general_dilated."""
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"            # "SAME", "VALID", an int or one (low, high) per axis
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    kernel_size, strides = _pair(self.kernel_size), _pair(self.strides)
    padding = _explicit_padding(self.padding)
    kernel = self.param("kernel", self.kernel_init,
                        (*kernel_size, x.shape[-1] // self.feature_group_count, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    # A 1x1 kernel makes "SAME" pad nothing, whatever the stride.
    unpadded = isinstance(padding, str) or all(p == (0, 0) for p in padding)
    if (kernel_size == (1, 1) and self.feature_group_count == 1 and unpadded
        and cpu_paths_enabled()):
      y = pointwise_conv_dot(x, kernel, strides, self.precision)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=self.feature_group_count,
                                       precision=self.precision)
    if bias is not None:
      y = y + bias
    return y


def max_pool(x, window: tuple[int, int], strides: tuple[int, int], padding="VALID"):
  """nn.max_pool over NHWC (padding "VALID", "SAME" or (low, high) pairs, padded with -inf)
  whose gradient, on CPU, follows the argmax recorded in the forward pass, as torch's does.

  XLA:CPU differentiates reduce_window max through a variadic reduce-window over four int32
  index arrays of the padded input's size and a scatter: 186 ms for ResNet-50's stem pool at
  batch 8 (fwd + bwd, CPU seconds), 24 ms this way. The forward values are reduce_window's
  (NaN propagates through jnp.maximum as through lax.max); each window's gradient goes to its
  first maximum in row-major order, the element XLA's select-and-scatter picks, so gradients
  differ only in how overlapping windows' contributions are rounded when they add up.
  """
  if not cpu_paths_enabled():
    return nn.max_pool(x, tuple(window), strides=tuple(strides), padding=padding)
  (kh, kw), (sh, sw) = window, strides
  h, w = x.shape[1:3]
  if isinstance(padding, str):
    pads = (_pad_amounts(h, kh, sh, padding) if padding == "SAME" else (0, 0),
            _pad_amounts(w, kw, sw, padding) if padding == "SAME" else (0, 0))
  else:
    pads = tuple(tuple(p) for p in padding)
  out_h = (h + sum(pads[0]) - kh) // sh + 1
  out_w = (w + sum(pads[1]) - kw) // sw + 1

  def taps(x):
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=-jnp.inf)
    return [jax.lax.slice(xp, (0, i, j, 0),
                          (xp.shape[0], i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1,
                           xp.shape[3]), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]

  def forward(x):
    best, first = None, None
    for t, tap in enumerate(taps(x)):
      if best is None:
        best, first = tap, jnp.zeros(tap.shape, jnp.int8)
      else:
        first = jnp.where(tap > best, jnp.int8(t), first)  # strict: an equal later tap loses
        best = jnp.maximum(best, tap)
    return best, first

  def backward(first, g):
    # Each tap's share goes back through the transpose of its strided slice (an interior pad).
    grad = None
    for t in range(kh * kw):
      i, j = divmod(t, kw)
      share = jax.lax.pad(jnp.where(first == t, g, 0), jnp.zeros((), g.dtype),
                          ((0, 0, 0),
                           (i - pads[0][0], h + pads[0][0] - i - (out_h - 1) * sh - 1, sh - 1),
                           (j - pads[1][0], w + pads[1][0] - j - (out_w - 1) * sw - 1, sw - 1),
                           (0, 0, 0)))
      grad = share if grad is None else grad + share
    return (grad,)

  pool = jax.custom_vjp(lambda x: forward(x)[0])
  pool.defvjp(forward, backward)
  return pool(x)
