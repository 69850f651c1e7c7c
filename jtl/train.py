"""train_and_evaluate(config, workdir): the one training loop, and its jitted steps.

Data parallel over every device JAX sees (a 1-D `jax.sharding.Mesh` named "data": the batch is
split over it, the state is replicated), on one host or many (each host feeds its own shard of
every global batch).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jtl import config as config_lib
from jtl import data as data_lib
from jtl import metrics as metrics_lib
from jtl import export, optim, report
from jtl import params as P
from jtl.checkpoint import Checkpoints
from jtl.models import create_model


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


class WorkdirError(OSError):
  """The workdir cannot be created or written (a file in its place, permissions, disk full)."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


# ---------------------------------------------------------------------------------------------
# Steps.

def _cross_entropy(logits, labels, num_classes: int, label_smoothing: float):
  if labels.ndim == 1:  # hard labels; mixup/cutmix give soft ones
    labels = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    labels = optax.smooth_labels(labels, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)


def train_step(state: TrainState, batch, *, module, tx, frozen_stages: int, num_classes: int,
               label_smoothing: float, bf16: bool, skip_nonfinite: bool,
               frozen_stats=None):
  """One optimizer step; returns the new state and (loss, accuracy, finite)."""
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  images = batch["image"]

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    x = images
    if bf16:
      variables = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), variables)
      x = x.astype(jnp.bfloat16)
    logits, new_vars = module.apply(variables, x, train=True, frozen_stages=frozen_stages,
                                    mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    loss = _cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
    return loss, (logits, new_vars.get("batch_stats", {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  batch_stats = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), batch_stats,
                                       state.batch_stats)
  if frozen_stats is not None:  # frozen layers outside the frozen prefix keep their statistics
    batch_stats = jax.tree_util.tree_map(lambda keep, new, old: old if keep else new,
                                         frozen_stats, batch_stats, state.batch_stats)
  labels = batch["label"] if batch["label"].ndim == 1 else jnp.argmax(batch["label"], -1)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  finite = jnp.isfinite(loss)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  if skip_nonfinite:  # keep the old state (but count the step) when the loss is not finite
    new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_state,
                                       state.replace(step=state.step + 1))
  return new_state, {"loss": loss, "accuracy": accuracy, "finite": finite}


def eval_step(params, batch_stats, batch, *, module, num_classes: int):
  """Per-example loss, prediction and top-5 hit (padding masked out on the host)."""
  logits = module.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                        train=False).astype(jnp.float32)
  loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], num_classes))
  k = min(5, num_classes)
  top5 = jnp.any(jax.lax.top_k(logits, k)[1] == batch["label"][:, None], axis=-1)
  return {"loss": loss, "pred": jnp.argmax(logits, -1), "label": batch["label"], "top5": top5,
          "mask": batch["mask"]}


# ---------------------------------------------------------------------------------------------
# Set-up helpers.

def _pretrained_arg(value: str):
  return {"default": True, "none": None, "": None}.get(value, value)


