"""Read a .safetensors file into {name: numpy array}, refusing broken or hostile files clearly.

The layout: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the tensors' bytes. The header length is checked against the file size
before the safetensors package sees the file, so that no length field makes anything allocate
more than the file holds; the package then validates offsets, coverage and shapes. Tensors whose
dtype numpy lacks (bfloat16, float8) are read from their byte range through ml_dtypes and
returned as float32, which holds them exactly.
"""
from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from jtl.weights.errors import CheckpointError

HEADER_LENGTH_BYTES = 8
# safetensors dtypes read through ml_dtypes rather than the package's numpy conversion.
_ML_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
              "F8_E5M2": ml_dtypes.float8_e5m2}


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of the file; bfloat16 and float8 ones as float32, the others as stored."""
  from safetensors import SafetensorError, safe_open

  path = os.fspath(path)
  header, data_start = _read_header(path)
  tensors: dict[str, np.ndarray] = {}
  try:
    with safe_open(path, framework="numpy") as f, open(path, "rb") as raw:
      for name in f.keys():
        dtype = f.get_slice(name).get_dtype()
        if dtype in _ML_DTYPES:
          tensors[name] = _read_raw(path, raw, name, header[name], data_start, _ML_DTYPES[dtype])
        else:
          tensors[name] = np.asarray(f.get_tensor(name))
  except CheckpointError:
    raise
  except SafetensorError as e:
    raise CheckpointError(f"{path}: invalid safetensors file ({e})") from None
  except (TypeError, ValueError, AttributeError) as e:
    raise CheckpointError(f"{path}: cannot convert a tensor to numpy ({e})") from None
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read ({e})") from None
  return tensors


def _read_header(path: str) -> tuple[dict, int]:
  """The parsed JSON header and the offset where the tensors' bytes begin."""
  try:
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
      length_bytes = f.read(HEADER_LENGTH_BYTES)
      if len(length_bytes) < HEADER_LENGTH_BYTES:
        raise CheckpointError(f"{path}: {file_size} bytes, too short for a safetensors header")
      length = int.from_bytes(length_bytes, "little")
      if length > file_size - HEADER_LENGTH_BYTES:
        raise CheckpointError(f"{path}: header length {length} exceeds the file size "
                              f"{file_size}; truncated, or not a safetensors file")
      header_bytes = f.read(length)
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read ({e})") from None
  try:
    header = json.loads(header_bytes)
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise CheckpointError(f"{path}: header is not JSON ({e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, not an object")
  return header, HEADER_LENGTH_BYTES + length


def _read_raw(path: str, f, name: str, info: dict, data_start: int, dtype) -> np.ndarray:
  """A tensor from its byte range, for dtypes that numpy itself lacks."""
  try:
    begin, end = info["data_offsets"]
    shape = tuple(int(n) for n in info["shape"])
  except (KeyError, TypeError, ValueError):
    raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
  count = int(np.prod(shape, dtype=object))
  # The package validated the layout already; checked again because these bytes are ours to read.
  if end - begin != count * np.dtype(dtype).itemsize:
    raise CheckpointError(f"{path}: tensor {name!r} of shape {shape} spans {end - begin} bytes")
  f.seek(data_start + begin)
  data = f.read(end - begin)
  if len(data) != end - begin:
    raise CheckpointError(f"{path}: tensor {name!r} is truncated")
  return np.frombuffer(data, dtype).reshape(shape).astype(np.float32)
