"""The PyTorch side: the yardstick `seed_torch_loop.py`, run in a subprocess of a torch environment.

The yardstick lives beside the repository (../shared/bench/seed_torch_loop.py, override with
$JTL_TORCH_YARDSTICK), never inside it, and runs with $JTL_TORCH_PYTHON, else
/tmp/torchenv/bin/python. torch is never a jtl dependency: without either, benches time jtl only.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_YARDSTICK = os.path.join(REPO, os.pardir, "shared", "bench", "seed_torch_loop.py")
DEFAULT_TORCH_PYTHON = "/tmp/torchenv/bin/python"


class Yardstick:
  """Where the torch side runs: `python yardstick ...`."""

  def __init__(self, python: str, path: str):
    self.python = python
    self.path = path

  @classmethod
  def find(cls) -> tuple["Yardstick | None", str]:
    """(the yardstick, "") or (None, why it is unavailable)."""
    path = os.path.abspath(os.environ.get("JTL_TORCH_YARDSTICK", DEFAULT_YARDSTICK))
    python = os.environ.get("JTL_TORCH_PYTHON") or (
        DEFAULT_TORCH_PYTHON if os.path.exists(DEFAULT_TORCH_PYTHON) else None)
    if python is None:
      return None, "no torch environment ($JTL_TORCH_PYTHON or /tmp/torchenv)"
    if not os.path.isfile(path):
      return None, f"no yardstick at {path} (set $JTL_TORCH_YARDSTICK)"
    return cls(python, path), ""

  def __str__(self) -> str:
    return f"{self.path} via {self.python}"

  def _run(self, *args: str) -> dict:
    command = [self.python, self.path, *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n"
                         + done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])

  def step_seconds(self, model_name: str, strategy: str, res: int, batch_size: int,
                   steps: int) -> dict:
    """The yardstick's own median step time (after its two warm-up steps)."""
    result = self._run("step", "--model", model_name, "--strategy", strategy,
                       "--batch", str(batch_size), "--res", str(res), "--steps", str(steps))
    return {"s_per_step": result["s_per_step"], "threads": result.get("threads")}

  def whole_run(self, model_name: str, strategy: str, data: str, res: int,
                epochs: int) -> dict:
    """A whole training run on a folder; wall_s is the process's, start-up included."""
    start = time.perf_counter()
    result = self._run("run", "--model", model_name, "--strategy", strategy, "--data", data,
                       "--res", str(res), "--epochs", str(epochs))
    return {"wall_s": time.perf_counter() - start, "test_accuracy": result["test_accuracy"],
            "inner_wall_s": result["wall_s"], "train_images": result["train_images"]}
