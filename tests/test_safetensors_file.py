"""The .safetensors reader: round trips (bfloat16 included) and hostile or broken files."""
import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jtl.weights import safetensors_file
from jtl.weights.files import CheckpointError, read_state_dict


def _write(path, header: dict, data: bytes, header_length: int | None = None):
  """A safetensors file from its parts, so that tests can make every part wrong."""
  header_bytes = json.dumps(header).encode()
  length = len(header_bytes) if header_length is None else header_length
  path.write_bytes(struct.pack("<Q", length) + header_bytes + data)
  return path


def _entry(dtype: str, shape, begin: int, end: int) -> dict:
  return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def test_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  state = {"conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
           "half": rng.standard_normal(7).astype(np.float16),
           "bn.num_batches_tracked": np.array(5, np.int64),
           "bf16": rng.standard_normal((2, 5)).astype(ml_dtypes.bfloat16)}
  path = tmp_path / "model.safetensors"
  save_file(state, str(path))
  loaded = safetensors_file.load(path)
  assert sorted(loaded) == sorted(state)
  for name, array in state.items():
    want = array.astype(np.float32) if array.dtype == ml_dtypes.bfloat16 else array
    assert loaded[name].dtype == want.dtype and loaded[name].shape == want.shape, name
    np.testing.assert_array_equal(loaded[name], want, err_msg=name)


def test_bfloat16_bytes_written_by_hand(tmp_path):
  """bfloat16 is the upper half of a float32: 0x3FC0 is 1.5, 0xC010 is -2.25."""
  data = struct.pack("<4H", 0x3FC0, 0xC010, 0x0000, 0x7F80)
  path = _write(tmp_path / "bf16.safetensors", {"w": _entry("BF16", (2, 2), 0, 8)}, data)
  loaded = safetensors_file.load(path)["w"]
  assert loaded.dtype == np.float32
  np.testing.assert_array_equal(loaded, np.float32([[1.5, -2.25], [0.0, np.inf]]))


@pytest.mark.parametrize("case, problem", [
    ("huge header length", "header length 1099511627776 exceeds the file size"),
    ("header longer than file", "exceeds the file size"),
    ("not JSON", "header is not JSON"),
    ("JSON list", "header is a JSON list"),
    ("truncated data", "incomplete metadata"),
    ("overlapping offsets", "invalid offset"),
    ("out-of-range offsets", "incomplete metadata"),
    ("shape and dtype disagree with bytes", "invalid shape, data type, or offset"),
    ("unknown dtype", "unknown variant"),
    ("shorter than a header length", "too short"),
])
def test_hostile_or_broken_file(tmp_path, case, problem):
  path = tmp_path / "bad.safetensors"
  f32x2 = np.float32([1, 2]).tobytes()
  if case == "huge header length":
    _write(path, {}, b"", header_length=2**40)
  elif case == "header longer than file":
    _write(path, {"w": _entry("F32", (2,), 0, 8)}, f32x2, header_length=200)
  elif case == "not JSON":
    path.write_bytes(struct.pack("<Q", 6) + b"hello!" + f32x2)
  elif case == "JSON list":
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
  elif case == "truncated data":
    save_file({"w": np.zeros(16, np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])
  elif case == "overlapping offsets":
    _write(path, {"a": _entry("F32", (2,), 0, 8), "b": _entry("F32", (2,), 4, 12)},
           bytes(12))
  elif case == "out-of-range offsets":
    _write(path, {"a": _entry("F32", (2,), 0, 8), "b": _entry("F32", (2,), 8, 16)}, bytes(12))
  elif case == "shape and dtype disagree with bytes":
    _write(path, {"w": _entry("F32", (3,), 0, 8)}, f32x2)
  elif case == "unknown dtype":
    _write(path, {"w": _entry("Q99", (2,), 0, 8)}, f32x2)
  elif case == "shorter than a header length":
    path.write_bytes(b"\x05\x00")
  with pytest.raises(CheckpointError, match=problem) as error:
    safetensors_file.load(path)
  assert str(path) in str(error.value)


def test_read_state_dict_dispatches_safetensors(tmp_path):
  path = tmp_path / "model.safetensors"
  save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(path))
  np.testing.assert_array_equal(read_state_dict(path)["w"],
                                np.arange(6, dtype=np.float32).reshape(2, 3))
