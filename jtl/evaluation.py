"""Evaluating a train state on a split: the batches through the compiled eval step, the
predictions gathered on the host, the metrics computed once there."""
from __future__ import annotations

from typing import Iterable, Sequence

import jax
import numpy as np

from jtl import distributed
from jtl import metrics as metrics_lib

_GATHERED = ("loss", "pred", "label", "top5", "logits")


def predictions(eval_fn, state, batches: Iterable[dict], mesh) -> dict[str, np.ndarray]:
  """Per-example loss, prediction, label, top-5 hit and logits of every real example."""
  outputs = {k: [] for k in _GATHERED}
  for local in batches:
    out = jax.device_get(eval_fn(state.params, state.batch_stats,
                                 distributed.global_batch(local, mesh)))
    mask = np.asarray(out["mask"], bool)
    for k in outputs:
      outputs[k].append(np.asarray(out[k])[mask])
  return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in outputs.items()}


def evaluate(eval_fn, state, batches: Iterable[dict], mesh, class_names: Sequence[str]) -> dict:
  """The classification report (accuracy, top-5, macro P/R/F1, per class, confusion matrix)."""
  arrays = predictions(eval_fn, state, batches, mesh)
  return metrics_lib.classification_report(arrays["label"], arrays["pred"], arrays["top5"],
                                           arrays["loss"], class_names)


def final_metrics(result: dict, split: str, prefix: str = "test_") -> dict:
  """The final_metrics.json fields of a report on `split`."""
  final = {"split": split}
  for key in ("accuracy", "top5", "loss", "macro_precision", "macro_recall", "macro_f1"):
    final[f"{prefix}{key}"] = result[key]
  final["per_class"] = result["per_class"]
  final["confusion_matrix"] = result["confusion_matrix"]
  final["num_test_examples"] = result["num_examples"]
  return final
