"""The loop alone: a step of plain Python and fake batches, so that the order of the hooks,
early stopping, the non-finite policies and preemption are shown without training anything."""
from __future__ import annotations

import dataclasses
import math
import signal

import numpy as np
import pytest

from jtl import distributed, hooks
from jtl.budget import Budget
from jtl.evaluation import Splits
from jtl.loop import Hook, Loop, NonFiniteLossError, Progress

pytestmark = pytest.mark.fast
STEPS_PER_EPOCH = 3


@dataclasses.dataclass(frozen=True)
class State:
  step: int


def make_step(losses=None):
  """A step that counts; its loss at step n (1-based) is losses[n - 1], else 1 / n."""
  def step_fn(state, batch):
    n = state.step + 1
    assert batch["x"].shape == (2,)  # the global batch the loop built from the host's
    loss = losses[n - 1] if losses is not None else 1.0 / n
    return State(n), {"loss": np.float32(loss), "accuracy": np.float32(0.5),
                      "finite": np.bool_(math.isfinite(loss))}
  return lambda epoch, state: (step_fn, state)


def batches(epoch, start_step):
  for i in range(start_step, STEPS_PER_EPOCH):
    yield {"x": np.full((2,), 10 * epoch + i, np.float32)}


def make_loop(hooks_, *, epochs=2, progress=None, losses=None, **kwargs) -> Loop:
  return Loop(step_for_epoch=make_step(losses), batches=batches,
              budget=Budget(STEPS_PER_EPOCH, STEPS_PER_EPOCH, epochs, 1),
              progress=progress or Progress(), hooks=hooks_, mesh=distributed.make_mesh(),
              **kwargs)


class Recorder(Hook):
  """Appends (name, point, step) to a shared list at every point."""

  def __init__(self, name, events):
    self.name, self.events = name, events

  def on_epoch_start(self, loop):
    self.events.append((self.name, "epoch_start", loop.step))

  def on_batch(self, loop, batch):
    self.events.append((self.name, "batch", loop.step))
    return batch

  def on_step(self, loop, step, metrics):
    self.events.append((self.name, "step", step))

  def after_step(self, loop, step):
    self.events.append((self.name, "after_step", step))

  def on_epoch_end(self, loop, stats):
    self.events.append((self.name, "epoch_end", loop.step))

  def on_epoch_done(self, loop):
    self.events.append((self.name, "epoch_done", loop.step))

  def on_end(self, loop):
    self.events.append((self.name, "end", loop.step))


def test_hooks_run_in_the_order_given_at_every_point_and_metrics_are_read_a_step_late():
  events = []
  loop = make_loop([Recorder("a", events), Recorder("b", events)])
  final = loop.run(State(0))
  assert final == State(6) and loop.step == 6
  a = [(point, step) for name, point, step in events if name == "a"]
  epoch = lambda s: [("epoch_start", s), ("batch", s), ("after_step", s + 1),  # noqa: E731
                     ("batch", s + 1), ("step", s + 1), ("after_step", s + 2),
                     ("batch", s + 2), ("step", s + 2), ("after_step", s + 3),
                     ("step", s + 3), ("epoch_end", s + 3), ("epoch_done", s + 3)]
  assert a == epoch(0) + epoch(3) + [("end", 6)]
  # b right after a, every time.
  assert events[1::2] == [("b", point, step) for _, point, step in events[0::2]]
  assert loop.progress.epoch == 2 and loop.progress.finished
  assert not loop.progress.stopped_early


def test_a_resumed_loop_starts_mid_epoch_and_goes_on_counting():
  events = []
  progress = Progress(epoch=1, step_in_epoch=1)
  loop = make_loop([Recorder("a", events)], progress=progress)
  loop.run(State(4))
  steps = [step for _, point, step in events if point == "step"]
  assert steps == [5, 6] and loop.step == 6 and progress.epoch == 2


class FakeLog:
  def __init__(self):
    self.rows = []

  def record(self, row):
    self.rows.append(row)


def _evaluation(values, metric="val_accuracy", patience=2):
  """The engine's Evaluation hook over scripted validation results, one per epoch."""
  results = iter(values)

  def evaluate(state):
    value = next(results)
    return {"loss": 1.0 if metric != "val_loss" else value, "accuracy": value, "top5": 1.0,
            "macro_f1": value, "balanced_accuracy": value}
  log = FakeLog()
  return hooks.Evaluation(evaluate, log, lambda step: 0.1, Splits("val", "test", metric),
                          patience=patience, min_delta=0.0), log


