"""Model EMA: the average the compiled step keeps equals the hand-computed one, frozen parameters
stay out of it, it survives a resume, and the final export holds the better of raw and EMA."""
import json
import os

import jax
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from conftest import tiny_config, write_image_folder
from jtl import distributed, optim, steps, train
from jtl import params as P
from jtl.loop import Hook
from helpers import save_and_stop
from jtl.models import create_model


@pytest.fixture(scope="module")
def model():
  return create_model("tiny_cnn", num_classes=3)


@pytest.mark.fast
def test_ema_after_three_steps_is_the_hand_computed_average(model):
  decay = 0.95
  rules = optim.freeze_rules("partial", model.stage_names, 1)  # the stem frozen
  plan = optim.make_freeze_plan(model.variables["params"], model.stage_names, rules)
  config = tiny_config("unused", ema_decay=decay, strategy="partial", freeze_depth=1)
  step = steps.make_train_step(model, plan, config, distributed.make_mesh(),
                               schedule=optax.constant_schedule(0.05), num_classes=3)
  state = step.init_state(model.variables["params"], model.variables["batch_stats"], 0)
  trainable = sorted(k for k, label in plan.labels.items() if label != optim.FROZEN)
  assert sorted(P.flatten(jax.device_get(state.ema_params))) == trainable
  assert not any(k.startswith("stem/") for k in trainable)

  rng = np.random.default_rng(0)
  expected = {k: np.asarray(v, np.float64) for k, v in P.flatten(model.variables["params"]).items()
              if k in trainable}
  for t in range(3):
    batch = {"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 3, 4).astype(np.int32)}
    state, _ = step(state, batch)
    d = min(decay, (1 + t) / (10 + t))  # the warmup: 0.1, 2/11, 3/12
    params = P.flatten(jax.device_get(state.params))
    expected = {k: d * expected[k] + (1 - d) * np.asarray(params[k], np.float64)
                for k in trainable}
  ema = P.flatten(jax.device_get(state.ema_params))
  for k in trainable:
    np.testing.assert_allclose(ema[k], expected[k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert not np.allclose(ema["head/kernel"], params["head/kernel"])  # it lags the weights
  # The EMA model: trainable leaves from the average, frozen ones bit-identical to the start.
  merged = P.flatten(jax.device_get(steps.with_ema_weights(state).params))
  for k, v in P.flatten(model.variables["params"]).items():
    if k.startswith("stem/"):
      np.testing.assert_array_equal(merged[k], v, err_msg=k)
      np.testing.assert_array_equal(params[k], v, err_msg=k)
    else:
      np.testing.assert_array_equal(merged[k], ema[k], err_msg=k)


@pytest.mark.fast
def test_under_gradient_accumulation_the_ema_moves_with_the_optimizer_steps(model):
  plan = optim.make_freeze_plan(model.variables["params"], model.stage_names, [(".*", "train")])
  config = tiny_config("unused", ema_decay=0.5, grad_accum_steps=2)
  step = steps.make_train_step(model, plan, config, distributed.make_mesh(),
                               schedule=optax.constant_schedule(0.05), num_classes=3)
  state = step.init_state(model.variables["params"], model.variables["batch_stats"], 0)
  start = P.flatten(jax.device_get(state.ema_params))["head/kernel"]
  rng = np.random.default_rng(0)
  heads = []
  for _ in range(2):
    state, _ = step(state, {"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
                            "label": rng.integers(0, 3, 4).astype(np.int32)})
    heads.append((P.flatten(jax.device_get(state.ema_params))["head/kernel"],
                  P.flatten(jax.device_get(state.params))["head/kernel"]))
  np.testing.assert_array_equal(heads[0][0], start)  # half an optimizer step: nothing moved
  d = min(0.5, 1 / 10)  # the first EMA update
  np.testing.assert_allclose(heads[1][0], d * start + (1 - d) * heads[1][1], rtol=1e-5,
                             atol=1e-7)


@pytest.mark.fast
def test_no_ema_keeps_no_copy(model):
  plan = optim.make_freeze_plan(model.variables["params"], model.stage_names, [(".*", "train")])
  step = steps.make_train_step(model, plan, tiny_config("unused"), distributed.make_mesh(),
                               schedule=optax.constant_schedule(0.05), num_classes=3)
  state = step.init_state(model.variables["params"], model.variables["batch_stats"], 0)
  assert state.ema_params == {}
  same = steps.with_ema_weights(state)  # no average: the raw weights, leaf for leaf
  assert jax.tree_util.tree_structure(same.params) == jax.tree_util.tree_structure(state.params)
  for a, b in zip(jax.tree_util.tree_leaves(same.params), jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _Watch(Hook):
  """Keeps host copies of the final EMA and of the best model's state; stops at `stop_at`."""

  def __init__(self, stop_at=None):
    self.stop_at, self.best, self.final_ema = stop_at, None, None

  def after_step(self, loop, step):
    if step == self.stop_at:
      save_and_stop(loop)

  def on_epoch_end(self, loop, stats):
    if loop.is_best:  # set by the engine's Evaluation, which runs first
      self.best = jax.device_get(loop.state)

  def on_end(self, loop):
    self.final_ema = P.flatten(jax.device_get(loop.state.ema_params))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("ema") / "data")
  write_image_folder(root, per_class=16)
  return root


def _config(data, **overrides):
  return tiny_config(data, num_epochs=3, ema_decay=0.9, strategy="partial", freeze_depth=1,
                     **{"feature_cache.mode": "off", **overrides})


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory):
  """One uninterrupted run: (its workdir, final metrics, what _Watch saw)."""
  watch = _Watch()
  workdir = str(tmp_path_factory.mktemp("ema") / "whole")
  final = train.train_and_evaluate(_config(data), workdir, extra_hooks=[watch])
  return workdir, final, watch


def test_a_resumed_run_ends_with_the_same_ema(data, whole, tmp_path):
  whole = whole[2]
  first = _Watch(stop_at=6)  # 4 steps per epoch: mid-epoch 2
  assert train.train_and_evaluate(_config(data), str(tmp_path / "cut"),
                                  extra_hooks=[first])["preempted"]
  resumed = _Watch()
  train.train_and_evaluate(_config(data), str(tmp_path / "cut"), extra_hooks=[resumed])
  assert sorted(resumed.final_ema) == sorted(whole.final_ema)
  assert not any(k.startswith("stem/") for k in whole.final_ema)
  for k, v in whole.final_ema.items():
    np.testing.assert_allclose(resumed.final_ema[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


def test_the_export_holds_the_better_of_raw_and_ema(whole):
  workdir, final, watch = whole
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  val = {r["step"]: r for r in rows if r["split"] == "val"}
  best_row = val[final["best_step"]]
  selection = final["ema_selection"]
  assert selection["metric"] == "val_accuracy"
  # The comparison is the one the val row recorded for the best checkpoint.
  assert selection["raw"] == pytest.approx(best_row["accuracy"])
  assert selection["ema"] == pytest.approx(best_row["ema_accuracy"])
  assert all({"ema_loss", "ema_accuracy", "ema_balanced_accuracy"} <= set(r) for r in val.values())
  ema_better = selection["ema"] > selection["raw"]
  assert final["exported_weights"] == ("ema" if ema_better else "raw")
  assert final["test_accuracy"] == final[f"{final['exported_weights']}_test_accuracy"]
  assert 0 <= final["raw_test_accuracy"] <= 1 and 0 <= final["ema_test_accuracy"] <= 1
  best = watch.best
  expected = steps.with_ema_weights(best) if ema_better else best
  exported = load_file(os.path.join(workdir, "export", "model.safetensors"))
  for k, v in P.flatten(jax.device_get(expected.params)).items():
    np.testing.assert_array_equal(exported[f"params/{k}"], v, err_msg=k)
  raw_head = P.flatten(best.params)["head/kernel"]
  assert ema_better != np.array_equal(exported["params/head/kernel"], raw_head)


@pytest.mark.fast
def test_the_choice_follows_the_metric():
  """A tie keeps the raw weights; val_loss prefers the lower one."""
  from jtl.evaluation import Splits
  accuracy, loss = Splits("val", "test", "val_accuracy"), Splits("val", "test", "val_loss")
  assert not accuracy.improved(0.5, 0.5) and accuracy.improved(0.6, 0.5)
  assert loss.improved(0.4, 0.5) and not loss.improved(0.6, 0.5)
  assert not accuracy.improved(0.55, 0.5, min_delta=0.1) and accuracy.improved(0.7, 0.5, 0.1)
