"""Optimizers, schedules and freezing: which parameters train, and how.

Freezing is data: every parameter gets a label from its "/"-joined path. Trainable parameters
are labelled by the stage they live in (so that layer-wise learning-rate decay and gradual
unfreezing are just per-label settings); frozen ones get "frozen", which maps to
`optax.set_to_zero()` inside `optax.multi_transform` and so keeps no optimizer state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from jtl import params as P
from jtl.pruning import magnitude

FROZEN = "frozen"


@dataclasses.dataclass(frozen=True)
class FreezePlan:
  """Which parameters train, as labels, and how many leading stages are frozen whole."""
  labels: dict[str, str]          # "/"-joined param path -> stage name or FROZEN
  frozen_stages: int              # leading stages with every parameter frozen
  stage_names: tuple[str, ...]

  @property
  def trainable_stages(self) -> tuple[str, ...]:
    return tuple(s for s in self.stage_names if s in set(self.labels.values()))

  def label_tree(self, params) -> Any:
    return P.unflatten({k: self.labels[k] for k in P.flatten(params)})

  def frozen_layers(self) -> frozenset[str]:
    """Module paths ("stage4/block0/bn1") whose every parameter is frozen."""
    layers: dict[str, bool] = {}
    for name, label in self.labels.items():
      layer = name.rsplit("/", 1)[0]
      layers[layer] = layers.get(layer, True) and label == FROZEN
    return frozenset(layer for layer, frozen in layers.items() if frozen)


def freeze_rules(strategy: str, stage_names: Sequence[str], freeze_depth: int,
                 trainable: Sequence[Sequence[str]] = ()) -> list[tuple[str, str]]:
  """(regex, "train" | "freeze") rules for a strategy; explicit `trainable` rules win."""
  if trainable:
    return [(str(p), str(l)) for p, l in trainable]
  if strategy == "full":
    return [(".*", "train")]
  if strategy == "feature_extraction":
    freeze_depth = len(stage_names) - 1
  elif strategy not in ("partial", "lp_ft"):  # lp_ft fine-tunes as partial after its probe
    raise ValueError(f"strategy must be feature_extraction, partial, full or lp_ft, "
                     f"got {strategy!r}")
  frozen = stage_names[:freeze_depth]
  rules = [(f"{s}/.*", "freeze") for s in frozen]
  return rules + [(".*", "train")]


def make_freeze_plan(params, stage_names: Sequence[str], rules: Sequence[tuple[str, str]]
                     ) -> FreezePlan:
  """Labels every parameter by the first matching rule (error if a rule matches nothing)."""
  for _, label in rules:
    if label not in ("train", "freeze"):
      raise ValueError(f"trainable rule label must be 'train' or 'freeze', got {label!r}")
  names = list(P.flatten(params))
  decided = P.label_by_regex(names, rules, what="trainable pattern")
  labels = {n: (n.split("/", 1)[0] if decided[n] == "train" else FROZEN) for n in names}
  frozen_stages = 0
  for stage in stage_names:
    in_stage = [n for n in names if n.split("/", 1)[0] == stage]
    if in_stage and all(labels[n] == FROZEN for n in in_stage):
      frozen_stages += 1
    else:
      break
  return FreezePlan(labels, frozen_stages, tuple(stage_names))


def unfreeze_stages(plan: FreezePlan, extra: int) -> FreezePlan:
  """Gradual unfreezing: the last `extra` stages of the frozen prefix become trainable."""
  if extra <= 0 or plan.frozen_stages == 0:
    return plan
  keep = max(plan.frozen_stages - extra, 0)
  thawed = set(plan.stage_names[keep:plan.frozen_stages])
  labels = {n: (n.split("/", 1)[0] if n.split("/", 1)[0] in thawed else l)
            for n, l in plan.labels.items()}
  return FreezePlan(labels, keep, plan.stage_names)


def make_schedule(config, steps_per_epoch: int, total_steps: int | None = None,
                  lr: float | None = None) -> optax.Schedule:
  """Learning rate per optimizer step: constant, warmup_cosine, step (decay at given epochs),
  one_cycle, or reduce_on_plateau (constant here; `plateau_rule` scales it at evaluations).

  total_steps: the run's budget (None: num_epochs epochs); lr: the peak (None: optimizer.lr).
  """
  lr = config.optimizer.lr if lr is None else lr
  sched = config.schedule
  total = max(total_steps or config.num_epochs * steps_per_epoch, 1)
  warmup = int(sched.warmup_epochs * steps_per_epoch)
  if sched.name in ("constant", "reduce_on_plateau"):
    base = optax.constant_schedule(lr)
  elif sched.name == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0), max(total, warmup + 1),
                                              end_value=lr * sched.end_lr_factor)
  elif sched.name == "step":
    boundaries = {int(e * steps_per_epoch): sched.decay_factor for e in sched.decay_epochs}
    base = optax.piecewise_constant_schedule(lr, boundaries)
  elif sched.name == "one_cycle":  # its own rise (pct_start) replaces the warmup
    return optax.cosine_onecycle_schedule(total, lr, pct_start=sched.pct_start,
                                          div_factor=sched.div_factor,
                                          final_div_factor=sched.final_div_factor)
  else:
    raise ValueError(f"schedule.name must be constant, warmup_cosine, step, one_cycle or "
                     f"reduce_on_plateau, got {sched.name!r}")
  if warmup > 0:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), base], [warmup])
  return base


def plateau_rule(config) -> optax.GradientTransformationExtraArgs:
  """schedule.name=reduce_on_plateau's rule, fed one value per evaluation (to minimise).

  "Better" is what early stopping counts as better: by more than early_stopping.min_delta
  (optax needs a positive tolerance; 1e-12 is "strictly better" at float32 precision)."""
  s = config.schedule
  return optax.contrib.reduce_on_plateau(
      factor=s.plateau_factor, patience=s.plateau_patience, cooldown=s.plateau_cooldown,
      min_scale=s.min_lr_factor, rtol=0.0, atol=max(config.early_stopping.min_delta, 1e-12))


def initial_plateau_state(params) -> optax.contrib.ReduceLROnPlateauState:
  """The rule's state before any evaluation (scale 1); its settings do not enter it."""
  return optax.contrib.reduce_on_plateau().init(params)


