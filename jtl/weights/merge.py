"""Put converted checkpoint tensors into freshly initialised variables, or fail loudly.

In the manner of big_vision's merge_params: on any mismatch the error lists the names missing
from the checkpoint, the names the model does not have, and every shape difference. Only the
head may differ, and only when the caller says the number of classes changed.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np

from jtl import params as P
from jtl.weights.errors import CheckpointMismatchError  # noqa: F401  (re-exported: its old home)

HEAD_PREFIX = "params/head/"


def merge(variables: Mapping[str, Any], converted: Mapping[str, np.ndarray], *, source: str,
          new_head: bool = False, model: str | None = None) -> dict[str, Any]:
  """Returns `variables` with every entry replaced by the checkpoint's.

  model: the model's name, for the error (a checkpoint of one family given to another is
  found here: the message names the model, the file and what does not fit).

  `variables` may hold arrays or jax.ShapeDtypeStruct (then only the head, when new, needs
  real values).

  new_head: the model's head has another number of classes than the checkpoint's; the head is
  then kept as initialised (and logged), and only the head may be absent or differ in shape.
  """
  target = P.flatten(variables)
  missing = [k for k in target if k not in converted]
  unexpected = [k for k in converted if k not in target]
  mismatched = [f"{k}: checkpoint {tuple(np.shape(converted[k]))} vs model "
                f"{tuple(target[k].shape)}"
                for k in target if k in converted
                and tuple(np.shape(converted[k])) != tuple(target[k].shape)]
  if new_head:
    is_head = lambda s: s.startswith(HEAD_PREFIX)
    missing = [k for k in missing if not is_head(k)]
    unexpected = [k for k in unexpected if not is_head(k)]
    mismatched = [m for m in mismatched if not is_head(m)]
  if missing or unexpected or mismatched:
    lines = [f"checkpoint {source} does not fit the model"
             + (f" {model}:" if model else ":")]
    if missing:
      lines.append(f"  missing from the checkpoint ({len(missing)}): " + _short(missing))
    if unexpected:
      lines.append(f"  not in the model ({len(unexpected)}): " + _short(unexpected))
    if mismatched:
      lines.append(f"  shape mismatches ({len(mismatched)}): " + _short(mismatched))
    if len(missing) + len(mismatched) > len(target) // 2:
      lines.append("  (most names differ: is this a checkpoint of another architecture?)")
    raise CheckpointMismatchError("\n".join(lines))
  merged = {}
  for k, v in target.items():
    if new_head and k.startswith(HEAD_PREFIX):
      merged[k] = v
    else:
      merged[k] = np.asarray(converted[k], dtype=v.dtype)
  if new_head:
    logging.info("%s: head of %s freshly initialised (%s) since num_classes differs from the "
                 "checkpoint's", source, model or "the model",
                 ", ".join(k for k in target if k.startswith(HEAD_PREFIX)))
  return P.unflatten(merged)


def _short(items: list[str], limit: int = 20) -> str:
  shown = ", ".join(items[:limit])
  return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
