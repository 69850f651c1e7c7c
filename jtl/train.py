"""train_and_evaluate(config, workdir): the recipe of a run.

Open the data and the model, decide what trains and on what (images, or the frozen prefix's
cached outputs), build the compiled steps (jtl.steps), run the loop with its hooks (jtl.loop,
jtl.hooks), evaluate the best checkpoint on the test split and export it. lp_ft first fits the
head alone on cached features (the probe, in workdir/probe), then fine-tunes from it;
optimizer.lr=auto first runs the learning-rate range test (jtl.lr_find, in workdir/lr_find).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from typing import Any, Sequence

import jax
import numpy as np

from jtl import class_weights as class_weights_lib
from jtl import config as config_lib
from jtl import data as data_lib
from jtl import distributed, evaluation, export, feature_cache, hooks as hooks_lib, optim, report
from jtl import lr_find
from jtl import error_analysis, report_md
from jtl import params as P
from jtl import steps as steps_lib
from jtl import workdir as workdir_lib
from jtl.budget import Budget, plan_budget
from jtl.checkpoint import Checkpoints
from jtl.data import tta as tta_lib
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
    config = reuse_found_lr(config, workdir)
    inputs = open_inputs(config, workdir)
    if config.strategy == "lp_ft":
      probe = run_probe(inputs, workdir, extra_hooks)
      if probe.get("preempted"):
        return probe
    else:
      probe = None
    if config_lib.is_auto_lr(config):  # after the probe: the sweep starts from its head
      inputs.config = config = find_auto_lr(inputs, workdir)
    outcome = fit(inputs, workdir, extra_hooks)
    if outcome.get("preempted"):
      return outcome
    final = finish(inputs, workdir, outcome)
    if probe is not None:
      final.update({f"probe_{k}": v for k, v in probe.items()
                    if k in ("test_accuracy", "val_accuracy", "steps", "train_seconds")})
    if config.lr_find.suggested_lr:
      final["suggested_lr"] = config.lr_find.suggested_lr
    # The whole command's time (data scan, weights, cache, compile, training, final evaluation
    # and export): what a user waits for, and what a study compares.
    final["wall_seconds"] = round(time.perf_counter() - started, 2)
    if distributed.is_host0():
      report.write_json(os.path.join(workdir, "final_metrics.json"), final)
      report_md.write_report(workdir, final, report_md.run_facts(config))  # with these fields
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
  _check_batch_sizes(config, dataset)  # before the weights load: a split smaller than a batch
  model = create_model(config.model, num_classes=len(class_names),
                       pretrained=_pretrained_arg(config.pretrained),
                       image_size=config.image_size or None, seed=config.seed,
                       **({"inner_widths": tuple(config.inner_widths)} if config.inner_widths
                          else {}))
  config_lib.validate_for_model(config, model.stage_names)
  preprocess = data_lib.Preprocess.from_pretrained_cfg(model.pretrained_cfg,
                                                       config.image_size or None)
  if (problem := tta_lib.crop_problem(config.tta, preprocess)) is not None:
    raise config_lib.ConfigError(f"config.tta={config.tta!r}: {problem}")
  mesh = distributed.make_mesh()
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
  class_weights: Any = None   # float32 [classes] loss weights (config.class_weights); None: none
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
  weights = class_weights_lib.resolve_class_weights(
      config.class_weights, dataset.table("train").labels, inputs.class_names)
  return Training(plan, budget, schedule, sources[0], sources[1], start_stage, eval_fn,
                  cache_seconds, class_weights=weights)


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
          seed=config.seed, epoch=epoch, start_step=start_step, shard=shard,
          balanced=config.balanced_sampling)

    def evaluate(split):
      return data_lib.eval_batches(inputs.dataset, split, batch_size=local_eval,
                                   preprocess=inputs.preprocess, shard=shard)
    return (train, evaluate), 0
  log.info("feature cache: %s", why)
  cache = feature_cache.open_cache(config, inputs.model, inputs.dataset, inputs.preprocess,
                                   cache_plan, inputs.mesh)
  cached = feature_cache.CachedBatches(cache, seed=config.seed,
                                       balanced=config.balanced_sampling)
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
          start_stage=self.training.start_stage, class_weights=self.training.class_weights)
    return self.training.steps[plan.frozen_stages]

  def __call__(self, epoch: int, state):
    """(the step of `epoch`, the state with its optimizer state fitted to that step)."""
    step = self.step_of(epoch)
    frozen = self.training.plan_for_epoch(self.config, epoch).frozen_stages
    if self._frozen is not None and self._frozen != frozen:
      log.info("epoch %d: unfreezing, %d stages frozen now", epoch, frozen)
      opt_state = optim.carry_opt_state(state.opt_state, step.tx.init(state.params))
      ema = step.fit_ema(state.ema_params, state.params)  # the newly thawed stage joins it
      state = state.replace(opt_state=distributed.replicate(opt_state, self.inputs.mesh),
                            ema_params=distributed.replicate(ema, self.inputs.mesh))
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
  def evaluate_on_val(state):
    return evaluation.evaluate(training.eval_fn, state, training.eval_batches(split),
                               inputs.mesh, inputs.class_names)
  evaluate = hooks_lib.Evaluation(
      evaluate_on_val, run_log, scalars.learning_rate, metric=config.early_stopping.metric,
      patience=config.early_stopping.patience, min_delta=config.early_stopping.min_delta,
      evaluate_ema=((lambda state: evaluate_on_val(steps_lib.with_ema_weights(state)))
                    if config.ema_decay else None))
  saving = hooks_lib.Checkpointing(checkpoints, every_steps=config.checkpoint_every_steps,
                                   min_seconds=config.checkpoint_min_seconds)
  hooks = [scalars, evaluate, saving]
  if config.schedule.name == "reduce_on_plateau":  # after Evaluation, before Checkpointing
    higher_is_better = config.early_stopping.metric != "val_loss"
    plateau = hooks_lib.PlateauSchedule(evaluate, optim.plateau_rule(config), inputs.mesh,
                                        higher_is_better=higher_is_better)
    scalars.lr_scale = plateau.current_scale  # the rate logged is the rate applied
    hooks.insert(2, plateau)
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
    return state.replace(opt_state=step.tx.init(state.params),
                         ema_params=step.fit_ema({}, state.params))

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
  """The best checkpoint on the test split (val without one), the export and the pictures.

  With model EMA the checkpoint's raw weights or their EMA, whichever scores better on
  validation, are tested and exported; config.tta adds the test-time augmented figures."""
  checkpoints, run_log, training = outcome["checkpoints"], outcome["run_log"], outcome["training"]
  progress, state = outcome["progress"], outcome["state"]
  steps_trained = int(state.step)
  try:
    checkpoints.wait()
    best = checkpoints.restore(state, which="best")
    if best is not None:
      state = distributed.replicate(best[0], inputs.mesh)
    split = "test" if inputs.dataset.has_split("test") else "val"
    state, weights = _pick_weights(inputs, training, state, split)
    result = evaluation.evaluate(training.eval_fn, state, training.eval_batches(split),
                                 inputs.mesh, inputs.class_names, keep_predictions=True)
    final = evaluation.final_metrics(result, split)
    final.update(weights)
    if inputs.config.ema_decay:  # both weights' test accuracies; without EMA, test_accuracy is all
      final[f"{weights['exported_weights']}_test_accuracy"] = result["accuracy"]
    final.update(_tta_metrics(inputs, state, split))
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
      _write_outputs(inputs, workdir, state, final, run_log, result["predictions"])
    return final
  finally:
    checkpoints.close()
    run_log.close()


def _pick_weights(inputs, training, state, test_split: str):
  """(the state to test and export, final_metrics fields): the raw weights of the best
  checkpoint, or its EMA when that beats them on validation by the early-stopping metric (a
  tie keeps the raw weights); the other one is tested too, for the record."""
  config = inputs.config
  if not config.ema_decay:
    return state, {"exported_weights": "raw"}
  metric = config.early_stopping.metric
  val_split = "val" if inputs.dataset.has_split("val") else "test"  # the one Evaluation used

  def report(s, split):
    return evaluation.evaluate(training.eval_fn, s, training.eval_batches(split), inputs.mesh,
                               inputs.class_names)
  ema_state = steps_lib.with_ema_weights(state)
  raw, ema = (report(s, val_split)[metric[len("val_"):]] for s in (state, ema_state))
  use_ema = hooks_lib.improved(metric, ema, raw, 0.0)
  other, other_name = (state, "raw") if use_ema else (ema_state, "ema")
  return (ema_state if use_ema else state), {
      "exported_weights": "ema" if use_ema else "raw",
      "ema_selection": {"metric": metric, "split": val_split, "raw": raw, "ema": ema},
      f"{other_name}_test_accuracy": report(other, test_split)["accuracy"]}


def _tta_metrics(inputs, state, split: str) -> dict:
  """final_metrics fields of the test-time augmented evaluation (config.tta) of the exported
  weights. The views need pixels, so it runs on images from stage 0 even when training ran on
  cached features; batches of eval_batch_size / views examples keep its memory that of one
  plain evaluation batch."""
  mode = inputs.config.tta
  if not tta_lib.is_on(mode):
    return {"tta": "none"}
  views, devices = tta_lib.num_views(mode), jax.local_device_count()
  local = inputs.config.eval_batch_size // jax.process_count() // views // devices * devices
  eval_fn = steps_lib.make_eval_step(inputs.model, inputs.mesh,
                                     num_classes=len(inputs.class_names))
  batches = data_lib.eval_batches(inputs.dataset, split, batch_size=max(local, devices),
                                  preprocess=inputs.preprocess, tta=mode,
                                  shard=data_lib.Shard(jax.process_index(), jax.process_count()))
  result = evaluation.evaluate(eval_fn, state, batches, inputs.mesh, inputs.class_names)
  return {"tta": mode, "tta_views": views,
          **{f"tta_test_{k}": result[k]
             for k in ("accuracy", "balanced_accuracy", "top5", "loss", "macro_f1")}}


def _write_outputs(inputs, workdir, state, final, run_log, predictions) -> None:
  variables = {"params": jax.device_get(state.params)}
  if state.batch_stats:
    variables["batch_stats"] = jax.device_get(state.batch_stats)
  export.export_model(workdir, variables, inputs.record)
  report.write_json(os.path.join(workdir, "final_metrics.json"), final)
  report.plot_curves(run_log.records(), os.path.join(workdir, "curves.png"))
  report.plot_confusion_matrix(final["confusion_matrix"], inputs.class_names,
                               os.path.join(workdir, "confusion_matrix.png"))
  # Error analysis from the final evaluation's own per-example arrays, then the one-page report.
  error_analysis.write_most_confused(workdir, final)
  error_analysis.write_top_losses(workdir, final, predictions, inputs.dataset, inputs.preprocess,
                                  local_batch_size=inputs.config.eval_batch_size
                                  // jax.process_count(), process_count=jax.process_count())
  report_md.write_report(workdir, final, report_md.run_facts(inputs.config))


# ---------------------------------------------------------------------------------------------
# lp_ft: the probe.

def run_probe(inputs: Inputs, workdir: str, extra_hooks: Sequence[Hook] = ()) -> dict:
  """Fits the head alone (feature extraction on cached features, its own budget, early
  stopping) in workdir/probe, then puts the probe's best head into the model."""
  config = config_lib.with_learning_rate(inputs.config, inputs.config.probe.lr)
  with config.unlocked():
    config.strategy, config.freeze_depth, config.trainable = "feature_extraction", 0, ()
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


