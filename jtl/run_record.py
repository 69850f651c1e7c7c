"""What a run is, in one record: written once by the engine (run_info.json, export/model.json)
and read back by export, predict and every tool that loads a finished run."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

RUN_INFO = "run_info.json"


@dataclasses.dataclass(frozen=True)
class RunRecord:
  model: str                      # the name given to create_model
  class_names: tuple[str, ...]    # index i is logit i
  stage_names: tuple[str, ...]
  pretrained_cfg: dict[str, Any]  # PretrainedCfg.to_dict() with the run's image_size and labels
  strategy: str = ""
  frozen_stages: int = 0
  inner_widths: tuple[int, ...] = ()  # a channel-pruned model's block widths (): the arch's own

  @classmethod
  def of_run(cls, model_name: str, model, class_names, image_size: int, strategy: str = "",
             frozen_stages: int = 0) -> "RunRecord":
    cfg = {**model.pretrained_cfg.to_dict(), "label_names": list(class_names),
           "image_size": int(image_size), "num_classes": len(class_names)}
    inner = tuple(int(w) for w in getattr(model.module, "inner_widths", None) or ())
    return cls(model_name, tuple(class_names), tuple(model.stage_names), cfg, strategy,
               frozen_stages, inner)

  @property
  def model_kwargs(self) -> dict[str, Any]:
    """What create_model needs beyond the name to rebuild this run's module."""
    return {"inner_widths": self.inner_widths} if self.inner_widths else {}

  @property
  def image_size(self) -> int:
    return int(self.pretrained_cfg["image_size"])

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["class_names"] = list(self.class_names)
    out["stage_names"] = list(self.stage_names)
    out["inner_widths"] = list(self.inner_widths)
    return out

  @classmethod
  def from_json(cls, value: dict[str, Any]) -> "RunRecord":
    fields = {f.name for f in dataclasses.fields(cls)}
    known = {k: v for k, v in value.items() if k in fields}
    known["class_names"] = tuple(known["class_names"])
    known["stage_names"] = tuple(known.get("stage_names", ()))
    known["inner_widths"] = tuple(int(w) for w in known.get("inner_widths", ()))
    return cls(**known)

  def write(self, path: str) -> None:
    """Atomically: a crash never leaves a half-written record."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.to_json(), f, indent=2)
    os.replace(tmp, path)

  @classmethod
  def read(cls, path: str) -> "RunRecord":
    with open(path) as f:
      return cls.from_json(json.load(f))
