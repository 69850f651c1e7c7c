"""A run's workdir before any work: writable, and either empty, the same run to resume, or
started over on request."""
from __future__ import annotations

import json
import logging
import os
import shutil

import jax

from jtl import config as config_lib
from jtl import distributed, report
from jtl.errors import UserError
from jtl.run_record import RUN_INFO

log = logging.getLogger(__name__)


class WorkdirError(UserError, OSError):
  """The workdir cannot be created or written (a file in its place, permissions, disk full)."""


def check_writable(workdir: str) -> None:
  """Creates the workdir and proves it writable before any work, naming it when it is not."""
  # One probe per process: the hosts of a multi-host run share the workdir.
  probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} cannot be created or written: {e}") from None


def has_checkpoints(workdir: str) -> bool:
  """Whether a run can resume here: a latest or a best checkpoint (a best one is resumable
  too, when every latest one is damaged)."""
  for which in ("latest", "best"):
    directory = os.path.join(workdir, "checkpoints", which)
    if os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory)):
      return True
  return False


def saved_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_same_run(config, workdir: str) -> None:
  """Refuses, before anything is loaded, to resume a run made with another config (the one
  same-run rule, config.same_run_differences), or to resume where there is nothing."""
  found = has_checkpoints(workdir)
  if config.resume == "true" and not found:
    raise config_lib.ConfigError(
        f"config.resume=true but {workdir} has no checkpoint to resume from")
  saved = saved_config(workdir) if found and config.resume != "false" else None
  if saved is not None:
    diffs = config_lib.same_run_differences(saved, config)
    if diffs:
      raise config_lib.ConfigError(
          f"{workdir} holds a run with another config; refusing to resume. Differences: "
          + "; ".join(diffs) + ". Use a new --workdir or --config.resume=false to start over.")


def prepare(config, workdir: str) -> None:
  """With config.resume=false, starts over (the run holds the workdir's lock by now)."""
  found = has_checkpoints(workdir)
  if config.resume == "false":
    # Host 0 alone deletes (the hosts share the workdir); the others wait until it has.
    if found and distributed.is_host0():
      log.info("config.resume=false: starting over in %s", workdir)
      shutil.rmtree(os.path.join(workdir, "checkpoints"))
      for name in ("metrics.jsonl", "final_metrics.json"):
        if os.path.exists(os.path.join(workdir, name)):
          os.remove(os.path.join(workdir, name))
    distributed.sync("jtl: resume=false clean-up done")


def write_run_files(config, record, workdir: str) -> None:
  """config.json and run_info.json, once the run's config is final (after the range test of an
  optimizer.lr=auto run); host 0 writes, the hosts share the workdir."""
  if distributed.is_host0():
    report.write_json(os.path.join(workdir, "config.json"), config_lib.to_jsonable(config))
    record.write(os.path.join(workdir, RUN_INFO))
