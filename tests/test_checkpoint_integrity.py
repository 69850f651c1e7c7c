"""Checkpoints that prove themselves: a damaged newest checkpoint (truncated or flipped data file,
unreadable meta) is named, moved to checkpoints/damaged/ and stepped over to the intact one
before it; with none intact the error names them all and nothing is deleted. A resume goes on
from the newest intact checkpoint, latest or best, and Checkpoints closes in a `with` block."""
from __future__ import annotations

import gc
import json
import logging
import os
import sys
import threading

import jax.numpy as jnp
import numpy as np
import pytest

import run_helpers
from conftest import tiny_config, write_image_folder
from damage import data_files, flip_byte, largest_data_file, truncate
from jtl.checkpoint import DIGEST_KEY, CheckpointDamagedError, Checkpoints
from jtl.errors import UserError

# Garbage of other tests collected here (see _collect_abandoned_reads) may report unraisable
# exceptions of its own; that this module's failed reads report none is checked in
# test_a_failed_restore_leaves_no_read_in_flight.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_abandoned_reads():
  yield
  gc.collect()


def _state(step):
  # Random values: incompressible, so the big array is one sizeable data file of its own.
  rng = np.random.default_rng(step)
  return {"step": jnp.int32(step),
          "params": {"w": jnp.asarray(rng.normal(size=(128, 64)).astype(np.float32)),
                     "b": jnp.asarray(rng.normal(size=(7,)).astype(jnp.bfloat16))}}


def _save(workdir, steps, *, best=False):
  checkpoints = Checkpoints(workdir, keep=len(steps), async_save=False)
  for step in steps:
    meta = {"epoch": step}
    checkpoints.save(step, _state(step), meta, best=best)
    assert meta == {"epoch": step}  # the caller's meta is not changed
  checkpoints.close()


def _assert_state(state, step):
  expected = _state(step)
  assert int(state["step"]) == step
  for key in ("w", "b"):
    np.testing.assert_array_equal(np.asarray(state["params"][key]),
                                  np.asarray(expected["params"][key]))


def _damage_warnings(caplog):
  return [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]


@pytest.fixture
def workdir(tmp_path):
  path = str(tmp_path / "run")
  _save(path, [1, 2, 3])
  return path


@pytest.mark.parametrize("damage", [truncate, flip_byte], ids=["truncated", "flipped"])
def test_damaged_latest_is_set_aside_and_the_one_before_restored(workdir, damage, caplog):
  damage(largest_data_file(workdir, "latest", 3))
  checkpoints = Checkpoints(workdir)
  with caplog.at_level(logging.WARNING):
    restored = checkpoints.load(_state(0))
  assert restored.step == 2 and restored.meta == {"epoch": 2}
  _assert_state(restored.state, 2)
  assert checkpoints.latest_step() == 2
  moved = os.path.join(workdir, "checkpoints", "damaged", "latest-3")
  assert os.path.isdir(os.path.join(moved, "state"))
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "latest", "3"))
  [warning] = _damage_warnings(caplog)
  assert "latest step 3" in warning and moved in warning and "\n" not in warning
  # The reason in one line: TensorStore's read error, or the digest of wrong values.
  assert "OUT_OF_RANGE" in warning or "DATA_LOSS" in warning or "digest" in warning, warning
  if damage is truncate:
    assert "OUT_OF_RANGE" in warning
  checkpoints.close()


def test_every_checkpoint_damaged_names_them_all_and_deletes_nothing(workdir):
  for step in (1, 2, 3):
    truncate(largest_data_file(workdir, "latest", step))
  checkpoints = Checkpoints(workdir)
  with pytest.raises(CheckpointDamagedError) as e:
    checkpoints.load(_state(0))
  message = str(e.value)
  assert isinstance(e.value, UserError) and "\n" not in message
  for step in (3, 2, 1):
    moved = os.path.join(workdir, "checkpoints", "damaged", f"latest-{step}")
    assert f"step {step} (" in message and moved in message
    assert os.path.isdir(os.path.join(moved, "state"))
  assert checkpoints.latest_step() is None
  checkpoints.close()


def test_damaged_best_falls_back_to_the_previous_best(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  _save(workdir, [1, 2], best=True)
  flip_byte(largest_data_file(workdir, "best", 2))
  checkpoints = Checkpoints(workdir)
  with caplog.at_level(logging.WARNING):
    state, meta = checkpoints.restore(_state(0), which="best")
  _assert_state(state, 1)
  assert meta == {"epoch": 1}
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "damaged", "best-2"))
  assert any("best step 2" in w for w in _damage_warnings(caplog))
  _assert_state(checkpoints.load(_state(0)).state, 2)  # the latest ones are untouched
  checkpoints.close()


def test_unreadable_meta_is_skipped_by_latest_meta_and_load_alike(workdir):
  with open(os.path.join(workdir, "checkpoints", "latest", "3", "meta", "metadata"), "w") as f:
    f.write("{cut")
  checkpoints = Checkpoints(workdir)
  assert checkpoints.latest_meta() == {"epoch": 2}
  seen = []
  restored = checkpoints.load(lambda meta: seen.append(meta) or _state(0))
  assert restored.step == 2 and seen == [{"epoch": 2}]  # the template is built from its meta
  assert [(d.step, d.reason.split(":")[0]) for d in checkpoints.damaged] == [(3, "JSONDecodeError")]
  checkpoints.close()


