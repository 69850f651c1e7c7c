"""A trained run's model as plain files: workdir/export/model.safetensors + model.json.

The safetensors file holds our own flat variable names ("params/stage4/...",
"batch_stats/..."), so any tool can read it and `load_exported` rebuilds the Model without the
training state or Orbax.

The run in other formats (SavedModel, TFLite, ONNX) is jtl/deploy/, and the command that
writes them `jtl export` (jtl/commands/export.py).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from jtl import params as P
from jtl.errors import UserError
from jtl.run_record import RunRecord

EXPORT_DIR = "export"


class NoFinishedRunError(UserError, FileNotFoundError):
  """The directory holds no exported model of a finished run."""


def export_model(workdir: str, variables: dict[str, Any], record: RunRecord) -> str:
  """Writes the variables and what is needed to rebuild the model; returns the directory."""
  from safetensors.numpy import save_file
  out = os.path.join(workdir, EXPORT_DIR)
  os.makedirs(out, exist_ok=True)
  flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in P.flatten(variables).items()}
  tmp = os.path.join(out, "model.safetensors.tmp")
  save_file(flat, tmp)
  os.replace(tmp, os.path.join(out, "model.safetensors"))
  record.write(os.path.join(out, "model.json"))
  return out


def load_exported(workdir: str):
  """The Model of a finished run (its head and class names)."""
  import dataclasses

  from jtl.models import create_model
  directory = os.path.join(workdir, EXPORT_DIR)
  info_path = os.path.join(directory, "model.json")
  if not os.path.isfile(info_path):
    raise NoFinishedRunError(f"{workdir}: no {EXPORT_DIR}/model.json (is it the workdir of a "
                             "finished jtl run?)")
  record = RunRecord.read(info_path)
  cfg = record.pretrained_cfg
  model = create_model(record.model, num_classes=len(record.class_names),
                       pretrained=os.path.join(directory, "model.safetensors"),
                       image_size=record.image_size, **record.model_kwargs)
  model.pretrained_cfg = dataclasses.replace(
      model.pretrained_cfg, label_names=record.class_names,
      mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), crop_pct=cfg["crop_pct"],
      interpolation=cfg["interpolation"], image_size=cfg["image_size"])
  return model


def check_finished_run(workdir: str) -> None:
  """Fails on a workdir without a finished run, before seconds of loading."""
  if not os.path.isdir(workdir):
    raise NoFinishedRunError(f"{workdir}: no such workdir")
  if not os.path.isfile(os.path.join(workdir, EXPORT_DIR, "model.json")):
    raise NoFinishedRunError(f"{workdir}: no finished jtl run there (no {EXPORT_DIR}/model.json; "
                             "training writes it last)")
