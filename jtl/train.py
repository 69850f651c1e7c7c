"""train_and_evaluate(config, workdir): the recipe of a run.

Open the data and the model, decide what trains and on what (images, or the frozen prefix's
cached outputs), build the compiled steps (jtl.steps), run the loop with its hooks (jtl.loop,
jtl.hooks), evaluate the best checkpoint on the test split and export it. lp_ft first fits the
head alone on cached features (the probe, in workdir/probe), then fine-tunes from it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Sequence

import jax
import numpy as np

from jtl import config as config_lib
from jtl import data as data_lib
from jtl import distributed, evaluation, export, feature_cache, hooks as hooks_lib, optim, report
from jtl import params as P
from jtl import steps as steps_lib
from jtl import workdir as workdir_lib
from jtl.budget import Budget, plan_budget
from jtl.checkpoint import Checkpoints
from jtl.lock import WorkdirLock
from jtl.loop import Hook, Loop, NonFiniteLossError, Progress
from jtl.models import create_model
from jtl.run_record import RUN_INFO, RunRecord
from jtl.workdir import WorkdirError

__all__ = ["NonFiniteLossError", "WorkdirError", "train_and_evaluate"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Inputs:
  """What a run trains on, opened and checked once."""
  config: Any
  dataset: data_lib.Dataset
  model: Any
  preprocess: data_lib.Preprocess
  mesh: Any
  record: RunRecord

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.record.class_names


def train_and_evaluate(config, workdir: str, *, extra_hooks: Sequence[Hook] = ()) -> dict:
  """Trains per `config`, writing everything into `workdir`; returns the final metrics.

  extra_hooks run after the engine's own (tests and tools observe or steer the loop there)."""
  started = time.perf_counter()
  config_lib.validate(config)
  if config.distributed:
    distributed.initialize(config)
  workdir_lib.check_same_run(config, workdir)
  preflight(config)
  workdir_lib.check_writable(workdir)
  with WorkdirLock(workdir, force=config.force_unlock, run_id=distributed.shared_run_id(),
                   process_index=jax.process_index(), process_count=jax.process_count(),
                   barrier=lambda: distributed.sync("jtl: workdir lock taken")):
    workdir_lib.prepare(config, workdir)
    inputs = open_inputs(config, workdir)
    if config.strategy == "lp_ft":
      probe = run_probe(inputs, workdir, extra_hooks)
      if probe.get("preempted"):
        return probe
    else:
      probe = None
    outcome = fit(inputs, workdir, extra_hooks)
    if outcome.get("preempted"):
      return outcome
    final = finish(inputs, workdir, outcome)
    if probe is not None:
      final.update({f"probe_{k}": v for k, v in probe.items()
                    if k in ("test_accuracy", "val_accuracy", "steps", "train_seconds")})
    # The whole command's time (data scan, weights, cache, compile, training, final evaluation
    # and export): what a user waits for, and what a study compares.
    final["wall_seconds"] = round(time.perf_counter() - started, 2)
    if distributed.is_host0():
      report.write_json(os.path.join(workdir, "final_metrics.json"), final)
    return final


def preflight(config) -> None:
  """Checks that need neither data nor weights loaded: an unknown model name, a weights file
  that does not exist. A large folder's scan takes minutes; these take milliseconds."""
  from jtl.models import factory
  try:
    factory.check_spec(config.model, _pretrained_arg(config.pretrained))
  except (KeyError, ValueError, FileNotFoundError) as e:
    message = e.args[0] if e.args else str(e)
    raise config_lib.ConfigError(f"config.model={config.model!r} / config.pretrained="
                                 f"{config.pretrained!r}: {message}") from None


def _pretrained_arg(value: str):
  return {"default": True, "none": None, "": None}.get(value, value)


def open_inputs(config, workdir: str) -> Inputs:
  """The dataset (scanned), the model (loaded) and the run record, written to the workdir."""
  dataset = data_lib.open_dataset(
      config.dataset, data_dir=config.data_dir or None, val_fraction=config.val_fraction,
      seed=config.seed, max_train_examples=config.max_train_examples or None,
      bad_images=config.bad_images, report_dir=workdir)
  class_names = tuple(dataset.class_names)
  config_lib.validate_for_data(config, class_names)
  model = create_model(config.model, num_classes=len(class_names),
                       pretrained=_pretrained_arg(config.pretrained),
                       image_size=config.image_size or None, seed=config.seed)
  config_lib.validate_for_model(config, model.stage_names)
  preprocess = data_lib.Preprocess.from_pretrained_cfg(model.pretrained_cfg,
                                                       config.image_size or None)
  mesh = distributed.make_mesh()
  _check_batch_sizes(config, dataset)
  record = RunRecord.of_run(config.model, model, class_names, preprocess.image_size,
                            config.strategy)
  if distributed.is_host0():
    report.write_json(os.path.join(workdir, "config.json"), config_lib.to_jsonable(config))
    record.write(os.path.join(workdir, RUN_INFO))
  return Inputs(config, dataset, model, preprocess, mesh, record)


