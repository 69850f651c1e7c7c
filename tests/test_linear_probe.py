"""The linear head solved as logistic regression (jtl.linear_probe): the optimum of its penalised
objective, found again bit for bit on a rerun, and the engine taking that path exactly when the
head is one dense layer on cached features held in memory."""
import json
import logging
import os
import types

import flax.linen as nn
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import TinyCNN, tiny_config, write_image_folder
from jtl import linear_probe, plan, train
from jtl.models import common, registry

GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
TOL = 1e-5  # tighter than config.probe.tolerance: float32 reaches it on these small problems


def _blobs(n=240, d=12, classes=4, spread=1.5, seed=0):
  """Overlapping Gaussian classes: not separable, so the penalty and the bias both matter."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(classes, d))
  labels = rng.integers(classes, size=n)
  labels[:classes] = np.arange(classes)
  features = centres[labels] + spread * rng.normal(size=(n, d)) + 3.0  # off-centre: a bias
  return features.astype(np.float32), labels


def _penalised_gradient(features, labels, kernel, bias, l2, *, weights=None, smoothing=0.0):
  """The largest |component| of the gradient of mean_i w_i CE_i + l2 / 2 |kernel|^2 with
  respect to (kernel, bias), in float64 numpy."""
  x = np.asarray(features, np.float64).reshape(len(labels), -1)
  logits = x @ kernel.astype(np.float64) + bias.astype(np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  classes = kernel.shape[1]
  targets = np.eye(classes)[labels] * (1 - smoothing) + smoothing / classes
  w = (np.ones(len(labels)) if weights is None else np.asarray(weights, np.float64))
  residual = (w / len(labels))[:, None] * (p - targets)
  grad_kernel = x.T @ residual + l2 * kernel
  return float(max(np.abs(grad_kernel).max(), np.abs(residual.sum(0)).max()))


def test_the_solution_is_the_optimum_of_the_penalised_objective():
  features, labels = _blobs()
  problem = linear_probe.Problem.from_cache(features[None], labels, num_classes=4)
  solution = linear_probe.fit(problem, l2_grid=(1e-2,), tolerance=TOL)
  assert solution.converged and solution.gradient_max <= TOL and not solution.cv_accuracy
  assert _penalised_gradient(features, labels, solution.kernel, solution.bias, 1e-2) <= TOL
  # The same optimum as an independent float64 solve (scipy's L-BFGS-B): the same objective
  # value, and the same probabilities to within what the tolerance allows (the objective is
  # 1e-2-strongly convex in the kernel, so the kernel lies within |gradient| / 1e-2 of the
  # optimum's: a few 1e-3 here).
  optimize = pytest.importorskip("scipy.optimize")
  x, d = features.astype(np.float64), features.shape[1]

  def log_probabilities(kernel, bias):
    logits = x @ kernel + bias
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

  def value_and_grad(theta):
    kernel, bias = theta[:d * 4].reshape(d, 4), theta[d * 4:]
    log_p = log_probabilities(kernel, bias)
    residual = (np.exp(log_p) - np.eye(4)[labels]) / len(labels)
    value = -log_p[np.arange(len(labels)), labels].mean() + 0.005 * np.sum(kernel ** 2)
    return value, np.concatenate([(x.T @ residual + 1e-2 * kernel).ravel(), residual.sum(0)])

  reference = optimize.minimize(value_and_grad, np.zeros(d * 4 + 4), jac=True,
                                method="L-BFGS-B", options={"gtol": 1e-12, "maxiter": 10000})
  assert solution.loss == pytest.approx(reference.fun, rel=1e-5)
  np.testing.assert_allclose(
      np.exp(log_probabilities(solution.kernel.astype(np.float64), solution.bias)),
      np.exp(log_probabilities(reference.x[:d * 4].reshape(d, 4), reference.x[d * 4:])),
      atol=5e-3)


def test_the_bias_is_not_penalised():
  # A penalty that pins the kernel to zero leaves the bias free: softmax(bias) is then the
  # class frequencies, the best constant prediction.
  features, labels = _blobs()
  problem = linear_probe.Problem.from_cache(features[None], labels, num_classes=4)
  solution = linear_probe.fit(problem, l2_grid=(1e4,))
  assert np.abs(solution.kernel).max() < 1e-3
  probabilities = np.exp(solution.bias) / np.exp(solution.bias).sum()
  np.testing.assert_allclose(probabilities, np.bincount(labels) / len(labels), atol=1e-3)


def test_label_smoothing_class_weights_and_views_enter_the_objective():
  features, labels = _blobs(n=120)
  flipped = features[:, ::-1]  # a second "view" of every example
  class_weights = np.array([2.0, 1.0, 0.5, 1.0], np.float32)
  problem = linear_probe.Problem.from_cache(np.stack([features, flipped]), labels,
                                            num_classes=4, label_smoothing=0.1,
                                            class_weights=class_weights)
  assert problem.features.shape == (240, 12)
  solution = linear_probe.fit(problem, l2_grid=(1e-2,), tolerance=TOL)
  rows, row_labels = np.concatenate([features, flipped]), np.tile(labels, 2)
  assert _penalised_gradient(rows, row_labels, solution.kernel, solution.bias, 1e-2,
                             weights=class_weights[row_labels], smoothing=0.1) <= TOL
  # Without the weights the same head is far from the optimum: they were used.
  assert _penalised_gradient(rows, row_labels, solution.kernel, solution.bias, 1e-2,
                             smoothing=0.1) > 1e-3


def test_cross_validation_is_stratified_seeded_and_the_rerun_bit_identical():
  features, labels = _blobs(spread=2.0)
  folds = linear_probe.stratified_folds(labels, 5, seed=0)
  for c in range(4):
    per_fold = np.bincount(folds[labels == c], minlength=5)
    assert per_fold.max() - per_fold.min() <= 1
  assert not np.array_equal(folds, linear_probe.stratified_folds(labels, 5, seed=1))
  problem = linear_probe.Problem.from_cache(features[None], labels, num_classes=4)
  first = linear_probe.fit(problem, l2_grid=GRID, folds=5, seed=0, tolerance=TOL)
  again = linear_probe.fit(problem, l2_grid=GRID, folds=5, seed=0, tolerance=TOL)
  # Strong to weak, stopping after two in a row did worse than the best.
  tried = list(first.cv_loss)
  assert tried == sorted(GRID, reverse=True)[:len(tried)] and set(first.cv_accuracy) == set(tried)
  assert first.cv_loss[first.l2] == min(first.cv_loss.values())
  if len(tried) < len(GRID):
    assert all(first.cv_loss[s] > first.cv_loss[first.l2] for s in tried[-2:])
  assert min(GRID) < first.l2 < max(GRID)  # noisy classes: neither extreme is best
  assert first.l2 == again.l2 and first.cv_accuracy == again.cv_accuracy
  assert np.array_equal(first.kernel, again.kernel) and np.array_equal(first.bias, again.bias)
  assert first.converged
  assert _penalised_gradient(features, labels, first.kernel, first.bias, first.l2) <= TOL


def test_folds_stop_at_the_cv_tolerance_and_the_refit_at_the_tolerance(monkeypatch):
  features, labels = _blobs(spread=2.0)
  problem = linear_probe.Problem.from_cache(features[None], labels, num_classes=4)
  tight = linear_probe.fit(problem, l2_grid=GRID, folds=5, seed=0, tolerance=TOL)
  asked, minimise = [], linear_probe._minimise

  def recording(*args):
    asked.append(float(args[7]))  # the tolerance of each fit, folds first, the refit last
    return minimise(*args)

  monkeypatch.setattr(linear_probe, "_minimise", recording)
  loose = linear_probe.fit(problem, l2_grid=GRID, folds=5, seed=0, tolerance=TOL,
                           cv_tolerance=1e-2)
  assert len(asked) == 5 * len(loose.cv_loss) + 1
  assert asked[:-1] == pytest.approx([1e-2] * (len(asked) - 1)) and asked[-1] == pytest.approx(TOL)
  # The ranking of strengths survives the looser folds; the refit is as converged as ever.
  assert loose.l2 == tight.l2 and loose.converged
  assert _penalised_gradient(features, labels, loose.kernel, loose.bias, loose.l2) <= TOL
  np.testing.assert_allclose(loose.kernel, tight.kernel, atol=1e-3)


class _MlpHead(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    hidden = nn.relu(nn.Dense(8, name="hidden")(x.mean(axis=(1, 2))))
    return nn.Dense(self.num_classes, name="out")(hidden)


class _HiddenLayerHeadCNN(nn.Module):
  """stem -> head, the head a hidden layer and a classifier on the pooled features."""
  head_pools_globally = True
  num_classes: int = 10
  image_size: int = 16

  @property
  def stage_names(self):
    return ("stem", "head")

  @nn.compact
  def __call__(self, x, train: bool = False, frozen_stages: int = 0, start_stage: int = 0,
               stop_stage: int | None = None):
    conv = nn.Conv(8, (3, 3), strides=2, name="stem")
    head = _MlpHead(self.num_classes, name="head")
    return common.apply_stages([("stem", lambda x, t: nn.relu(conv(x))),
                                ("head", lambda x, t: head(x))], x, train=train,
                               frozen_stages=frozen_stages, start_stage=start_stage,
                               stop_stage=stop_stage)


class _SquaringHeadCNN(_HiddenLayerHeadCNN):
  """Its head is a dense layer on the squared pooled features: not affine in them."""

  @nn.compact
  def __call__(self, x, train: bool = False, frozen_stages: int = 0, start_stage: int = 0,
               stop_stage: int | None = None):
    conv = nn.Conv(8, (3, 3), strides=2, name="stem")
    head = nn.Dense(self.num_classes, name="head")
    return common.apply_stages([("stem", lambda x, t: nn.relu(conv(x))),
                                ("head", lambda x, t: head(x.mean(axis=(1, 2)) ** 2))], x,
                               train=train, frozen_stages=frozen_stages,
                               start_stage=start_stage, stop_stage=stop_stage)


HIDDEN_LAYER_HEAD = registry.ModelEntry(
    name="tiny_hidden_layer_head", family="test", build=_HiddenLayerHeadCNN,
    pretrained={"": registry.PretrainedCfg(image_size=16, crop_pct=1.0)}, default_tag=None,
    converters={}, published_params=None)


def _model(module, head: dict):
  """A model with only its head's weights: all that a head applied on cached features needs
  (create_model would compile the whole network's initialisation)."""
  return types.SimpleNamespace(module=module, stage_names=module.stage_names,
                               variables={"params": {"head": head}})


def test_the_solver_is_chosen_by_the_head_and_where_the_features_are(tmp_path):
  config = tiny_config("unused", **{"probe.solver": "lbfgs"})
  model = _model(TinyCNN(num_classes=3), {"kernel": np.zeros((16, 3), np.float32),
                                          "bias": np.zeros(3, np.float32)})
  pooled = np.random.default_rng(0).normal(size=(1, 20, 1, 1, 16)).astype(np.float32)
  chosen = linear_probe.choose_solver(config, model, pooled, start_stage=3)
  assert chosen.solves and "one dense layer" in chosen.why
  on_disk = str(tmp_path / "train.npy")
  np.save(on_disk, pooled)
  mapped = linear_probe.choose_solver(config, model, np.load(on_disk, mmap_mode="r"), 3)
  assert not mapped.solves and "memory-mapped" in mapped.why
  assert "images" in linear_probe.choose_solver(config, model, None, 0).why
  config.probe.solver = "sgd"
  assert linear_probe.choose_solver(config, model, pooled, 3).solver == "sgd"
  config.probe.solver = "lbfgs"
  dense = lambda i, o: {"kernel": np.zeros((i, o), np.float32), "bias": np.zeros(o, np.float32)}
  hidden = _model(_HiddenLayerHeadCNN(num_classes=3), {"hidden": dense(16, 8), "out": dense(8, 3)})
  choice = linear_probe.choose_solver(config, hidden, pooled, start_stage=1)
  assert not choice.solves and "not one dense layer" in choice.why
  # A head that is one dense layer by its weights but does more than it to the features.
  squared = _model(_SquaringHeadCNN(num_classes=3), dense(16, 3))
  choice = linear_probe.choose_solver(config, squared, pooled, start_stage=1)
  assert not choice.solves and "not one dense layer on the cached features" in choice.why


@pytest.fixture
def data(tmp_path):
  root = str(tmp_path / "data")
  write_image_folder(root, per_class=16)
  return root


def test_feature_extraction_solves_the_head_and_a_rerun_finds_it_finished(data, tmp_path,
                                                                          caplog):
  caplog.set_level(logging.INFO)
  # lr=auto: a solved head has no learning rate, so no range test runs for it.
  config = tiny_config(data, strategy="feature_extraction",
                       **{"probe.solver": "lbfgs", "optimizer.lr": "auto"})
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(config, workdir)
  assert final["head_solver"] == "lbfgs" and final["feature_cache"]
  assert not os.path.exists(os.path.join(workdir, "lr_find")) and "suggested_lr" not in final
  assert "no range test" in caplog.text
  # Its steps are L-BFGS iterations over every example: no per-step speed is reported.
  assert "step_seconds" not in final and "images_per_second" not in final
  probe = final["linear_probe"]
  assert probe["converged"] and probe["gradient_max"] <= config.probe.tolerance
  assert probe["l2"] in config.probe.l2_grid and len(probe["cv_loss"]) >= 3
  assert final["steps"] == probe["iterations"] and "L-BFGS iterations" in caplog.text
  for name in ("final_metrics.json", "report.md", "metrics.jsonl",
               os.path.join("export", "model.safetensors")):
    assert os.path.isfile(os.path.join(workdir, name)), name
  # The exported head is the optimum of the objective on the cached training features.
  exported = load_file(os.path.join(workdir, "export", "model.safetensors"))
  run = plan.plan_run(plan.open_inputs(config), config)
  assert run.cache is not None
  assert _penalised_gradient(run.cache.features["train"][0], run.cache.labels["train"],
                             exported["params/head/kernel"], exported["params/head/bias"],
                             probe["l2"]) <= config.probe.tolerance
  # A finished probe is a finished run: the rerun resumes it and solves nothing.
  caplog.clear()
  again = train.train_and_evaluate(config, workdir)
  assert "resumed from step" in caplog.text and "L-BFGS iterations" not in caplog.text
  assert again["test_accuracy"] == final["test_accuracy"]
  assert again["linear_probe"] == probe
  rerun = load_file(os.path.join(workdir, "export", "model.safetensors"))
  assert np.array_equal(rerun["params/head/kernel"], exported["params/head/kernel"])


def test_a_head_with_a_hidden_layer_takes_the_minibatch_loop(data, tmp_path):
  config = tiny_config(data, model="tiny_hidden_layer_head", strategy="feature_extraction",
                       num_epochs=2, **{"probe.solver": "lbfgs"})
  with registry.registered(HIDDEN_LAYER_HEAD):
    final = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert final["feature_cache"] and final["head_solver"] == "sgd"
  assert "not one dense layer" in final["head_solver_reason"] and "linear_probe" not in final
  assert final["steps"] == 8  # 2 epochs of 36 training images in batches of 8
  assert final["step_seconds"] > 0 and final["images_per_second"] > 0


def test_lp_ft_solves_its_probe_then_fine_tunes(data, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(data, strategy="lp_ft", freeze_depth=2, num_epochs=1,
                       **{"probe.solver": "lbfgs"})
  final = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "probe", "final_metrics.json")) as f:
    probe = json.load(f)
  assert probe["head_solver"] == "lbfgs" and probe["linear_probe"]["converged"]
  assert final["probe_steps"] == probe["linear_probe"]["iterations"] == probe["steps"]
  assert final["probe_test_accuracy"] == probe["test_accuracy"]
  # The fine-tuning phase trains more than the head, in the minibatch loop.
  assert "head_solver" not in final and final["steps"] == 4
  assert final["trainable_params"] > probe["trainable_params"]
