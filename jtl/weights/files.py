"""Read any supported checkpoint file into a flat {name: numpy array}.

.safetensors through the safetensors package; .pth/.pt/.bin through our torch-free reader;
.npz (big_vision, vit_jax) through numpy with pickles disallowed.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np

from jtl.weights.errors import CheckpointError  # noqa: F401  (re-exported: its old home)

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SUFFIXES = (".safetensors", ".npz") + TORCH_SUFFIXES


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such checkpoint file")
  if os.path.isdir(path):
    raise CheckpointError(f"{path}: is a directory, expected a checkpoint file ({', '.join(SUFFIXES)})")
  if os.path.getsize(path) == 0:
    raise CheckpointError(f"{path}: empty file")
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".safetensors":
    return _read_safetensors(path)
  if suffix == ".npz":
    return _read_npz(path)
  if suffix in TORCH_SUFFIXES:
    from jtl.weights import torch_file
    return torch_file.load(path)
  raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r}; expected one of {SUFFIXES}")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from jtl.weights import safetensors_file
  return safetensors_file.load(path)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: np.asarray(f[k]) for k in f.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise CheckpointError(f"{path}: not a readable .npz file ({e})") from None
