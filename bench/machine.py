"""What the machine was and what else it was doing while a bench measured, and where results go.

The machine may be shared, so every figure travels with the load average and with the CPU that
other processes took while it was measured; each bench script replaces only its own keys of
results.json.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(BENCH, "results.json")


class OtherJobs:
  """Cores' worth of CPU that other processes used while the block ran (None off Linux).

  The load average lags by a minute and counts the bench itself; the machine's busy time from
  /proc/stat minus this process's and its children's CPU time is what disturbed the timing.
  Children count once waited for, so a subprocess must have finished inside the block.
  """

  def __enter__(self):
    self._start = self._snapshot()
    self.cores = None
    self.wall = None
    return self

  def __exit__(self, *exc):
    end = self._snapshot()
    self.wall = end[0] - self._start[0]
    if end[1] is not None and self._start[1] is not None and self.wall > 0:
      others = (end[1] - self._start[1]) - (end[2] - self._start[2])
      self.cores = max(others / self.wall, 0.0)

  @staticmethod
  def _snapshot():
    own = sum(os.times()[:4])  # user and system, self and waited-for children
    try:
      with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
      return time.perf_counter(), None, own
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own


def load_1min() -> float:
  return os.getloadavg()[0]


def load_line() -> str:
  """The load as `uptime` shows it (1 / 5 / 15 min)."""
  one, five, fifteen = os.getloadavg()
  return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def cores(value) -> str:
  return "n/a" if value is None else f"{value:.2f}"


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def describe() -> dict:
  """The machine section of a result: enough to tell two machines of one kind apart."""
  import jax  # late: machine.py is also used by scripts that never load jax themselves
  return {"platform": platform.platform(), "processor": cpu_model(), "cpus": os.cpu_count(),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "devices": jax.device_count()}


def now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def update_results(values: dict, path: str = RESULTS) -> None:
  """Replaces the top-level keys in `values` in results.json, keeping every other key: the
  step cases (run.py) own date, machine, ... and cases; each other script one key of its own.

  Written to a temporary sibling and renamed, so a reader never sees half a file.
  """
  results = {}
  if os.path.isfile(path):
    with open(path) as f:
      results = json.load(f)
  results.update(values)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".results-", suffix=".json", dir=directory)
  with os.fdopen(fd, "w") as f:
    json.dump(results, f, indent=2)
  os.replace(tmp, path)
