"""The range test run as a user asks for it: alone (`jtl lr-find`), or first in an
optimizer.lr=auto run (jtl.train), with the run's own plan and step (jtl.plan)."""
from __future__ import annotations

import itertools
import logging
import os

from jtl import config as config_lib
from jtl import distributed, lr_find
from jtl import workdir as workdir_lib
from jtl.plan import Inputs, StepsByEpoch, begin, open_inputs, plan_run
from jtl.workdir import WorkdirError

log = logging.getLogger(__name__)


def lr_range_test(config, workdir: str) -> dict:
  """`jtl lr-find`: the range test alone, lr_find.json and lr_find.png in `workdir`."""
  begin(config)
  if workdir_lib.has_checkpoints(workdir):
    raise WorkdirError(f"workdir {workdir} holds a training run; give the range test a "
                       "workdir of its own")
  config_lib.check_model_spec(config)
  workdir_lib.check_writable(workdir)
  return find_learning_rate(open_inputs(config, report_dir=workdir), config, workdir)


def find_learning_rate(inputs: Inputs, config, directory: str) -> dict:
  """The range test with the run's own step (freezing, layer decay, clipping, the feature
  cache's batches) from the weights in inputs.model, which stay as they are: a run after it
  starts from them afresh. Returns lr_find.json's content (written by host 0)."""
  finder = config.lr_find
  lrs = lr_find.sweep_lrs(finder.min_lr, finder.max_lr, finder.num_steps)
  # The sweep's schedule replaces the run's; a number stands in for an "auto" lr meanwhile.
  config = config_lib.with_learning_rate(config, float(lrs[-1]))
  run = plan_run(inputs, config, schedule=lr_find.sweep_schedule(lrs))
  steps = StepsByEpoch(run)
  batches = (batch for epoch in itertools.count()
             for batch in run.train_batches(epoch=epoch, start_step=0))
  sweep, suggested = lr_find.range_test(steps.step_of(0), steps.initial_state(), batches,
                                        run.mesh, lrs, finder,
                                        grad_accum_steps=config.grad_accum_steps)
  result = lr_find.summary(sweep, suggested)
  if distributed.is_host0():
    lr_find.write_results(directory, sweep, result)
  log.info("lr_find: suggested learning rate %.4g (%s)", suggested, lr_find.METHOD)
  return result


def reuse_found_lr(config, workdir: str):
  """An optimizer.lr=auto run that resumes goes on with the rate its range test found (kept
  in its config.json), rather than run the test again; any other config is returned as is."""
  if (not config_lib.is_auto_lr(config) or config.resume == "false"
      or not workdir_lib.has_checkpoints(workdir)):
    return config
  found = ((workdir_lib.saved_config(workdir) or {}).get("lr_find") or {}).get("suggested_lr")
  if not found:
    return config
  log.info("optimizer.lr=auto: resuming with the learning rate found before, %.4g", found)
  return config_lib.with_learning_rate(config, found, found=True)


def find_auto_lr(inputs: Inputs, config, workdir: str):
  """A new optimizer.lr=auto run: the range test in workdir/lr_find; returns the config with
  its suggestion as the lr (and in lr_find.suggested_lr, which config.json keeps)."""
  suggested = find_learning_rate(inputs, config, os.path.join(workdir, "lr_find"))[
      "suggested_lr"]
  log.info("optimizer.lr=auto: training with the range test's suggestion, %.4g", suggested)
  return config_lib.with_learning_rate(config, suggested, found=True)