def _check_batch_sizes(config, dataset) -> None:
  devices, hosts = jax.device_count(), jax.process_count()
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % devices or config[key] % hosts:
      raise config_lib.ConfigError(f"config.{key}={config[key]} must be divisible by the "
                                   f"{devices} devices ({hosts} hosts)")
  if dataset.num_examples("train") < config.batch_size:
    raise config_lib.ConfigError(
        f"config.batch_size={config.batch_size} is larger than the training split "
        f"({dataset.num_examples('train')} examples)")


# ---------------------------------------------------------------------------------------------
# What trains, on what.

@dataclasses.dataclass
class Training:
  """The freeze plan, the batches (images or cached features) and the steps built for them."""
  plan: optim.FreezePlan
  budget: Budget
  schedule: Any
  train_batches: Any          # (epoch=, start_step=) -> this host's batches
  eval_batches: Any           # split -> this host's evaluation batches
  start_stage: int            # 0 on images; K on the cached outputs of the first K stages
  eval_fn: Any
  cache_seconds: float        # building (or opening) the feature cache; 0 without one
  steps: dict[int, steps_lib.TrainStep] = dataclasses.field(default_factory=dict)

  def plan_for_epoch(self, config, epoch: int) -> optim.FreezePlan:
    if config.unfreeze_every_epochs:
      return optim.unfreeze_stages(self.plan, epoch // config.unfreeze_every_epochs)
    return self.plan


def plan_training(inputs: Inputs, config, *, train_steps: int | None = None) -> Training:
  model, dataset, mesh = inputs.model, inputs.dataset, inputs.mesh
  rules = optim.freeze_rules(config.strategy, model.stage_names, config.freeze_depth,
                             config.trainable)
  plan = optim.make_freeze_plan(model.variables["params"], model.stage_names, rules)
  budget = plan_budget(config, data_lib.steps_per_epoch(dataset, config.batch_size),
                       train_steps=train_steps)
  lr = config.optimizer.lr
  schedule = optim.make_schedule(config, budget.optimizer_steps_per_epoch, budget.total_steps,
                                 lr)
  started = time.perf_counter()
  sources, start_stage = _batch_sources(inputs, config, plan)
  cache_seconds = time.perf_counter() - started if start_stage else 0.0
  eval_fn = steps_lib.make_eval_step(model, mesh, num_classes=len(inputs.class_names),
                                     start_stage=start_stage)
  return Training(plan, budget, schedule, sources[0], sources[1], start_stage, eval_fn,
                  cache_seconds)


def _batch_sources(inputs: Inputs, config, plan: optim.FreezePlan):
  """((train, eval) batch functions, start stage): cached features when the cache applies."""
  local = config.batch_size // jax.process_count()
  local_eval = config.eval_batch_size // jax.process_count()
  shard = data_lib.Shard(jax.process_index(), jax.process_count())
  cache_plan, why = feature_cache.plan_cache(config, plan.frozen_stages)
  if cache_plan is None:
    log.info("feature cache not used: %s", why)
    augment = data_lib.Augment.from_config(config.augment)

    def train(epoch, start_step):
      return data_lib.train_batches(
          inputs.dataset, batch_size=local, preprocess=inputs.preprocess, augment=augment,
          seed=config.seed, epoch=epoch, start_step=start_step, shard=shard)

    def evaluate(split):
      return data_lib.eval_batches(inputs.dataset, split, batch_size=local_eval,
                                   preprocess=inputs.preprocess, shard=shard)
    return (train, evaluate), 0
  log.info("feature cache: %s", why)
  cache = feature_cache.open_cache(config, inputs.model, inputs.dataset, inputs.preprocess,
                                   cache_plan, inputs.mesh)
  cached = feature_cache.CachedBatches(cache, seed=config.seed)
  return ((lambda epoch, start_step: cached.train_epoch(
              batch_size=local, epoch=epoch, start_step=start_step, shard=shard)),
          (lambda split: cached.eval_split(split, batch_size=local_eval, shard=shard))), \
      cache_plan.stop_stage


class StepsByEpoch:
  """The compiled step of each epoch: gradual unfreezing changes the plan between epochs (one
  step compiled per plan), and the optimizer state of stages already training is carried."""

  def __init__(self, inputs: Inputs, config, training: Training):
    self.inputs, self.config, self.training = inputs, config, training
    self._frozen: int | None = None  # the frozen prefix of the step last handed out

  def step_of(self, epoch: int) -> steps_lib.TrainStep:
    plan = self.training.plan_for_epoch(self.config, epoch)
    if plan.frozen_stages not in self.training.steps:
      self.training.steps[plan.frozen_stages] = steps_lib.make_train_step(
          self.inputs.model, plan, self.config, self.inputs.mesh,
          schedule=self.training.schedule, num_classes=len(self.inputs.class_names),
          start_stage=self.training.start_stage)
    return self.training.steps[plan.frozen_stages]

  def __call__(self, epoch: int, state):
    """(the step of `epoch`, the state with its optimizer state fitted to that step)."""
    step = self.step_of(epoch)
    frozen = self.training.plan_for_epoch(self.config, epoch).frozen_stages
    if self._frozen is not None and self._frozen != frozen:
      log.info("epoch %d: unfreezing, %d stages frozen now", epoch, frozen)
      opt_state = optim.carry_opt_state(state.opt_state, step.tx.init(state.params))
      state = state.replace(opt_state=distributed.replicate(opt_state, self.inputs.mesh))
    self._frozen = frozen
    return step, state


# ---------------------------------------------------------------------------------------------
# Training, resuming, finishing.

def fit(inputs: Inputs, workdir: str, extra_hooks: Sequence[Hook] = (), *, config=None,
        train_steps: int | None = None) -> dict:
  """Runs the loop to the end of the budget (or an early stop, or SIGTERM) in `workdir`."""
  config = config or inputs.config
  training = plan_training(inputs, config, train_steps=train_steps)
  step_for_epoch = StepsByEpoch(inputs, config, training)
  model = inputs.model
  first = step_for_epoch.step_of(0)
  state = first.init_state(model.variables["params"], model.variables.get("batch_stats", {}),
                           config.seed)
  checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints)
  run_log = report.RunLog(workdir, enabled=distributed.is_host0())
  failed = False
  try:
    state, progress = _resume(checkpoints, state, step_for_epoch, run_log, inputs.mesh)
    _log_plan(inputs, config, training)
    with hooks_lib.Preemption() as preemption:
      loop = _make_loop(inputs, config, training, step_for_epoch, progress, run_log,
                        checkpoints, [preemption, *extra_hooks])
      state = loop.run(state)
    if loop.interrupted:
      return {"preempted": True, "step": int(loop.step)}
    return {"state": state, "progress": progress, "training": training,
            "checkpoints": checkpoints, "run_log": run_log}
  except BaseException:
    failed = True
    raise
  finally:
    # Also on a crash: let an in-flight asynchronous save finish rather than leave it half done
    # (and report its own failure only when it is the first thing to go wrong).
    if failed or loop.interrupted:  # otherwise `finish` closes them after the final evaluation
      checkpoints.close(raise_errors=not failed)
      run_log.close()


