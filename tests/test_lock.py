"""One run per workdir: a held lock refuses a second run in one line naming the holder; a stale
lock (its process gone) is taken over with a warning; force takes any; release removes only our
own; of eight processes racing for one workdir exactly one wins."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from jtl.errors import UserError
from jtl.lock import LOCK_NAME, WorkdirBusyError, WorkdirLock

JTL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jtl")

# A racer: jtl/lock.py alone, without jtl/__init__ (which imports every model family and would
# make each of the eight children take seconds), then one attempt once the "go" file appears.
RACER = f"""
import os, sys, time, types
pkg = types.ModuleType("jtl"); pkg.__path__ = [{JTL_DIR!r}]; sys.modules["jtl"] = pkg
from jtl.lock import WorkdirBusyError, WorkdirLock
workdir, go = sys.argv[1], sys.argv[2]
while not os.path.exists(go):
  time.sleep(0.001)
try:
  with WorkdirLock(workdir):
    print("got", os.getpid(), flush=True)
    sys.stdin.read()  # hold it until the test has heard from every racer
except WorkdirBusyError as e:
  print("busy", e, flush=True)
"""


def _write_lock(workdir, pid, host=None, **extra):
  """A lock file as another run would have left it."""
  holder = {"host": host or socket.gethostname(), "pid": pid, "started": "2026-12-01 12:00:00",
            "run_id": "other-run", "token": "other-token", **extra}
  with open(os.path.join(workdir, LOCK_NAME), "w") as f:
    json.dump(holder, f)


def _read_lock(workdir):
  with open(os.path.join(workdir, LOCK_NAME)) as f:
    return json.load(f)


@pytest.fixture
def live_pid():
  child = subprocess.Popen(["sleep", "60"])
  yield child.pid
  child.kill()
  child.wait()


def _exited_pid():
  child = subprocess.Popen(["true"])
  child.wait()  # reaped: the pid names no process now
  return child.pid


def test_lock_file_names_this_run_and_is_removed_on_exit(tmp_path):
  with WorkdirLock(str(tmp_path), run_id="r1") as lock:
    held = _read_lock(tmp_path)
    assert lock.held
    assert (held["pid"], held["host"], held["run_id"]) == (os.getpid(), socket.gethostname(), "r1")
    time.strptime(held["started"], "%Y-%m-%d %H:%M:%S")
  assert not os.path.exists(tmp_path / LOCK_NAME)
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_second_run_on_a_held_workdir_is_refused_in_one_line(tmp_path, live_pid):
  workdir = str(tmp_path / "x")
  os.makedirs(workdir)
  _write_lock(workdir, live_pid, host="h")
  with pytest.raises(WorkdirBusyError) as e:
    WorkdirLock(workdir).acquire()
  message = str(e.value)
  assert isinstance(e.value, UserError)
  assert message == (f"workdir {workdir} is in use by pid {live_pid} on host h since "
                     f"2026-12-01 12:00:00 (lock {workdir}/{LOCK_NAME}); if that run is gone "
                     "from another host, rerun with --config.force_unlock=true")
  assert _read_lock(workdir)["pid"] == live_pid  # untouched


def test_live_holder_on_this_host_is_not_taken_over(tmp_path, live_pid):
  _write_lock(str(tmp_path), live_pid)
  with pytest.raises(WorkdirBusyError, match=f"pid {live_pid} on host {socket.gethostname()}"):
    WorkdirLock(str(tmp_path)).acquire()


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()} "):
      WorkdirLock(str(tmp_path)).acquire()
    assert os.path.exists(tmp_path / LOCK_NAME)


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
  dead = _exited_pid()
  _write_lock(str(tmp_path), dead)
  with caplog.at_level(logging.WARNING):
    with WorkdirLock(str(tmp_path), run_id="mine"):
      assert _read_lock(tmp_path)["run_id"] == "mine"
  warnings = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
  assert len(warnings) == 1 and f"pid {dead} on host {socket.gethostname()}" in warnings[0]
  assert not os.path.exists(tmp_path / LOCK_NAME)


def test_reused_pid_counts_as_stale(tmp_path):
  # A restarted container numbers its processes again: the lock's pid may now be our own.
  _write_lock(str(tmp_path), os.getpid(), pid_start=1)
  with WorkdirLock(str(tmp_path), run_id="mine"):
    assert _read_lock(tmp_path)["run_id"] == "mine"


def test_lock_of_another_host_is_not_judged_stale(tmp_path):
  _write_lock(str(tmp_path), _exited_pid(), host="elsewhere")
  with pytest.raises(WorkdirBusyError, match="on host elsewhere"):
    WorkdirLock(str(tmp_path)).acquire()


def test_force_takes_a_held_lock(tmp_path, live_pid, caplog):
  _write_lock(str(tmp_path), live_pid, host="elsewhere")
  with caplog.at_level(logging.WARNING):
    with WorkdirLock(str(tmp_path), force=True, run_id="mine"):
      assert _read_lock(tmp_path)["run_id"] == "mine"
  assert any("force_unlock" in r.getMessage() and f"pid {live_pid} on host elsewhere"
             in r.getMessage() for r in caplog.records)


def test_unreadable_lock_is_refused_unless_forced(tmp_path):
  (tmp_path / LOCK_NAME).write_text("{not json")
  with pytest.raises(WorkdirBusyError, match="cannot be read"):
    WorkdirLock(str(tmp_path)).acquire()
  with WorkdirLock(str(tmp_path), force=True, run_id="mine"):
    assert _read_lock(tmp_path)["run_id"] == "mine"


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path, live_pid, caplog):
  lock = WorkdirLock(str(tmp_path))
  lock.acquire()
  _write_lock(str(tmp_path), live_pid)  # as a forced takeover by another run would
  with caplog.at_level(logging.WARNING):
    lock.release()
  assert _read_lock(tmp_path)["pid"] == live_pid
  assert any("left in place" in r.getMessage() for r in caplog.records)
  lock.release()  # a second release does nothing


def test_other_hosts_verify_the_lock_of_their_run(tmp_path):
  calls = []
  host0 = WorkdirLock(str(tmp_path), run_id="run-7", process_index=0, process_count=2,
                      barrier=lambda: calls.append(0))
  host1 = WorkdirLock(str(tmp_path), run_id="run-7", process_index=1, process_count=2,
                      barrier=lambda: calls.append(1))
  with host0:
    with host1:
      assert not host1.held
    assert calls == [0, 1] and os.path.exists(tmp_path / LOCK_NAME)  # host 1 removes nothing
    with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()}"):
      WorkdirLock(str(tmp_path), run_id="run-8", process_index=1, process_count=2,
                  verify_timeout_s=0.2).verify_shared()
  with pytest.raises(RuntimeError, match="took no lock"):
    WorkdirLock(str(tmp_path), run_id="run-7", process_index=1, process_count=2,
                verify_timeout_s=0.2).verify_shared()
  with pytest.raises(ValueError, match="run_id"):
    WorkdirLock(str(tmp_path), process_count=2)


def test_refused_host0_still_meets_the_other_hosts_at_the_barrier(tmp_path, live_pid):
  _write_lock(str(tmp_path), live_pid)
  calls = []
  with pytest.raises(WorkdirBusyError, match=f"pid {live_pid} "):
    with WorkdirLock(str(tmp_path), run_id="run-9", process_index=0, process_count=2,
                     barrier=lambda: calls.append(0)):
      pass
  assert calls == [0]


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_exactly_one_of_eight_racers_gets_the_workdir(tmp_path, stale):
  workdir, go = str(tmp_path / "run"), str(tmp_path / "go")
  os.makedirs(workdir)
  if stale:  # all eight find the same stale lock and try to take it over at once
    _write_lock(workdir, _exited_pid())
  racers = [subprocess.Popen([sys.executable, "-c", RACER, workdir, go], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(8)]
  try:
    time.sleep(0.3)  # let them all start polling
    open(go, "w").close()
    lines = [r.stdout.readline().strip() for r in racers]
  finally:
    for r in racers:
      r.stdin.close()  # the winner lets go, and every racer exits
    errors = [r.stderr.read() for r in racers]
    for r in racers:
      r.wait(timeout=30)
  winners = [line for line in lines if line.startswith("got")]
  assert len(winners) == 1, (lines, errors)
  winner_pid = winners[0].split()[1]
  assert all(line.startswith("busy") and f"pid {winner_pid} " in line
             for line in lines if line not in winners), lines
  assert not os.path.exists(os.path.join(workdir, LOCK_NAME))