# ---------------------------------------------------------------------------------------------
# The learning-rate range test (jtl.lr_find): alone, or first in an optimizer.lr=auto run.

def lr_range_test(config, workdir: str) -> dict:
  """python -m jtl.lr_find: the range test alone, lr_find.json and lr_find.png in `workdir`."""
  config_lib.validate(config)
  if config.distributed:
    distributed.initialize(config)
  if workdir_lib.has_checkpoints(workdir):
    raise WorkdirError(f"workdir {workdir} holds a training run; give the range test a "
                       "workdir of its own")
  preflight(config)
  workdir_lib.check_writable(workdir)
  return find_learning_rate(open_inputs(config, workdir), workdir)


def find_learning_rate(inputs: Inputs, directory: str) -> dict:
  """The range test with the run's own step (freezing, layer decay, clipping, the feature
  cache's batches) from the weights in inputs.model, which stay as they are: a run after it
  starts from them afresh. Returns lr_find.json's content (written by host 0)."""
  finder = inputs.config.lr_find
  lrs = lr_find.sweep_lrs(finder.min_lr, finder.max_lr, finder.num_steps)
  # The sweep's schedule replaces the run's; a number stands in for an "auto" lr meanwhile.
  config = config_lib.with_learning_rate(inputs.config, float(lrs[-1]))
  training = dataclasses.replace(plan_training(inputs, config),
                                 schedule=lr_find.sweep_schedule(lrs))
  step = StepsByEpoch(inputs, config, training).step_of(0)
  variables = inputs.model.variables
  state = step.init_state(variables["params"], variables.get("batch_stats", {}), config.seed)
  batches = (batch for epoch in itertools.count()
             for batch in training.train_batches(epoch=epoch, start_step=0))
  sweep, suggested = lr_find.range_test(step, state, batches, inputs.mesh, lrs, finder,
                                        grad_accum_steps=config.grad_accum_steps)
  result = lr_find.summary(sweep, suggested)
  if distributed.is_host0():
    lr_find.write_results(directory, sweep, result)
  log.info("lr_find: suggested learning rate %.4g (%s)", suggested, lr_find.METHOD)
  return result


def reuse_found_lr(config, workdir: str):
  """An optimizer.lr=auto run that resumes goes on with the rate its range test found (kept
  in its config.json), rather than run the test again; any other config is returned as is."""
  if (not config_lib.is_auto_lr(config) or config.resume == "false"
      or not workdir_lib.has_checkpoints(workdir)):
    return config
  found = ((workdir_lib.saved_config(workdir) or {}).get("lr_find") or {}).get("suggested_lr")
  if not found:
    return config
  log.info("optimizer.lr=auto: resuming with the learning rate found before, %.4g", found)
  return config_lib.with_learning_rate(config, found, found=True)


def find_auto_lr(inputs: Inputs, workdir: str):
  """A new optimizer.lr=auto run: the range test in workdir/lr_find; the config with its
  suggestion as the lr, saved as the run's config.json."""
  suggested = find_learning_rate(inputs, os.path.join(workdir, "lr_find"))["suggested_lr"]
  config = config_lib.with_learning_rate(inputs.config, suggested, found=True)
  log.info("optimizer.lr=auto: training with the range test's suggestion, %.4g", suggested)
  if distributed.is_host0():
    report.write_json(os.path.join(workdir, "config.json"), config_lib.to_jsonable(config))
  return config