def _mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def _global_batch(local: dict, sharding: NamedSharding) -> dict:
  """This host's part of a batch -> one global array per key, split over the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def _replicate(tree, sharding: NamedSharding):
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


@dataclasses.dataclass
class _Phase:
  """What is compiled for one freeze plan (gradual unfreezing changes it between epochs)."""
  plan: optim.FreezePlan
  tx: optax.GradientTransformation
  step_fn: Any


class _Preemption:
  """SIGTERM asks the loop to save and exit at a step boundary, the same one on every host.

  One host: a Python handler sets a flag. Several hosts: each may get its SIGTERM at another
  step, and one host saving (a collective) while another trains (another collective) hangs
  both; so JAX's preemption service (started by jax.distributed.initialize) catches SIGTERM,
  tells every host, and names the step at which all of them stop.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._across_hosts = False

  def __enter__(self):
    if jax.process_count() > 1 and jax.config.jax_enable_preemption_service:
      self._across_hosts = True
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM: saving a checkpoint and stopping")
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; called once for every step, on every host."""
    if self._across_hosts:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        logging.warning("preemption notice: every host saves step %d and stops", step)
        self.requested = True
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _improved(metric: str, value: float, best: float | None, min_delta: float) -> bool:
  if best is None:
    return np.isfinite(value)
  if metric == "val_loss":
    return value < best - min_delta
  return value > best + min_delta


# ---------------------------------------------------------------------------------------------
# The loop.

def train_and_evaluate(config, workdir: str) -> dict:
  """Trains per `config`, writing everything into `workdir`; returns the final metrics."""
  config_lib.validate(config)
  if config.distributed:
    _initialize_distributed(config)
  is_host0 = jax.process_index() == 0
  _check_writable(workdir)
  _check_resumable(config, workdir)

  dataset = data_lib.open_dataset(
      config.dataset, data_dir=config.data_dir or None, val_fraction=config.val_fraction,
      seed=config.seed, max_train_examples=config.max_train_examples or None,
      bad_images=config.bad_images, report_dir=workdir)
  class_names = tuple(dataset.class_names)
  config_lib.validate_for_data(config, class_names)
  num_classes = len(class_names)

  model = create_model(config.model, num_classes=num_classes,
                       pretrained=_pretrained_arg(config.pretrained),
                       image_size=config.image_size or None, seed=config.seed)
  config_lib.validate_for_model(config, model.stage_names)
  cfg = model.pretrained_cfg
  image_size = config.image_size or cfg.image_size
  preprocess = data_lib.Preprocess(image_size=image_size, crop_pct=cfg.crop_pct,
                                   interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std)
  augment = _augment_from_config(config.augment)

  run_info = {"class_names": list(class_names), "model": config.model,
              "pretrained_cfg": {**cfg.to_dict(), "label_names": list(class_names),
                                 "image_size": image_size},
              "stage_names": list(model.stage_names)}
  if is_host0:
    report.write_json(os.path.join(workdir, "config.json"), config_lib.to_jsonable(config))
    report.write_json(os.path.join(workdir, "run_info.json"), run_info)

  mesh = _mesh()
  replicated = NamedSharding(mesh, PartitionSpec())
  data_sharding = NamedSharding(mesh, PartitionSpec("data"))
  num_devices = jax.device_count()
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % num_devices or config[key] % jax.process_count():
      raise config_lib.ConfigError(f"config.{key}={config[key]} must be divisible by the "
                                   f"{num_devices} devices ({jax.process_count()} hosts)")
  local_batch = config.batch_size // jax.process_count()
  steps_per_epoch = data_lib.steps_per_epoch(dataset, config.batch_size)
  if steps_per_epoch == 0:
    raise config_lib.ConfigError(
        f"config.batch_size={config.batch_size} is larger than the training split "
        f"({dataset.num_examples('train')} examples)")
  optimizer_steps_per_epoch = max(steps_per_epoch // config.grad_accum_steps, 1)
  schedule = optim.make_schedule(config, optimizer_steps_per_epoch)

  params = model.variables["params"]
  batch_stats = model.variables.get("batch_stats", {})
  rules = optim.freeze_rules(config.strategy, model.stage_names, config.freeze_depth,
                             config.trainable)
  base_plan = optim.make_freeze_plan(params, model.stage_names, rules)

  def phase_for_epoch(epoch: int) -> _Phase:
    plan = base_plan
    if config.unfreeze_every_epochs:
      plan = optim.unfreeze_stages(base_plan, epoch // config.unfreeze_every_epochs)
    tx = optim.make_optimizer(config, plan, params, schedule)
    step = functools.partial(
        train_step, module=model.module, tx=tx, frozen_stages=plan.frozen_stages,
        num_classes=num_classes, label_smoothing=config.label_smoothing, bf16=config.bf16,
        skip_nonfinite=config.nonfinite_policy == "skip",
        frozen_stats=plan.frozen_stats_mask(batch_stats))
    step_fn = jax.jit(step, in_shardings=(replicated, data_sharding),
                      out_shardings=(replicated, replicated), donate_argnums=0)
    return _Phase(plan, tx, step_fn)

  phase = phase_for_epoch(0)
  state = TrainState(step=np.int32(0), params=params, batch_stats=batch_stats,
                     opt_state=phase.tx.init(params),
                     rng=np.asarray(jax.random.key_data(jax.random.PRNGKey(config.seed))))
  state = _replicate(state, replicated)
  eval_fn = jax.jit(functools.partial(eval_step, module=model.module, num_classes=num_classes),
                    in_shardings=(replicated, replicated, data_sharding),
                    out_shardings=replicated)

  checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints)
  run_log = report.RunLog(workdir, enabled=is_host0)
  failed = False
  try:
    meta = {"epoch": 0, "step_in_epoch": 0, "best": None, "best_step": None, "bad_evals": 0,
            "skipped_steps": 0, "train_seconds": 0.0, "finished": False}
    latest = checkpoints.latest_step()
    if latest is not None:
      state, meta = _restore(checkpoints, state, phase_for_epoch, replicated)
      checkpoints.discard_best_after(latest)
      phase = phase_for_epoch(meta["epoch"])
      run_log.truncate_after(latest)
      logging.info("resumed from step %d (epoch %d, step %d in it)", latest, meta["epoch"],
                   meta["step_in_epoch"])
    trainable = P.count({k: v for k, v in P.flatten(params).items()
                         if phase.plan.labels[k] != optim.FROZEN})
    logging.info("%s: %d classes, %d of %d parameters trainable, %d frozen stages, "
                 "%d steps per epoch", config.model, num_classes, trainable, P.count(params),
                 phase.plan.frozen_stages, steps_per_epoch)

    stop_early = meta["finished"]
    with _Preemption() as preemption:
      train_start = time.perf_counter() - meta["train_seconds"]
      while meta["epoch"] < config.num_epochs and not stop_early:
        epoch = meta["epoch"]
        new_phase = phase_for_epoch(epoch)
        if new_phase.plan.frozen_stages != phase.plan.frozen_stages:
          logging.info("epoch %d: unfreezing, %d stages frozen now", epoch,
                       new_phase.plan.frozen_stages)
          opt_state = optim.carry_opt_state(state.opt_state, new_phase.tx.init(state.params))
          state = state.replace(opt_state=_replicate(opt_state, replicated))
        phase = new_phase
        state, epoch_stats, interrupted = _train_epoch(
            config, state, phase, dataset, meta, preprocess, augment, local_batch,
            steps_per_epoch, data_sharding, schedule, run_log, preemption, checkpoints,
            num_classes, train_start)
        if interrupted:
          logging.warning("stopped by SIGTERM at step %d; rerun the same command to resume",
                          int(state.step))
          return {"preempted": True, "step": int(state.step)}
        meta["epoch"], meta["step_in_epoch"] = epoch + 1, 0
        meta["train_seconds"] = time.perf_counter() - train_start
        step = int(state.step)
        lr = float(schedule(step // config.grad_accum_steps))
        run_log.record({"step": step, "epoch": epoch + 1, "split": "train",
                        "learning_rate": lr, **epoch_stats})
        is_best = False
        if (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == config.num_epochs:
          split = "val" if dataset.has_split("val") else "test"
          result = _evaluate(eval_fn, state, dataset, split, config, preprocess, class_names,
                             data_sharding)
          run_log.record({"step": step, "epoch": epoch + 1, "split": "val",
                          "loss": result["loss"], "accuracy": result["accuracy"],
                          "top5": result["top5"], "macro_f1": result["macro_f1"],
                          "learning_rate": lr})
          metric = config.early_stopping.metric
          value = result[metric[len("val_"):]]
          # A model whose validation loss is not finite has diverged, whatever its accuracy.
          if (np.isfinite(result["loss"])
              and _improved(metric, value, meta["best"], config.early_stopping.min_delta)):
            meta.update(best=value, best_step=step, bad_evals=0)
            is_best = True
          else:
            meta["bad_evals"] += 1
            if config.early_stopping.patience and meta["bad_evals"] >= config.early_stopping.patience:
              logging.info("early stopping: %s did not improve for %d evaluations", metric,
                           meta["bad_evals"])
              stop_early = True
        meta["finished"] = stop_early or meta["epoch"] >= config.num_epochs
        checkpoints.save(step, state, meta, best=is_best)
    checkpoints.wait()
    train_seconds = meta["train_seconds"]

    final, best_state = _final_evaluation(config, workdir, checkpoints, state, eval_fn, dataset,
                                         preprocess, class_names, data_sharding, replicated)
    final.update(trainable_params=int(trainable), total_params=int(P.count(params)),
                 train_seconds=round(train_seconds, 2), steps=int(state.step),
                 best_step=meta["best_step"], skipped_steps=meta["skipped_steps"])
    if is_host0:
      variables = {"params": jax.device_get(best_state.params)}
      if best_state.batch_stats:
        variables["batch_stats"] = jax.device_get(best_state.batch_stats)
      export.export_model(workdir, variables, run_info)
      report.write_json(os.path.join(workdir, "final_metrics.json"), final)
      records = run_log.records()
      report.plot_curves(records, os.path.join(workdir, "curves.png"))
      report.plot_confusion_matrix(final["confusion_matrix"], class_names,
                                   os.path.join(workdir, "confusion_matrix.png"))
    return final
  except BaseException:
    failed = True
    raise
  finally:
    # Also on a crash: let an in-flight asynchronous save finish rather than leave it half done
    # (and report its own failure only when it is the first thing to go wrong).
    checkpoints.close(raise_errors=not failed)
    run_log.close()


def _train_epoch(config, state, phase, dataset, meta, preprocess, augment, local_batch,
                 steps_per_epoch, data_sharding, schedule, run_log, preemption, checkpoints,
                 num_classes, train_start):
  """Runs the rest of one epoch; returns (state, epoch stats, interrupted)."""
  epoch, start = meta["epoch"], meta["step_in_epoch"]
  batches = data_lib.train_batches(
      dataset, batch_size=local_batch, preprocess=preprocess, augment=augment,
      seed=config.seed, epoch=epoch, start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count(), num_classes=num_classes)
  progress = None
  if config.progress_bar and jax.process_index() == 0:
    from tqdm.auto import tqdm
    progress = tqdm(total=steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}",
                    unit="step", leave=False, dynamic_ncols=True)
  if start == 0:  # running sums of the epoch, kept in meta so a resumed epoch logs the same
    meta.update(epoch_loss_sum=0.0, epoch_accuracy_sum=0.0, epoch_steps=0)
  pending = None  # metrics of the previous step, read one step late so the device never waits
  last_time, images_seen = time.perf_counter(), 0

  def consume(step_metrics, step_index):
    nonlocal last_time, images_seen
    loss = float(step_metrics["loss"])
    if not bool(step_metrics["finite"]):
      meta["skipped_steps"] += 1
      if (config.nonfinite_policy == "halt"
          or meta["skipped_steps"] > config.max_skipped_steps):
        raise NonFiniteLossError(
            f"non-finite loss ({loss}) at step {step_index}; the last good checkpoint "
            f"(step {checkpoints.latest_step()}) is kept")
      logging.warning("non-finite loss at step %d skipped (%d so far)", step_index,
                      meta["skipped_steps"])
      return
    meta["epoch_loss_sum"] += loss
    meta["epoch_accuracy_sum"] += float(step_metrics["accuracy"])
    meta["epoch_steps"] += 1
    if step_index % config.log_every_steps == 0:
      run_log.scalars(step_index, {"train/loss": loss,
                                   "train/learning_rate": float(schedule(step_index))})
    if progress is not None:
      now = time.perf_counter()
      images_seen += config.batch_size
      if now - last_time > 1.0:
        progress.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_seen / (now - last_time):.0f}")
        last_time, images_seen = now, 0
      progress.update(1)

  state_step = int(state.step)
  for index, local in enumerate(batches, start=start):
    batch = _global_batch(local, data_sharding)
    state, step_metrics = phase.step_fn(state, batch)
    state_step += 1
    if pending is not None:
      consume(*pending)
    pending = (step_metrics, state_step)
    meta["step_in_epoch"] = index + 1
    if preemption.reached(state_step):
      consume(*pending)
      meta["train_seconds"] = time.perf_counter() - train_start
      checkpoints.save(state_step, state, meta)
      return state, {}, True
    if (config.checkpoint_every_steps and state_step % config.checkpoint_every_steps == 0
        and meta["step_in_epoch"] < steps_per_epoch):
      consume(*pending)
      pending = None
      meta["train_seconds"] = time.perf_counter() - train_start
      checkpoints.save(state_step, state, meta)
  if pending is not None:
    consume(*pending)
  if progress is not None:
    progress.close()
  n = meta["epoch_steps"]
  stats = {"loss": meta["epoch_loss_sum"] / n if n else float("nan"),
           "accuracy": meta["epoch_accuracy_sum"] / n if n else float("nan")}
  return state, stats, False


def _evaluate(eval_fn, state, dataset, split, config, preprocess, class_names, data_sharding):
  outputs = {k: [] for k in ("loss", "pred", "label", "top5")}
  for local in data_lib.eval_batches(dataset, split, batch_size=config.eval_batch_size
                                     // jax.process_count(), preprocess=preprocess,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    out = jax.device_get(eval_fn(state.params, state.batch_stats,
                                 _global_batch(local, data_sharding)))
    mask = np.asarray(out["mask"], bool)
    for k in outputs:
      outputs[k].append(np.asarray(out[k])[mask])
  arrays = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in outputs.items()}
  return metrics_lib.classification_report(arrays["label"], arrays["pred"], arrays["top5"],
                                           arrays["loss"], class_names)


def _final_evaluation(config, workdir, checkpoints, state, eval_fn, dataset, preprocess,
                      class_names, data_sharding, replicated) -> dict:
  """The best checkpoint on the test split (val when there is no test split)."""
  best = checkpoints.restore(state, which="best")
  if best is not None:
    state = _replicate(best[0], replicated)
  split = "test" if dataset.has_split("test") else "val"
  result = _evaluate(eval_fn, state, dataset, split, config, preprocess, class_names,
                     data_sharding)
  final = {"split": split}
  for key in ("accuracy", "top5", "loss", "macro_precision", "macro_recall", "macro_f1"):
    final[f"test_{key}"] = result[key]
  final["per_class"] = result["per_class"]
  final["confusion_matrix"] = result["confusion_matrix"]
  final["num_test_examples"] = result["num_examples"]
  return final, state


def _restore(checkpoints, state, phase_for_epoch, replicated):
  # The optimizer state's structure depends on the phase (gradual unfreezing), so restore the
  # meta first to know the epoch, then the state against the right abstract tree.
  meta_only = checkpoints.latest_meta()
  phase = phase_for_epoch(meta_only["epoch"])
  template = state.replace(opt_state=phase.tx.init(state.params))
  restored, meta = checkpoints.restore(template)
  return _replicate(restored, replicated), meta


def _augment_from_config(a) -> "data_lib.Augment":
  return data_lib.Augment(
      random_resized_crop=a.random_resized_crop, scale=(a.scale_min, 1.0), hflip=a.hflip,
      rotation_degrees=a.rotation_degrees, color_jitter=a.color_jitter,
      randaugment=(a.randaugment_ops, a.randaugment_magnitude) if a.randaugment_ops else None,
      mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha)


def _initialize_distributed(config) -> None:
  """Joins the other processes of a multi-host run (TPU VM pods, multi-GPU nodes, CPU tests)."""
  kwargs = {}
  if config.coordinator_address:
    kwargs["coordinator_address"] = config.coordinator_address
  if config.num_processes:
    kwargs["num_processes"] = config.num_processes
  if config.process_id >= 0:
    kwargs["process_id"] = config.process_id
  # CPU processes exchange gradients through gloo (the CPU backend has no collectives of its
  # own); the setting does not affect GPU or TPU devices.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def _check_writable(workdir: str) -> None:
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


def _check_resumable(config, workdir: str) -> None:
  """Refuses to resume a run whose config differs in a way that matters."""
  saved_path = os.path.join(workdir, "config.json")
  has_checkpoints = os.path.isdir(os.path.join(workdir, "checkpoints", "latest")) and any(
      name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints", "latest")))
  if config.resume == "true" and not has_checkpoints:
    raise config_lib.ConfigError(
        f"config.resume=true but {workdir} has no checkpoint to resume from")
  if config.resume == "false":
    # Host 0 alone deletes (the hosts share the workdir); the others wait until it has.
    if has_checkpoints and jax.process_index() == 0:
      import shutil
      logging.info("config.resume=false: starting over in %s", workdir)
      shutil.rmtree(os.path.join(workdir, "checkpoints"))
      for name in ("metrics.jsonl", "final_metrics.json"):
        if os.path.exists(os.path.join(workdir, name)):
          os.remove(os.path.join(workdir, name))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("jtl: resume=false clean-up done")
    return
  if has_checkpoints and os.path.exists(saved_path):
    with open(saved_path) as f:
      saved = json.load(f)
    diffs = config_lib.resume_differences(saved, config)
    if diffs:
      raise config_lib.ConfigError(
          f"{workdir} holds a run with another config; refusing to resume. Differences: "
          + "; ".join(diffs) + ". Use a new --workdir or --config.resume=false to start over.")
