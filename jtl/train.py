"""train_and_evaluate(config, workdir): the recipe of a run.

1. Check the config and the workdir before any work; take the workdir's lock.
2. Open the inputs (jtl.plan): the data scanned, the model loaded.
3. lp_ft: fit the head alone first (the probe, in workdir/probe) and start from its head;
   optimizer.lr=auto: the learning-rate range test picks the rate (jtl.lr_find.driver).
4. Plan the run (jtl.plan) and fit it: the loop and its hooks (jtl.loop, jtl.hooks), from the
   newest intact checkpoint when there is one; a linear head alone on cached features is
   solved instead (jtl.linear_probe).
5. Finish: the best checkpoint tested, exported and reported (jtl.final).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Sequence

import jax

from jtl import config as config_lib
from jtl import distributed, linear_probe, optim
from jtl import hooks as hooks_lib
from jtl import params as P
from jtl import workdir as workdir_lib
from jtl.checkpoint import Checkpoints
from jtl.final import evaluate_and_export
from jtl.lock import WorkdirLock
from jtl.loop import Hook, Loop, NonFiniteLossError, Progress
from jtl.lr_find import driver as lr_driver
from jtl.plan import Inputs, RunPlan, StepsByEpoch, begin, open_inputs, plan_run
from jtl.report import RunLog
from jtl.steps import with_ema_weights
from jtl.workdir import WorkdirError

__all__ = ["NonFiniteLossError", "WorkdirError", "train_and_evaluate"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Fitted:
  """A loop that ran to its end (budget spent or stopped early), or a head solved."""
  state: Any
  progress: Progress
  fields: dict = dataclasses.field(default_factory=dict)  # final_metrics.json's, about the fit


@dataclasses.dataclass(frozen=True)
class Preempted:
  """A loop stopped by SIGTERM after saving `step`; the same command resumes it."""
  step: int

  def metrics(self) -> dict:
    return {"preempted": True, "step": self.step}


def train_and_evaluate(config, workdir: str, *, extra_hooks: Sequence[Hook] = ()) -> dict:
  """Trains per `config`, writing everything into `workdir`; returns the final metrics
  ({"preempted": True, "step": n} when SIGTERM stopped it).

  extra_hooks run after the engine's own (tests and tools observe or steer the loop there)."""
  started = time.perf_counter()
  begin(config)
  workdir_lib.check_same_run(config, workdir)  # names what changed, even the model's name
  config_lib.check_model_spec(config)
  workdir_lib.check_writable(workdir)
  with WorkdirLock(workdir, force=config.force_unlock, run_id=distributed.shared_run_id(),
                   process_index=jax.process_index(), process_count=jax.process_count(),
                   barrier=lambda: distributed.sync("jtl: workdir lock taken")):
    workdir_lib.prepare(config, workdir)
    config = lr_driver.reuse_found_lr(config, workdir)
    inputs = open_inputs(config, report_dir=workdir)
    fields = {}
    if config.strategy == "lp_ft":
      probe = run_probe(inputs, config, workdir, extra_hooks)
      if isinstance(probe, Preempted):
        return probe.metrics()
      inputs, fields = probe
    run = None
    if config_lib.is_auto_lr(config):  # after the probe: the sweep starts from its head
      run = plan_solved_head(inputs, config)
      if run is None:
        config = lr_driver.find_auto_lr(inputs, config, workdir)
    if config.lr_find.suggested_lr:
      fields["suggested_lr"] = config.lr_find.suggested_lr
    workdir_lib.write_run_files(config, inputs.record, workdir)
    outcome = train_in(run or plan_run(inputs, config), workdir, extra_hooks, fields=fields,
                       started=started)
    return outcome.metrics()


# The learning rate a solved head's plan is built with: its schedule is never stepped.
_LR_OF_A_SOLVED_HEAD = 1e-3


def plan_solved_head(inputs: Inputs, config) -> RunPlan | None:
  """optimizer.lr=auto: the plan of a run whose head is solved (jtl.linear_probe), which has
  no learning rate to pick, so no range test runs; None when the run trains with steps (the
  range test picks its rate). config.json keeps lr "auto"; a resume decides the same way."""
  model = inputs.model
  rules = optim.freeze_rules(config.strategy, model.stage_names, config.freeze_depth,
                             config.trainable)
  freeze = optim.make_freeze_plan(model.variables["params"], model.stage_names, rules)
  if config.probe.solver != linear_probe.LBFGS or not linear_probe.trains_head_alone(
      model.stage_names, freeze.labels, len(model.stage_names) - 1):
    return None  # settled from the config alone, before any feature is cached
  run = plan_run(inputs, config_lib.with_learning_rate(config, _LR_OF_A_SOLVED_HEAD))
  choice = linear_probe.choose_for_run(run, None)
  if choice is None or not choice.solves:
    return None
  log.info("optimizer.lr=auto: no range test, the head is solved without a learning rate "
           "(%s)", choice.why)
  return run


