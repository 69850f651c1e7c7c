"""How long a run trains, and how often it stops to evaluate: one rule for 140 images and for
60,000.

The budget is counted in optimizer steps: `train_steps` when set, otherwise `num_epochs` epochs
stretched to at least `min_train_steps` (a folder of 140 images at batch 64 has 2 steps an
epoch: 10 epochs would be 20 steps, far too few to fit even a linear head), rounded up to whole
epochs. Evaluations (each with its checkpoint) come every `eval_every_epochs` epochs, spaced out
so that there are at most `max_evaluations` of them: a 2-step epoch is not worth an evaluation,
a checkpoint and a pipeline start each. Early stopping on the validation split, with its
patience counted in evaluations, then ends the run when it stops improving.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Budget:
  steps_per_epoch: int          # batches per epoch (data steps)
  optimizer_steps_per_epoch: int  # after gradient accumulation
  num_epochs: int               # epochs the run trains for, unless it stops early
  eval_every_epochs: int        # evaluate (and checkpoint) after every this many epochs

  @property
  def total_steps(self) -> int:
    """Optimizer steps over the whole budget: the length of the learning-rate schedule."""
    return self.num_epochs * self.optimizer_steps_per_epoch

  def evaluates_after(self, epoch: int) -> bool:
    """Whether the run evaluates after finishing `epoch` (1-based count of finished epochs)."""
    return epoch % self.eval_every_epochs == 0 or epoch == self.num_epochs


def plan_budget(config, steps_per_epoch: int, *, train_steps: int | None = None) -> Budget:
  """The budget of `config` for a training split of `steps_per_epoch` batches an epoch.

  train_steps overrides config.train_steps (lp_ft's probe has its own)."""
  optimizer_steps = max(steps_per_epoch // config.grad_accum_steps, 1)
  wanted = train_steps if train_steps is not None else config.train_steps
  if not wanted:
    wanted = max(config.num_epochs * optimizer_steps, config.min_train_steps)
  num_epochs = max(math.ceil(wanted / optimizer_steps), 1)
  eval_every = config.eval_every_epochs
  if config.max_evaluations:
    eval_every = max(eval_every, math.ceil(num_epochs / config.max_evaluations))
  return Budget(steps_per_epoch, optimizer_steps, num_epochs, eval_every)