def test_checkpoint_without_a_digest_is_accepted(workdir):
  # As written before digests existed.
  path = os.path.join(workdir, "checkpoints", "latest", "3", "meta", "metadata")
  with open(path) as f:
    meta = json.load(f)
  assert meta.pop(DIGEST_KEY).startswith("sha256:")
  with open(path, "w") as f:
    json.dump(meta, f)
  checkpoints = Checkpoints(workdir)
  restored = checkpoints.load(_state(0))
  assert restored.step == 3 and restored.meta == {"epoch": 3}
  checkpoints.close()


def test_a_template_that_does_not_fit_is_an_error_not_damage(workdir):
  wrong = _state(0)
  wrong["params"]["w"] = jnp.zeros((3, 3))
  checkpoints = Checkpoints(workdir)
  with pytest.raises(ValueError, match="shape"):
    checkpoints.load(wrong)
  assert checkpoints.damaged == [] and checkpoints.latest_step() == 3
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "damaged"))
  checkpoints.close()


def test_a_failed_restore_leaves_no_read_in_flight(tmp_path, monkeypatch):
  """Orbax ends a restore at its first failed read, with TensorStore still reading the state's
  other arrays; each read left in flight, ending, would call Orbax's closed event loop and print
  a `RuntimeError: Event loop is closed` traceback (from a TensorStore thread, at any time)."""
  workdir = str(tmp_path / "run")
  rng = np.random.default_rng(0)
  many = {f"a{i}": jnp.asarray(rng.normal(size=(64, 64)).astype(np.float32)) for i in range(40)}
  with Checkpoints(workdir, keep=3, async_save=False) as checkpoints:
    for step in (1, 2, 3):
      checkpoints.save(step, many, {"epoch": step})
  for step in (1, 2, 3):
    for path in data_files(workdir, "latest", step):
      truncate(path)
  gc.collect()  # other tests' garbage, before listening
  reported = []
  monkeypatch.setattr(sys, "unraisablehook", reported.append)
  with Checkpoints(workdir) as checkpoints:
    with pytest.raises(CheckpointDamagedError):
      checkpoints.load(many)
  gc.collect()  # abandoned coroutines would report here
  assert [f"{u.exc_type.__name__}: {u.exc_value}" for u in reported] == []


# ---------------------------------------------------------------------------------------------
# Resuming: the newest intact checkpoint, latest or best.

def _save_run(workdir, *, best_steps, latest_steps):
  """A run's checkpoints as the engine leaves them: each best step saved with its latest one
  (save(best=True)), keep_checkpoints=1 (so only the newest latest step stays)."""
  with Checkpoints(workdir, keep=1, async_save=False) as checkpoints:
    for step in sorted(set(best_steps) | set(latest_steps)):
      checkpoints.save(step, _state(step), {"epoch": step}, best=step in best_steps)


def _resume_warnings(caplog):
  return [r.getMessage() for r in caplog.records if "resuming from the best" in r.getMessage()]