def run_probe(inputs: Inputs, config, workdir: str, extra_hooks: Sequence[Hook] = ()):
  """lp_ft's probe: the head alone (feature extraction on cached features: solved, see
  jtl.linear_probe, or in the loop with its own budget and early stopping) in workdir/probe.
  Returns (the inputs with the probe's exported head, final_metrics fields about the probe),
  or Preempted."""
  probe_config = config_lib.with_learning_rate(config, config.probe.lr)
  with probe_config.unlocked():
    probe_config.strategy, probe_config.freeze_depth, probe_config.trainable = (
        "feature_extraction", 0, ())
    probe_config.optimizer.layer_decay = 1.0
  probe_dir = os.path.join(workdir, "probe")
  workdir_lib.check_writable(probe_dir)
  run = plan_run(inputs, probe_config, train_steps=config.probe.steps or None)
  outcome = train_in(run, probe_dir, extra_hooks, fields={})
  if isinstance(outcome, Preempted):
    return outcome
  final = outcome.metrics()
  log.info("probe: the head alone reached %.4f on %s; fine-tuning from it",
           final["test_accuracy"], final["split"])
  head = distributed.host_copy(outcome.state.params["head"])
  return inputs.with_params(head=head), {
      "probe_test_accuracy": final["test_accuracy"], "probe_steps": final["steps"],
      "probe_train_seconds": final["train_seconds"], "probe_val_accuracy": outcome.best_val}


@dataclasses.dataclass(frozen=True)
class Trained:
  """A run fitted and finished: final_metrics.json's content and the exported state."""
  final: dict
  state: Any
  best_val: float | None

  def metrics(self) -> dict:
    return self.final


def train_in(run: RunPlan, workdir: str, extra_hooks: Sequence[Hook] = (), *, fields: dict,
             started: float | None = None) -> Trained | Preempted:
  """Fits `run` in `workdir` and finishes it; the checkpoints and the logs are open for just
  that long, and closed (saves in flight complete) before any error goes on up."""
  with Checkpoints(workdir, keep=run.config.keep_checkpoints) as checkpoints, \
       RunLog(workdir, enabled=distributed.is_host0()) as run_log:
    fitted = fit(run, checkpoints, run_log, extra_hooks)
    if isinstance(fitted, Preempted):
      return fitted
    return finish(run, fitted, checkpoints, run_log, workdir, fields=fields, started=started)


def fit(run: RunPlan, checkpoints: Checkpoints, run_log: RunLog,
        extra_hooks: Sequence[Hook] = ()) -> Fitted | Preempted:
  """Runs the loop to the end of the budget (or an early stop, or SIGTERM); a linear head on
  cached features is solved instead (jtl.linear_probe)."""
  steps = StepsByEpoch(run)
  state, progress, restored = _resume(checkpoints, steps, run_log, run.mesh)
  resumed_meta = None if restored is None else restored.meta
  head = linear_probe.choose_for_run(run, resumed_meta)
  if head is not None:
    log.info("the head alone trains: %s (%s)", head.solver, head.why)
  if head is not None and head.solves:
    if resumed_meta is None:
      state, progress, summary = linear_probe.solve_run(run, state, head, checkpoints, run_log)
    else:
      summary = resumed_meta[linear_probe.SUMMARY_KEY]
    return Fitted(state, progress, head.fields(summary))
  _log_plan(run)
  saving = hooks_lib.Checkpointing(checkpoints, every_steps=run.config.checkpoint_every_steps,
                                   min_seconds=run.config.checkpoint_min_seconds,
                                   last_saved_step=restored.step if restored else None)
  with hooks_lib.Preemption(saving) as preemption:
    loop = Loop(step_for_epoch=steps, batches=run.train_batches, budget=run.budget,
                progress=progress, hooks=[*_hooks(run, run_log), saving, preemption,
                                          *extra_hooks],
                mesh=run.mesh, nonfinite_policy=run.config.nonfinite_policy,
                max_skipped_steps=run.config.max_skipped_steps)
    try:
      state = loop.run(state)
    except NonFiniteLossError as e:
      raise NonFiniteLossError(f"{e}; the last good checkpoint (step {saving.last_saved_step}) "
                               "is kept", step=e.step) from None
  if loop.interrupted:
    return Preempted(loop.step)
  return Fitted(state, progress, head.fields() if head is not None else {})


