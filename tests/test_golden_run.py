"""Crash and resume.

A golden run trains straight through in a child process; a second workdir gets the same command
killed again and again (SIGKILL inside an asynchronous checkpoint write, mid-epoch and at an epoch
boundary; SIGTERM) and restarted each time. Its final parameters, optimizer state, logged losses and
outputs must be bit-identical to the golden run's. Augmentation (random crops, flips, mixup) is on,
so a resumed epoch must also replay the data exactly.

Then the rules for when a workdir may be resumed at all, and the errors for a workdir or a
checkpoint that cannot be written.
"""
import errno
import json
import os
import random
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import run_helpers as rh
from helpers import save_and_stop, without_timings
from conftest import tiny_config, write_image_folder
from jtl.loop import Hook
from jtl import checkpoint as checkpoint_lib
from jtl import config as config_lib
from jtl import train

# 72 images, no test split -> 54 train, 18 val (also the final evaluation): 6 steps of 8 per
# epoch, 18 steps.
# Checkpoints: every 4 steps inside an epoch (4, 8, 16) and at each epoch's end (6, 12, 18).
GOLDEN = {"num_epochs": 3, "checkpoint_every_steps": 4, "log_every_steps": 1,
          "augment.random_resized_crop": True, "augment.hflip": True,
          "augment.mixup_alpha": 0.4, "early_stopping.metric": "val_loss"}
STEPS = 18

# The kill steps that may vary are drawn afresh each session; the seed is in every message.
SEED = int(os.environ.get("JTL_TEST_KILL_SEED", random.randrange(10**6)))
_draw = random.Random(SEED)
KILL_MID_EPOCH = _draw.choice([9, 10, 11])  # epoch 2, after the checkpoint of step 8 was begun
SIGTERM_AT = _draw.choice([13, 14])         # epoch 3: the engine saves at the next step
WHY = f"(JTL_TEST_KILL_SEED={SEED}: SIGKILL after step {KILL_MID_EPOCH}, SIGTERM at {SIGTERM_AT})"

# (name, hooks) of the successive runs in the crashed workdir. Each writes its checkpoints' JSON
# late, so that a checkpoint which took the loop's later state instead of its own would show.
STAGES = [
    ("kill in the commit of best checkpoint 6", ["--sigkill-in-commit", "best:6"]),
    ("SIGKILL mid-epoch", ["--sigkill-after-step", str(KILL_MID_EPOCH)]),
    ("SIGKILL at the epoch boundary", ["--sigkill-after-save", "12"]),
    ("SIGTERM", ["--sigterm-after-step", str(SIGTERM_AT)]),
    ("to the end", []),
]
SLOW = ["--slow-meta-writes", "0.3"]


class Stage:
  def __init__(self, name, returncode, output, record, workdir):
    self.name, self.returncode, self.output, self.record = name, returncode, output, record
    self.latest_after = rh.checkpoint_steps(workdir)
    self.best_after = rh.checkpoint_steps(workdir, "best")
    self.temporaries_after = [os.path.relpath(p, workdir) for p in rh.temporary_dirs(workdir)]
    self.saved = {s: rh.checkpoint_arrays(workdir, s) for s in self.latest_after}
    # The best checkpoint that the newest complete checkpoint names (None before any eval).
    self.best_named = self.saved[self.latest_after[-1]][1]["best_step"] if self.saved else None

  def resumed_from(self) -> str | None:
    for line in self.output.splitlines():
      if "resumed from step" in line:
        return line.split("resumed from ", 1)[1]
    return None


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
  root = tmp_path_factory.mktemp("golden")
  data = str(root / "data")
  write_image_folder(data, per_class=24, splits=("train",))
  env = rh.child_env(rh.shared_jax_cache(tmp_path_factory))
  straight = str(root / "straight")
  straight_child = rh.start(straight, data, GOLDEN, str(root / "record_straight"), env=env)
  crashed = str(root / "crashed")
  stages = []
  try:
    for i, (name, hooks) in enumerate(STAGES):
      record = str(root / f"record_{i}")
      returncode, output = rh.run(crashed, data, GOLDEN, record, hooks + SLOW, env=env)
      stages.append(Stage(name, returncode, output, record, crashed))
    output, _ = straight_child.communicate(timeout=300)
  finally:
    straight_child.kill()
  assert straight_child.returncode == 0, output[-3000:]
  return {"root": str(root), "data": data, "straight": straight, "crashed": crashed,
          "stages": stages, "straight_record": str(root / "record_straight"), "env": env}


