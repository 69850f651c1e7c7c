"""A trained run's model as plain files: workdir/export/model.safetensors + model.json.

The safetensors file holds our own flat variable names ("params/stage4/...",
"batch_stats/..."), so any tool can read it and `load_exported` rebuilds the Model without the
training state or Orbax.

The run in other formats (SavedModel, TFLite, ONNX) is jtl/deploy/, and the command that
writes them `jtl export` (jtl/commands/export.py).
"""
from __future__ import annotations

import os
import shutil
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
  _copy_transformers_config(record.model, out)
  record.write(os.path.join(out, "model.json"))
  return out


def _copy_transformers_config(model_name: str, out: str) -> None:
  """A model built from a transformers config.json (a hub id or a directory) is rebuilt from
  copies of its config files kept beside the weights: the original directory may be gone and
  the hub cache cleared when the run is exported or served."""
  from jtl.models import factory
  if not factory.is_transformers_source(model_name):
    return
  source = factory.transformers_directory(model_name)
  for name in factory.TRANSFORMERS_CONFIG_FILES:
    if os.path.isfile(os.path.join(source, name)):
      shutil.copyfile(os.path.join(source, name), os.path.join(out, name + ".tmp"))
      os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


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
  # A transformers-built model: its architecture from the config.json copied beside the weights.
  source = directory if os.path.isfile(os.path.join(directory, "config.json")) else record.model
  model = create_model(source, num_classes=len(record.class_names),
                       pretrained=os.path.join(directory, "model.safetensors"),
                       image_size=record.image_size, **record.model_kwargs)
  model.pretrained_cfg = dataclasses.replace(
      model.pretrained_cfg, label_names=record.class_names,
      mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), crop_pct=cfg["crop_pct"],
      interpolation=cfg["interpolation"], image_size=cfg["image_size"],
      crop_mode=cfg.get("crop_mode", "center"))
  return model


def check_finished_run(workdir: str) -> None:
  """Fails on a workdir without a finished run, before seconds of loading."""
  if not os.path.isdir(workdir):
    raise NoFinishedRunError(f"{workdir}: no such workdir")
  if not os.path.isfile(os.path.join(workdir, EXPORT_DIR, "model.json")):
    raise NoFinishedRunError(f"{workdir}: no finished jtl run there (no {EXPORT_DIR}/model.json; "
                             "training writes it last)")
