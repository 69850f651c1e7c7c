"""The training loop: steps over batches, epoch after epoch, with everything else in hooks.

In the manner of nanodo's Trainer and clu's periodic actions: the loop only feeds batches to the
compiled step, reads each step's metrics one step late (so the host never stalls the device)
and keeps `Progress`; logging, evaluation and early stopping, checkpoints, preemption and the
progress bar are `Hook`s it calls at fixed points. Tests drive it through the same seams.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Iterator, Sequence

from jtl import distributed
from jtl.budget import Budget

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss; the last good checkpoint is kept."""

  def __init__(self, message: str, *, step: int):
    super().__init__(message)
    self.step = step


@dataclasses.dataclass
class Progress:
  """Where a run stands; saved with every checkpoint, so a resumed run continues exactly."""
  epoch: int = 0                  # finished epochs
  step_in_epoch: int = 0          # batches of the current epoch already trained
  best: float | None = None       # best value of the early-stopping metric so far
  best_step: int | None = None
  bad_evals: int = 0              # evaluations since the best one
  skipped_steps: int = 0          # non-finite steps skipped (nonfinite_policy=skip)
  train_seconds: float = 0.0
  finished: bool = False          # budget spent or stopped early
  stopped_early: bool = False     # by early stopping: a larger budget does not revive the run
  epoch_loss_sum: float = 0.0     # running sums of the current epoch
  epoch_accuracy_sum: float = 0.0
  epoch_steps: int = 0

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, value: dict[str, Any]) -> "Progress":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in value.items() if k in names})

  def start_epoch(self) -> None:
    self.epoch_loss_sum = self.epoch_accuracy_sum = 0.0
    self.epoch_steps = 0

  def epoch_stats(self) -> dict[str, float]:
    n = self.epoch_steps
    return {"loss": self.epoch_loss_sum / n if n else math.nan,
            "accuracy": self.epoch_accuracy_sum / n if n else math.nan}


class Hook:
  """Called by the loop at fixed points; override what you need."""

  def on_epoch_start(self, loop: "Loop") -> None: ...

  def on_batch(self, loop: "Loop", batch: dict) -> dict:
    """The batch about to be fed (host-local arrays); may return another one."""
    return batch

  def on_step(self, loop: "Loop", step: int, metrics: dict[str, float]) -> None:
    """The metrics of `step` (1-based), read one step late; skipped steps are not shown."""

  def after_step(self, loop: "Loop", step: int) -> None:
    """After `step` was dispatched: a hook may save (after `loop.flush()`) or
    `loop.interrupt()` here."""

  def on_epoch_end(self, loop: "Loop", stats: dict[str, float]) -> None:
    """After an epoch; `loop.progress.epoch` counts it. Evaluation and early stopping."""

  def on_epoch_done(self, loop: "Loop") -> None:
    """After every on_epoch_end, with `progress.finished` decided. Checkpoints."""

  def on_end(self, loop: "Loop") -> None: ...


@dataclasses.dataclass
class Loop:
  """One run of training: `run(state)` trains until the budget is spent or a hook stops it.

  The hooks run in the order given, at every point; one that reads what another decided comes
  after it (jtl.hooks says which)."""
  step_for_epoch: Callable[[int, Any], tuple[Callable, Any]]  # (epoch, state) -> (step, state)
  batches: Callable[..., Iterator[dict]]  # (epoch=, start_step=) -> this host's batches
  budget: Budget
  progress: Progress
  hooks: Sequence[Hook]
  mesh: Any
  nonfinite_policy: str = "halt"
  max_skipped_steps: int = 10
  state: Any = None
  step: int = 0
  interrupted: bool = False
  stop_requested: bool = False
  is_best: bool = False           # set by evaluation when this epoch's model is the best so far
  _pending: tuple | None = None
  _clock_start: float = 0.0
  # Seconds the loop has spent blocked waiting for this host's next batch: the input pipeline
  # keeps up while this stays a small share of the wall time (ProgressBar shows and warns).
  input_seconds: float = 0.0

  def run(self, state) -> Any:
    self.state, self.step = state, int(state.step)
    # A resumed run goes on when its budget has grown (more epochs continue a run).
    self.progress.finished = (self.progress.stopped_early
                              or self.progress.epoch >= self.budget.num_epochs)
    self._clock_start = time.perf_counter() - self.progress.train_seconds
    while (self.progress.epoch < self.budget.num_epochs and not self.progress.finished
           and not self.interrupted):
      self._train_epoch()
      if self.interrupted:
        break
      self._end_epoch()
    for hook in self.hooks:
      hook.on_end(self)
    return self.state

  def _train_epoch(self) -> None:
    p = self.progress
    step_fn, self.state = self.step_for_epoch(p.epoch, self.state)
    if p.step_in_epoch == 0:
      p.start_epoch()
    for hook in self.hooks:
      hook.on_epoch_start(self)
    for local in self._timed(self.batches(epoch=p.epoch, start_step=p.step_in_epoch)):
      for hook in self.hooks:
        local = hook.on_batch(self, local)
      self.state, metrics = step_fn(self.state, distributed.global_batch(local, self.mesh))
      self.step += 1
      self.flush()
      self._pending = (metrics, self.step)
      p.step_in_epoch += 1
      for hook in self.hooks:
        hook.after_step(self, self.step)
        if self.interrupted:
          return
    self.flush()

  def _timed(self, batches: Iterator[dict]) -> Iterator[dict]:
    iterator = iter(batches)
    while True:
      start = time.perf_counter()
      try:
        local = next(iterator)
      except StopIteration:
        return
      finally:
        self.input_seconds += time.perf_counter() - start
      yield local

  def _end_epoch(self) -> None:
    p = self.progress
    p.epoch, p.step_in_epoch = p.epoch + 1, 0
    p.train_seconds = time.perf_counter() - self._clock_start
    self.is_best = False
    stats = p.epoch_stats()
    for hook in self.hooks:
      hook.on_epoch_end(self, stats)
    p.stopped_early = p.stopped_early or self.stop_requested
    p.finished = p.stopped_early or p.epoch >= self.budget.num_epochs
    for hook in self.hooks:
      hook.on_epoch_done(self)

  def flush(self) -> None:
    """Reads the pending step's metrics (blocking on it) and updates the progress."""
    self.progress.train_seconds = time.perf_counter() - self._clock_start
    if self._pending is None:
      return
    metrics, step = self._pending
    self._pending = None
    loss = float(metrics["loss"])
    p = self.progress
    if not bool(metrics["finite"]):
      p.skipped_steps += 1
      if self.nonfinite_policy == "halt" or p.skipped_steps > self.max_skipped_steps:
        raise NonFiniteLossError(f"non-finite loss ({loss}) at step {step}", step=step)
      log.warning("non-finite loss at step %d skipped (%d so far)", step, p.skipped_steps)
      return
    values = {"loss": loss, "accuracy": float(metrics["accuracy"])}
    p.epoch_loss_sum += values["loss"]
    p.epoch_accuracy_sum += values["accuracy"]
    p.epoch_steps += 1
    for hook in self.hooks:
      hook.on_step(self, step, values)

  def interrupt(self) -> None:
    """Stops at once (preemption): the run is left to be resumed."""
    self.interrupted = True

  def request_stop(self) -> None:
    """Ends the run after this epoch (early stopping)."""
    self.stop_requested = True