def test_early_stopping_after_patience_evaluations_without_improvement():
  evaluation, log = _evaluation([0.5, 0.7, 0.6, 0.7, 0.9])
  best_flags = []

  class Best(Hook):  # after Evaluation: it reads what Evaluation decided
    def on_epoch_end(self, loop, stats):
      best_flags.append(loop.is_best)
  loop = make_loop([evaluation, Best()], epochs=5)
  loop.run(State(0))
  # 0.7 at epoch 2 is the best; 0.6 and 0.7 (not better) make two bad evaluations: stop.
  assert [r["accuracy"] for r in log.rows] == [0.5, 0.7, 0.6, 0.7]
  assert best_flags == [True, True, False, False]
  p = loop.progress
  assert p.stopped_early and p.finished and p.epoch == 4
  assert (p.best, p.best_step, p.bad_evals) == (0.7, 6, 2)


def test_a_lower_validation_loss_is_better():
  evaluation, _ = _evaluation([0.5, 0.4, 0.6], metric="val_loss", patience=1)
  loop = make_loop([evaluation], epochs=5)
  loop.run(State(0))
  assert loop.progress.best == 0.4 and loop.progress.stopped_early and loop.progress.epoch == 3


def test_a_non_finite_loss_halts_at_its_step():
  loop = make_loop([], losses=[1.0, 1.0, float("nan"), 1.0, 1.0, 1.0])
  with pytest.raises(NonFiniteLossError, match="at step 3") as error:
    loop.run(State(0))
  assert error.value.step == 3


def test_skipped_non_finite_steps_are_counted_and_not_shown_until_too_many():
  events = []
  losses = [1.0, float("inf"), 1.0, float("nan"), 1.0, 1.0]
  loop = make_loop([Recorder("a", events)], losses=losses, nonfinite_policy="skip",
                   max_skipped_steps=2)
  loop.run(State(0))
  assert loop.progress.skipped_steps == 2
  assert [s for _, point, s in events if point == "step"] == [1, 3, 5, 6]
  # The epoch's mean loss counts only the finite steps.
  loop = make_loop([], losses=[1.0, float("inf"), float("nan"), 1.0, 1.0, 1.0],
                   nonfinite_policy="skip", max_skipped_steps=1)
  with pytest.raises(NonFiniteLossError, match="at step 3"):
    loop.run(State(0))


class FakeSaving:
  """Stands in for hooks.Checkpointing: records the steps saved (with the metrics read)."""

  def __init__(self):
    self.saved = []

  def save(self, loop, *, best=False):
    loop.flush()
    self.saved.append((loop.step, loop.progress.step_in_epoch, loop.progress.epoch_steps))


def test_sigterm_saves_at_a_step_boundary_and_stops_the_loop():
  saving, events = FakeSaving(), []

  class Terminate(Hook):  # SIGTERM arrives while step 4 is being fed
    def __init__(self, preemption):
      self.preemption = preemption

    def on_batch(self, loop, batch):
      if loop.step == 3:
        self.preemption._handle(signal.SIGTERM, None)  # what the signal calls
      return batch

  with hooks.Preemption(saving) as preemption:
    loop = make_loop([Terminate(preemption), preemption, Recorder("after", events)], epochs=3)
    loop.run(State(0))
  assert loop.interrupted and loop.step == 4
  # Saved after step 4 with its metrics read: epoch 1's first step.
  assert saving.saved == [(4, 1, 1)]
  points = [point for _, point, _ in events]
  # The hooks after Preemption see no after_step of step 4, no epoch end, but the end.
  assert ("after", "after_step", 4) not in events and points[-1] == "end"
  assert "epoch_end" not in points[points.index("epoch_start", 1):]
  assert loop.progress.epoch == 1 and not loop.progress.finished


def test_time_blocked_on_input_is_counted_and_a_starved_epoch_is_reported(caplog):
  import time

  def slow_batches(epoch, start_step):
    for batch in batches(epoch, start_step):
      time.sleep(0.02)  # the loop must count at least this much waiting per batch
      yield batch
  loop = make_loop([hooks.ProgressBar(STEPS_PER_EPOCH, 2, input_wait_warning=0.0)], epochs=1)
  loop.batches = slow_batches
  with caplog.at_level("INFO", logger="jtl.hooks"):
    loop.run(State(0))
  assert loop.input_seconds >= STEPS_PER_EPOCH * 0.02
  assert "images/s" in caplog.text and "waiting for input" in caplog.text
  assert "training waited for input" in caplog.text
