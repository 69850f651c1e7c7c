"""The engine in a child process, with test-only hooks that crash it at chosen points.

    python tests/run_helpers.py train --workdir W --data D [--config JSON] [--record DIR]
        [--sigkill-after-step K] [--sigterm-after-step K] [--sigkill-after-save K]
        [--sigkill-in-commit latest:K|best:K]

The config is tests/conftest.py's tiny_config(D, **JSON) with tiny_cnn registered. Hooks act from
inside the process so that the crash point is exact (a watcher outside would race the loop):

  --sigkill-after-step K   SIGKILL once the loss of step K has been read (needs log_every_steps=1)
  --sigterm-after-step K   SIGTERM at that point instead: the engine should save and exit
  --sigkill-after-save K   SIGKILL once the checkpoint of step K (latest and best) is complete
  --sigkill-in-commit M:K  SIGKILL in the background commit of manager M's checkpoint K, after its
                           data is written into the temporary directory and before the rename
  --slow-meta-writes S     every checkpoint's JSON item is written S seconds late (in the
                           background, as Orbax writes it)
  --pause-after-step K:FILE  wait until FILE exists (300 s at most) once the loss of step K has
                           been read (a second run is started on the workdir this one holds)

--record DIR leaves, per process p: steps.p<p>.jsonl (step, loss of every step read),
batches.p<p>.jsonl (epoch, step, label and SHA-1 of each image this process fed), reads.p<p>.jsonl
(the record ids a records:DIR run fetched while feeding training, per epoch), probes.p<p>.jsonl
(the image files its share of a folder's scan probed), writes.p<p>.txt
(files this process's Python code opened for writing under the workdir) and result.p<p>.json.

The tests also import this module for `checkpoint_arrays`, `child_env` and `run`.
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from typing import Sequence

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


# ---------------------------------------------------------------------------------------------
# Used by the tests.

def child_env(jax_cache: str | None = None, devices: int | None = None, **extra) -> dict:
  """Environment of a child run: this repo importable, TF quiet, optional shared XLA cache."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  if jax_cache:
    env["JTL_TEST_JAX_CACHE"] = jax_cache
  env.update({k: str(v) for k, v in extra.items()})
  return env


def shared_jax_cache(tmp_path_factory) -> str:
  """One XLA compilation cache for every engine test of a session: the runs compile the same
  tiny programs, and loading them instead of compiling again saves most of each run's time."""
  path = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
  path.mkdir(exist_ok=True)
  return str(path)


@contextlib.contextmanager
def persistent_jax_cache(path: str):
  """The compilation cache for in-process runs, restored to the previous setting afterwards."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def command(workdir: str, data: str, config: dict, record: str | None = None,
            hooks: Sequence[str] = ()) -> list[str]:
  args = [sys.executable, os.path.join(TESTS, "run_helpers.py"), "train", "--workdir", workdir,
          "--data", data, "--config", json.dumps(config)]
  if record:
    args += ["--record", record]
  return args + list(hooks)


def start(workdir, data, config, record=None, hooks=(), env=None) -> subprocess.Popen:
  return subprocess.Popen(command(workdir, data, config, record, hooks), cwd=REPO,
                          env=env or child_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def run(workdir, data, config, record=None, hooks=(), env=None, timeout=300):
  """Runs one child to the end; returns (returncode, output)."""
  process = start(workdir, data, config, record, hooks, env)
  output, _ = process.communicate(timeout=timeout)
  return process.returncode, output


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def checkpoint_steps(workdir: str, which: str = "latest") -> list[int]:
  """Complete checkpoints of `which` (renamed into place, so named by their step alone)."""
  path = os.path.join(workdir, "checkpoints", which)
  if not os.path.isdir(path):
    return []
  return sorted(int(name) for name in os.listdir(path) if name.isdigit())


def temporary_dirs(workdir: str) -> list[str]:
  """Orbax temporaries (interrupted saves) anywhere under the workdir's checkpoints."""
  found = []
  for root, dirs, _ in os.walk(os.path.join(workdir, "checkpoints")):
    found += [os.path.join(root, d) for d in dirs if "orbax-checkpoint-tmp" in d]
  return found


def checkpoint_arrays(workdir: str, step: int | None = None, which: str = "latest"):
  """(flat {path: np.ndarray} of the saved train state, meta dict) of one checkpoint.

  Read without a template, as a user inspecting a run would, so a broken checkpoint fails here.
  """
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  if step is None:
    step = checkpoint_steps(workdir, which)[-1]
  directory = os.path.join(os.path.abspath(workdir), "checkpoints", which, str(step))
  path = os.path.join(directory, "state")
  with ocp.PyTreeCheckpointer() as checkpointer:
    # As host arrays: the checkpoint may come from other devices than this process has.
    tree = checkpointer.metadata(path).item_metadata
    tree = getattr(tree, "tree", tree)
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = checkpointer.restore(path, restore_args=as_numpy)
  with open(os.path.join(directory, "meta", "metadata")) as f:
    meta = json.load(f)
  def name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {name(path): np.asarray(leaf) for path, leaf in leaves}, meta


# ---------------------------------------------------------------------------------------------
# The child.

def _kill(sig) -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), sig)


