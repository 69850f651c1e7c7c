"""Two processes on this machine joined by jax.distributed on a loopback coordinator (CPU
collectives through gloo), as the hosts of a TPU VM pod or a multi-GPU cluster would be.

Both hosts must see the same losses while each feeds a distinct half of every global batch; only
host 0 writes the run's files; Orbax writes one checkpoint per step; SIGTERM on one host stops both
at the same step; a restart restores on both.
"""
import json
import os

import pytest

import run_helpers as rh
from helpers import without_timings
from conftest import write_image_folder

# 27 train images: 3 global steps of 8 per epoch, 4 examples per host and step.
CONFIG = {"num_epochs": 2, "batch_size": 8, "eval_batch_size": 8, "log_every_steps": 1,
          "distributed": True, "num_processes": 2}
HOSTS = 2


def _run_hosts(workdir, data, config, record, env, hooks=((), ())):
  """Starts both hosts, waits for both; one failing must not leave the other waiting forever."""
  port = rh.free_port()
  children = [rh.start(workdir, data, {**config, "coordinator_address": f"127.0.0.1:{port}",
                                       "process_id": i}, record, hooks[i], env=env)
              for i in range(HOSTS)]
  outputs = []
  try:
    for child in children:
      outputs.append(child.communicate(timeout=180)[0])
  finally:
    for child in children:
      child.kill()
  for i, child in enumerate(children):
    assert child.returncode == 0, f"host {i}:\n" + outputs[i][-4000:]
  return outputs


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  data = str(root / "data")
  write_image_folder(data, splits=("train",))
  env = rh.child_env(rh.shared_jax_cache(tmp_path_factory))
  workdir = str(root / "run")
  # Preemption: host 0 alone gets SIGTERM, after step 1. JAX tells host 1, and both save the
  # same step (which one depends on when the notice arrives) and exit.
  first = _run_hosts(workdir, data, CONFIG, str(root / "first"), env,
                     (["--sigterm-after-step", "1"], []))
  after_first = rh.checkpoint_steps(workdir)
  with open(root / "first" / "result.p0.json") as f:
    stop = json.load(f)["step"]
  # The same command again: both hosts restore that step and finish the run.
  second = _run_hosts(workdir, data, CONFIG, str(root / "second"), env)
  return {"workdir": workdir, "first": str(root / "first"), "second": str(root / "second"),
          "outputs": (first, second), "after_first": after_first, "stop": stop}


def _per_host(record, name):
  return [rh.read_jsonl(os.path.join(record, f"{name}.p{i}.jsonl")) for i in range(HOSTS)]


def test_both_hosts_joined_one_run(hosts):
  for run in ("first", "second"):
    results = []
    for i in range(HOSTS):
      with open(os.path.join(hosts[run], f"result.p{i}.json")) as f:
        results.append(json.load(f))
      assert results[-1]["process_count"] == HOSTS and results[-1]["device_count"] == HOSTS
    results = [without_timings(r) for r in results]
    assert results[0] == results[1]  # the same stop step; the same gathered evaluation
  assert results[0]["steps"] == 6


def test_sigterm_on_one_host_stops_both_at_the_same_step(hosts):
  assert 2 <= hosts["stop"] < 6
  for output in hosts["outputs"][0]:
    assert f"stopped by SIGTERM at step {hosts['stop']}" in output
    assert "Traceback" not in output
  assert hosts["after_first"][-1] == hosts["stop"]


def test_both_hosts_log_the_same_losses(hosts):
  stop = hosts["stop"]
  for run, steps in (("first", range(1, stop + 1)), ("second", range(stop + 1, 7))):
    losses = _per_host(hosts[run], "steps")
    assert [e["step"] for e in losses[0]] == list(steps)
    assert losses[0] == losses[1]


def test_each_host_reads_a_distinct_shard(hosts):
  batches = [a + b for a, b in zip(_per_host(hosts["first"], "batches"),
                                   _per_host(hosts["second"], "batches"))]
  assert [(b["epoch"], b["step"]) for b in batches[0]] == [(0, 0), (0, 1), (0, 2), (1, 0),
                                                           (1, 1), (1, 2)]
  for b0, b1 in zip(*batches):
    assert (b0["epoch"], b0["step"]) == (b1["epoch"], b1["step"])
    assert len(b0["images"]) == len(b1["images"]) == 4
    assert not set(b0["images"]) & set(b1["images"]), "both hosts fed the same images"
  for epoch in (0, 1):  # together the hosts use each example at most once per epoch
    images = [i for host in batches for b in host if b["epoch"] == epoch for i in b["images"]]
    assert len(set(images)) == len(images) == 24


def test_each_host_probes_its_share_of_the_folder(hosts):
  for run in ("first", "second"):
    probed = [[e["path"] for e in rh.read_jsonl(os.path.join(hosts[run], f"probes.p{i}.jsonl"))]
              for i in range(HOSTS)]
    assert len(probed[0]) == len(probed[1]) == 18  # 36 files, each probed once, by one host
    assert not set(probed[0]) & set(probed[1])


def test_only_host_0_writes_the_run_files_and_orbax_one_checkpoint(hosts):
  for run in ("first", "second"):
    writes = [set(), set()]
    for i in range(HOSTS):
      path = os.path.join(hosts[run], f"writes.p{i}.txt")
      if os.path.exists(path):
        with open(path) as f:
          writes[i] = set(f.read().split())
    outside = {w for w in writes[1] if not w.startswith("checkpoints" + os.sep)
               and w != ".write_probe_1"}
    assert outside == set(), f"host 1 wrote run files: {sorted(outside)}"
    # In a checkpoint, host 1 only describes the array shards it wrote itself.
    assert all(w.endswith(os.path.join("array_metadatas", "process_1"))
               for w in writes[1] - {".write_probe_1"}), sorted(writes[1])
    assert "config.json.tmp" in writes[0]
  workdir = hosts["workdir"]
  assert rh.checkpoint_steps(workdir) == sorted({3, hosts["stop"], 6})[-2:]
  assert rh.temporary_dirs(workdir) == []
  records = rh.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [(r["step"], r["split"]) for r in records] == [(3, "train"), (3, "val"),
                                                        (6, "train"), (6, "val")]


def test_a_restart_restores_on_both_hosts(hosts):
  stop = hosts["stop"]
  epoch = (stop - 1) // 3  # saved inside the loop: its epoch is not over yet
  for output in hosts["outputs"][1]:
    assert f"resumed from step {stop} (epoch {epoch}, step {stop - 3 * epoch} in it)" in output
  arrays, meta = rh.checkpoint_arrays(hosts["workdir"], 6)
  assert int(arrays["step"]) == 6 and meta["epoch"] == 2 and meta["finished"]
