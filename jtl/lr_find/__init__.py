"""The learning-rate range test (Smith, "Cyclical Learning Rates", 2017; fastai's lr_find).

The run's own training step, from the pretrained weights, one optimizer step per learning rate
while the rate rises exponentially from lr_find.min_lr to lr_find.max_lr; the loss curve is
smoothed (a debiased exponential moving average, as fastai does) and the sweep stops once the
smoothed loss is lr_find.divergence_factor times its best, or not finite.

The suggestion is the steepest descent of the smoothed loss against log(lr), looked for before
the curve's minimum only (and after the moving average's first few points, which are noise):
the rate at which the loss falls fastest is the largest one that is still clearly improving,
it needs no arbitrary divisor (the "minimum / 10" rule's 10 stands in for how far the minimum
lies from the cliff), and by construction it lies inside the sweep and below the point where
the loss diverged.

The sweep and the suggestion are plain functions of a loss-per-step callable and of arrays, so
they are tested without training; `range_test` feeds them a compiled step (jtl.lr_find.driver
builds it with the run's optimizer, freezing, layer decay and clipping: `find_learning_rate`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Iterator

import jax.numpy as jnp
import numpy as np

from jtl import distributed, report
from jtl.config import ConfigError

log = logging.getLogger(__name__)

METHOD = ("steepest descent: the learning rate at which the smoothed loss falls fastest "
          "against log(lr), before the smoothed loss's minimum")
JSON_NAME, PLOT_NAME = "lr_find.json", "lr_find.png"


def sweep_lrs(min_lr: float, max_lr: float, num_steps: int) -> np.ndarray:
  """The sweep's learning rates, one per optimizer step, evenly spaced in log(lr)."""
  return np.geomspace(min_lr, max_lr, num_steps)


def sweep_schedule(lrs: np.ndarray):
  """The schedule of the sweep's optimizer: lrs[step] (the last one after the end)."""
  table = jnp.asarray(lrs, jnp.float32)
  return lambda step: table[jnp.minimum(step, len(lrs) - 1)]


def smooth(losses, beta: float) -> np.ndarray:
  """Exponential moving average of `losses`, debiased (divided by 1 - beta^(i+1)) so that the
  first values are not pulled towards zero; beta=0 gives the losses themselves."""
  out, average = [], 0.0
  for i, loss in enumerate(losses):
    average = beta * average + (1.0 - beta) * float(loss)
    out.append(average / (1.0 - beta ** (i + 1)))
  return np.asarray(out, np.float64)


@dataclasses.dataclass(frozen=True)
class Sweep:
  """What the sweep saw: one loss per learning rate tried, until it stopped."""
  lrs: list[float]
  losses: list[float]
  smoothed: list[float]
  stop_reason: str


def run_sweep(loss_at: Callable[[int, float], float], lrs, *, smoothing: float,
              divergence_factor: float) -> Sweep:
  """Calls loss_at(i, lrs[i]) in order (the loss of the step taken at that rate) and stops
  after the first smoothed loss above divergence_factor x the best so far; a non-finite loss
  stops it without being kept."""
  kept: list[float] = []
  reason = f"end of the sweep (lr {lrs[-1]:.3g})"
  best = np.inf
  for i, lr in enumerate(lrs):
    loss = float(loss_at(i, float(lr)))
    if not np.isfinite(loss):
      reason = f"non-finite loss at lr {lr:.3g}"
      break
    kept.append(loss)
    current = smooth(kept, smoothing)[-1]
    best = min(best, current)
    if current > divergence_factor * best:
      reason = f"diverged at lr {lr:.3g} (smoothed loss {current:.4g} > {divergence_factor:g} x " \
               f"best {best:.4g})"
      break
  smoothed = smooth(kept, smoothing)
  return Sweep([float(x) for x in lrs[:len(kept)]], kept, smoothed.tolist(), reason)