def _install_hooks(args, workdir: str) -> None:
  import jax
  import numpy as np
  from jtl import checkpoint, report
  from jtl import data as data_lib
  from jtl import train

  def process() -> int:
    return jax.process_index()

  def record(name: str, entry) -> None:
    if args.record:
      with open(os.path.join(args.record, f"{name}.p{process()}.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")

  real_scalars = report.RunLog.scalars

  def scalars(self, step, values):
    if "train/loss" in values:
      record("steps", {"step": int(step), "loss": values["train/loss"]})
      if step == args.sigkill_after_step:
        _kill(signal.SIGKILL)
      if step == args.sigterm_after_step:
        _kill(signal.SIGTERM)
      if args.pause_after_step and step == int(args.pause_after_step.split(":", 1)[0]):
        import time
        print(f"run_helpers: paused after step {step}", flush=True)
        release, deadline = args.pause_after_step.split(":", 1)[1], time.time() + 300
        while not os.path.exists(release) and time.time() < deadline:
          time.sleep(0.1)
    return real_scalars(self, step, values)
  report.RunLog.scalars = scalars

  real_batches = data_lib.train_batches
  feeding = {"epoch": None}  # the training epoch being fed (evaluations never overlap one)

  def train_batches(*a, **kw):
    feeding["epoch"] = kw["epoch"]
    for i, batch in enumerate(real_batches(*a, **kw)):
      images = np.asarray(batch["image"])
      record("batches", {"epoch": kw["epoch"], "step": kw.get("start_step", 0) + i,
                         "labels": np.asarray(batch["label"]).tolist(),
                         "images": [hashlib.sha1(x.tobytes()).hexdigest() for x in images]})
      yield batch
    feeding["epoch"] = None
  data_lib.train_batches = train_batches

  # The image files this process probed (a folder's scan, shared between hosts).
  from jtl.data import decode
  import threading
  real_probe, probe_lock = decode.probe_file, threading.Lock()

  def probe_file(path, *a, **kw):
    with probe_lock:
      record("probes", {"path": os.path.relpath(path, args.data)})
    return real_probe(path, *a, **kw)
  decode.probe_file = probe_file

  # Records a run reads while it feeds training (datasets read by index: records:DIR).
  from jtl.data import record_source
  real_read = record_source.RecordReader.read

  def read(self, record_ids):
    if feeding["epoch"] is not None:
      record("reads", {"epoch": feeding["epoch"], "ids": [int(i) for i in record_ids]})
    return real_read(self, record_ids)
  record_source.RecordReader.read = read

  if args.sigkill_after_save is not None:
    real_save = checkpoint.Checkpoints.save

    def save(self, step, state, meta, *, best=False):
      real_save(self, step, state, meta, best=best)
      if step == args.sigkill_after_save:
        self.wait()
        _kill(signal.SIGKILL)
    checkpoint.Checkpoints.save = save

  if args.slow_meta_writes:
    # Widens the window in which the loop runs on while a checkpoint's JSON is written.
    import asyncio
    from orbax.checkpoint._src.handlers import json_checkpoint_handler
    handler = json_checkpoint_handler.JsonCheckpointHandler
    real_save_fn = handler._save_fn

    async def slow_save_fn(self, x, directory):
      await asyncio.sleep(args.slow_meta_writes)
      return await real_save_fn(self, x, directory)
    handler._save_fn = slow_save_fn

  if args.sigkill_in_commit:
    from orbax.checkpoint._src.path import atomicity
    which, step = args.sigkill_in_commit.split(":")
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
      final = self.get_final()
      if final.name == step and final.parent.name == which:
        _kill(signal.SIGKILL)
      return await real_finalize(self)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize

  if args.record:
    # Which process writes which run files: every open-for-writing by Python code under workdir.
    real_open = builtins.open
    root = os.path.abspath(workdir)
    log_path = os.path.join(args.record, "writes.p{}.txt")

    def logging_open(file, mode="r", *a, **kw):
      if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
        path = os.path.abspath(os.fspath(file))
        if path.startswith(root + os.sep):
          with real_open(log_path.format(process()), "a") as f:
            f.write(os.path.relpath(path, root) + "\n")
      return real_open(file, mode, *a, **kw)
    builtins.open = logging_open


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["train"])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data", required=True)
  parser.add_argument("--config", default="{}")
  parser.add_argument("--record")
  parser.add_argument("--sigkill-after-step", type=int)
  parser.add_argument("--sigterm-after-step", type=int)
  parser.add_argument("--sigkill-after-save", type=int)
  parser.add_argument("--sigkill-in-commit")
  parser.add_argument("--slow-meta-writes", type=float, default=0.0)
  parser.add_argument("--pause-after-step")
  args = parser.parse_args(argv)

  import logging
  logging.basicConfig(level=logging.INFO, format="%(relativeCreated)6d %(levelname)s %(name)s: %(message)s",
                      force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-file INFO lines drown the run
  sys.path.insert(0, TESTS)
  import jax
  from conftest import tiny_config  # registers tiny_cnn
  from jtl import train

  if args.record:
    os.makedirs(args.record, exist_ok=True)
  _install_hooks(args, args.workdir)
  config = tiny_config(args.data, **json.loads(args.config))
  cache = os.environ.get("JTL_TEST_JAX_CACHE")
  with persistent_jax_cache(cache) if cache else contextlib.nullcontext():
    result = train.train_and_evaluate(config, args.workdir)
  if args.record:
    summary = {k: v for k, v in result.items() if k not in ("per_class", "confusion_matrix")}
    summary.update(device_count=jax.device_count(), process_count=jax.process_count())
    with open(os.path.join(args.record, f"result.p{jax.process_index()}.json"), "w") as f:
      json.dump(summary, f)
  print("run_helpers: done", json.dumps({"step": result.get("step", result.get("steps")),
                                         "preempted": bool(result.get("preempted"))}))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
