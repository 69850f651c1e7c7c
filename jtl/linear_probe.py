"""A linear head on cached features fitted as the convex problem it is.

When only the head trains and it is one dense layer on the feature cache's outputs, training it
is multinomial logistic regression: minibatch steps with early stopping on a few dozen
validation images stop short of the optimum and pick under-trained heads by noise. Here it is
solved instead, as a linear probe is (Kornblith et al., 2019): full-batch L-BFGS (optax.lbfgs
with its zoom line search) on every cached training view, softmax cross-entropy (label smoothing
and class weights as the training step has them) plus an L2 penalty on the kernel alone,
iterated until every component of that objective's gradient is within config.probe.tolerance
(the criterion of scipy's L-BFGS-B, `pgtol`, that scikit-learn's lbfgs solver uses). The L2
strength is chosen by stratified k-fold cross-validation on the training split over
config.probe.l2_grid (the lowest held-out loss; seeded: the same folds, the same choice, the
same head on a rerun), then the head is refitted on all of it.

The minibatch loop stays for every other case, and `choose_solver` says which applies and why:
a head that is not one dense layer on the cached features (a hidden layer), features that do
not fit in memory (the cache memory-mapped), or config.probe.solver="sgd". Dropout before the
dense layer does not make the head non-linear (at evaluation it is the same affine map): the
solve leaves it out and the cross-validated penalty regularises in its place.

Multi-host: every host holds the whole cache and runs this same full-batch computation on its
own device, so every host finds the same parameters bit for bit (the solve is deterministic
arithmetic on identical inputs, with no data split between hosts and no collective).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtl import distributed, optim
from jtl import params as P
from jtl.hooks import EVAL_ROW_KEYS
from jtl.loop import Progress

log = logging.getLogger(__name__)

LBFGS, SGD = "lbfgs", "sgd"
SUMMARY_KEY = "linear_probe"  # in a solved run's checkpoint meta and final_metrics.json
_FOLD_STREAM = 0xF01D  # the folds' own random stream, apart from the data order's
# float32 matmuls at full precision: an accelerator's default (TF32 on GPUs) has a gradient too
# noisy for the tolerance to be reached.
_PRECISION = jax.lax.Precision.HIGHEST
# Iterations without a lower objective after which the solve stops short of the tolerance: the
# line search can no longer find a decrease that float32 resolves.
_STALLED_ITERATIONS = 20
# Cross-validation stops going to weaker penalties after this many in a row did worse than the
# best (Fashion-MNIST at 20,000 images: 1e-2 best, 1e-3 and 1e-4 worse, 1e-5 and 1e-6 skipped).
_WORSE_TO_STOP = 2


@dataclasses.dataclass(frozen=True)
class SolverChoice:
  """How the head is fitted: LBFGS or SGD, and why (logged and in final_metrics.json)."""
  solver: str
  why: str

  @property
  def solves(self) -> bool:
    return self.solver == LBFGS

  def fields(self, summary: dict | None = None) -> dict:
    """final_metrics.json's fields: head_solver, head_solver_reason (and the solve's summary)."""
    fields = {"head_solver": self.solver, "head_solver_reason": self.why}
    if summary is not None:
      fields[SUMMARY_KEY] = {k: v for k, v in summary.items() if k != "why"}
    return fields


def trains_head_alone(stage_names: Sequence[str], freeze_labels: dict[str, str],
                      start_stage: int) -> bool:
  """Whether only the head's parameters train, on the cached outputs of every stage before it
  (or on images, without a cache)."""
  head = stage_names[-1]
  trainable = {name for name, label in freeze_labels.items() if label != optim.FROZEN}
  in_head = {name for name in freeze_labels if name.split("/", 1)[0] == head}
  return bool(trainable) and trainable == in_head and start_stage in (0, len(stage_names) - 1)


def choose_solver(config, model, train_features, start_stage: int) -> SolverChoice:
  """LBFGS when config.probe.solver asks for it and the head is one dense layer on cached
  features held in memory; SGD (the minibatch loop) otherwise. train_features: the cache's
  [views, N, ...] training array, None without a cache."""
  if config.probe.solver == SGD:
    return SolverChoice(SGD, "config.probe.solver='sgd'")
  if train_features is None or start_stage == 0:
    return SolverChoice(SGD, "the head trains on images (no feature cache)")
  if isinstance(train_features, np.memmap):
    return SolverChoice(SGD, "the cached features are memory-mapped (larger than memory "
                             "allows): minibatches stream them")
  head = model.variables["params"][model.stage_names[-1]]
  names = sorted(P.flatten(head))
  if names != ["bias", "kernel"] or np.ndim(head["kernel"]) != 2:
    return SolverChoice(SGD, f"the head is not one dense layer (its parameters: "
                             f"{', '.join(names)})")
  if model.variables.get("batch_stats", {}).get(model.stage_names[-1]):
    return SolverChoice(SGD, "the head has batch statistics of its own (not one dense layer)")
  sample = np.asarray(train_features[0, :8], np.float32)
  if np.prod(sample.shape[1:]) != np.shape(head["kernel"])[0]:
    return SolverChoice(SGD, f"the cached features ({sample.shape[1:]}) are not the dense "
                             f"layer's input ({np.shape(head['kernel'])[0]} wide)")
  if not _is_affine(model, sample, start_stage):
    return SolverChoice(SGD, "the head is not one dense layer on the cached features")
  views, n = train_features.shape[:2]
  return SolverChoice(LBFGS, f"the head is one dense layer on {n} cached examples x {views} "
                             f"view{'s' if views > 1 else ''} of {sample[0].size} features")


def _is_affine(model, sample: np.ndarray, start_stage: int) -> bool:
  """Whether the head at evaluation computes flatten(x) @ kernel + bias: checked on a few
  cached examples with random head weights, so that nothing but the dense layer can hide in
  it (a pooling head on pooled features [N, 1, 1, C] averages one position: x itself)."""
  head = model.variables["params"][model.stage_names[-1]]
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=np.shape(head["kernel"])).astype(np.float32)
  bias = rng.normal(size=np.shape(head["bias"])).astype(np.float32)
  params = {**model.variables["params"], model.stage_names[-1]: {"kernel": kernel, "bias": bias}}
  variables = {"params": params, "batch_stats": model.variables.get("batch_stats", {})}
  with jax.default_matmul_precision("float32"):  # not TF32: its error would fail the check
    logits = np.asarray(model.module.apply(variables, sample, train=False,
                                           start_stage=start_stage), np.float64)
  expected = sample.reshape(len(sample), -1).astype(np.float64) @ kernel + bias
  scale = np.abs(expected).max() + 1.0
  return logits.shape == expected.shape and np.abs(logits - expected).max() <= 1e-4 * scale


@dataclasses.dataclass(frozen=True)
class Problem:
  """The full-batch problem: features [M, D] (every training view), integer labels [M], the
  example each row is a view of [M] (cross-validation keeps an example's views together), the
  view index of each row, and the per-row loss weights (class weights, balanced sampling)."""
  features: np.ndarray
  labels: np.ndarray
  examples: np.ndarray
  views: np.ndarray
  row_weights: np.ndarray
  num_classes: int
  label_smoothing: float = 0.0

  @classmethod
  def from_cache(cls, train_features, labels, *, num_classes: int, label_smoothing: float = 0.0,
                 class_weights=None, balanced: bool = False) -> "Problem":
    """train_features [views, N, ...] (every view stacked as rows), labels [N]. class_weights
    as the training step's; balanced (config.balanced_sampling): each class weighs as much in
    total, as balanced epochs make it on average."""
    views, n = train_features.shape[:2]
    features = np.asarray(train_features, np.float32).reshape(views * n, -1)
    labels = np.asarray(labels, np.int32)
    weights = np.ones(n, np.float32)
    if class_weights is not None:
      weights *= np.asarray(class_weights, np.float32)[labels]
    if balanced:
      counts = np.bincount(labels, minlength=num_classes).astype(np.float32)
      weights *= (n / (np.count_nonzero(counts) * np.maximum(counts, 1)))[labels]
    return cls(features, np.tile(labels, views), np.tile(np.arange(n), views),
               np.repeat(np.arange(views), n), np.tile(weights, views), num_classes,
               label_smoothing)


@dataclasses.dataclass(frozen=True)
class Solution:
  """The fitted head, how the solve went and what cross-validation found."""
  kernel: np.ndarray
  bias: np.ndarray
  l2: float
  iterations: int          # of the final fit on all training rows
  loss: float              # its penalised objective at the solution
  gradient_max: float      # the largest |component| of its gradient there
  converged: bool          # gradient_max <= tolerance within max_iterations
  cv_accuracy: dict[float, float]   # mean held-out accuracy per strength ({} without CV)
  cv_loss: dict[float, float]       # mean held-out cross-entropy per strength (it chooses)
  seconds: float

  def head(self) -> dict[str, np.ndarray]:
    return {"kernel": self.kernel, "bias": self.bias}

  def summary(self) -> dict[str, Any]:
    """final_metrics.json's "linear_probe" field."""
    return {"l2": self.l2, "iterations": self.iterations, "loss": self.loss,
            "gradient_max": self.gradient_max, "converged": self.converged,
            "cv_accuracy": {f"{k:g}": v for k, v in self.cv_accuracy.items()},
            "cv_loss": {f"{k:g}": v for k, v in self.cv_loss.items()},
            "seconds": round(self.seconds, 3)}


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
  """The fold of each example: every class's examples in a seeded order, dealt out in turn, so
  that each fold holds every class in proportion (within one example)."""
  rng = np.random.default_rng([seed, _FOLD_STREAM])
  order = np.concatenate([rng.permutation(np.flatnonzero(labels == c))
                          for c in np.unique(labels)])
  fold = np.empty(len(labels), np.int64)
  fold[order] = np.arange(len(labels)) % folds
  return fold


def _loss_and_residual(params, features, targets, weights, l2):
  logits = jnp.matmul(features, params["kernel"], precision=_PRECISION) + params["bias"]
  log_p = jax.nn.log_softmax(logits)
  cross_entropy = -jnp.sum(targets * log_p, axis=-1)
  value = jnp.dot(weights, cross_entropy, precision=_PRECISION) + 0.5 * l2 * jnp.sum(
      jnp.square(params["kernel"]))
  # d value / d logits, row by row (soft targets: label smoothing keeps them summing to 1).
  residual = weights[:, None] * (jnp.exp(log_p) * jnp.sum(targets, -1, keepdims=True) - targets)
  return value, residual


@jax.custom_vjp
def objective(params, features, features_t, targets, weights, l2):
  """sum_i weights_i * cross-entropy_i + l2 / 2 * |kernel|^2 (the bias is not penalised).

  features_t is features transposed, held apart in its own layout: the kernel's gradient
  features^T @ residual reads it row by row, 4x faster on a CPU than XLA's contraction over
  the rows of `features` (the L-BFGS iteration's largest cost)."""
  return _loss_and_residual(params, features, targets, weights, l2)[0]


def _objective_forward(params, features, features_t, targets, weights, l2):
  value, residual = _loss_and_residual(params, features, targets, weights, l2)
  return value, (params["kernel"], features_t, residual, l2)


def _objective_backward(saved, cotangent):
  kernel, features_t, residual, l2 = saved
  grad = {"kernel": cotangent * (jnp.matmul(features_t, residual, precision=_PRECISION)
                                 + l2 * kernel),
          "bias": cotangent * jnp.sum(residual, axis=0)}
  return grad, None, None, None, None, None  # the data and the strength are constants


objective.defvjp(_objective_forward, _objective_backward)


def _gradient_max(grad, mean):
  """The largest |component| of the gradient with respect to (kernel, bias), from that with
  respect to (kernel, bias + mean @ kernel): the same objective, whose gradient is what the
  tolerance bounds. The largest component rather than the Euclidean norm: a bound that means
  the same for a head of 10 parameters and of 12,810, and scikit-learn's (on 2,800 Fashion-MNIST
  images, half the iterations of a norm within the same 1e-4, the same strength chosen)."""
  kernel = grad["kernel"] + mean[:, None] * grad["bias"][None, :]
  return jnp.maximum(jnp.max(jnp.abs(kernel)), jnp.max(jnp.abs(grad["bias"])))


@jax.jit
def _minimise(params, centred, centred_t, mean, targets, weights, l2, tolerance,
              max_iterations):
  """L-BFGS from `params` until max |gradient| <= tolerance, max_iterations or a stall; returns
  (params, iterations, objective, max |gradient|). One compiled program for every fold and
  strength: the arrays keep their shapes (a fold is a zero weight on its held-out rows).

  It works on features less their mean, with the bias b' = b + mean @ kernel: the same
  problem, but without the long valley along which kernel and bias trade off when the features
  sit far from zero (pooled ReLU features do), where float32 L-BFGS stalls."""
  value_fn = functools.partial(objective, features=centred, features_t=centred_t,
                               targets=targets, weights=weights, l2=l2)
  solver = optax.lbfgs()  # with optax's zoom line search
  value_and_grad = optax.value_and_grad_from_state(value_fn)

  def step(carry):
    params, state, best, stalled = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                   value_fn=value_fn)
    new_value = optax.tree_utils.tree_get(state, "value")
    return (optax.apply_updates(params, updates), state, jnp.minimum(new_value, best),
            jnp.where(new_value < best, 0, stalled + 1))

  def going_on(carry):
    _, state, _, stalled = carry
    count = optax.tree_utils.tree_get(state, "count")
    grad = optax.tree_utils.tree_get(state, "grad")
    return (count == 0) | ((count < max_iterations) & (stalled < _STALLED_ITERATIONS)
                           & (_gradient_max(grad, mean) > tolerance))

  carry = (params, solver.init(params), jnp.asarray(jnp.inf, jnp.float32), jnp.int32(0))
  params, state, _, _ = jax.lax.while_loop(going_on, step, carry)
  value, grad = jax.value_and_grad(value_fn)(params)
  return params, optax.tree_utils.tree_get(state, "count"), value, _gradient_max(grad, mean)


