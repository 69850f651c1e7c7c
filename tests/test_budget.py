"""The budget rule: optimizer steps with a floor, evaluations spaced out, early stopping."""
import json
import os

import pytest

from conftest import tiny_config, write_image_folder
from jtl import train
from jtl.budget import plan_budget
from jtl.config import default_config


def _config(**values):
  c = default_config()
  for key, value in values.items():
    c[key] = value
  return c


@pytest.mark.parametrize("steps_per_epoch,expected_epochs,expected_eval_every", [
    (2, 250, 13),     # 140 images at batch 64: stretched to 500 steps, 20 evaluations at most
    (312, 10, 1),     # 20,000 images: the epochs as given, evaluated after each
    (937, 10, 1),     # 60,000 images
])
def test_small_data_gets_enough_steps_and_few_evaluations(steps_per_epoch, expected_epochs,
                                                          expected_eval_every):
  budget = plan_budget(_config(num_epochs=10, min_train_steps=500, max_evaluations=20),
                       steps_per_epoch)
  assert budget.num_epochs == expected_epochs
  assert budget.eval_every_epochs == expected_eval_every
  assert budget.total_steps >= 500
  evaluations = [e for e in range(1, budget.num_epochs + 1) if budget.evaluates_after(e)]
  assert len(evaluations) <= 20 and evaluations[-1] == budget.num_epochs


def test_train_steps_is_the_budget_rounded_up_to_whole_epochs():
  budget = plan_budget(_config(train_steps=25, num_epochs=99), 4)
  assert budget.num_epochs == 7 and budget.total_steps == 28
  accumulated = plan_budget(_config(train_steps=25, grad_accum_steps=2), 8)
  assert accumulated.optimizer_steps_per_epoch == 4 and accumulated.num_epochs == 7


def test_the_engine_runs_the_budget_and_evaluates_as_planned(tmp_path):
  data = str(tmp_path / "data")
  write_image_folder(data, per_class=8)  # 18 training images after val: 2 steps an epoch
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(
      tiny_config(data, num_epochs=1, min_train_steps=20, max_evaluations=4,
                  strategy="feature_extraction"), workdir)
  assert final["steps"] == 20
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  val = [r["epoch"] for r in rows if r["split"] == "val"]
  assert val == [3, 6, 9, 10]
  assert [r["epoch"] for r in rows if r["split"] == "train"] == list(range(1, 11))


def test_early_stopping_ends_a_long_budget(tmp_path):
  data = str(tmp_path / "data")
  write_image_folder(data, per_class=8)
  final = train.train_and_evaluate(
      tiny_config(data, train_steps=400, max_evaluations=100, strategy="feature_extraction",
                  **{"early_stopping.patience": 2, "early_stopping.metric": "val_loss",
                     "early_stopping.min_delta": 1e-3}), str(tmp_path / "run"))
  assert 0 < final["steps"] < 400
