"""Magnitude pruning: which weights may be pruned, the masks of a sparsity, and the optax
transform that holds them at zero through every update.

The masks live in the optimizer state, so checkpoints carry them and a resumed run holds the
same weights at zero. The transform goes last in the optimizer's chain: where a mask is off it
replaces the update by -param, so param + update is exactly 0.0 after every step whatever came
before it (momentum, weight decay). One-shot pruning fixes the masks when the optimizer state is
made; the polynomial schedule of Zhu & Gupta (2017) recomputes them from the current weights
every `update_every` steps while the sparsity rises to its target.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtl import params as P

SCOPES = ("global", "per_layer")
SCHEDULES = ("one_shot", "polynomial")


def is_prunable(name: str, value) -> bool:
  """Convolution and dense kernels (depthwise ones too), not the head's: its few weights are
  each a class's only evidence."""
  return name.endswith("kernel") and np.ndim(value) >= 2 and not name.startswith("head/")


def prunable_names(params, trainable: Sequence[str] | None = None) -> list[str]:
  """The "/"-joined names of the prunable kernels, restricted to `trainable` when given (a
  frozen layer is not pruned: the feature cache would keep serving its unpruned outputs)."""
  allowed = None if trainable is None else set(trainable)
  return [n for n, v in P.flatten(params).items()
          if is_prunable(n, v) and (allowed is None or n in allowed)]


def keep_largest(magnitudes, sparsity) -> jax.Array:
  """True for all but the round(sparsity * n) smallest of a flat array; ties go by position
  (a stable sort), so exactly that many are dropped. `sparsity` may be traced."""
  n = magnitudes.size
  if isinstance(sparsity, (int, float)):
    k = jnp.int32(int(round(sparsity * n)))  # exact on the host, whatever n
  else:
    k = jnp.round(sparsity * n).astype(jnp.int32)
  order = jnp.argsort(magnitudes, stable=True)
  ranks = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return ranks >= k


def magnitude_masks(kernels: Mapping[str, Any], sparsity, scope: str = "global"
                    ) -> dict[str, jax.Array]:
  """{name: bool mask} keeping the largest |w|: one ranking over every kernel together
  (global) or each kernel at the same sparsity (per_layer)."""
  if scope not in SCOPES:
    raise ValueError(f"pruning scope must be one of {SCOPES}, got {scope!r}")
  names = list(kernels)
  if not names:
    return {}
  if scope == "per_layer":
    return {n: keep_largest(jnp.abs(kernels[n]).ravel(), sparsity).reshape(np.shape(kernels[n]))
            for n in names}
  flat = jnp.concatenate([jnp.abs(jnp.asarray(kernels[n], jnp.float32)).ravel() for n in names])
  keep = keep_largest(flat, sparsity)
  masks, start = {}, 0
  for n in names:
    size = int(np.prod(np.shape(kernels[n])))
    masks[n] = keep[start:start + size].reshape(np.shape(kernels[n]))
    start += size
  return masks


def prune(params, sparsity: float, scope: str = "global") -> tuple[dict, dict[str, np.ndarray]]:
  """(params with the pruned kernel weights set to 0.0, {name: mask}), on the host."""
  flat = P.flatten(params)
  names = prunable_names(params)
  masks = {n: np.asarray(m) for n, m in
           magnitude_masks({n: flat[n] for n in names}, sparsity, scope).items()}
  pruned = {n: (np.where(masks[n], v, np.zeros((), np.asarray(v).dtype)) if n in masks
                else np.asarray(v)) for n, v in flat.items()}
  return P.unflatten(pruned), masks


def polynomial_sparsity(final: float, begin_step: int, end_step: int) -> optax.Schedule:
  """Zhu & Gupta's gradual schedule from 0: s_t = final * (1 - (1 - progress)^3)."""
  span = max(end_step - begin_step, 1)

  def schedule(step):
    progress = jnp.clip((step - begin_step) / span, 0.0, 1.0)
    return final * (1.0 - (1.0 - progress) ** 3)
  return schedule


class MaskState(NamedTuple):
  count: jax.Array  # optimizer updates so far
  masks: Any        # nested like params, the prunable kernels only; False = held at zero


def hold_sparsity(names: Sequence[str], sparsity: optax.Schedule, *, scope: str = "global",
                  recompute: Callable[[jax.Array], jax.Array] | None = None
                  ) -> optax.GradientTransformation:
  """Holds the kernels `names` at the masks of `sparsity`; masks made at init from the
  weights then, and (with `recompute`) made again after update t when recompute(t) holds."""
  names = list(names)

  def init(params):
    flat = P.flatten(params)
    masks = magnitude_masks({n: flat[n] for n in names}, sparsity(0), scope)
    return MaskState(jnp.zeros((), jnp.int32), P.unflatten(masks))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("hold_sparsity needs the params")
    flat_u, flat_p = P.flatten(updates), P.flatten(params)
    masks = P.flatten(state.masks)
    count = state.count + 1
    if recompute is not None:
      moved = {n: flat_p[n] + flat_u[n] for n in names}
      masks = jax.lax.cond(recompute(count),
                           lambda: magnitude_masks(moved, sparsity(count), scope),
                           lambda: masks)
    for n in names:
      flat_u[n] = jnp.where(masks[n], flat_u[n], -flat_p[n])  # p + (-p) is exactly 0.0
    return P.unflatten(flat_u), MaskState(count, P.unflatten(masks))

  return optax.GradientTransformation(init, update)


def from_config(pruning, names: Sequence[str]) -> optax.GradientTransformation:
  """The transform of config.pruning (jtl.config) for the kernels `names`."""
  if pruning.schedule == "one_shot":
    return hold_sparsity(names, lambda step: float(pruning.sparsity), scope=pruning.scope)
  begin, end, every = pruning.begin_step, pruning.end_step, pruning.update_every

  def recompute(count):
    due = ((count - begin) % every == 0) | (count == end)
    return (count >= begin) & (count <= end) & due
  return hold_sparsity(names, polynomial_sparsity(pruning.sparsity, begin, end),
                       scope=pruning.scope, recompute=recompute)


def kernel_sparsity(params) -> float:
  """The fraction of the prunable kernels' weights that are exactly zero."""
  flat = P.flatten(params)
  names = prunable_names(params)
  total = sum(int(np.size(flat[n])) for n in names)
  zeros = sum(int(np.sum(np.asarray(flat[n]) == 0)) for n in names)
  return zeros / total if total else 0.0