def suggest_lr(lrs, smoothed, smoothing: float = 0.0) -> float:
  """The steepest descent of `smoothed` against log10(lrs), among the points up to its
  minimum (METHOD), leaving out the moving average's first 1 / (1 - smoothing) points (it has
  seen too few losses there to be more than their noise). The first rate when the loss never
  fell."""
  lrs, curve = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
  if len(curve) < 3:
    raise ConfigError(
        f"the range test stopped after {len(curve)} learning rates (from {lrs[0]:.3g}): too "
        "few to read a curve; lower config.lr_find.min_lr")
  lowest = int(np.argmin(curve))
  if lowest < 2:
    log.warning("lr_find: the loss never fell (lowest at lr %.3g); suggesting the sweep's "
                "first rate; lower config.lr_find.min_lr", lrs[lowest])
    return float(lrs[0])
  start = min(int(round(1.0 / (1.0 - smoothing))), lowest - 2)  # at least 3 points remain
  slopes = np.gradient(curve[start:lowest + 1], np.log10(lrs[start:lowest + 1]))
  return float(lrs[start + int(np.argmin(slopes))])


def range_test(step_fn, state, batches: Iterator[dict], mesh, lrs, finder, *,
               grad_accum_steps: int = 1) -> tuple[Sweep, float]:
  """The sweep over compiled steps: `step_fn` (a jtl.steps.TrainStep whose schedule is
  sweep_schedule(lrs)), `batches` host-local and endless, `finder` config.lr_find.
  Returns (sweep, suggestion)."""
  def loss_at(i, lr):
    nonlocal state
    losses = []
    for _ in range(grad_accum_steps):  # one optimizer step, one learning rate
      state, metrics = step_fn(state, distributed.global_batch(next(batches), mesh))
      losses.append(float(metrics["loss"]))
    return float(np.mean(losses))

  sweep = run_sweep(loss_at, lrs, smoothing=finder.smoothing,
                    divergence_factor=finder.divergence_factor)
  log.info("lr_find: %d learning rates, stopped by %s", len(sweep.lrs), sweep.stop_reason)
  return sweep, suggest_lr(sweep.lrs, sweep.smoothed, finder.smoothing)


def summary(sweep: Sweep, suggested: float) -> dict:
  """lr_find.json's content."""
  return {"lrs": sweep.lrs, "losses": sweep.losses, "smoothed": sweep.smoothed,
          "suggested_lr": suggested, "method": METHOD, "stop_reason": sweep.stop_reason}


def write_results(directory: str, sweep: Sweep, result: dict) -> None:
  """lr_find.json (`result`) and lr_find.png in `directory`, each replaced whole."""
  os.makedirs(directory, exist_ok=True)
  plot(sweep, result["suggested_lr"], os.path.join(directory, PLOT_NAME))
  report.write_json(os.path.join(directory, JSON_NAME), result)


def plot(sweep: Sweep, suggested: float, path: str) -> None:
  """Smoothed (and raw) loss against the learning rate, log x axis, the suggestion marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.plot(sweep.lrs, sweep.losses, color="0.75", linewidth=1, label="loss")
  ax.plot(sweep.lrs, sweep.smoothed, color="C0", linewidth=2, label="smoothed loss")
  at = int(np.argmin(np.abs(np.log(sweep.lrs) - np.log(suggested))))
  ax.axvline(suggested, color="C3", linestyle="--", linewidth=1)
  ax.plot([suggested], [sweep.smoothed[at]], "o", color="C3",
          label=f"suggested lr {suggested:.3g}")
  ax.set_xscale("log")
  # The raw losses of the last, diverging steps would squash the curve: the smoothed one sets
  # the top.
  low = min(min(sweep.losses), min(sweep.smoothed))
  ax.set_ylim(low - 0.05 * abs(low), 1.15 * max(sweep.smoothed))
  ax.set_xlabel("learning rate")
  ax.set_ylabel("training loss")
  ax.set_title("learning-rate range test (steepest descent of the smoothed loss)")
  ax.grid(alpha=0.3, which="both")
  ax.legend()
  fig.tight_layout()
  tmp = path + ".tmp"
  fig.savefig(tmp, dpi=100, format="png")
  plt.close(fig)
  os.replace(tmp, path)