def _hooks(run: RunPlan, run_log: RunLog) -> list[Hook]:
  """The engine's hooks before checkpointing, in the order they run (jtl.hooks)."""
  config, splits = run.config, run.splits
  learning_rate = hooks_lib.LearningRate(run.schedule, grad_accum_steps=config.grad_accum_steps)
  hooks: list[Hook] = []
  if config.progress_bar and distributed.is_host0():
    hooks.append(hooks_lib.ProgressBar(run.budget.steps_per_epoch, config.batch_size))
  hooks.append(hooks_lib.ScalarLog(run_log, learning_rate, every_steps=config.log_every_steps))
  evaluation = hooks_lib.Evaluation(
      lambda state: run.evaluate(state, splits.val), run_log, learning_rate, splits,
      patience=config.early_stopping.patience, min_delta=config.early_stopping.min_delta,
      evaluate_ema=((lambda state: run.evaluate(with_ema_weights(state), splits.val))
                    if config.ema_decay else None))
  hooks.append(evaluation)
  if config.schedule.name == "reduce_on_plateau":
    hooks.append(hooks_lib.PlateauSchedule(evaluation, optim.plateau_rule(config), run.mesh,
                                           learning_rate))
  return hooks


def _resume(checkpoints: Checkpoints, steps: StepsByEpoch, run_log: RunLog, mesh):
  """(state, progress, the checkpoint resumed from): from the newest intact checkpoint, latest
  or best, when there is one, else fresh ones (and None). Damaged checkpoints are named, moved
  aside and stepped over (jtl.checkpoint)."""
  state = steps.initial_state()

  def template(meta):
    # The optimizer state's structure depends on the plan of the checkpoint's epoch (gradual
    # unfreezing), so each candidate is restored against its own epoch's tree.
    step = steps.step_of(Progress.from_json(meta).epoch)
    return state.replace(opt_state=step.tx.init(state.params),
                         ema_params=step.fit_ema({}, state.params))

  restored = checkpoints.load_resumable(template)  # latest or best, whichever is newer
  if restored is None:
    return state, Progress(), None
  progress = Progress.from_json(restored.meta)
  checkpoints.discard_best_after(restored.step)
  run_log.truncate_after(restored.step)
  log.info("resumed from step %d (epoch %d, step %d in it)", restored.step, progress.epoch,
           progress.step_in_epoch)
  return distributed.replicate(restored.state, mesh), progress, restored


def _log_plan(run: RunPlan) -> None:
  params, b = run.inputs.model.variables["params"], run.budget
  log.info("%s: %d classes, %d of %d parameters trainable, %d frozen stages; %d epochs of %d "
           "steps (%d optimizer steps), evaluating every %d epochs", run.config.model,
           len(run.inputs.class_names), run.trainable_params(), P.count(params),
           run.freeze.frozen_stages, b.num_epochs, b.steps_per_epoch, b.total_steps,
           b.eval_every_epochs)


def finish(run: RunPlan, fitted: Fitted, checkpoints: Checkpoints, run_log: RunLog,
           workdir: str, *, fields: dict, started: float | None = None) -> Trained:
  """The best checkpoint (the last state without one) tested, exported and reported."""
  checkpoints.wait()
  state, progress = fitted.state, fitted.progress
  steps_trained = int(state.step)
  best = checkpoints.restore(state, which="best")
  if best is not None:
    state = distributed.replicate(best[0], run.mesh)
  params, config = run.inputs.model.variables["params"], run.config
  run_fields = dict(
      trainable_params=run.trainable_params(), total_params=int(P.count(params)),
      train_seconds=round(progress.train_seconds, 2), steps=steps_trained,
      best_step=progress.best_step, skipped_steps=progress.skipped_steps,
      best_val=progress.best, best_val_metric=run.splits.metric,
      feature_cache=run.start_stage > 0, feature_cache_seconds=round(run.cache_seconds, 2))
  if linear_probe.SUMMARY_KEY not in fitted.fields:
    # A solved head's "steps" are L-BFGS iterations over the whole training set: per-step
    # speed and images per second would mean nothing there.
    run_fields.update(
        step_seconds=round(progress.train_seconds / max(steps_trained, 1), 4),
        images_per_second=round(steps_trained * config.batch_size
                                / max(progress.train_seconds, 1e-9), 1))
  finished = evaluate_and_export(run, state, workdir,
                                 fields={**run_fields, **fitted.fields, **fields},
                                 records=run_log.records(), started=started)
  return Trained(finished.metrics, finished.state, progress.best)