def _stage(golden, index, returncode):
  stage = golden["stages"][index]
  assert stage.returncode == returncode, (
      f"{stage.name}: exit code {stage.returncode}, expected {returncode} {WHY}\n"
      + stage.output[-3000:])
  return stage


def test_no_kill_leaves_a_checkpoint_whose_best_is_missing(golden):
  """Else a resumed run would report and export an older model as its best."""
  for stage in golden["stages"]:
    assert stage.best_named is None or stage.best_named in stage.best_after, (
        f"after '{stage.name}': checkpoint {stage.latest_after[-1]} names best step "
        f"{stage.best_named}, but checkpoints/best holds {stage.best_after} {WHY}")


def test_every_checkpoint_holds_the_position_of_its_own_step(golden):
  """Its meta (where in which epoch) must be the loop's at that step, not at a later one."""
  for stage in golden["stages"]:
    for step, (arrays, meta) in stage.saved.items():
      assert int(arrays["step"]) == step
      assert meta["epoch"] * 6 + meta["step_in_epoch"] == step, (stage.name, step, meta)


def test_kill_inside_an_asynchronous_save_resumes_from_the_last_complete_checkpoint(golden):
  first = _stage(golden, 0, -9)
  # The kill came after the data of best/6 was written and before its rename.
  assert any(t.startswith(os.path.join("checkpoints", "best", "6.orbax-checkpoint-tmp"))
             for t in first.temporaries_after), first.temporaries_after
  assert first.best_after == []
  newest = first.latest_after[-1]
  assert golden["stages"][1].resumed_from() == (
      f"step {newest} (epoch {newest // 6}, step {newest % 6} in it)")
  _stage(golden, len(STAGES) - 1, 0)
  assert rh.temporary_dirs(golden["crashed"]) == [], "an interrupted save was left behind"


def test_sigkill_mid_epoch_resumes_from_the_newest_complete_checkpoint(golden):
  stage = _stage(golden, 1, -9)
  # The save of step 8 was begun before the kill; whether it completed is up to the race.
  newest = max(stage.latest_after)
  assert newest in (6, 8), (stage.latest_after, WHY)
  expected = f"step {newest} (epoch 1, step {newest - 6} in it)"
  assert golden["stages"][2].resumed_from() == expected, WHY


def test_sigkill_at_an_epoch_boundary_resumes_at_the_next_epoch(golden):
  stage = _stage(golden, 2, -9)
  assert max(stage.latest_after) == 12 and stage.temporaries_after == []
  assert golden["stages"][3].resumed_from() == "step 12 (epoch 2, step 0 in it)"


def test_sigterm_saves_and_exits_cleanly(golden):
  stage = _stage(golden, 3, 0)
  assert "Traceback" not in stage.output, stage.output[-3000:]
  assert "stopped by SIGTERM" in stage.output
  with open(os.path.join(stage.record, "result.p0.json")) as f:
    result = json.load(f)
  assert result["preempted"] and result["step"] == SIGTERM_AT + 1, WHY
  # Complete on exit: the engine waited for the asynchronous save before returning.
  stop = SIGTERM_AT + 1
  assert max(stage.latest_after) == stop and stage.temporaries_after == [], WHY
  assert golden["stages"][4].resumed_from() == f"step {stop} (epoch 2, step {stop - 12} in it)"