def _make_loop(inputs, config, training, step_for_epoch, progress, run_log, checkpoints,
               extra_hooks) -> Loop:
  budget = training.budget
  scalars = hooks_lib.ScalarLog(run_log, training.schedule, every_steps=config.log_every_steps,
                                grad_accum_steps=config.grad_accum_steps)
  split = "val" if inputs.dataset.has_split("val") else "test"
  evaluate = hooks_lib.Evaluation(
      lambda state: evaluation.evaluate(training.eval_fn, state, training.eval_batches(split),
                                        inputs.mesh, inputs.class_names),
      run_log, scalars.learning_rate, metric=config.early_stopping.metric,
      patience=config.early_stopping.patience, min_delta=config.early_stopping.min_delta)
  saving = hooks_lib.Checkpointing(checkpoints, every_steps=config.checkpoint_every_steps)
  hooks = [scalars, evaluate, saving]
  if config.progress_bar and distributed.is_host0():
    hooks.insert(0, hooks_lib.ProgressBar(budget.steps_per_epoch, config.batch_size))
  loop = Loop(step_for_epoch=step_for_epoch, batches=training.train_batches, budget=budget,
              progress=progress, hooks=[*hooks, *extra_hooks], mesh=inputs.mesh,
              nonfinite_policy=config.nonfinite_policy,
              max_skipped_steps=config.max_skipped_steps)
  saving.attach(loop)
  return loop


def _resume(checkpoints, state, step_for_epoch, run_log, mesh):
  """(state, progress): from the newest intact checkpoint when there is one, else the fresh
  ones. Damaged checkpoints are named, moved aside and stepped over (jtl.checkpoint)."""
  if checkpoints.latest_step() is None:
    return state, Progress()

  def template(meta):
    # The optimizer state's structure depends on the plan of the checkpoint's epoch (gradual
    # unfreezing), so each candidate is restored against its own epoch's tree.
    step = step_for_epoch.step_of(Progress.from_json(meta).epoch)
    return state.replace(opt_state=step.tx.init(state.params))

  restored = checkpoints.load(template)
  progress = Progress.from_json(restored.meta)
  checkpoints.discard_best_after(restored.step)
  run_log.truncate_after(restored.step)
  log.info("resumed from step %d (epoch %d, step %d in it)", restored.step, progress.epoch,
           progress.step_in_epoch)
  return distributed.replicate(restored.state, mesh), progress


