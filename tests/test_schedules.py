"""The schedules that react or cycle: one_cycle's values are optax's; reduce_on_plateau cuts the
rate the compiled step applies after `plateau_patience` evaluations without improvement of the
validation metric, logs the cut rate, and resumes with it exactly."""
import os
import re
import types

import jax
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import run_helpers as rh
from conftest import tiny_config, write_image_folder
from jtl import config as config_lib
from jtl import distributed, hooks, optim, train
from jtl import params as P
from jtl.config import default_config
from jtl.evaluation import Splits
from helpers import StopAt
from jtl.models import create_model
from jtl.steps import TrainState, make_train_step

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# ---------------------------------------------------------------------------------------------
# one_cycle.

def test_one_cycle_is_optax_s_cosine_onecycle_over_the_budget():
  config = default_config()
  config.schedule.name = "one_cycle"
  config.schedule.pct_start, config.schedule.div_factor = 0.25, 10.0
  config.schedule.final_div_factor = 100.0
  schedule = optim.make_schedule(config, steps_per_epoch=10, total_steps=80, lr=0.5)
  reference = optax.cosine_onecycle_schedule(80, 0.5, pct_start=0.25, div_factor=10.0,
                                             final_div_factor=100.0)
  for step in (0, 7, 20, 33, 61, 80):
    assert float(schedule(step)) == float(reference(step))
  # From lr / div_factor up to lr at pct_start of the budget, down to that / final_div_factor.
  assert float(schedule(0)) == pytest.approx(0.05, rel=1e-6)
  assert float(schedule(20)) == pytest.approx(0.5, rel=1e-6)
  assert float(schedule(80)) == pytest.approx(0.0005, rel=1e-5)


@pytest.mark.parametrize("key,value", [("schedule.pct_start", 1.0),
                                       ("schedule.plateau_factor", 1.0),
                                       ("schedule.min_lr_factor", 1.5),
                                       ("schedule.plateau_patience", 0),
                                       ("lr_find.max_lr", 1e-8)])
def test_the_new_keys_refuse_values_that_cannot_work_naming_the_key(key, value):
  config = default_config()
  section, leaf = key.split(".")
  config[section][leaf] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(f"config.{key}")):
    config_lib.validate(config)


# ---------------------------------------------------------------------------------------------
# reduce_on_plateau: the rule, driven by the evaluation's metric.

class _FakeEvaluation:
  latest = None


def _drive_plateau(values, *, higher_is_better=True, **schedule):
  """The hook after evaluations of `values` (one per epoch): the scale after each."""
  config = default_config()
  for key, value in schedule.items():
    config.schedule[key] = value
  mesh = distributed.make_mesh()
  state = TrainState(step=0, params={}, batch_stats={}, opt_state=(), rng=0,
                     plateau=distributed.replicate(optim.initial_plateau_state({"w": np.zeros(1,
                                                   np.float32)}), mesh))
  evaluation = _FakeEvaluation()
  evaluation.splits = Splits("val", "test", "val_accuracy" if higher_is_better else "val_loss")
  learning_rate = hooks.LearningRate(optax.constant_schedule(1.0), grad_accum_steps=1)
  hook = hooks.PlateauSchedule(evaluation, optim.plateau_rule(config), mesh, learning_rate)
  loop = types.SimpleNamespace(state=state, step=0)
  hook.on_epoch_start(loop)
  scales = []
  for value in values:
    loop.step += 3
    evaluation.latest = (loop.step, value)
    hook.on_epoch_end(loop, {})
    # The logged rate's scale is the host copy of the device state's.
    assert float(loop.state.plateau.scale) == learning_rate.scale == learning_rate(loop.step)
    scales.append(learning_rate.scale)
  return scales


def test_the_rate_is_cut_after_patience_evaluations_without_improvement():
  # Patience 2: the 2nd and 3rd evaluations are no better than the 1st, so the 3rd cuts; the
  # count starts again, and the 5th (after two more stalls) cuts again; min_lr_factor floors it.
  scales = _drive_plateau([0.5, 0.5, 0.4, 0.5, 0.5, 0.5, 0.5], plateau_patience=2,
                          plateau_factor=0.5, min_lr_factor=0.2)
  assert scales == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.2], rel=1e-7)  # float32


def test_cooldown_and_improvement_and_the_direction_of_the_metric():
  # Cooldown 1: the evaluation right after a cut is not counted.
  assert _drive_plateau([0.5, 0.5, 0.5, 0.5, 0.6, 0.6], plateau_patience=1,
                        plateau_factor=0.5, plateau_cooldown=1) == [1.0, 0.5, 0.5, 0.25, 0.25,
                                                                     0.125]
  # val_loss: lower is better, so a falling loss is never a plateau.
  assert _drive_plateau([3.0, 2.0, 1.0, 0.5], higher_is_better=False, plateau_patience=1,
                        plateau_factor=0.5) == [1.0] * 4
  # A diverged model (NaN) is no improvement.
  assert _drive_plateau([0.5, float("nan")], plateau_patience=1, plateau_factor=0.5) == [1.0,
                                                                                          0.5]


