"""Planning a run: its inputs opened and checked, what trains and on what, the compiled steps.

`open_inputs` opens the dataset and the model once (it writes nothing but the bad-image list
that config.bad_images=skip asks for); `plan_run` decides the freeze plan, the budget, the
schedule, the batches (images, or the frozen prefix's cached outputs) and the evaluation step;
`StepsByEpoch` compiles the training step of each epoch. jtl.train runs them; the range test
(jtl.lr_find.driver) and pruning (jtl.prune_runs) plan through here too, never through train.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Iterator

import jax

from jtl import class_weights as class_weights_lib
from jtl import config as config_lib
from jtl import data as data_lib
from jtl import distributed, evaluation, feature_cache, optim
from jtl import params as P
from jtl import steps as steps_lib
from jtl.budget import Budget, plan_budget
from jtl.data import tta as tta_lib
from jtl.evaluation import Splits
from jtl.models import create_model
from jtl.run_record import RunRecord

log = logging.getLogger(__name__)


def begin(config) -> None:
  """Before any work: the config's own checks, and jax.distributed started when asked."""
  config_lib.validate(config)
  if config.distributed:
    distributed.initialize(config)


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What a run trains on, opened and checked once: the data, the model, how images become
  the model's input, the device mesh and the run's record."""
  dataset: data_lib.Dataset
  model: Any
  preprocess: data_lib.Preprocess
  mesh: Any
  record: RunRecord

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.record.class_names

  def with_params(self, **subtrees) -> "Inputs":
    """The same inputs with some top-level parameter subtrees replaced (lp_ft: the probe's
    head); the model given is left as it is."""
    variables = {**self.model.variables,
                 "params": {**self.model.variables["params"], **subtrees}}
    return dataclasses.replace(self, model=dataclasses.replace(self.model, variables=variables))


def open_inputs(config, *, report_dir: str | None = None) -> Inputs:
  """The dataset (scanned) and the model (loaded), checked against the config. report_dir:
  where config.bad_images=skip lists the files it skipped."""
  dataset = data_lib.open_dataset(
      config.dataset, data_dir=config.data_dir or None, val_fraction=config.val_fraction,
      seed=config.seed, max_train_examples=config.max_train_examples or None,
      bad_images=config.bad_images, report_dir=report_dir,
      val_min_per_class=config.val_min_per_class)
  class_names = tuple(dataset.class_names)
  config_lib.validate_for_data(config, class_names)
  # Before the weights load: a split smaller than a batch is found in milliseconds.
  config_lib.validate_batch_sizes(config, dataset.num_examples("train"),
                                  devices=jax.device_count(), hosts=jax.process_count())
  model = create_model(config.model, num_classes=len(class_names),
                       pretrained=config_lib.pretrained_arg(config.pretrained),
                       image_size=config.image_size or None, seed=config.seed,
                       **({"inner_widths": tuple(config.inner_widths)} if config.inner_widths
                          else {}))
  config_lib.validate_for_model(config, model.stage_names)
  preprocess = data_lib.Preprocess.from_pretrained_cfg(model.pretrained_cfg,
                                                       config.image_size or None)
  if (problem := tta_lib.crop_problem(config.tta, preprocess)) is not None:
    raise config_lib.ConfigError(f"config.tta={config.tta!r}: {problem}")
  record = RunRecord.of_run(config.model, model, class_names, preprocess.image_size,
                            config.strategy)
  return Inputs(dataset, model, preprocess, distributed.make_mesh(), record)


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """One run's plan: its inputs and config, the freeze plan, the budget and schedule, the
  batches (images or cached features) and the evaluation step."""
  inputs: Inputs
  config: Any
  freeze: optim.FreezePlan
  budget: Budget
  schedule: Any
  train_batches: Callable[..., Iterator[dict]]  # (epoch=, start_step=) -> this host's batches
  eval_batches: Callable[[str], Iterator[dict]]  # split -> this host's evaluation batches
  start_stage: int            # 0 on images; K on the cached outputs of the first K stages
  eval_fn: Any
  splits: Splits
  cache_seconds: float        # building (or opening) the feature cache; 0 without one
  class_weights: Any = None   # float32 [classes] loss weights (config.class_weights); None: none
  cache: feature_cache.FeatureCache | None = None  # the cache trained on; None on images

  @property
  def mesh(self):
    return self.inputs.mesh

  def freeze_for_epoch(self, epoch: int) -> optim.FreezePlan:
    if self.config.unfreeze_every_epochs:
      return optim.unfreeze_stages(self.freeze, epoch // self.config.unfreeze_every_epochs)
    return self.freeze

  def trainable_params(self) -> int:
    params = self.inputs.model.variables["params"]
    return P.count({k: v for k, v in P.flatten(params).items()
                    if self.freeze.labels[k] != optim.FROZEN})

  def evaluate(self, state, split: str, **kwargs) -> dict:
    """The classification report of `state` on `split` (jtl.evaluation.evaluate)."""
    return evaluation.evaluate(self.eval_fn, state, self.eval_batches(split), self.mesh,
                               self.inputs.class_names, **kwargs)


def plan_run(inputs: Inputs, config, *, train_steps: int | None = None,
             schedule=None) -> RunPlan:
  """The plan of a run of `config` on `inputs`. train_steps overrides the budget (lp_ft's
  probe); schedule replaces the config's (the range test's sweep)."""
  model, dataset = inputs.model, inputs.dataset
  rules = optim.freeze_rules(config.strategy, model.stage_names, config.freeze_depth,
                             config.trainable)
  freeze = optim.make_freeze_plan(model.variables["params"], model.stage_names, rules)
  budget = plan_budget(config, data_lib.steps_per_epoch(dataset, config.batch_size),
                       train_steps=train_steps)
  if schedule is None:
    schedule = optim.make_schedule(config, budget.optimizer_steps_per_epoch, budget.total_steps,
                                   config.optimizer.lr)
  started = time.perf_counter()
  (train, evaluate), start_stage, cache = _batch_sources(inputs, config, freeze)
  cache_seconds = time.perf_counter() - started if start_stage else 0.0
  eval_fn = steps_lib.make_eval_step(model, inputs.mesh, num_classes=len(inputs.class_names),
                                     start_stage=start_stage)
  weights = class_weights_lib.resolve_class_weights(
      config.class_weights, dataset.table("train").labels, inputs.class_names)
  return RunPlan(inputs, config, freeze, budget, schedule, train, evaluate, start_stage, eval_fn,
                 Splits.of(dataset, config.early_stopping.metric), cache_seconds,
                 class_weights=weights, cache=cache)


def _batch_sources(inputs: Inputs, config, freeze: optim.FreezePlan):
  """((train, eval) batch functions, start stage, the cache or None): cached features when the
  cache applies."""
  local = config.batch_size // jax.process_count()
  local_eval = config.eval_batch_size // jax.process_count()
  shard = data_lib.Shard(jax.process_index(), jax.process_count())
  cache_plan, why = feature_cache.plan_cache(config, freeze.frozen_stages)
  if cache_plan is None:
    log.info("feature cache not used: %s", why)
    augment = data_lib.Augment.from_config(config.augment)

    def train(epoch, start_step):
      return data_lib.train_batches(
          inputs.dataset, batch_size=local, preprocess=inputs.preprocess, augment=augment,
          seed=config.seed, epoch=epoch, start_step=start_step, shard=shard,
          balanced=config.balanced_sampling)

    def evaluate(split):
      return data_lib.eval_batches(inputs.dataset, split, batch_size=local_eval,
                                   preprocess=inputs.preprocess, shard=shard)
    return (train, evaluate), 0, None
  log.info("feature cache: %s", why)
  cache = feature_cache.open_cache(config, inputs.model, inputs.dataset, inputs.preprocess,
                                   cache_plan, inputs.mesh)
  cached = feature_cache.CachedBatches(cache, seed=config.seed,
                                       balanced=config.balanced_sampling)

  def train_cached(epoch, start_step):
    return cached.train_epoch(batch_size=local, epoch=epoch, start_step=start_step, shard=shard)

  def evaluate_cached(split):
    return cached.eval_split(split, batch_size=local_eval, shard=shard)
  return (train_cached, evaluate_cached), cache_plan.stop_stage, cache


class StepsByEpoch:
  """The compiled step of each epoch: gradual unfreezing changes the freeze plan between epochs
  (one step compiled per plan, kept here), and the optimizer state of stages already training
  is carried over."""

  def __init__(self, run: RunPlan):
    self.run = run
    self._compiled: dict[int, steps_lib.TrainStep] = {}  # frozen stages -> its step
    self._frozen: int | None = None  # the frozen prefix of the step last handed out

  def step_of(self, epoch: int) -> steps_lib.TrainStep:
    run = self.run
    frozen = run.freeze_for_epoch(epoch)
    if frozen.frozen_stages not in self._compiled:
      self._compiled[frozen.frozen_stages] = steps_lib.make_train_step(
          run.inputs.model, frozen, run.config, run.mesh, schedule=run.schedule,
          num_classes=len(run.inputs.class_names), start_stage=run.start_stage,
          class_weights=run.class_weights)
    return self._compiled[frozen.frozen_stages]

  def __call__(self, epoch: int, state):
    """(the step of `epoch`, the state with its optimizer state fitted to that step)."""
    step = self.step_of(epoch)
    frozen = self.run.freeze_for_epoch(epoch).frozen_stages
    if self._frozen is not None and self._frozen != frozen:
      log.info("epoch %d: unfreezing, %d stages frozen now", epoch, frozen)
      opt_state = optim.carry_opt_state(state.opt_state, step.tx.init(state.params))
      ema = step.fit_ema(state.ema_params, state.params)  # the newly thawed stage joins it
      state = state.replace(opt_state=distributed.replicate(opt_state, self.run.mesh),
                            ema_params=distributed.replicate(ema, self.run.mesh))
    self._frozen = frozen
    return step, state

  def initial_state(self):
    """A fresh train state from the model's weights (step 0, the first epoch's optimizer)."""
    variables = self.run.inputs.model.variables
    return self.step_of(0).init_state(variables["params"], variables.get("batch_stats", {}),
                                      self.run.config.seed)
