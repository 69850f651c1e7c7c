"""The one place that builds the compiled steps: training, evaluation and frozen-prefix features.

The engine, the feature cache, `bench/run.py` and every later tool (learning-rate finder,
pruning) call these factories, so a new step argument cannot split them apart. Each returns a
function jitted over the mesh: batches split along "data", the state replicated, the train state
donated to the step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jtl import distributed, optim
from jtl.models import common

BN_MODES = ("frozen_only", "eval_everywhere")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy; labels hard (int) or soft (mixup/cutmix)."""
  if labels.ndim == 1:
    labels = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    labels = optax.smooth_labels(labels, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)


def inference_layers(plan: optim.FreezePlan, bn_mode: str) -> frozenset[str]:
  """Layers whose BatchNorm runs in inference mode while training.

  frozen_only: every layer frozen by any rule (in the frozen prefix or not): normalising a
  frozen layer with batch statistics would train it on other statistics than it is tested on,
  the mismatch Keras's fine-tuning guide warns about. eval_everywhere: every layer (very small
  data, where batch statistics are noise).
  """
  if bn_mode == "eval_everywhere":
    return frozenset([common.EVERY_LAYER])
  if bn_mode != "frozen_only":
    raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
  return plan.frozen_layers()


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """A compiled training step for one freeze plan, and the optimizer it applies."""
  tx: optax.GradientTransformation
  fn: Callable  # (state, global batch) -> (state, {"loss", "accuracy", "finite"})
  mesh: Mesh

  def __call__(self, state: TrainState, batch: dict):
    return self.fn(state, batch)

  def init_state(self, params, batch_stats, seed: int) -> TrainState:
    """A fresh state (step 0, new optimizer state), replicated over the mesh."""
    state = TrainState(step=np.int32(0), params=params, batch_stats=batch_stats,
                       opt_state=self.tx.init(params),
                       rng=np.asarray(jax.random.key_data(jax.random.PRNGKey(seed))))
    return distributed.replicate(state, self.mesh)


def make_train_step(model, plan: optim.FreezePlan, config, mesh: Mesh, *, schedule,
                    num_classes: int, start_stage: int = 0) -> TrainStep:
  """The jitted training step of `model` under `plan` and `config`.

  start_stage > 0 trains on the outputs of the first start_stage stages (the feature cache)
  instead of images; it must not exceed the plan's frozen prefix.
  """
  if start_stage > plan.frozen_stages:
    raise ValueError(f"start_stage {start_stage} lies past the frozen prefix "
                     f"({plan.frozen_stages} stages)")
  tx = optim.make_optimizer(config, plan, model.variables["params"], schedule)
  held = inference_layers(plan, config.bn_mode)
  module = model.module
  options = dict(frozen_stages=plan.frozen_stages, start_stage=start_stage)

  def step(state: TrainState, batch):
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      x = batch["image"]
      if config.bf16:
        variables = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), variables)
        x = x.astype(jnp.bfloat16)
      with common.batchnorm_inference(held):
        logits, new_vars = module.apply(variables, x, train=True, mutable=["batch_stats"],
                                        rngs={"dropout": dropout_rng}, **options)
      loss = cross_entropy(logits, batch["label"], num_classes, config.label_smoothing).mean()
      return loss, (logits, new_vars.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    batch_stats = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), batch_stats,
                                         state.batch_stats)
    labels = batch["label"] if batch["label"].ndim == 1 else jnp.argmax(batch["label"], -1)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    finite = jnp.isfinite(loss)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    if config.nonfinite_policy == "skip":  # keep the old state (but count the step)
      new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_state,
                                         state.replace(step=state.step + 1))
    return new_state, {"loss": loss, "accuracy": accuracy, "finite": finite}

  fn = jax.jit(step, in_shardings=(distributed.replicated(mesh), distributed.batch_sharded(mesh)),
               out_shardings=(distributed.replicated(mesh), distributed.replicated(mesh)),
               donate_argnums=0)
  return TrainStep(tx, fn, mesh)


def make_eval_step(model, mesh: Mesh, *, num_classes: int, start_stage: int = 0) -> Callable:
  """(params, batch_stats, batch) -> per-example loss, prediction, top-5 hit, logits, mask."""
  module = model.module
  k = min(5, num_classes)

  def step(params, batch_stats, batch):
    logits = module.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                          train=False, start_stage=start_stage).astype(jnp.float32)
    loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], num_classes))
    top5 = jnp.any(jax.lax.top_k(logits, k)[1] == batch["label"][:, None], axis=-1)
    return {"loss": loss, "pred": jnp.argmax(logits, -1), "label": batch["label"],
            "top5": top5, "logits": logits, "mask": batch["mask"]}

  replicated = distributed.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, replicated, distributed.batch_sharded(mesh)),
                 out_shardings=replicated)


def make_features_fn(model, mesh: Mesh, *, stop_stage: int, dtype=jnp.float32) -> Callable:
  """(params, batch_stats, images) -> outputs of the first stop_stage stages, inference mode.

  The outputs come back replicated, so every host holds every example's features."""
  module = model.module

  def features(params, batch_stats, images):
    out = module.apply({"params": params, "batch_stats": batch_stats}, images, train=False,
                       stop_stage=stop_stage)
    return out.astype(dtype)

  replicated = distributed.replicated(mesh)
  return jax.jit(features, in_shardings=(replicated, replicated, distributed.batch_sharded(mesh)),
                 out_shardings=replicated)