def test_restarted_run_ends_bit_identical_to_the_straight_run(golden):
  _stage(golden, len(STAGES) - 1, 0)
  straight, crashed = golden["straight"], golden["crashed"]
  assert rh.checkpoint_steps(crashed) == rh.checkpoint_steps(straight) == [16, 18]
  assert rh.checkpoint_steps(crashed, "best") == rh.checkpoint_steps(straight, "best"), WHY
  for which in ("latest", "best"):
    step = rh.checkpoint_steps(straight, which)[-1]
    a, meta_a = rh.checkpoint_arrays(straight, step, which)
    b, meta_b = rh.checkpoint_arrays(crashed, step, which)
    assert a.keys() == b.keys()
    assert any("opt_state" in k for k in a) and any("batch_stats" in k for k in a)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{which} {k} {WHY}")
    meta_a.pop("train_seconds"), meta_b.pop("train_seconds")
    assert meta_a == meta_b, WHY
  with open(os.path.join(straight, "metrics.jsonl")) as f1, \
       open(os.path.join(crashed, "metrics.jsonl")) as f2:
    assert f1.read() == f2.read(), WHY
  finals = []
  for workdir in (straight, crashed):
    with open(os.path.join(workdir, "final_metrics.json")) as f:
      final = json.load(f)
    finals.append(without_timings(final))
  assert finals[0] == finals[1], WHY
  exported = [load_file(os.path.join(w, "export", "model.safetensors"))
              for w in (straight, crashed)]
  assert exported[0].keys() == exported[1].keys()
  for k in exported[0]:
    np.testing.assert_array_equal(exported[0][k], exported[1][k], err_msg=f"export {k} {WHY}")


def test_every_replayed_step_has_the_golden_batch_and_loss(golden):
  """Every step any of the killed runs took, including those redone after a restart."""
  def by_step(record, name, key):
    return [(e["step"] if name == "steps" else (e["epoch"], e["step"]), e[key])
            for e in rh.read_jsonl(os.path.join(record, f"{name}.p0.jsonl"))]
  golden_losses = dict(by_step(golden["straight_record"], "steps", "loss"))
  golden_batches = dict(by_step(golden["straight_record"], "batches", "images"))
  assert sorted(golden_losses) == list(range(1, STEPS + 1))
  seen = set()
  for stage in golden["stages"]:
    for step, loss in by_step(stage.record, "steps", "loss"):
      assert loss == golden_losses[step], f"{stage.name}: step {step} {WHY}"
      seen.add(step)
    for key, images in by_step(stage.record, "batches", "images"):
      assert images == golden_batches[key], f"{stage.name}: batch {key} {WHY}"
  assert seen == set(golden_losses)


# ---------------------------------------------------------------------------------------------
# When a workdir may be resumed.

@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  with rh.persistent_jax_cache(rh.shared_jax_cache(tmp_path_factory)):
    yield


def _golden_config(golden, **overrides):
  return tiny_config(golden["data"], **{**GOLDEN, **overrides})


def _listing(workdir):
  return sorted((os.path.relpath(os.path.join(d, f), workdir), os.path.getmtime(os.path.join(d, f)))
                for d, _, files in os.walk(workdir) for f in files)


@pytest.mark.parametrize("key,value", [("model", "tiny_cnn_wide"), ("num_classes", 4),
                                       ("dataset", "folder:/elsewhere"), ("image_size", 24)])
