"""One pruned run (jtl.prune runs one per sparsity): its starting weights, its fine-tune as an ordinary engine run (metrics,
checkpoints, export like any run) or, with no steps, an evaluation alone; then its measurements.

Each run is written in a hidden `.<name>.partial` directory beside its final name and renamed
into place when complete, so `runs/x/prune/` never shows a half-written run.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import jax
import ml_collections
import numpy as np

from jtl import config as config_lib
from jtl import export, final, plan, report, train
from jtl import params as P
from jtl import workdir as workdir_lib
from jtl.pruning import channels, magnitude, measure, recalibrate, summary

log = logging.getLogger(__name__)
METHODS = ("magnitude", "channels")
START_DIR = "start"  # the starting weights of each pruned run (its config.pretrained)


@dataclasses.dataclass(frozen=True)
class Request:
  """What to prune and how, checked before any work (jtl.prune.check_request)."""
  workdir: str                 # the finished run
  method: str                  # magnitude | channels
  sparsities: tuple[float, ...]
  steps: int                   # fine-tune budget in optimizer steps; 0: none
  scope: str = "global"        # magnitude: global | per_layer
  schedule: str = "one_shot"   # magnitude: one_shot | polynomial
  rank: str = "bn_scale"       # channels: bn_scale | kernel_norm
  lr: float | None = None      # None: a tenth of the run's optimizer.lr
  repeats: int = 5             # timed calls per latency figure

  @property
  def prune_dir(self) -> str:
    return os.path.join(self.workdir, "prune")

  def name(self, sparsity: float) -> str:
    return f"{self.method}-{sparsity:g}"


def config_from_saved(saved: dict, base: ml_collections.ConfigDict | None = None
                      ) -> ml_collections.ConfigDict:
  """A run's config.json back as a ConfigDict over today's defaults (JSON lists -> tuples;
  keys that no longer exist are dropped)."""
  config = base if base is not None else config_lib.default_config()
  for key, value in saved.items():
    if key not in config:
      log.warning("config.json: key %r is not known any more; ignored", key)
    elif isinstance(config[key], ml_collections.ConfigDict):
      config_from_saved(value, config[key])
    else:
      if isinstance(config[key], tuple) and isinstance(value, list):
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
      config[key] = value
  return config


def finetune_config(base, request: Request, sparsity: float, start_file: str,
                    inner_widths: tuple[int, ...] | None = None) -> ml_collections.ConfigDict:
  """The run's own config, fine-tuning every layer from `start_file` for request.steps;
  inner_widths: the channel-pruned model's (None: the run's own)."""
  c = base.copy_and_resolve_references()
  c.pretrained = os.path.abspath(start_file)
  # Every layer trains: the pruned layers must adapt, and no frozen prefix may keep serving
  # cached features of the unpruned weights.
  c.strategy, c.freeze_depth, c.trainable, c.unfreeze_every_epochs = "full", 0, (), 0
  c.train_steps = max(request.steps, 1)
  c.optimizer.lr = request.lr if request.lr is not None else base.optimizer.lr / 10
  c.resume = "false"
  if inner_widths is not None:
    c.inner_widths = tuple(inner_widths)
  if "ema_decay" in c:
    c.ema_decay = 0.0  # the masks hold the raw weights; an average of them would not be sparse
  if request.method == "magnitude":
    c.pruning.sparsity, c.pruning.scope, c.pruning.schedule = sparsity, request.scope, \
        request.schedule
    if request.schedule == "polynomial":
      # Sparsity rises over the first three quarters, then the masks stay; evaluated once at
      # the end, so the exported model is the one at full sparsity.
      c.pruning.begin_step, c.pruning.end_step = 0, max(1, (3 * request.steps) // 4)
      c.pruning.update_every = max(1, c.pruning.end_step // 10)
      c.max_evaluations, c.early_stopping.patience = 1, 0
  else:
    c.pruning.sparsity = 0.0  # a narrower dense model: no masks (not even a pruned run's own)
  config_lib.validate(c)
  return c


def save_weights(path: str, variables) -> None:
  """A safetensors file of flat variables (our own names, as the export), atomically."""
  from safetensors.numpy import save_file
  os.makedirs(os.path.dirname(path), exist_ok=True)
  flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in P.flatten(variables).items()}
  save_file(flat, path + ".tmp")
  os.replace(path + ".tmp", path)


def start_weights(request: Request, model, sparsity: float
                  ) -> tuple[str, tuple[int, ...] | None]:
  """(weights file the run starts from, inner_widths or None: the run's) for one sparsity."""
  original = _original(request)
  path = os.path.join(request.prune_dir, START_DIR, f"{request.name(sparsity)}.safetensors")
  if request.method == "channels":
    widths, variables = channels.prune_channels(model, sparsity, request.rank)
    save_weights(path, variables)
    return path, widths
  if request.schedule == "polynomial":
    return original, None  # the optimizer prunes as it goes
  pruned, _ = magnitude.prune(model.variables["params"], sparsity, request.scope)
  save_weights(path, {**model.variables, "params": pruned})
  return path, None


def _original(request: Request) -> str:
  return os.path.join(request.workdir, export.EXPORT_DIR, "model.safetensors")


def recalibrate_start(config, start_file: str) -> None:
  """Rewrites the pruned starting weights with BatchNorm statistics measured on the training
  split (jtl.pruning.recalibrate: the unpruned network's statistics no longer fit)."""
  inputs = plan.open_inputs(config)  # the pruned model, loaded from start_file
  variables = recalibrate.recalibrated(inputs.model, inputs.dataset, inputs.preprocess,
                                       batch_size=config.batch_size)
  save_weights(start_file, jax.device_get(dict(variables)))


def evaluate_only(config, workdir: str) -> dict:
  """A run of no steps: the starting weights tested, exported and reported like any run's."""
  workdir_lib.check_writable(workdir)
  inputs = plan.open_inputs(config, report_dir=workdir)
  workdir_lib.write_run_files(config, inputs.record, workdir)
  run = plan.plan_run(inputs, config)
  finished = final.evaluate_and_export(
      run, plan.StepsByEpoch(run).initial_state(), workdir,
      fields=dict(trainable_params=0, total_params=P.count(inputs.model.variables["params"]),
                  steps=0, train_seconds=0.0))
  return finished.metrics


class Preempted(Exception):
  """A fine-tune stopped by SIGTERM; rerunning the command starts that sparsity over."""


def _replace_dir(partial: str, final: str) -> None:
  head, name = os.path.split(final)
  old = os.path.join(head, f".{name}.old")  # hidden: never read as a run by the summary
  if os.path.exists(old):
    shutil.rmtree(old)
  if os.path.exists(final):
    os.replace(final, old)
  os.replace(partial, final)
  shutil.rmtree(old, ignore_errors=True)


def measured(workdir: str, repeats: int) -> dict:
  model = export.load_exported(workdir)
  path = os.path.join(workdir, export.EXPORT_DIR, "model.safetensors")
  return measure.measure(model, path, int(model.pretrained_cfg.image_size), repeats=repeats)


def run_one(request: Request, base, model, sparsity: float) -> str:
  """Prunes, fine-tunes (or evaluates), measures; returns the finished workdir."""
  name = request.name(sparsity)
  final_dir = os.path.join(request.prune_dir, name)
  partial = os.path.join(request.prune_dir, f".{name}.partial")
  if os.path.exists(partial):  # an earlier attempt that did not finish: start it over
    shutil.rmtree(partial)
  start, widths = start_weights(request, model, sparsity)
  config = finetune_config(base, request, sparsity, start, widths)
  if start != _original(request):
    recalibrate_start(config, start)
  if request.steps > 0:
    final = train.train_and_evaluate(config, partial)
    if final.get("preempted"):
      raise Preempted(f"{name}: preempted; rerun the same command to prune it again")
  else:
    final = evaluate_only(config, partial)
  row = {"method": request.method, "sparsity": sparsity, "source": os.path.abspath(
      request.workdir), "scope": request.scope, "schedule": request.schedule,
      "rank": request.rank, **measured(partial, request.repeats)}
  report.write_json(os.path.join(partial, summary.MEASUREMENTS), row)
  _replace_dir(partial, final_dir)
  log.info("%s: test accuracy %.4f, %d of %d parameters non-zero", final_dir,
           final["test_accuracy"], row["nonzero_params"], row["params"])
  return final_dir


def unpruned_row(request: Request) -> dict:
  return summary.row_of(request.workdir, summary.UNPRUNED, 0.0,
                        measured(request.workdir, request.repeats), "..")


def dataset_path(config) -> str | None:
  """The folder of a folder: dataset (None for tfds)."""
  return config.dataset[len("folder:"):] if config.dataset.startswith("folder:") else None

