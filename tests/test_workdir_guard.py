"""A workdir belongs to one run: a second run is refused, a stale lock is taken over, damaged
checkpoints are named, moved aside and stepped over, and the run resumes from an intact one."""
import glob
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

import run_helpers as rh
from damage import flip_byte, largest_data_file, truncate
from conftest import tiny_config, write_image_folder
from jtl import train
from jtl.checkpoint import CheckpointDamagedError
from jtl.lock import LOCK_NAME
from helpers import StopAt

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
# 24 images per class x 3, no test split: 54 train / 18 val, 6 steps an epoch.
CONFIG = {"num_epochs": 2, "log_every_steps": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("guard") / "data")
  write_image_folder(root, per_class=24, splits=("train",))
  return root


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  with rh.persistent_jax_cache(rh.shared_jax_cache(tmp_path_factory)):
    yield


def _export(workdir):
  return load_file(os.path.join(workdir, "export", "model.safetensors"))


def _assert_same_export(a, b):
  x, y = _export(a), _export(b)
  assert x.keys() == y.keys()
  for k in x:
    np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_a_second_run_on_a_held_workdir_is_refused_and_the_first_is_unaffected(data, tmp_path):
  env = rh.child_env()
  held, lone = str(tmp_path / "held"), str(tmp_path / "lone")
  release = str(tmp_path / "release")  # the first run waits after step 3 until this exists
  first = rh.start(held, data, CONFIG, hooks=["--pause-after-step", f"3:{release}"], env=env)
  lone_child = rh.start(lone, data, CONFIG, env=env)
  try:
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(held, LOCK_NAME)) and time.time() < deadline:
      time.sleep(0.2)
    returncode, output = rh.run(held, data, CONFIG, env=env, timeout=240)
    open(release, "w").close()
    first_output, _ = first.communicate(timeout=300)
    lone_child.communicate(timeout=300)
  finally:
    first.kill()
    lone_child.kill()
  assert returncode != 0
  assert f"is in use by pid {first.pid} on host {socket.gethostname()}" in output, output[-2000:]
  assert "force_unlock" in output
  assert first.returncode == 0, first_output[-3000:]
  assert not os.path.exists(os.path.join(held, LOCK_NAME))  # released at the end
  _assert_same_export(held, lone)
  with open(os.path.join(held, "metrics.jsonl")) as f1, \
       open(os.path.join(lone, "metrics.jsonl")) as f2:
    assert f1.read() == f2.read()


def test_a_lock_left_by_a_dead_process_is_taken_over(data, tmp_path, caplog, jax_cache):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(os.path.join(workdir, LOCK_NAME), "w") as f:
    f.write('{"host": "%s", "pid": %d, "started": "2026-12-01 00:00:00", "run_id": "x", '
            '"token": "t"}' % (socket.gethostname(), dead.pid))
  caplog.set_level(logging.WARNING)
  final = train.train_and_evaluate(tiny_config(data, num_epochs=1), workdir)
  assert final["steps"] == 6
  assert f"pid {dead.pid}" in caplog.text and "taking over" in caplog.text


@pytest.fixture(scope="module")
def interrupted(data, tmp_path_factory, jax_cache):
  """A 3-epoch run stopped at step 9 (checkpoints of steps 6 and 9 kept)."""
  workdir = str(tmp_path_factory.mktemp("interrupted") / "run")
  config = tiny_config(data, num_epochs=3, checkpoint_every_steps=3)
  assert train.train_and_evaluate(config, workdir, extra_hooks=[StopAt(9)])["preempted"]
  assert rh.checkpoint_steps(workdir) == [6, 9]
  return workdir, config


@pytest.mark.parametrize("damage", [truncate, flip_byte])
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes_before_it(
    interrupted, tmp_path, caplog, damage):
  source, config = interrupted
  damaged, reference = str(tmp_path / "damaged"), str(tmp_path / "reference")
  shutil.copytree(source, damaged)
  shutil.copytree(source, reference)
  damage(largest_data_file(damaged, "latest", 9))
  shutil.rmtree(os.path.join(reference, "checkpoints", "latest", "9"))  # resumes from 6
  caplog.set_level(logging.INFO)
  train.train_and_evaluate(config, damaged)
  assert "step 9" in caplog.text and "damaged" in caplog.text
  assert "resumed from step 6" in caplog.text
  assert os.path.isdir(os.path.join(damaged, "checkpoints", "damaged", "latest-9"))
  train.train_and_evaluate(config, reference)
  _assert_same_export(damaged, reference)


def _damage_every_checkpoint(workdir):
  """Latest and best: a best checkpoint is resumable too, when it is intact."""
  for which in ("latest", "best"):
    for step in rh.checkpoint_steps(workdir, which):
      truncate(largest_data_file(workdir, which, step))


def test_every_checkpoint_damaged_is_one_error_and_nothing_is_deleted(interrupted, tmp_path):
  source, config = interrupted
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  _damage_every_checkpoint(workdir)
  before = sorted(os.path.getsize(f) for f in glob.glob(os.path.join(workdir, "checkpoints",
                                                                     "**", "*"), recursive=True)
                  if os.path.isfile(f))
  with pytest.raises(CheckpointDamagedError) as error:
    train.train_and_evaluate(config, workdir)
  assert "latest step 9" in str(error.value) and "latest step 6" in str(error.value)
  assert "best step" in str(error.value)
  after = sorted(os.path.getsize(f) for f in glob.glob(os.path.join(workdir, "checkpoints",
                                                                    "**", "*"), recursive=True)
                 if os.path.isfile(f))
  assert after == before  # moved aside for inspection, not deleted


def test_the_cli_ends_with_the_one_error_line_and_no_shutdown_noise(interrupted, data, tmp_path):
  source, _ = interrupted
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  _damage_every_checkpoint(workdir)
  config_file = tmp_path / "tiny.py"
  config_file.write_text(
      "import sys\n"
      f"sys.path.insert(0, {rh.TESTS!r})\n"
      "from conftest import tiny_config\n\n\n"
      "def get_config():\n"
      f"  return tiny_config({data!r}, num_epochs=3, checkpoint_every_steps=3)\n")
  result = subprocess.run([sys.executable, "-m", "jtl.main", "--config", str(config_file),
                           "--workdir", workdir], cwd=rh.REPO, env=rh.child_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith("error: ") and "damaged" in lines[-1], lines[-5:]
  assert "Traceback" not in result.stderr and "sys.meta_path is None" not in result.stderr
