"""A finished state tested, exported and reported: the one function every finished run ends in
(a trained run, lp_ft's probe, a pruned model evaluated as it is).

It tests the state on the test split (with model EMA: the raw weights or their average,
whichever validates better; config.tta adds the test-time augmented figures), gives test
accuracy and macro F1 their 95% intervals (jtl.intervals), exports the weights tested, and
writes final_metrics.json, the pictures, the error analysis and report.md, each once and
complete.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import jax

from jtl import data as data_lib
from jtl import distributed, error_analysis, evaluation, export, intervals, report, report_md
from jtl import steps as steps_lib
from jtl.data import tta as tta_lib
from jtl.plan import RunPlan


@dataclasses.dataclass(frozen=True)
class Finished:
  """final_metrics.json's content, and the state whose weights were tested and exported."""
  metrics: dict
  state: Any


def evaluate_and_export(run: RunPlan, state, workdir: str, *, fields: dict,
                        records: Sequence[dict] = (), started: float | None = None) -> Finished:
  """Tests `state` on the run's test split, exports it and writes the run's outputs (host 0).

  fields: final_metrics.json's fields about the run (steps, timings, ...), after the test's;
  records: metrics.jsonl's rows, for the curves; started: the perf_counter at which the
  command began, for wall_seconds (the whole command's time, what a user waits for)."""
  split = run.splits.test
  state, weights = _pick_weights(run, state)
  result = run.evaluate(state, split, keep_predictions=True)
  predicted = result["predictions"]
  final = {**evaluation.final_metrics(result, split),
           # 95% intervals of the headline figures, from the same per-example arrays.
           **intervals.final_intervals(predicted["label"], predicted["pred"],
                                       len(run.inputs.class_names)),
           **weights}
  if run.config.ema_decay:  # both weights' test accuracies; without EMA, test_accuracy is all
    final[f"{weights['exported_weights']}_test_accuracy"] = result["accuracy"]
  final.update(_tta_metrics(run, state, split))
  final.update(fields)
  if distributed.is_host0():
    _write_outputs(run, workdir, state, final, records, result["predictions"], started)
  elif started is not None:
    final["wall_seconds"] = round(time.perf_counter() - started, 2)
  return Finished(final, state)


def _pick_weights(run: RunPlan, state):
  """(the state to test and export, final_metrics fields): the raw weights, or their EMA when
  that beats them on validation by the early-stopping metric (a tie keeps the raw weights);
  the other one is tested too, for the record."""
  if not run.config.ema_decay:
    return state, {"exported_weights": "raw"}
  splits = run.splits
  ema_state = steps_lib.with_ema_weights(state)
  raw, ema = (run.evaluate(s, splits.val)[splits.key] for s in (state, ema_state))
  use_ema = splits.improved(ema, raw)
  other, other_name = (state, "raw") if use_ema else (ema_state, "ema")
  return (ema_state if use_ema else state), {
      "exported_weights": "ema" if use_ema else "raw",
      "ema_selection": {"metric": splits.metric, "split": splits.val, "raw": raw, "ema": ema},
      f"{other_name}_test_accuracy": run.evaluate(other, splits.test)["accuracy"]}


def _tta_metrics(run: RunPlan, state, split: str) -> dict:
  """final_metrics fields of the test-time augmented evaluation (config.tta) of the exported
  weights. The views need pixels, so it runs on images from stage 0 even when training ran on
  cached features; batches of eval_batch_size / views examples keep its memory that of one
  plain evaluation batch."""
  mode, inputs = run.config.tta, run.inputs
  if not tta_lib.is_on(mode):
    return {"tta": "none"}
  views, devices = tta_lib.num_views(mode), jax.local_device_count()
  local = run.config.eval_batch_size // jax.process_count() // views // devices * devices
  eval_fn = steps_lib.make_eval_step(inputs.model, inputs.mesh,
                                     num_classes=len(inputs.class_names))
  batches = data_lib.eval_batches(inputs.dataset, split, batch_size=max(local, devices),
                                  preprocess=inputs.preprocess, tta=mode,
                                  shard=data_lib.Shard(jax.process_index(), jax.process_count()))
  result = evaluation.evaluate(eval_fn, state, batches, inputs.mesh, inputs.class_names)
  return {"tta": mode, "tta_views": views,
          **{f"tta_test_{k}": result[k]
             for k in ("accuracy", "balanced_accuracy", "top5", "loss", "macro_f1")}}


def _write_outputs(run: RunPlan, workdir: str, state, final: dict, records, predictions,
                   started: float | None) -> None:
  """The export, the pictures, the error analysis, then final_metrics.json and report.md
  (last, so that wall_seconds counts everything before them)."""
  inputs, config = run.inputs, run.config
  variables = {"params": jax.device_get(state.params)}
  if state.batch_stats:
    variables["batch_stats"] = jax.device_get(state.batch_stats)
  export.export_model(workdir, variables, inputs.record)
  report.plot_curves(records, os.path.join(workdir, "curves.png"))
  report.plot_confusion_matrix(final["confusion_matrix"], inputs.class_names,
                               os.path.join(workdir, "confusion_matrix.png"))
  # Error analysis from the final evaluation's own per-example arrays.
  error_analysis.write_most_confused(workdir, final)
  error_analysis.write_top_losses(workdir, final, predictions, inputs.dataset, inputs.preprocess,
                                  local_batch_size=config.eval_batch_size
                                  // jax.process_count(), process_count=jax.process_count())
  if started is not None:
    final["wall_seconds"] = round(time.perf_counter() - started, 2)
  report.write_json(os.path.join(workdir, "final_metrics.json"), final)
  report_md.write_report(workdir, final, report_md.run_facts(config))