@jax.jit
def _held_out_scores(params, features, labels, weights):
  """(weighted accuracy, weighted cross-entropy) over the rows of weight > 0."""
  logits = jnp.matmul(features, params["kernel"], precision=_PRECISION) + params["bias"]
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  cross_entropy = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1)[:, 0]
  total = jnp.sum(weights)
  return jnp.dot(weights, correct) / total, jnp.dot(weights, cross_entropy) / total


def fit(problem: Problem, *, l2_grid: Sequence[float], folds: int = 5, seed: int = 0,
        tolerance: float = 1e-4, cv_tolerance: float | None = None,
        max_iterations: int = 1000) -> Solution:
  """The head minimising the penalised objective on every training row, its L2 strength the
  grid's best by `folds`-fold cross-validation: the lowest held-out cross-entropy (view 0, class
  weights as in training), ties to the stronger penalty; strengths weaker than two in a row that
  did worse than the best are not tried. One strength: no cross-validation.

  Held-out loss rather than accuracy: on a few hundred held-out images one example decides
  between strengths by accuracy (scikit-learn's digits: 93.16% at 1e-5 against 93.08% at 1e-3,
  a plateau from 1e-6 to 1e-2), while the loss has a clear minimum in the middle of it.

  The folds' fits stop at cv_tolerance (default: tolerance): they only rank the strengths,
  whose held-out losses differ by far more than a looser solve moves them; the refit on every
  row, warm-started from the folds' heads at the chosen strength, goes to `tolerance`."""
  started = time.perf_counter()
  c = problem.num_classes
  mean = problem.features.mean(axis=0, dtype=np.float64).astype(np.float32)
  centred = problem.features - mean
  centred, centred_t = jnp.asarray(centred), jnp.asarray(np.ascontiguousarray(centred.T))
  targets = jax.nn.one_hot(problem.labels, c)
  if problem.label_smoothing:
    targets = optax.smooth_labels(targets, problem.label_smoothing)
  labels = jnp.asarray(problem.labels)
  zeros = {"kernel": np.zeros((centred.shape[1], c), np.float32), "bias": np.zeros(c, np.float32)}

  def solve(params, rows: np.ndarray, l2: float, tolerance: float = tolerance):
    # The mean over training rows, as the training step's loss is over a batch's.
    weights = np.where(rows, problem.row_weights, 0.0) / max(np.count_nonzero(rows), 1)
    return _minimise(params, centred, centred_t, mean, targets,
                     jnp.asarray(weights, jnp.float32), jnp.float32(l2),
                     jnp.float32(tolerance), jnp.int32(max_iterations))

  strengths = sorted({float(s) for s in l2_grid}, reverse=True)  # warm starts: strong to weak
  cv_accuracy, cv_loss, chosen = {}, {}, strengths[0]
  start = zeros
  folds = min(folds, int(np.count_nonzero(problem.views == 0)))
  if len(strengths) > 1 and folds > 1:
    fold_of = stratified_folds(problem.labels[problem.views == 0], folds, seed)[problem.examples]

    def score(params, held_out):  # (accuracy, loss) on the held-out examples' first views
      return _held_out_scores(params, centred, labels, jnp.asarray(
          np.where(held_out & (problem.views == 0), problem.row_weights, 0.0), jnp.float32))

    solve_fold = functools.partial(solve, tolerance=cv_tolerance or tolerance)
    cv_accuracy, cv_loss, heads = _cross_validate(solve_fold, score, fold_of, folds, strengths,
                                                  zeros)
    chosen = min(cv_loss, key=lambda s: (cv_loss[s], -s))
    # The folds' heads at that strength, averaged: close to the refit's optimum.
    start = {k: np.mean([p[k] for p in heads[chosen]], axis=0) for k in zeros}
  params, iterations, value, gradient_max = jax.device_get(
      solve(start, np.ones(len(problem.labels), bool), chosen))
  kernel = np.asarray(params["kernel"])
  bias = (params["bias"].astype(np.float64) - mean.astype(np.float64) @ kernel).astype(np.float32)
  return Solution(kernel, bias, chosen, int(iterations), float(value), float(gradient_max),
                  float(gradient_max) <= tolerance, cv_accuracy, cv_loss,
                  time.perf_counter() - started)