# Parameters of more than one dimension that are still kept out of weight decay, by their leaf
# name: timm's VisionTransformer.no_weight_decay() (pos_embed, cls_token, reg_token,
# dist_token) in each source's spelling, and mask tokens and a MAP head's probe, learned tokens
# of the same kind. They are points in the activations' space, not weights: decay would only
# pull them towards zero.
NO_DECAY_NAMES = frozenset({
    "pos_embedding", "pos_embed", "position_embeddings",   # position embeddings
    "cls", "cls_token", "class_token",                     # class tokens
    "registers", "register_tokens", "reg_token",           # register tokens (DINOv2)
    "dist_token", "mask_token",                            # distillation and mask tokens
    "probe",                                               # a MAP head's query (big_vision)
})


def _leaf_name(path) -> str:
  key = path[-1] if path else None
  return str(getattr(key, "key", getattr(key, "name", key)))


def _decay_mask(params):
  """True where weight decay applies: kernels and embeddings of more than one dimension; not
  biases and norm scales (1-D), nor the tokens, position embeddings and probes above."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.ndim(p) > 1 and _leaf_name(path) not in NO_DECAY_NAMES, params)


def _base_optimizer(config, learning_rate) -> optax.GradientTransformation:
  opt = config.optimizer
  if opt.name == "adam":
    return optax.adam(learning_rate, b1=opt.b1, b2=opt.b2)
  if opt.name == "adamw":
    return optax.adamw(learning_rate, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                       mask=_decay_mask)
  if opt.name == "sgd":
    return optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=_decay_mask),
                       optax.sgd(learning_rate, momentum=opt.momentum, nesterov=opt.nesterov))
  raise ValueError(f"optimizer.name must be adam, adamw or sgd, got {opt.name!r}")


def make_optimizer(config, plan: FreezePlan, params, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  """The full update rule: zero frozen grads, clip, per-stage optimizer, pruning masks
  (config.pruning), accumulation."""
  label_tree = plan.label_tree(params)
  present = sorted(set(plan.labels.values()))
  stages = [s for s in plan.stage_names if s in present]
  layer_decay = config.optimizer.layer_decay
  transforms = {FROZEN: optax.set_to_zero()}
  for depth_from_top, stage in enumerate(reversed(plan.stage_names)):
    if stage in stages:
      scale = layer_decay ** depth_from_top  # discriminative learning rates, head at full lr
      transforms[stage] = _base_optimizer(config, lambda step, s=scale: schedule(step) * s)
  # Zero the frozen gradients first so they do not count in the global clipping norm.
  zero_frozen = optax.multi_transform(
      {label: (optax.set_to_zero() if label == FROZEN else optax.identity())
       for label in transforms}, label_tree)
  chain = [zero_frozen]
  if config.optimizer.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(config.optimizer.grad_clip_norm))
  chain.append(optax.multi_transform(transforms, label_tree))
  if config.pruning.sparsity > 0:  # last: whatever came before, pruned weights stay 0.0
    trainable = [n for n, label in plan.labels.items() if label != FROZEN]
    chain.append(magnitude.from_config(config.pruning, magnitude.prunable_names(params,
                                                                                trainable)))
  tx = optax.chain(*chain)
  if config.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
  return tx


def carry_opt_state(old, new):
  """Keeps the old optimizer state wherever its structure still fits the new optimizer.

  Used by gradual unfreezing: the per-stage states of stages that were already training are
  kept as they are; newly unfrozen stages start from the new (fresh) state.
  """
  if isinstance(old, optax.MultiTransformState) and isinstance(new, optax.MultiTransformState):
    inner = {k: (carry_opt_state(old.inner_states[k], v) if k in old.inner_states else v)
             for k, v in new.inner_states.items()}
    return optax.MultiTransformState(inner)
  if (isinstance(old, tuple) and isinstance(new, tuple) and type(old) is type(new)
      and len(old) == len(new)):
    carried = [carry_opt_state(o, n) for o, n in zip(old, new)]
    return type(new)(*carried) if hasattr(new, "_fields") else type(new)(carried)
  if jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new):
    return old
  return new
