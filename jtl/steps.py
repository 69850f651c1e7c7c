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
from jtl import params as P
from jtl.models import common

BN_MODES = ("frozen_only", "eval_everywhere")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  # Model EMA (config.ema_decay) of the trainable parameters only, nested like params: frozen
  # ones are constants, their average is themselves (see with_ema_weights). {} when off.
  ema_params: Any = flax.struct.field(default_factory=dict)
  # schedule.name=reduce_on_plateau's state (optax.contrib.ReduceLROnPlateauState): its scale
  # multiplies every update; set at evaluations (hooks.PlateauSchedule), checkpointed with the
  # rest. Scale 1, unused, under the other schedules.
  plateau: Any = None


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy; labels hard (int) or soft (mixup/cutmix)."""
  if labels.ndim == 1:
    labels = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    labels = optax.smooth_labels(labels, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)


def training_loss(logits, labels, num_classes: int, label_smoothing: float = 0.0,
                  class_weights=None):
  """The batch's scalar loss: mean over examples of w * cross-entropy, w = 1 without class
  weights. Hard labels weigh w[label]; soft ones (mixup/cutmix) their mix of class weights,
  labels @ w, before smoothing. The mean is over examples, not sum(w * l) / sum(w): that would
  rescale each batch by its own make-up and give a batch without a rare class the unweighted
  loss again; with "auto" weights averaging 1 over the training split, this mean is an unbiased
  estimate of the split's weighted loss."""
  per_example = cross_entropy(logits, labels, num_classes, label_smoothing)
  if class_weights is None:
    return per_example.mean()
  w = jnp.asarray(class_weights, jnp.float32)
  weights = w[labels] if labels.ndim == 1 else labels.astype(jnp.float32) @ w
  return (weights * per_example).mean()


def ema_decay_at(decay: float, updates_before: jax.Array) -> jax.Array:
  """The EMA decay of an update after `updates_before` earlier ones: min(decay, (1 + t) /
  (10 + t)), TensorFlow ExponentialMovingAverage's num_updates warmup, so the average follows
  the first steps instead of clinging to the initial weights (no debiasing is needed: the
  average starts from the weights, not from zeros)."""
  t = jnp.asarray(updates_before, jnp.float32)
  return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def with_ema_weights(state: TrainState) -> TrainState:
  """The state with the EMA in place of the trainable parameters (frozen ones as they are);
  BatchNorm statistics stay the raw run's (already running averages)."""
  flat = P.flatten(state.params)
  flat.update(P.flatten(state.ema_params))
  return state.replace(params=P.unflatten(flat))


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
  ema_names: tuple[str, ...] = ()  # the parameters the EMA averages (the trainable ones); ()
                                   # when config.ema_decay is 0

  def __call__(self, state: TrainState, batch: dict):
    return self.fn(state, batch)

  def init_state(self, params, batch_stats, seed: int) -> TrainState:
    """A fresh state (step 0, new optimizer state, EMA = the weights), replicated over the
    mesh; checkpoint restore uses it as its template."""
    state = TrainState(step=np.int32(0), params=params, batch_stats=batch_stats,
                       opt_state=self.tx.init(params),
                       rng=np.asarray(jax.random.key_data(jax.random.PRNGKey(seed))),
                       ema_params=self.fit_ema({}, params),
                       plateau=optim.initial_plateau_state(params))
    return distributed.replicate(state, self.mesh)

  def fit_ema(self, ema_params, params) -> dict:
    """The EMA for this step's trainable parameters: kept where `ema_params` has them, started
    from the weights for the others (a stage gradual unfreezing just thawed: its average so far
    is its constant value). Host copies, never the very buffers of `params` (both are donated)."""
    old, flat = P.flatten(ema_params), P.flatten(params)
    return P.unflatten({k: np.array(jax.device_get(old[k] if k in old else flat[k]))
                        for k in self.ema_names})