def _log_plan(inputs, config, training) -> None:
  params = inputs.model.variables["params"]
  trainable = count_trainable(params, training.plan)
  b = training.budget
  log.info("%s: %d classes, %d of %d parameters trainable, %d frozen stages; %d epochs of %d "
           "steps (%d optimizer steps), evaluating every %d epochs", config.model,
           len(inputs.class_names), trainable, P.count(params), training.plan.frozen_stages,
           b.num_epochs, b.steps_per_epoch, b.total_steps, b.eval_every_epochs)


def count_trainable(params, plan) -> int:
  return P.count({k: v for k, v in P.flatten(params).items() if plan.labels[k] != optim.FROZEN})


def finish(inputs: Inputs, workdir: str, outcome: dict) -> dict:
  """The best checkpoint on the test split (val without one), the export and the pictures."""
  checkpoints, run_log, training = outcome["checkpoints"], outcome["run_log"], outcome["training"]
  progress, state = outcome["progress"], outcome["state"]
  steps_trained = int(state.step)
  try:
    checkpoints.wait()
    best = checkpoints.restore(state, which="best")
    if best is not None:
      state = distributed.replicate(best[0], inputs.mesh)
    split = "test" if inputs.dataset.has_split("test") else "val"
    result = evaluation.evaluate(training.eval_fn, state, training.eval_batches(split),
                                 inputs.mesh, inputs.class_names)
    final = evaluation.final_metrics(result, split)
    params = inputs.model.variables["params"]
    final.update(trainable_params=count_trainable(params, training.plan),
                 total_params=int(P.count(params)), train_seconds=round(progress.train_seconds, 2),
                 steps=steps_trained, best_step=progress.best_step,
                 skipped_steps=progress.skipped_steps,
                 best_val=progress.best, best_val_metric=inputs.config.early_stopping.metric,
                 step_seconds=round(progress.train_seconds / max(steps_trained, 1), 4),
                 images_per_second=round(steps_trained * inputs.config.batch_size
                                         / max(progress.train_seconds, 1e-9), 1),
                 feature_cache=training.start_stage > 0,
                 feature_cache_seconds=round(training.cache_seconds, 2))
    if distributed.is_host0():
      _write_outputs(inputs, workdir, state, final, run_log)
    return final
  finally:
    checkpoints.close()
    run_log.close()


def _write_outputs(inputs, workdir, state, final, run_log) -> None:
  variables = {"params": jax.device_get(state.params)}
  if state.batch_stats:
    variables["batch_stats"] = jax.device_get(state.batch_stats)
  export.export_model(workdir, variables, inputs.record)
  report.write_json(os.path.join(workdir, "final_metrics.json"), final)
  report.plot_curves(run_log.records(), os.path.join(workdir, "curves.png"))
  report.plot_confusion_matrix(final["confusion_matrix"], inputs.class_names,
                               os.path.join(workdir, "confusion_matrix.png"))


# ---------------------------------------------------------------------------------------------
# lp_ft: the probe.

def run_probe(inputs: Inputs, workdir: str, extra_hooks: Sequence[Hook] = ()) -> dict:
  """Fits the head alone (feature extraction on cached features, its own budget, early
  stopping) in workdir/probe, then puts the probe's best head into the model."""
  config = inputs.config.copy_and_resolve_references()
  with config.unlocked():
    config.strategy, config.freeze_depth, config.trainable = "feature_extraction", 0, ()
    config.optimizer.lr = inputs.config.probe.lr
    config.optimizer.layer_decay = 1.0
  probe_dir = os.path.join(workdir, "probe")
  workdir_lib.check_writable(probe_dir)
  outcome = fit(inputs, probe_dir, extra_hooks, config=config,
                train_steps=inputs.config.probe.steps or None)
  if outcome.get("preempted"):
    return outcome
  final = finish(inputs, probe_dir, outcome)
  head = _best_head(probe_dir)
  inputs.model.variables["params"]["head"] = head
  log.info("probe: the head alone reached %.4f on %s; fine-tuning from it",
           final["test_accuracy"], final["split"])
  return {"test_accuracy": final["test_accuracy"], "steps": final["steps"],
          "train_seconds": final["train_seconds"],
          "val_accuracy": outcome["progress"].best}


def _best_head(probe_dir: str) -> dict:
  from safetensors.numpy import load_file
  flat = load_file(os.path.join(probe_dir, export.EXPORT_DIR, "model.safetensors"))
  prefix = "params/head/"
  return {k[len(prefix):]: np.asarray(v) for k, v in flat.items() if k.startswith(prefix)}
