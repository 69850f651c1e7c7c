"""Write {name: numpy array} state dicts as torch.save would, without torch, for tests.

save_zip writes the zip layout of torch >= 1.6, save_legacy the older stream layout
(_use_new_zipfile_serialization=False). The pickle is emitted opcode by opcode (protocol 2, as
torch.save's default) because the globals it names (torch._utils._rebuild_tensor_v2,
torch.FloatStorage) cannot be pickled without importing torch.

Arrays that view one another (a transpose, slices of one array) share one storage, with the
offset and strides of each view, as torch saves tensors sharing memory. bfloat16 arrays
(ml_dtypes) become BFloat16Storage. Values may also be nested dicts (training checkpoints),
`TensorView`s (a storage with an explicit view, possibly a broken one) and `RawPickle`s, spliced
in verbatim so that tests can hide hostile objects inside an otherwise valid checkpoint.
torch.load (torch 2.14) read what these write, shared storages included, when they were written.
"""
from __future__ import annotations

import dataclasses
import pickle
import struct
import zipfile
from typing import Mapping

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_CLASSES = {
  np.dtype(np.float64): "DoubleStorage", np.dtype(np.float32): "FloatStorage",
  np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
  np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
  np.dtype(np.int16): "ShortStorage", np.dtype(np.int8): "CharStorage",
  np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage",
}


class RawPickle(bytes):
  """A complete protocol-2 pickle (pickle.dumps(obj, protocol=2)) to place as a value as is."""


class _Opcodes:
  """Just the protocol-2 opcodes a state dict needs; no memo, so spliced pickles keep theirs."""

  def __init__(self):
    self.out = bytearray(b"\x80\x02")

  def glob(self, module: str, name: str):
    self.out += b"c" + f"{module}\n{name}\n".encode()

  def string(self, s: str):
    data = s.encode("utf-8")
    self.out += b"X" + struct.pack("<I", len(data)) + data

  def int(self, i: int):
    if 0 <= i < 2**31:
      self.out += b"J" + struct.pack("<i", i)
    else:
      data = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
      self.out += b"\x8a" + bytes([len(data)]) + data

  def ints(self, values):
    self.out += b"("
    for v in values:
      self.int(v)
    self.out += b"t"

  def ordered_dict(self):
    self.glob("collections", "OrderedDict")
    self.out += b")R"

  def raw(self, pickled: bytes):
    if not (pickled.startswith(b"\x80\x02") and pickled.endswith(b".")):
      raise ValueError("RawPickle needs a protocol-2 pickle")
    self.out += pickled[2:-1]


@dataclasses.dataclass
class TensorView:
  """A tensor given by its storage and view, written as is (tests use it for broken views).

  numel: the element count the file declares for the storage (default: the storage's size).
  """
  storage: np.ndarray
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]
  numel: int | None = None


def _root(array: np.ndarray) -> np.ndarray:
  while isinstance(array.base, np.ndarray):
    array = array.base
  return array


def _as_view(value: np.ndarray) -> TensorView:
  """The storage an array lives in (the array it views, if any) and its place in it."""
  value = np.asarray(value)
  root = _root(value)
  itemsize = value.dtype.itemsize
  offset_bytes = value.__array_interface__["data"][0] - root.__array_interface__["data"][0]
  if (root.dtype != value.dtype or not root.flags.c_contiguous or offset_bytes % itemsize
      or any(s < 0 or s % itemsize for s in value.strides)):
    root, offset_bytes = np.ascontiguousarray(value), 0
    value = root
  return TensorView(root, offset_bytes // itemsize, value.shape,
                    tuple(s // itemsize for s in value.strides))


def _pickle_state_dict(state_dict: Mapping, legacy: bool):
  """The main pickle's bytes and the storages {key: (array, declared numel)} it refers to."""
  storages: dict[int, tuple[str, np.ndarray, int]] = {}
  ops = _Opcodes()

  def write_tensor(view: TensorView):
    root = view.storage
    numel = root.size if view.numel is None else view.numel
    # Legacy keys are the storage's C pointer in torch; any distinct strings do.
    key = storages.setdefault(
        id(root), (str(len(storages) + (94000 if legacy else 0)), root, numel))[0]
    ops.glob("torch._utils", "_rebuild_tensor_v2")
    ops.out += b"("  # the arguments
    ops.out += b"("  # the persistent id of the storage
    ops.string("storage")
    ops.glob("torch", STORAGE_CLASSES[root.dtype])
    ops.string(key)
    ops.string("cpu")
    ops.int(numel)
    if legacy:
      ops.out += b"N"  # no view metadata
    ops.out += b"tQ"
    ops.int(view.offset)
    ops.ints(view.shape)
    ops.ints(view.stride)
    ops.out += b"\x89"  # requires_grad=False
    ops.ordered_dict()  # backward hooks
    ops.out += b"tR"

  def write_dict(entries: Mapping):
    ops.ordered_dict()
    ops.out += b"("
    for name, value in entries.items():
      ops.string(name)
      if isinstance(value, RawPickle):
        ops.raw(value)
      elif isinstance(value, Mapping):
        write_dict(value)
      else:
        write_tensor(value if isinstance(value, TensorView) else _as_view(value))
    ops.out += b"u"

  write_dict(state_dict)
  ops.out += b"."
  return bytes(ops.out), {key: (root, numel) for key, root, numel in storages.values()}


def _storage_bytes(array: np.ndarray, byteorder: str = "little") -> bytes:
  if byteorder == "big" and array.dtype.itemsize > 1:
    array = array.view(f"u{array.dtype.itemsize}").byteswap()
  return np.ascontiguousarray(array).tobytes()


def write_zip(path, data_pkl: bytes, storages: Mapping[str, bytes], *, archive: str = "archive",
              byteorder: str | None = "little"):
  """A zip checkpoint from a finished data.pkl and the bytes of each storage."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{archive}/data.pkl", data_pkl)
    if byteorder is not None:
      z.writestr(f"{archive}/byteorder", byteorder)
    for key, data in storages.items():
      z.writestr(f"{archive}/data/{key}", data)
    z.writestr(f"{archive}/version", "3\n")


def save_zip(state_dict: Mapping[str, np.ndarray], path, *, archive: str = "archive",
             byteorder: str = "little"):
  """As torch.save(state_dict, path) writes it."""
  data_pkl, storages = _pickle_state_dict(state_dict, legacy=False)
  write_zip(path, data_pkl, {k: _storage_bytes(a, byteorder) for k, (a, _) in storages.items()},
            archive=archive, byteorder=byteorder)


def write_legacy(path, main_pickle: bytes, storages: Mapping[str, tuple[np.ndarray, int]]):
  """A legacy checkpoint from a finished main pickle and the storages it names, each as
  (array, element count to declare)."""
  sys_info = {"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
              "type_sizes": {"short": 2, "int": 4, "long": 4}}
  with open(path, "wb") as f:
    for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, sys_info):
      f.write(pickle.dumps(header, protocol=2))
    f.write(main_pickle)
    keys = sorted(storages)
    f.write(pickle.dumps(keys, protocol=2))
    for key in keys:
      array, numel = storages[key]
      f.write(struct.pack("<q", numel))
      f.write(_storage_bytes(array))


def save_legacy(state_dict: Mapping[str, np.ndarray], path):
  """As torch.save(state_dict, path, _use_new_zipfile_serialization=False) writes it."""
  main_pickle, storages = _pickle_state_dict(state_dict, legacy=True)
  write_legacy(path, main_pickle, storages)
