"""The loop's hooks: what happens around the steps, one concern each.

Each hook is given what it needs when it is made, and they are made in the order they run:
ProgressBar, ScalarLog, Evaluation (which sets `loop.is_best` and may stop the run),
PlateauSchedule (which reads the Evaluation it is given and sets the LearningRate's scale),
Checkpointing (which saves with that flag, and the plateau state in the train state), then
Preemption (which saves through the Checkpointing it is given).
"""
from __future__ import annotations

import logging
import signal
import time
from typing import Callable


import jax
import numpy as np

from jtl import distributed
from jtl.evaluation import RankingCheck, Splits
from jtl.loop import Hook, Loop

log = logging.getLogger(__name__)


class LearningRate:
  """The learning rate applied at a step, for the logs: the schedule's, times the scale of
  reduce_on_plateau (PlateauSchedule sets `scale`; 1 under every other schedule)."""

  def __init__(self, schedule, *, grad_accum_steps: int):
    self.schedule, self.accum = schedule, grad_accum_steps
    self.scale = 1.0

  def __call__(self, step: int) -> float:
    # The schedule counts optimizer steps; with accumulation, `accum` batches make one.
    return float(self.schedule(step // self.accum)) * self.scale


class ScalarLog(Hook):
  """Training loss and learning rate to TensorBoard every `every_steps` steps, and one "train"
  row in metrics.jsonl per epoch."""

  def __init__(self, run_log, learning_rate: Callable[[int], float], *, every_steps: int):
    self.run_log, self.learning_rate, self.every = run_log, learning_rate, every_steps

  def on_step(self, loop, step, metrics):
    if step % self.every == 0:
      self.run_log.scalars(step, {"train/loss": metrics["loss"],
                                  "train/learning_rate": self.learning_rate(step)})

  def on_epoch_end(self, loop, stats):
    self.run_log.record({"step": loop.step, "epoch": loop.progress.epoch, "split": "train",
                         "learning_rate": self.learning_rate(loop.step), **stats})


class ProgressBar(Hook):
  """A tqdm bar per epoch on host 0, with the loss, images per second, the time per step and
  the share of it spent waiting for input; the log gets the same figures per epoch and a
  warning when training waited on its input pipeline for more than `input_wait_warning` of
  the epoch (decoding and augmentation, not the model, then set the pace)."""

  def __init__(self, steps_per_epoch: int, batch_size: int, input_wait_warning: float = 0.2):
    self.steps_per_epoch, self.batch_size = steps_per_epoch, batch_size
    self.input_wait_warning = input_wait_warning
    self.bar = None

  def on_epoch_start(self, loop):
    from tqdm.auto import tqdm
    p = loop.progress
    self.bar = tqdm(total=self.steps_per_epoch, initial=p.step_in_epoch,
                    desc=f"epoch {p.epoch + 1}/{loop.budget.num_epochs}", unit="step",
                    leave=False, dynamic_ncols=True)
    self.last = self.epoch_start = time.perf_counter()
    self.steps = self.epoch_steps = 0
    self.waited = self.epoch_waited = loop.input_seconds

  def on_step(self, loop, step, metrics):
    if self.bar is None:
      return
    now = time.perf_counter()
    self.steps += 1
    self.epoch_steps += 1
    if now - self.last > 1.0:
      seconds = now - self.last
      self.bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                           img_s=f"{self.steps * self.batch_size / seconds:.0f}",
                           step_ms=f"{1000 * seconds / self.steps:.0f}",
                           input_wait=f"{(loop.input_seconds - self.waited) / seconds:.0%}")
      self.last, self.steps, self.waited = now, 0, loop.input_seconds
    self.bar.update(1)

  def on_epoch_end(self, loop, stats):
    if self.bar is None:
      return
    self.bar.close()
    self.bar = None
    seconds = time.perf_counter() - self.epoch_start
    if not self.epoch_steps or seconds <= 0:
      return
    waited = (loop.input_seconds - self.epoch_waited) / seconds
    log.info("epoch %d: %.0f images/s, %.0f ms/step, %.0f%% of the time waiting for input",
             loop.progress.epoch, self.epoch_steps * self.batch_size / seconds,
             1000 * seconds / self.epoch_steps, 100 * waited)
    if waited > self.input_wait_warning:
      log.warning("training waited for input %.0f%% of epoch %d: decoding and augmentation "
                  "set the pace, not the model (more cores, a smaller decode size "
                  "(decode_min_side), lighter augmentation, or the feature cache when the "
                  "backbone is frozen)", 100 * waited, loop.progress.epoch)

  def on_end(self, loop):  # an interrupted epoch leaves its bar open
    if self.bar is not None:
      self.bar.close()
      self.bar = None


EVAL_ROW_KEYS = ("loss", "accuracy", "top5", "macro_f1", "balanced_accuracy")


class Evaluation(Hook):
  """Evaluates on the validation split when the budget says so, records it, tracks the best
  model and stops the run early after `patience` evaluations without improvement.

  evaluate_ema (model EMA on): the EMA weights are evaluated beside the raw ones and recorded
  as ema_* in the same row; the best checkpoint and early stopping follow the raw weights (the
  final evaluation then picks the better of the two in that checkpoint)."""

  def __init__(self, evaluate: Callable[[object], dict], run_log, learning_rate, splits: Splits,
               *, patience: int, min_delta: float,
               evaluate_ema: Callable[[object], dict] | None = None):
    self.evaluate, self.run_log, self.learning_rate = evaluate, run_log, learning_rate
    self.splits, self.patience, self.min_delta = splits, patience, min_delta
    self.evaluate_ema = evaluate_ema
    self.latest: tuple[int, float] | None = None  # (step, metric value) of the last evaluation
    self.ranking = RankingCheck(splits)  # warns when validation cannot tell checkpoints apart

  def on_epoch_end(self, loop, stats):
    p = loop.progress
    if not loop.budget.evaluates_after(p.epoch):
      return
    result = self.evaluate(loop.state)
    row = {"step": loop.step, "epoch": p.epoch, "split": "val",
           **{k: result[k] for k in EVAL_ROW_KEYS}}
    if self.evaluate_ema is not None:
      ema = self.evaluate_ema(loop.state)
      row.update({f"ema_{k}": ema[k] for k in EVAL_ROW_KEYS})
    self.run_log.record({**row, "learning_rate": self.learning_rate(loop.step)})
    value = result[self.splits.key]
    self.latest = (loop.step, value if np.isfinite(result["loss"]) else float("nan"))
    for message in self.ranking.observe(result, step=loop.step, best=p.best,
                                        best_step=p.best_step):
      log.warning(message)
    # A model whose validation loss is not finite has diverged, whatever its accuracy.
    if np.isfinite(result["loss"]) and self.splits.improved(value, p.best, self.min_delta):
      p.best, p.best_step, p.bad_evals = value, loop.step, 0
      loop.is_best = True
      return
    p.bad_evals += 1
    if self.patience and p.bad_evals >= self.patience:
      log.info("early stopping: %s did not improve for %d evaluations", self.splits.metric,
               p.bad_evals)
      loop.request_stop()


class PlateauSchedule(Hook):
  """schedule.name=reduce_on_plateau: after each evaluation, optax's reduce_on_plateau rule
  reads the early-stopping metric (negated when higher is better: the rule minimises; a
  diverged model counts as no better) and updates its state in the train state, whose scale
  the compiled step applies to every update. The host keeps the scale too, in the
  LearningRate it is given, so the logged learning rate is the applied one without reading the
  device every step."""

  def __init__(self, evaluation: Evaluation, rule, mesh, learning_rate: LearningRate):
    self.evaluation, self.rule, self.mesh = evaluation, rule, mesh
    self.learning_rate = learning_rate
    self.sign = -1.0 if evaluation.splits.higher_is_better else 1.0
    self.scale: float | None = None  # read from the (perhaps resumed) state at the start

  def on_epoch_start(self, loop):
    if self.scale is None:
      self._set_scale(float(distributed.host_copy(loop.state.plateau).scale))

  def _set_scale(self, scale: float) -> None:
    self.scale = self.learning_rate.scale = scale

  def on_epoch_end(self, loop, stats):
    latest = self.evaluation.latest
    if latest is None or latest[0] != loop.step:
      return
    value = self.sign * latest[1] if np.isfinite(latest[1]) else np.inf
    _, plateau = self.rule.update(None, distributed.host_copy(loop.state.plateau), value=value)
    plateau = jax.device_get(plateau)
    if float(plateau.scale) != self.scale:
      log.info("reduce_on_plateau: the learning rate is now %g x its base",
               float(plateau.scale))
    self._set_scale(float(plateau.scale))
    loop.state = loop.state.replace(plateau=distributed.replicate(plateau, self.mesh))


class Checkpointing(Hook):
  """Saves at evaluations, at the end, every `every_steps` steps inside an epoch, and at an
  epoch end when `every_seconds` have passed since the last save.

  min_seconds > 0: an evaluation saves only when that long has passed since the last save, so
  that a small dataset's many short evaluations are not each followed by a checkpoint (Orbax
  takes ~0.8 s for EfficientNet-Lite0's 14 MB state, against 5 ms for a step on cached
  features). A best model found in between is held as a copy of the state and written, before
  the latest checkpoint that names it, with the next save: the end of the run, a SIGTERM or the
  next due evaluation always save. A kill in between resumes from the previous checkpoint and
  redoes those steps, deterministically.
  """

  def __init__(self, checkpoints, *, every_steps: int = 0, every_seconds: float = 600.0,
               min_seconds: float = 0.0, last_saved_step: int | None = None):
    self.checkpoints = checkpoints
    self.every_steps, self.every_seconds = every_steps, every_seconds
    self.min_seconds = min_seconds
    self.last_time = time.perf_counter()
    self.held_best: tuple | None = None  # (step, state copy, progress json) not yet on disk
    # The newest complete checkpoint: the one the run resumed from, until it saves one.
    self.last_saved_step = last_saved_step

  def save(self, loop: Loop, *, best: bool = False) -> None:
    """Checkpoints the loop's state and progress now (its pending metrics read first)."""
    loop.flush()
    if self.held_best is not None and not best:
      self.checkpoints.save_best(*self.held_best)
    self.held_best = None
    self.checkpoints.save(loop.step, loop.state, loop.progress.to_json(), best=best)
    self.last_saved_step = loop.step
    self.last_time = time.perf_counter()

  def after_step(self, loop, step):
    if (self.every_steps and step % self.every_steps == 0
        and loop.progress.step_in_epoch < loop.budget.steps_per_epoch):
      self.save(loop)

  def on_epoch_done(self, loop):
    p = loop.progress
    since = time.perf_counter() - self.last_time
    at_evaluation = loop.budget.evaluates_after(p.epoch) or loop.is_best
    if not (at_evaluation or p.finished or _on_every_host(since > self.every_seconds)):
      return
    if p.finished or not self.min_seconds or not _on_every_host(since < self.min_seconds):
      self.save(loop, best=loop.is_best)
    elif loop.is_best:  # held back: a copy, since the next step donates the state's buffers
      loop.flush()
      self.held_best = (loop.step, jax.tree_util.tree_map(lambda x: x.copy(), loop.state),
                        p.to_json())

  def on_end(self, loop):
    self.checkpoints.wait()


def _on_every_host(decision: bool) -> bool:
  """Host 0's answer, on every host: a save is a collective, so a decision read from each
  host's own clock must be the same everywhere."""
  if jax.process_count() == 1:
    return decision
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(decision)))


class Preemption(Hook):
  """SIGTERM asks the loop to save (through the Checkpointing hook given) and stop at a step
  boundary, the same one on every host.

  One host: a Python handler sets a flag. Several hosts: each may get its SIGTERM at another
  step, and one host saving (a collective) while another trains (another collective) hangs
  both; so JAX's preemption service (started by jax.distributed.initialize) catches SIGTERM,
  tells every host, and names the step at which all of them stop.
  """

  def __init__(self, saving: Checkpointing):
    self.saving = saving
    self.requested = False
    self._previous = None
    self._across_hosts = False

  def __enter__(self):
    if jax.process_count() > 1 and jax.config.jax_enable_preemption_service:
      self._across_hosts = True
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    log.warning("SIGTERM: saving a checkpoint and stopping")
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; called once for every step, on every host."""
    if self._across_hosts:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        log.warning("preemption notice: every host saves step %d and stops", step)
        self.requested = True
    return self.requested

  def after_step(self, loop, step):
    if self.reached(step):
      self.saving.save(loop)
      loop.interrupt()
      log.warning("stopped by SIGTERM at step %d; rerun the same command to resume", step)

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
