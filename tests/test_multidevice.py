"""Data parallel over 8 devices (forced CPU devices in a child process) trains the same model
as 1 device with the same global batch: the batch is split over the devices, BatchNorm statistics
and gradients are still those of the whole batch.
"""
import json
import os

import numpy as np
import pytest

import run_helpers as rh
from conftest import tiny_config, write_image_folder
from jtl import train

# 27 train images: 3 steps of 8 per epoch, 6 steps. One example per device and step. SGD: its
# update is linear in the gradient, where Adam's m / sqrt(v) magnifies rounding in the gradients
# that are near zero; any real difference (statistics per device, a wrong split) is far larger.
CONFIG = {"num_epochs": 2, "batch_size": 8, "eval_batch_size": 8, "checkpoint_every_steps": 0,
          "optimizer.name": "sgd", "optimizer.lr": 0.1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multidevice")
  data = str(root / "data")
  write_image_folder(data, splits=("train",))
  cache = rh.shared_jax_cache(tmp_path_factory)
  many = str(root / "eight")
  record = str(root / "record")
  child = rh.start(many, data, CONFIG, record, env=rh.child_env(cache, devices=8))
  try:
    one = str(root / "one")
    with rh.persistent_jax_cache(cache):  # in this process: one CPU device
      train.train_and_evaluate(tiny_config(data, **CONFIG), one)
    output, _ = child.communicate(timeout=300)
  finally:
    child.kill()
  assert child.returncode == 0, output[-3000:]
  with open(os.path.join(record, "result.p0.json")) as f:
    result = json.load(f)
  return {"one": one, "many": many, "result": result}


def test_the_child_trained_on_eight_devices(runs):
  import jax
  assert jax.device_count() == 1
  assert runs["result"]["device_count"] == 8 and runs["result"]["steps"] == 6


def test_eight_devices_reach_the_parameters_of_one(runs):
  one, _ = rh.checkpoint_arrays(runs["one"])
  many, _ = rh.checkpoint_arrays(runs["many"])
  assert one.keys() == many.keys()
  assert int(one["step"]) == int(many["step"]) == 6
  for k in one:
    if one[k].dtype.kind == "f":
      # Only the order of the sums differs (observed: at most 5e-6 absolute, on values ~3).
      np.testing.assert_allclose(many[k], one[k], rtol=1e-5, atol=1e-5, err_msg=k)
    else:
      np.testing.assert_array_equal(many[k], one[k], err_msg=k)


def test_eight_devices_log_the_losses_of_one(runs):
  records = [rh.read_jsonl(os.path.join(runs[w], "metrics.jsonl")) for w in ("one", "many")]
  assert [(r["step"], r["split"]) for r in records[0]] == [(r["step"], r["split"])
                                                          for r in records[1]]
  for a, b in zip(*records):
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
    assert b["accuracy"] == pytest.approx(a["accuracy"])