def test_the_compiled_step_applies_the_plateau_scale_to_the_update():
  """Plain SGD: the update is -lr * scale * grad, so a scale of 0.25 moves every trained
  parameter by a quarter of what scale 1 does from the same state and batch."""
  config = default_config()
  config.schedule.name, config.optimizer.name = "reduce_on_plateau", "sgd"
  config.optimizer.momentum = config.optimizer.weight_decay = 0.0
  model = create_model("tiny_cnn", num_classes=3)
  params, batch_stats = model.variables["params"], model.variables["batch_stats"]
  plan = optim.make_freeze_plan(params, model.stage_names, [(".*", "train")])
  mesh = distributed.make_mesh()
  step = make_train_step(model, plan, config, mesh, schedule=optax.constant_schedule(0.1),
                         num_classes=3)
  rng = np.random.default_rng(0)
  batch = distributed.global_batch({"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
                                    "label": rng.integers(0, 3, 4).astype(np.int32)}, mesh)
  moved = {}
  for scale in (1.0, 0.25):
    state = step.init_state(params, batch_stats, seed=0)
    plateau = jax.device_get(state.plateau)._replace(scale=np.float32(scale))
    state = state.replace(plateau=distributed.replicate(plateau, mesh))
    after, _ = step(state, batch)
    moved[scale] = {k: np.asarray(v) - np.asarray(P.flatten(params)[k])
                    for k, v in P.flatten(jax.device_get(after.params)).items()}
  assert any(np.abs(d).max() > 0 for d in moved[1.0].values())
  for name, delta in moved[1.0].items():
    np.testing.assert_allclose(moved[0.25][name], 0.25 * delta, rtol=1e-4, atol=1e-7,
                               err_msg=name)


# ---------------------------------------------------------------------------------------------
# reduce_on_plateau in a run: logged, checkpointed, resumed.

PLATEAU = {"num_epochs": 4, "schedule.name": "reduce_on_plateau", "schedule.plateau_patience": 1,
           "schedule.plateau_factor": 0.5,
           # Nothing beats the first evaluation by a whole unit of accuracy: every later one
           # is a stall, so the rate halves after each evaluation from the second on.
           "early_stopping.min_delta": 1.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("plateau") / "data")
  write_image_folder(root, per_class=12)   # 27 train images: 3 steps an epoch
  return root


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  with rh.persistent_jax_cache(rh.shared_jax_cache(tmp_path_factory)):
    yield


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory, jax_cache):
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  train.train_and_evaluate(tiny_config(data, **PLATEAU), workdir)
  return workdir


def test_a_stalled_validation_metric_halves_the_logged_and_saved_rate(straight):
  rows = rh.read_jsonl(os.path.join(straight, "metrics.jsonl"))
  base = 0.03   # tiny_config's lr
  # Epoch k trains with the scale set after evaluation k - 1: 1, 1 (after the first, the
  # best), 0.5, 0.25; the val row shows the rate its epoch trained with.
  expected = [base, base, base * 0.5, base * 0.25]
  assert [r["learning_rate"] for r in rows if r["split"] == "train"] == expected
  assert [r["learning_rate"] for r in rows if r["split"] == "val"] == expected
  arrays, _ = rh.checkpoint_arrays(straight, 12)
  # The 4th evaluation's cut, saved with the state.
  assert [float(v) for k, v in arrays.items() if k == "plateau/scale"] == [0.125]


def test_a_run_stopped_after_a_cut_resumes_with_the_cut_rate_and_ends_the_same(
    data, straight, tmp_path, jax_cache):
  workdir = str(tmp_path / "run")
  config = tiny_config(data, **PLATEAU)
  # Step 8 lies in epoch 3, after the second evaluation halved the rate.
  assert train.train_and_evaluate(config, workdir, extra_hooks=[StopAt(8)])["preempted"]
  arrays, _ = rh.checkpoint_arrays(workdir, 8)
  assert [float(v) for k, v in arrays.items() if k == "plateau/scale"] == [0.5]
  train.train_and_evaluate(config, workdir)
  assert (rh.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          == rh.read_jsonl(os.path.join(straight, "metrics.jsonl")))
  for name in ("latest", "best"):
    a, _ = rh.checkpoint_arrays(workdir, which=name)
    b, _ = rh.checkpoint_arrays(straight, which=name)
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}: {k}")
  x = load_file(os.path.join(workdir, "export", "model.safetensors"))
  y = load_file(os.path.join(straight, "export", "model.safetensors"))
  for k in y:
    np.testing.assert_array_equal(x[k], y[k], err_msg=k)