def test_resume_goes_on_from_the_best_when_the_only_latest_is_damaged(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  _save_run(workdir, best_steps=[2], latest_steps=[3])
  truncate(largest_data_file(workdir, "latest", 3))
  seen = []
  with Checkpoints(workdir, keep=1, async_save=False) as checkpoints:
    with caplog.at_level(logging.WARNING):
      restored = checkpoints.load_resumable(lambda meta: seen.append(meta) or _state(0))
    assert (restored.step, restored.which, restored.meta) == (2, "best", {"epoch": 2})
    _assert_state(restored.state, 2)
    assert seen[-1] == {"epoch": 2}  # the template was built from the best's own meta
    moved = os.path.join(workdir, "checkpoints", "damaged", "latest-3")
    assert os.path.isdir(os.path.join(moved, "state"))
    assert checkpoints.latest_step() is None
    [damage] = _damage_warnings(caplog)
    assert "latest step 3" in damage and moved in damage
    [resume] = _resume_warnings(caplog)
    assert "step 2" in resume and "latest step 3 damaged" in resume
    # The resumed run saves on, into a latest/ whose steps were all set aside.
    checkpoints.discard_best_after(restored.step)
    checkpoints.save(4, _state(4), {"epoch": 4})
  with Checkpoints(workdir, async_save=False) as checkpoints:
    restored = checkpoints.load_resumable(_state(0))
    assert (restored.step, restored.which) == (4, "latest")
    _assert_state(restored.state, 4)
    assert checkpoints.load(_state(0), which="best").step == 2


def test_resume_with_every_checkpoint_damaged_names_them_all(tmp_path):
  workdir = str(tmp_path / "run")
  _save_run(workdir, best_steps=[2], latest_steps=[3])
  truncate(largest_data_file(workdir, "latest", 3))
  flip_byte(largest_data_file(workdir, "best", 2))
  with Checkpoints(workdir, async_save=False) as checkpoints:
    with pytest.raises(CheckpointDamagedError) as e:
      checkpoints.load_resumable(_state(0))
  message = str(e.value)
  assert "\n" not in message
  for which, step in (("latest", 3), ("best", 2)):
    moved = os.path.join(workdir, "checkpoints", "damaged", f"{which}-{step}")
    assert f"{which} step {step} (" in message and moved in message
    assert os.path.isdir(os.path.join(moved, "state"))


@pytest.mark.parametrize("best_steps, latest_steps", [([2], [3]), ([3], [3])],
                         ids=["latest-newer", "same-step"])
def test_resume_prefers_an_intact_latest_checkpoint(tmp_path, caplog, best_steps, latest_steps):
  workdir = str(tmp_path / "run")
  _save_run(workdir, best_steps=best_steps, latest_steps=latest_steps)
  with Checkpoints(workdir, async_save=False) as checkpoints:
    with caplog.at_level(logging.WARNING):
      restored = checkpoints.load_resumable(_state(0))
    assert (restored.step, restored.which, restored.meta) == (3, "latest", {"epoch": 3})
    _assert_state(restored.state, 3)
    assert checkpoints.damaged == [] and _resume_warnings(caplog) == []


def test_resume_takes_a_best_checkpoint_newer_than_every_latest_one(tmp_path, caplog):
  # A kill after a best checkpoint was written and before the latest one that names it.
  workdir = str(tmp_path / "run")
  _save_run(workdir, best_steps=[], latest_steps=[3])
  with Checkpoints(workdir, async_save=False) as checkpoints:
    checkpoints.save_best(5, _state(5), {"epoch": 5})
    with caplog.at_level(logging.WARNING):
      restored = checkpoints.load_resumable(_state(0))
  assert (restored.step, restored.which) == (5, "best")
  _assert_state(restored.state, 5)
  [resume] = _resume_warnings(caplog)
  assert "step 5" in resume and "no latest checkpoint at or after it" in resume


def test_resume_without_checkpoints_starts_afresh(tmp_path):
  with Checkpoints(str(tmp_path / "run")) as checkpoints:
    assert checkpoints.load_resumable(_state(0)) is None


def _threads_begun_since(before):
  return [t for t in threading.enumerate() if t not in before and t.is_alive()]


def test_leaving_the_with_block_on_an_error_closes_and_lets_the_error_through(tmp_path):
  workdir = str(tmp_path / "run")
  before = set(threading.enumerate())
  error = RuntimeError("the loop failed")
  with pytest.raises(RuntimeError) as raised:
    with Checkpoints(workdir) as checkpoints:  # asynchronous saves
      checkpoints.save(1, _state(1), {"epoch": 1}, best=True)
      checkpoints.save(2, _state(2), {"epoch": 2})
      raise error
  assert raised.value is error and checkpoints.closed
  assert _threads_begun_since(before) == []  # Orbax's threads were joined
  # The save in flight was finished, not abandoned.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest"))) == ["1", "2"]
  checkpoints.close()  # a second close does nothing



@pytest.mark.engine
def test_a_rerun_whose_only_latest_checkpoint_is_damaged_resumes_from_the_best(
    tmp_path, tmp_path_factory, caplog):
  from jtl import train  # with TensorFlow: imported by the engine test alone, not the unit ones
  data, workdir = str(tmp_path / "data"), str(tmp_path / "run")
  write_image_folder(data)
  # min_delta=1: no later evaluation beats the first, so the best checkpoint stays at epoch 1
  # while keep_checkpoints=1 leaves the last epoch's latest checkpoint alone (as
  # checkpoint_min_seconds does on a real run).
  config = tiny_config(data, num_epochs=2, keep_checkpoints=1, **{"early_stopping.min_delta": 1.0})
  with run_helpers.persistent_jax_cache(run_helpers.shared_jax_cache(tmp_path_factory)):
    first = train.train_and_evaluate(config, workdir)
    last, best = first["steps"], first["best_step"]
    assert run_helpers.checkpoint_steps(workdir) == [last]
    assert run_helpers.checkpoint_steps(workdir, "best") == [best] and best < last
    straight, _ = run_helpers.checkpoint_arrays(workdir, last)
    for path in data_files(workdir, "latest", last):
      truncate(path)
    with caplog.at_level(logging.WARNING):
      again = train.train_and_evaluate(config, workdir)
  [damage] = _damage_warnings(caplog)
  assert f"latest step {last}" in damage and "OUT_OF_RANGE" in damage
  assert any(f"resuming from the best checkpoint, step {best}" in m
             for m in _resume_warnings(caplog))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "damaged", f"latest-{last}"))
  # The steps after the best one were trained again, to the same end.
  assert (again["steps"], again["best_step"]) == (last, best)
  assert again["test_accuracy"] == first["test_accuracy"]
  redone, _ = run_helpers.checkpoint_arrays(workdir, last)
  assert redone.keys() == straight.keys()
  for key in straight:
    np.testing.assert_array_equal(redone[key], straight[key], err_msg=key)
