"""A NaN or infinite loss: the run stops naming the step, keeps its last good checkpoint, and
never saves a non-finite state or picks a diverged model as its best; with
nonfinite_policy="skip" such steps are skipped and counted, up to max_skipped_steps.

Two causes: a poisoned batch (NaN pixels) and a learning rate of 1e30.
"""
import json
import math
import os
import re

import numpy as np
import pytest

import run_helpers as rh
from conftest import tiny_config, write_image_folder
from jtl.loop import Hook
from jtl import train

# 36 images, no test split -> 27 train, 9 val: 3 steps of 8 per epoch.
STEPS_PER_EPOCH = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("nonfinite") / "data")
  write_image_folder(root, splits=("train",))
  return root


@pytest.fixture(scope="module", autouse=True)
def jax_cache(tmp_path_factory):
  with rh.persistent_jax_cache(rh.shared_jax_cache(tmp_path_factory)):
    yield


class Poison(Hook):
  """NaN pixels in the batches of the given (1-based, counted over the whole run) steps."""

  def __init__(self, steps):
    self.steps, self.count = set(steps), 0

  def on_batch(self, loop, batch):
    self.count += 1
    if self.count in self.steps:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    return batch


def _all_checkpoints(workdir):
  """{(which, step): (arrays, meta)} of every checkpoint on disk."""
  return {(which, step): rh.checkpoint_arrays(workdir, step, which)
          for which in ("latest", "best") for step in rh.checkpoint_steps(workdir, which)}


def _assert_all_finite(checkpoints):
  assert checkpoints
  for key, (arrays, meta) in checkpoints.items():
    for name, value in arrays.items():
      # reduce_on_plateau's bookkeeping starts at +inf ("no best value yet") by design.
      if value.dtype.kind == "f" and not name.startswith("plateau/"):
        assert np.isfinite(value).all(), f"{key}: {name} is not finite"
    assert meta["best"] is None or math.isfinite(meta["best"]), key


def _failed_step(error) -> int:
  match = re.search(r"non-finite loss \(\w+\) at step (\d+)", str(error))
  assert match, str(error)
  return int(match.group(1))


def test_a_poisoned_batch_halts_at_its_step_and_the_run_resumes_from_the_last_good_one(
    data, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(data, checkpoint_every_steps=2)
  with pytest.raises(train.NonFiniteLossError) as error:
    # Epoch 2's step 5, after the checkpoints of steps 2, 3 (epoch end) and 4.
    train.train_and_evaluate(config, workdir, extra_hooks=[Poison({5})])
  assert _failed_step(error.value) == 5
  assert "last good checkpoint (step 4)" in str(error.value)
  assert rh.checkpoint_steps(workdir) == [3, 4]
  assert rh.checkpoint_steps(workdir, "best") == [3]
  _assert_all_finite(_all_checkpoints(workdir))
  assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))

  # The data is clean again: the same command resumes from step 4.
  final = train.train_and_evaluate(config, workdir)
  assert final["steps"] == 2 * STEPS_PER_EPOCH and final["skipped_steps"] == 0
  assert math.isfinite(final["test_loss"])


def test_a_huge_learning_rate_halts_before_saving_a_non_finite_state(data, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(data, checkpoint_every_steps=1, **{"optimizer.lr": 1e30})
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train_and_evaluate(config, workdir)
  step = _failed_step(error.value)
  assert 1 <= step <= 3  # one update of 1e30 is enough
  # Every step before it was saved; the non-finite one was not.
  assert max(rh.checkpoint_steps(workdir), default=0) == step - 1
  if step > 1:
    _assert_all_finite(_all_checkpoints(workdir))
    assert f"last good checkpoint (step {step - 1})" in str(error.value)


def test_skip_policy_skips_poisoned_steps_exactly_and_counts_them(data, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(data, checkpoint_every_steps=1, keep_checkpoints=100,
                       nonfinite_policy="skip", max_skipped_steps=2)
  final = train.train_and_evaluate(config, workdir, extra_hooks=[Poison({2, 5})])
  assert final["skipped_steps"] == 2 and final["steps"] == 2 * STEPS_PER_EPOCH
  checkpoints = _all_checkpoints(workdir)
  _assert_all_finite(checkpoints)

  def state(step):
    arrays, meta = checkpoints[("latest", step)]
    return {k: v for k, v in arrays.items() if k != "step"}, meta

  for skipped in (2, 5):
    before, _ = state(skipped - 1)
    after, meta = state(skipped)
    assert before.keys() == after.keys()
    for k in before:  # a skipped step changes nothing: parameters, statistics, optimizer
      np.testing.assert_array_equal(before[k], after[k], err_msg=f"step {skipped}: {k}")
    assert meta["skipped_steps"] == (1 if skipped == 2 else 2)
  changed, _ = state(3)
  assert any(not np.array_equal(changed[k], state(2)[0][k]) for k in changed)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for record in map(json.loads, f):
      assert math.isfinite(record["loss"]), record


def test_skip_policy_halts_past_max_skipped_steps(data, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(data, checkpoint_every_steps=1, keep_checkpoints=100,
                       nonfinite_policy="skip", max_skipped_steps=2,
                       **{"optimizer.lr": 1e30})
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train_and_evaluate(config, workdir)
  step = _failed_step(error.value)
  arrays, meta = rh.checkpoint_arrays(workdir, step - 1)
  assert meta["skipped_steps"] == 2  # two skipped, the third halts
  assert rh.checkpoint_steps(workdir)[-1] == step - 1
  _assert_all_finite(_all_checkpoints(workdir))


def test_a_diverged_model_is_never_chosen_as_best(data, tmp_path):
  """lr 1e30 with the skip policy: parameters stay finite (~1e30) but every prediction is NaN.

  Its validation accuracy is a number (the argmax of NaN logits), its validation loss is not.
  """
  workdir = str(tmp_path / "run")
  config = tiny_config(data, nonfinite_policy="skip", max_skipped_steps=100,
                       **{"optimizer.lr": 1e30, "early_stopping.metric": "val_accuracy"})
  final = train.train_and_evaluate(config, workdir)
  assert final["skipped_steps"] > 0
  assert not math.isfinite(final["test_loss"])
  assert final["best_step"] is None
  assert rh.checkpoint_steps(workdir, "best") == []