@dataclasses.dataclass(frozen=True)
class EmaRule:
  """config.ema_decay's moving average of the trainable parameters `names` (() when off)."""
  names: tuple[str, ...]
  decay: float
  accum_steps: int

  @classmethod
  def of(cls, plan: optim.FreezePlan, config) -> "EmaRule":
    names = tuple(sorted(k for k, label in plan.labels.items() if label != optim.FROZEN))
    return cls(names if config.ema_decay else (), config.ema_decay, config.grad_accum_steps)

  def update(self, state: TrainState, params, moved=None):
    """The average after this step, counted in optimizer steps; `moved` (a traced bool, or None
    for always) says whether the parameters changed at this batch."""
    if not self.names:
      return state.ema_params
    flat = P.flatten(params)
    trained = P.unflatten({k: flat[k] for k in self.names})
    decay = ema_decay_at(self.decay, state.step // self.accum_steps)
    ema = optax.incremental_update(trained, state.ema_params, 1.0 - decay)
    if moved is not None:
      ema = jax.tree_util.tree_map(lambda n, o: jnp.where(moved, n, o), ema, state.ema_params)
    return ema


def make_train_step(model, plan: optim.FreezePlan, config, mesh: Mesh, *, schedule,
                    num_classes: int, start_stage: int = 0, class_weights=None) -> TrainStep:
  """The jitted training step of `model` under `plan` and `config`.

  start_stage > 0 trains on the outputs of the first start_stage stages (the feature cache)
  instead of images; it must not exceed the plan's frozen prefix. class_weights: float [classes]
  loss weights (jtl.class_weights), None for none; see training_loss.
  """
  if start_stage > plan.frozen_stages:
    raise ValueError(f"start_stage {start_stage} lies past the frozen prefix "
                     f"({plan.frozen_stages} stages)")
  tx = optim.make_optimizer(config, plan, model.variables["params"], schedule)
  held = inference_layers(plan, config.bn_mode)
  module = model.module
  options = dict(frozen_stages=plan.frozen_stages, start_stage=start_stage)
  ema = EmaRule.of(plan, config)

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
      loss = training_loss(logits, batch["label"], num_classes, config.label_smoothing,
                           class_weights)
      return loss, (logits, new_vars.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if config.schedule.name == "reduce_on_plateau":  # every update is lr * (...): scale the lr
      updates = jax.tree_util.tree_map(lambda u: u * state.plateau.scale, updates)
    params = optax.apply_updates(state.params, updates)
    batch_stats = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), batch_stats,
                                         state.batch_stats)
    labels = batch["label"] if batch["label"].ndim == 1 else jnp.argmax(batch["label"], -1)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    finite = jnp.isfinite(loss)
    # Under gradient accumulation the parameters (and so their average) move every k-th batch.
    moved = tx.has_updated(opt_state) if isinstance(tx, optax.MultiSteps) else None
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, ema_params=ema.update(state, params, moved))
    if config.nonfinite_policy == "skip":  # keep the old state (but count the step)
      new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_state,
                                         state.replace(step=state.step + 1))
    return new_state, {"loss": loss, "accuracy": accuracy, "finite": finite}

  fn = jax.jit(step, in_shardings=(distributed.replicated(mesh), distributed.batch_sharded(mesh)),
               out_shardings=(distributed.replicated(mesh), distributed.replicated(mesh)),
               donate_argnums=0)
  return TrainStep(tx, fn, mesh, ema.names)


def make_eval_step(model, mesh: Mesh, *, num_classes: int, start_stage: int = 0) -> Callable:
  """(params, batch_stats, batch) -> per-example loss, prediction, top-5 hit, logits, mask.

  A batch of test-time augmentation views, image [B, V, ...] (data.eval_batches with tta), is
  scored by its views' mean logits; loss, prediction and top-5 are those of the mean."""
  module = model.module
  k = min(5, num_classes)

  def step(params, batch_stats, batch):
    x = batch["image"]
    views = x.shape[1] if x.ndim == 5 and start_stage == 0 else 0
    if views:
      x = x.reshape(-1, *x.shape[2:])
    logits = module.apply({"params": params, "batch_stats": batch_stats}, x,
                          train=False, start_stage=start_stage).astype(jnp.float32)
    if views:
      logits = logits.reshape(-1, views, logits.shape[-1]).mean(axis=1)
    loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], num_classes))
    top5 = jnp.any(jax.lax.top_k(logits, k)[1] == batch["label"][:, None], axis=-1)
    return {"loss": loss, "pred": jnp.argmax(logits, -1), "label": batch["label"],
            "top5": top5, "logits": logits, "mask": batch["mask"]}

  replicated = distributed.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, replicated, distributed.batch_sharded(mesh)),
                 out_shardings=replicated)


def make_features_fn(model, mesh: Mesh, *, stop_stage: int, dtype=jnp.float32,
                     pool: bool = False, gather: bool = True) -> Callable:
  """(params, batch_stats, images) -> outputs of the first stop_stage stages, inference mode.

  pool: averaged over height and width, kept as [N, 1, 1, C] (a head that pools first then
  gives the same logits: the mean of one position is that position). gather: the outputs come
  back replicated, so every host holds every example's features; otherwise split over the
  batch like the images, each host holding the rows of its own examples."""
  module = model.module

  def features(params, batch_stats, images):
    out = module.apply({"params": params, "batch_stats": batch_stats}, images, train=False,
                       stop_stage=stop_stage)
    if pool:
      out = jnp.mean(out, axis=(1, 2), keepdims=True)
    return out.astype(dtype)

  replicated = distributed.replicated(mesh)
  batch = distributed.batch_sharded(mesh)
  return jax.jit(features, in_shardings=(replicated, replicated, batch),
                 out_shardings=replicated if gather else batch)
