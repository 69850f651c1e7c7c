"""A whole jtl run as a user starts it: `python -m jtl.main --config ...` in its own process.

The wall time is the process's, from start to exit (imports, the folder scan, weights, the
feature cache, training, the test evaluation and the export). Every run gets a fresh workdir
and a fresh feature-cache directory, so nothing a previous run left makes it look faster.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(config: str, workdir: str, overrides: dict, *, cache_dir: str | None = None) -> dict:
  """Runs jtl.main with `--config.key=value` overrides; its final_metrics.json plus wall_s.

  cache_dir: where the feature cache goes (emptied first; None: a fresh one beside workdir).
  The process's stderr (jtl's log) is kept in <workdir>.log.
  """
  workdir = os.path.abspath(workdir)  # the run's cwd is the repository
  shutil.rmtree(workdir, ignore_errors=True)
  cache_dir = os.path.abspath(cache_dir or workdir + ".cache")
  shutil.rmtree(cache_dir, ignore_errors=True)
  settings = {"feature_cache.dir": cache_dir, "progress_bar": False, **overrides}
  command = [sys.executable, "-m", "jtl.main", "--config", config, "--workdir", workdir]
  command += [f"--config.{k}={v}" for k, v in settings.items()]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  start = time.perf_counter()
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
  wall = time.perf_counter() - start
  with open(workdir + ".log", "w") as f:  # the run's own log, timestamped: where the time went
    f.write(done.stderr)
  shutil.rmtree(cache_dir, ignore_errors=True)  # never reused, and hundreds of MB
  if done.returncode != 0:
    raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n"
                       + (done.stderr or done.stdout)[-3000:])
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    final = json.load(f)
  keep = ("test_accuracy", "train_seconds", "steps", "feature_cache", "trainable_params",
          "best_step", "head_solver", "linear_probe")
  return {"wall_s": wall, **{k: final.get(k) for k in keep}, "command": command[1:]}