def test_a_run_with_another_model_classes_or_data_refuses_to_resume(golden, key, value):
  workdir = golden["straight"]
  before = _listing(workdir)
  config = _golden_config(golden, num_epochs=5, **{key: value})
  with pytest.raises(config_lib.ConfigError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert f"{key}: saved" in message and repr(value) in message and workdir in message
  assert "num_epochs" not in message  # more epochs is a legitimate way to continue a run
  assert "resume=false" in message
  assert _listing(workdir) == before


def test_resume_false_starts_over(golden, tmp_path, jax_cache):
  workdir = str(tmp_path / "run")
  shutil.copytree(golden["straight"], workdir)
  train.train_and_evaluate(_golden_config(golden, num_epochs=1, resume="false"), workdir)
  assert rh.checkpoint_steps(workdir) == [4, 6]
  assert rh.checkpoint_steps(workdir, "best") == [6]
  golden_records = rh.read_jsonl(os.path.join(golden["straight"], "metrics.jsonl"))
  assert rh.read_jsonl(os.path.join(workdir, "metrics.jsonl")) == golden_records[:2]


def test_preempted_on_the_last_step_of_an_epoch_resumes_to_the_same_run(golden, tmp_path,
                                                                        monkeypatch, jax_cache):
  """Stopped after step 6, before epoch 1's evaluation; the restart evaluates and saves step 6
  again (the SIGTERM itself is tested above; here the loop is told to stop at that step)."""
  workdir = str(tmp_path / "run")
  config = _golden_config(golden, num_epochs=1)
  class StopAt(Hook):  # what Preemption does on SIGTERM, at a chosen step
    def after_step(self, loop, step):
      if step == 6:
        save_and_stop(loop)
  assert train.train_and_evaluate(config, workdir, extra_hooks=[StopAt()]) == {
      "preempted": True, "step": 6}
  assert rh.checkpoint_arrays(workdir, 6)[1]["step_in_epoch"] == 6
  train.train_and_evaluate(config, workdir)
  golden_records = rh.read_jsonl(os.path.join(golden["straight"], "metrics.jsonl"))
  assert rh.read_jsonl(os.path.join(workdir, "metrics.jsonl")) == golden_records[:2]
  _, meta = rh.checkpoint_arrays(workdir, 6)
  assert (meta["epoch"], meta["step_in_epoch"], meta["finished"]) == (1, 0, True)


def test_resume_true_without_a_checkpoint_is_an_error(golden, tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError, match="resume=true.*no checkpoint"):
    train.train_and_evaluate(_golden_config(golden, resume="true"), str(workdir))
  assert not (workdir / "checkpoints").exists()
  # An interrupted save is not a checkpoint either.
  (workdir / "checkpoints" / "latest" / "8.orbax-checkpoint-tmp-1234").mkdir(parents=True)
  with pytest.raises(config_lib.ConfigError, match="resume=true.*no checkpoint"):
    train.train_and_evaluate(_golden_config(golden, resume="true"), str(workdir))


def test_a_workdir_that_cannot_be_created_or_written(golden, tmp_path, monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  for workdir in (blocker, blocker / "run"):
    with pytest.raises(train.WorkdirError, match=f"workdir {workdir} cannot be created"):
      train.train_and_evaluate(_golden_config(golden), str(workdir))
  # Permissions: root ignores chmod, so the refusal is simulated where the engine probes.
  real_open = open

  def refusing_open(path, mode="r", *args, **kwargs):
    if "w" in mode and str(tmp_path / "readonly") in str(path):
      raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return real_open(path, mode, *args, **kwargs)
  monkeypatch.setattr("builtins.open", refusing_open)
  workdir = tmp_path / "readonly"
  with pytest.raises(train.WorkdirError, match="readonly cannot be created or written.*denied"):
    train.train_and_evaluate(_golden_config(golden), str(workdir))
  monkeypatch.undo()
  assert os.listdir(workdir) == []


def _fail_checkpoint(monkeypatch, which: str, step: int, error: Exception):
  """Makes the background write of checkpoint `step` of `which` fail with `error`."""
  from orbax.checkpoint._src.path import atomicity
  real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    final = self.get_final()
    if final.name == str(step) and final.parent.name == which:
      raise error
    return await real_finalize(self)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    # What a full disk looks like when TensorStore writes the arrays.
    ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device "
               "[os_error_code='28']"),
], ids=["oserror", "tensorstore"])
def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_last_good_one(
    golden, tmp_path, monkeypatch, jax_cache, error):
  workdir = str(tmp_path / "run")
  config = _golden_config(golden, num_epochs=1, checkpoint_every_steps=2)
  _fail_checkpoint(monkeypatch, "latest", 4, error)
  with pytest.raises(checkpoint_lib.CheckpointWriteError) as raised:
    train.train_and_evaluate(config, workdir)
  message = str(raised.value)
  assert "checkpoint of step 4" in message and "No space left" in message
  assert "last complete checkpoint (step 2) is intact" in message
  assert rh.checkpoint_steps(workdir) == [2]
  arrays, meta = rh.checkpoint_arrays(workdir, 2)
  assert meta["step_in_epoch"] == 2 and int(arrays["step"]) == 2
  assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))
