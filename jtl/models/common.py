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
from typing import Callable, Sequence

import flax.linen as nn
import jax

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