def _cross_validate(solve, score, fold_of: np.ndarray, folds: int, strengths: Sequence[float],
                    zeros: dict):
  """({strength: mean held-out accuracy}, {strength: mean held-out loss}, {strength: the folds'
  heads}), the strengths in the order given (strong to weak), each fold warm-started from its
  head at the one before. It stops once the last _WORSE_TO_STOP strengths all did worse than
  the best: weaker ones only overfit more, and cost the most iterations."""
  heads, accuracy, loss, at_strength = [zeros] * folds, {}, {}, {}
  for s in strengths:
    results = []
    for k in range(folds):
      heads[k] = jax.device_get(solve(heads[k], fold_of != k, s)[0])
      results.append(score(heads[k], fold_of == k))
    accuracy[s], loss[s] = map(float, np.asarray(jax.device_get(results), np.float64).mean(0))
    at_strength[s] = list(heads)
    recent = list(loss.values())[-_WORSE_TO_STOP:]
    if len(loss) > _WORSE_TO_STOP and all(v > min(loss.values()) for v in recent):
      break
  return accuracy, loss, at_strength


def fit_from_config(config, train_features, labels, *, num_classes: int,
                    class_weights=None) -> Solution:
  """`fit` on the cache's training features with config.probe's grid, folds and tolerance and
  the run's label smoothing, class weights and balanced sampling; logged."""
  problem = Problem.from_cache(train_features, labels, num_classes=num_classes,
                               label_smoothing=config.label_smoothing,
                               class_weights=class_weights, balanced=config.balanced_sampling)
  p = config.probe
  solution = fit(problem, l2_grid=tuple(p.l2_grid), folds=p.cv_folds, seed=config.seed,
                 tolerance=p.tolerance, cv_tolerance=p.get("cv_tolerance"),
                 max_iterations=p.max_iterations)
  if solution.cv_accuracy:
    log.info("linear probe: L2 strength %g by %d-fold cross-validation (held-out loss / "
             "accuracy by strength: %s)", solution.l2, p.cv_folds,
             ", ".join(f"{s:g}: {solution.cv_loss[s]:.4f} / {a:.4f}"
                       for s, a in sorted(solution.cv_accuracy.items())))
  log.info("linear probe: %d L-BFGS iterations on %d rows, objective %.6f, largest gradient "
           "component %.2e (%s tolerance %g), %.2f s in all", solution.iterations,
           len(problem.labels), solution.loss, solution.gradient_max,
           "within" if solution.converged else "NOT within", p.tolerance, solution.seconds)
  if not solution.converged:
    log.warning("linear probe: not converged after config.probe.max_iterations=%d iterations",
                p.max_iterations)
  return solution


