"""checkpoint_min_seconds: evaluations inside the interval save nothing, a better model found
there is held and written before the next latest checkpoint, and neither the straight run nor
a preempted-and-resumed one ends differently from a run that saves at every evaluation."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import tiny_config, write_image_folder
from helpers import StopAt, without_timings
from jtl import train

NEVER_DUE = 1e9  # seconds: inside a test run only the end (or SIGTERM) saves


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("policy") / "images"
  write_image_folder(str(root))
  return str(root)


EPOCHS = 6


def _config(folder, **overrides):
  # 27 training images at batch 8: 3 steps an epoch, an evaluation after each epoch.
  return tiny_config(folder, num_epochs=EPOCHS, **overrides)


def _steps(workdir, which):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints", which))
                if n.isdigit())


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _export(workdir):
  return load_file(os.path.join(workdir, "export", "model.safetensors"))


def _assert_same_export(a, b):
  ea, eb = _export(a), _export(b)
  assert sorted(ea) == sorted(eb)
  for k in ea:
    np.testing.assert_array_equal(ea[k], eb[k], err_msg=k)


@pytest.fixture(scope="module")
def every_evaluation(folder, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("every") / "run")
  final = train.train_and_evaluate(_config(folder), workdir)
  return workdir, final


def test_without_an_interval_every_evaluation_saves(every_evaluation):
  workdir, final = every_evaluation
  last, per_epoch = final["steps"], final["steps"] // EPOCHS
  assert _steps(workdir, "latest") == [last - per_epoch, last]  # keep_checkpoints=2
  assert final["best_step"] in _steps(workdir, "best")


def test_inside_the_interval_only_the_end_saves_and_the_best_is_held(folder, every_evaluation,
                                                                      tmp_path):
  reference, final_every = every_evaluation
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(_config(folder, checkpoint_min_seconds=NEVER_DUE), workdir)
  assert _steps(workdir, "latest") == [final["steps"]]
  # The best model was held in memory since its evaluation and written at the end; the run
  # reports and exports the same model as the one that saved every time.
  assert final["best_step"] == final_every["best_step"] < final["steps"]
  assert _steps(workdir, "best") == [final["best_step"]]
  assert without_timings(final) == without_timings(final_every)
  _assert_same_export(workdir, reference)


def test_a_preempted_run_writes_the_held_best_first_and_resumes_to_the_same_end(
    folder, every_evaluation, tmp_path):
  reference, final_every = every_evaluation
  best_step = final_every["best_step"]
  stop = best_step + 1  # after the best's evaluation, before the run's end
  if stop >= final_every["steps"]:
    pytest.skip("the best model is the last one: nothing is held back")
  workdir = str(tmp_path / "run")
  config = _config(folder, checkpoint_min_seconds=NEVER_DUE)
  train.train_and_evaluate(config, workdir, extra_hooks=[StopAt(stop)])
  assert _steps(workdir, "latest") == [stop]
  assert _steps(workdir, "best") == [best_step]  # written before the latest that names it
  final = train.train_and_evaluate(config, workdir)
  assert without_timings(final) == without_timings(final_every)
  assert _rows(workdir) == _rows(reference)
  _assert_same_export(workdir, reference)
