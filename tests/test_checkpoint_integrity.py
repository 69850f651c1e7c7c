"""Checkpoints that prove themselves: a damaged newest checkpoint (truncated or flipped data file,
unreadable meta) is named, moved to checkpoints/damaged/ and stepped over to the intact one
before it; with none intact the error names them all and nothing is deleted."""
from __future__ import annotations

import gc
import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from damage import flip_byte, largest_data_file, truncate
from jtl.checkpoint import DIGEST_KEY, CheckpointDamagedError, Checkpoints
from jtl.errors import UserError

# When one array of a checkpoint fails to read, Orbax abandons the reads of the others, whose
# coroutines then report that same failure again as "exception ignored" when collected: collect
# them within the test (see _collect_abandoned_reads), where this filter applies.
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
