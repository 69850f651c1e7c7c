"""Two processes (gloo) training on converted records: each reads only the records of its own
slice of every global batch, and a run preempted and restarted on both reaches the parameters
of the uninterrupted run, bit for bit."""
import json
import os

import numpy as np
import pytest

import run_helpers as rh
from conftest import write_image_folder
from jtl.data import convert
from test_multihost import CONFIG, HOSTS, _run_hosts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost_records")
  folder = str(root / "folder")
  write_image_folder(folder, splits=("train",))
  records = convert.convert(f"folder:{folder}", str(root / "records"), records_per_shard=8,
                            show_progress=False)
  config = {**CONFIG, "dataset": f"records:{records}"}
  env = rh.child_env(rh.shared_jax_cache(tmp_path_factory))
  out = {name: str(root / name) for name in ("straight", "first", "second")}
  _run_hosts(str(root / "straight_run"), folder, config, out["straight"], env)
  resumed = str(root / "resumed_run")
  _run_hosts(resumed, folder, config, out["first"], env, (["--sigterm-after-step", "1"], []))
  _run_hosts(resumed, folder, config, out["second"], env)
  out.update(straight_run=str(root / "straight_run"), resumed_run=resumed)
  return out


def _reads(record_dir, process):
  return rh.read_jsonl(os.path.join(record_dir, f"reads.p{process}.jsonl"))


def test_each_process_reads_exactly_its_share_of_every_epoch(runs):
  for epoch in (0, 1):
    ids = [[i for r in _reads(runs["straight"], p) if r["epoch"] == epoch for i in r["ids"]]
           for p in range(HOSTS)]
    batches = [[b for b in rh.read_jsonl(os.path.join(runs["straight"], f"batches.p{p}.jsonl"))
                if b["epoch"] == epoch] for p in range(HOSTS)]
    for p in range(HOSTS):
      # Read once each, no more than it fed: 3 steps of 4 examples.
      assert len(ids[p]) == len(set(ids[p])) == sum(len(b["labels"]) for b in batches[p]) == 12
    assert not set(ids[0]) & set(ids[1])  # disjoint; together the epoch's 24 examples


def test_a_preempted_records_run_resumes_bit_identically_on_both_hosts(runs):
  with open(os.path.join(runs["first"], "result.p0.json")) as f:
    assert json.load(f)["preempted"]
  a, meta_a = rh.checkpoint_arrays(runs["straight_run"], 6)
  b, meta_b = rh.checkpoint_arrays(runs["resumed_run"], 6)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  straight = rh.read_jsonl(os.path.join(runs["straight"], "steps.p0.jsonl"))
  resumed = (rh.read_jsonl(os.path.join(runs["first"], "steps.p0.jsonl"))
             + rh.read_jsonl(os.path.join(runs["second"], "steps.p0.jsonl")))
  by_step = {e["step"]: e["loss"] for e in resumed}  # a step past the save is run again
  assert {e["step"]: e["loss"] for e in straight} == by_step