def choose_for_run(run, resumed_meta: dict | None) -> SolverChoice | None:
  """How `run` (a jtl.plan.RunPlan) fits its head; None when more than the head trains.
  resumed_meta: the meta of the checkpoint the run resumes from (None when fresh): a solved
  head is finished, and a run that began in the minibatch loop goes on in it."""
  model = run.inputs.model
  if not trains_head_alone(model.stage_names, run.freeze.labels, run.start_stage):
    return None
  if resumed_meta is not None:
    if SUMMARY_KEY in resumed_meta:
      return SolverChoice(LBFGS, resumed_meta[SUMMARY_KEY]["why"])
    return SolverChoice(SGD, "resumed from the minibatch loop's checkpoint")
  train_features = None if run.cache is None else run.cache.features["train"]
  return choose_solver(run.config, model, train_features, run.start_stage)


def solve_run(run, state, choice: SolverChoice, checkpoints, run_log):
  """Fits the head of `run` on its cached training features and makes it the head of `state`
  (a fresh train state): validated once, saved as the run's latest and best checkpoint (a
  finished run: resuming it goes straight to its final evaluation). Returns (state, progress,
  the summary for final_metrics.json). SIGTERM is not caught during the solve: nothing is saved
  before it ends, and the same command solves again."""
  cache, config, model = run.cache, run.config, run.inputs.model
  solution = fit_from_config(config, cache.features["train"], cache.labels["train"],
                             num_classes=len(run.inputs.class_names),
                             class_weights=run.class_weights)
  head_name = model.stage_names[-1]
  params = {**distributed.host_copy(state.params), head_name: solution.head()}
  flat = P.flatten(params)
  ema = P.unflatten({k: flat[k] for k in P.flatten(distributed.host_copy(state.ema_params))})
  state = state.replace(step=distributed.replicate(np.int32(solution.iterations), run.mesh),
                        params=distributed.replicate(params, run.mesh),
                        ema_params=distributed.replicate(ema, run.mesh))
  result = run.evaluate(state, run.splits.val)
  value = result[run.splits.key]
  progress = Progress(epoch=1, best=value, best_step=solution.iterations, finished=True,
                      train_seconds=solution.seconds)
  run_log.record({"step": solution.iterations, "epoch": 1, "split": "val",
                  **{k: result[k] for k in EVAL_ROW_KEYS}})
  log.info("linear probe: %s %.4f on %s", run.splits.metric, value, run.splits.val)
  summary = {**solution.summary(), "why": choice.why}
  checkpoints.save(solution.iterations, state, {**progress.to_json(), SUMMARY_KEY: summary},
                   best=True)
  return state, progress, summary
