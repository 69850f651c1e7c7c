"""Read PyTorch checkpoints written by torch.save, without torch and without running their code.

torch.save writes a pickle, and unpickling an untrusted pickle runs whatever it names. Here the
unpickler knows only the globals in `_ALLOWED` (OrderedDict, the tensor rebuild functions, the
storage classes, dtypes), each replaced by a local stand-in; any other global (os.system,
builtins.exec, numpy reconstructors...) is refused in find_class, before the pickle can call it.

Both layouts torch.save writes are read:
  zip (torch >= 1.6): <archive>/data.pkl, one record <archive>/data/<key> per storage, and an
    optional <archive>/byteorder record;
  legacy (older torch, or _use_new_zipfile_serialization=False): pickled magic number, protocol
    version and system info, the main pickle, the pickled list of storage keys, then each
    storage as an 8-byte little-endian element count followed by its bytes.
The pickle yields placeholders; tensors are rebuilt with numpy (dtype, shape, stride, offset)
once every storage is located, after checking that each view stays inside its storage. Nothing
read from the file is trusted to size an allocation beyond the file's own size: each pickle is
walked with pickletools before it is unpickled, storage lengths are checked against the file,
and the rebuilt tensors together may not outgrow it.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import pickletools
import struct
import sys
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

from jtl.weights.errors import CheckpointError

# torch.serialization's MAGIC_NUMBER and PROTOCOL_VERSION of the legacy stream.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch dtype name -> numpy dtype of the bytes in the file.
_NUMPY_DTYPES = {
  "float64": np.dtype(np.float64), "float32": np.dtype(np.float32),
  "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
  "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
  "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
  "complex64": np.dtype(np.complex64), "complex128": np.dtype(np.complex128),
  "int64": np.dtype(np.int64), "int32": np.dtype(np.int32), "int16": np.dtype(np.int16),
  "int8": np.dtype(np.int8), "uint64": np.dtype(np.uint64), "uint32": np.dtype(np.uint32),
  "uint16": np.dtype(np.uint16), "uint8": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
}
# numpy has no arithmetic of its own for these; callers get float32, which holds them exactly.
_WIDENED = ("bfloat16", "float8_e4m3fn", "float8_e5m2")

# Storage classes torch pickles by name (torch.FloatStorage...) and the dtype each holds.
_STORAGE_CLASSES = {
  "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
  "BFloat16Storage": "bfloat16", "ComplexFloatStorage": "complex64",
  "ComplexDoubleStorage": "complex128", "LongStorage": "int64", "IntStorage": "int32",
  "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}


class _Inert:
  """Base of every stand-in: a pickle may pass them around but not fill them in (BUILD)."""

  def __setstate__(self, state):
    raise CheckpointError(f"pickle tries to set the state of a {type(self).__name__}")


@dataclasses.dataclass(frozen=True, eq=False)
class _DType(_Inert):
  """Stands in for a torch dtype (torch.float32...) and for a storage class (torch.FloatStorage)."""
  name: str


@dataclasses.dataclass(eq=False)
class _Storage(_Inert):
  """A storage named by the pickle; `root` is the key of the bytes in the file, `byte_offset`
  and `nbytes` the part of them it covers (legacy files may hold views of a storage)."""
  root: str
  dtype: str
  byte_offset: int
  nbytes: int


@dataclasses.dataclass(eq=False)
class _TensorRef(_Inert):
  """A tensor to rebuild once its storage's bytes are at hand; offset and stride in elements."""
  storage: _Storage
  dtype: str
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
    raise CheckpointError(f"tensor {what} {value!r} is not a tuple of non-negative integers")
  return tuple(value)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None = None):
  if not isinstance(storage, _Storage):
    raise CheckpointError(f"tensor built on a {type(storage).__name__}, not on a storage")
  if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
    raise CheckpointError(f"tensor storage offset {offset!r} is not a non-negative integer")
  shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
  if len(shape) != len(strides):
    raise CheckpointError(f"tensor size {shape} and stride {strides} differ in length")
  return _TensorRef(storage, dtype or storage.dtype, offset, shape, strides)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  if metadata:
    raise CheckpointError(f"tensor with conjugate/negative view bits {metadata!r}")
  return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  """torch's rebuild for dtypes that have no typed storage class (uint16, float8...)."""
  if not isinstance(dtype, _DType) or dtype.name not in _NUMPY_DTYPES:
    raise CheckpointError(f"tensor dtype {dtype!r} is not a known torch dtype")
  if metadata:
    raise CheckpointError(f"tensor with conjugate/negative view bits {metadata!r}")
  return _tensor(storage, storage_offset, size, stride, dtype.name)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  if not isinstance(data, _TensorRef):
    raise CheckpointError(f"parameter built from a {type(data).__name__}, not from a tensor")
  return data


_TENSOR_CLASS = _DType("Tensor")
_PARAMETER_CLASS = _DType("Parameter")
_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
  """What torch pickles for a tensor that carries Python attributes; the attributes are dropped."""
  if func not in _REBUILDERS or new_type not in (_TENSOR_CLASS, _PARAMETER_CLASS):
    raise CheckpointError(f"_rebuild_from_type_v2 of {func!r} into {new_type!r}")
  if not isinstance(args, tuple):
    raise CheckpointError("_rebuild_from_type_v2 arguments are not a tuple")
  return func(*args)


def _torch_size(dims=()):
  return _int_tuple(dims, "size")


# The complete list of globals a checkpoint may name. Each maps to a local stand-in; nothing of
# torch (nor any other module named in the file) is imported or called.
_ALLOWED: dict[tuple[str, str], Any] = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
  ("torch", "Tensor"): _TENSOR_CLASS,
  ("torch.nn.parameter", "Parameter"): _PARAMETER_CLASS,
  ("torch", "Size"): _torch_size,
  ("torch", "UntypedStorage"): _DType("uint8"),
  ("torch.storage", "UntypedStorage"): _DType("uint8"),
  **{("torch", cls): _DType(dtype) for cls, dtype in _STORAGE_CLASSES.items()},
  **{("torch", dtype): _DType(dtype) for dtype in _NUMPY_DTYPES},
}


class _Unpickler(pickle.Unpickler):
  """Unpickler that resolves only `allowed` globals, storages through `load_storage`."""

  def __init__(self, file, path: str, allowed: dict, load_storage: Callable | None = None):
    super().__init__(file, encoding="utf-8")
    self._path, self._allowed, self._load_storage = path, allowed, load_storage

  def find_class(self, module, name):
    try:
      return self._allowed[(module, name)]
    except (KeyError, TypeError):
      raise CheckpointError(
          f"{self._path}: refused to load global {module}.{name}: only tensors, storages and "
          "OrderedDict may appear in a checkpoint (it may contain code, or be more than a "
          "state dict)") from None

  def persistent_load(self, pid):
    if self._load_storage is None:
      raise CheckpointError(f"{self._path}: unexpected persistent id {pid!r}")
    if not isinstance(pid, tuple) or not pid or _ascii(pid[0]) != "storage":
      raise CheckpointError(f"{self._path}: persistent id {pid!r} is not a storage "
                            "(whole pickled modules are not supported; save a state_dict)")
    return self._load_storage(pid[1:])


def _ascii(value: Any) -> Any:
  return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _unpickle(data: bytes, path: str, allowed: dict, load_storage: Callable | None = None) -> Any:
  _check_pickle(path, io.BytesIO(data))
  try:
    return _Unpickler(io.BytesIO(data), path, allowed, load_storage).load()
  except CheckpointError as e:
    raise (e if str(e).startswith(path) else CheckpointError(f"{path}: {e}")) from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
          AttributeError, OverflowError, MemoryError, RecursionError, struct.error) as e:
    raise CheckpointError(f"{path}: corrupt pickle ({type(e).__name__}: {e})") from None


def _check_pickle(path: str, stream) -> None:
  """Walks one pickle's opcodes up to its STOP, checking that each length field's bytes are
  there: CPython's unpickler allocates a declared length before it reads the bytes."""
  try:
    for _ in pickletools.genops(stream):
      pass
  except (ValueError, EOFError, struct.error, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: corrupt or truncated pickle ({e})") from None


def _next_pickle(path: str, f, file_size: int) -> bytes:
  """The bytes of the pickle that starts at f's position; f is left just after it."""
  start = f.tell()
  _check_pickle(path, _Bounded(f, file_size))
  end = f.tell()
  f.seek(start)
  return f.read(end - start)


class _Bounded(io.RawIOBase):
  """Reads of f that never ask for more than the file holds, whatever length they are given."""

  def __init__(self, f, size: int):
    self._f, self._size = f, size

  def readable(self):
    return True

  def _left(self, n) -> int:
    left = max(self._size - self._f.tell(), 0)
    return left if n is None or n < 0 else min(n, left)

  def read(self, n=-1):
    return self._f.read(self._left(n))

  def readinto(self, buffer):
    data = self.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)

  def readline(self, limit=-1):
    return self._f.readline(self._left(limit))

  def tell(self):
    return self._f.tell()


def _storage_from_pid(path: str, fields: tuple, storages: dict[str, _Storage]) -> _Storage:
  """A storage for persistent id fields (type, key, location, numel[, view]), shared by key."""
  if len(fields) not in (4, 5):
    raise CheckpointError(f"{path}: storage id {fields!r} has {len(fields)} fields, not 4 or 5")
  storage_type, key, _, numel = fields[:4]
  view = fields[4] if len(fields) == 5 else None
  key = _ascii(key)
  if not isinstance(storage_type, _DType) or storage_type.name not in _NUMPY_DTYPES:
    raise CheckpointError(f"{path}: storage {key!r} has unknown type {storage_type!r}")
  if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
    raise CheckpointError(f"{path}: storage id {fields!r} is malformed")
  itemsize = _NUMPY_DTYPES[storage_type.name].itemsize
  storage = _Storage(key, storage_type.name, 0, numel * itemsize)
  known = storages.setdefault(key, storage)
  if (known.dtype, known.nbytes) != (storage.dtype, storage.nbytes):
    raise CheckpointError(f"{path}: storage {key!r} is named both as {known.dtype} x "
                          f"{known.nbytes} bytes and as {storage.dtype} x {storage.nbytes} bytes")
  if view is None:
    return known
  # Storage views of old torch: (view key, offset, size) within this storage, in elements.
  if (not isinstance(view, tuple) or len(view) != 3
      or not all(isinstance(v, int) and v >= 0 for v in view[1:])):
    raise CheckpointError(f"{path}: storage view {view!r} of {key!r} is malformed")
  _, view_offset, view_size = view
  return _Storage(key, known.dtype, view_offset * itemsize, view_size * itemsize)


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The state dict in a torch.save file (zip or legacy), as {name: numpy array}.

  A checkpoint {"state_dict": {...}} or {"model": {...}} yields the inner dict. bfloat16 and
  float8 tensors come back as float32; other dtypes as saved.
  """
  path = os.fspath(path)
  try:
    file_size = os.path.getsize(path)
    if file_size == 0:
      raise CheckpointError(f"{path}: empty file")
    if zipfile.is_zipfile(path):
      return _load_zip(path, file_size)
    with open(path, "rb") as f:
      return _load_legacy(path, f, file_size)
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read ({e})") from None


def _load_zip(path: str, file_size: int) -> dict[str, np.ndarray]:
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, ValueError) as e:
    raise CheckpointError(f"{path}: broken zip archive ({e})") from None
  with archive:
    records = {info.filename: info for info in archive.infolist()}
    pickles = [n for n in records if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise CheckpointError(f"{path}: zip archive without exactly one <folder>/data.pkl "
                            f"(found {pickles or 'none'}); not a torch.save file")
    prefix = pickles[0][:-len("data.pkl")]
    if any(n.startswith(prefix + "code/") for n in records):
      raise CheckpointError(f"{path}: a TorchScript archive (torch.jit.save), not a state dict")

    def read_record(name: str) -> bytes:
      info = records.get(name)
      if info is None:
        raise CheckpointError(f"{path}: missing record {name}")
      if info.file_size > file_size:
        raise CheckpointError(f"{path}: record {name} claims {info.file_size} bytes, more than "
                              f"the file's {file_size}")
      try:
        return archive.read(info)
      except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: cannot read record {name} ({e})") from None

    byteorder = "little"
    if prefix + "byteorder" in records:
      byteorder = read_record(prefix + "byteorder").decode("ascii", "replace").strip()
      if byteorder not in ("little", "big"):
        raise CheckpointError(f"{path}: unknown byteorder record {byteorder!r}")

    storages: dict[str, _Storage] = {}

    def load_storage(fields: tuple) -> _Storage:
      storage = _storage_from_pid(path, fields, storages)
      if prefix + "data/" + storage.root not in records:
        raise CheckpointError(f"{path}: missing storage record {prefix}data/{storage.root}")
      return storage

    obj = _unpickle(read_record(pickles[0]), path, _ALLOWED, load_storage)

    def storage_bytes(key: str) -> bytes:
      data = read_record(prefix + "data/" + key)
      if len(data) != storages[key].nbytes:
        raise CheckpointError(f"{path}: storage record {prefix}data/{key} holds {len(data)} "
                              f"bytes, the pickle says {storages[key].nbytes}")
      return data

    return _materialize(path, obj, storage_bytes, byteorder, file_size)


def _load_legacy(path: str, f, file_size: int) -> dict[str, np.ndarray]:
  head = f.read(512)
  f.seek(0)
  if head.startswith(b"PK\x03\x04"):
    raise CheckpointError(f"{path}: a zip archive without a readable central directory "
                          "(truncated or corrupt)")
  if head[257:262] == b"ustar":
    raise CheckpointError(f"{path}: a tar checkpoint of torch < 0.4, which is not supported")
  if not head.startswith(b"\x80"):
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a "
                          "legacy torch.save stream)")
  next_pickle = lambda: _next_pickle(path, f, file_size)
  if _unpickle(next_pickle(), path, {}) != LEGACY_MAGIC:
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (wrong magic number)")
  protocol = _unpickle(next_pickle(), path, {})
  if protocol != LEGACY_PROTOCOL:
    raise CheckpointError(f"{path}: unknown legacy protocol version {protocol!r}")
  if not isinstance(_unpickle(next_pickle(), path, {}), dict):
    raise CheckpointError(f"{path}: system information record is not a dict")
  storages: dict[str, _Storage] = {}
  obj = _unpickle(next_pickle(), path, _ALLOWED,
                  lambda fields: _storage_from_pid(path, fields, storages))
  keys = _unpickle(next_pickle(), path, {})
  if not isinstance(keys, list) or not all(isinstance(_ascii(k), str) for k in keys):
    raise CheckpointError(f"{path}: storage key list is malformed")
  # Each storage: its element count, then its bytes (little-endian whatever machine wrote it).
  data_offsets: dict[str, int] = {}
  for key in map(_ascii, keys):
    storage = storages.get(key)
    if storage is None:
      raise CheckpointError(f"{path}: storage {key!r} is listed but no tensor uses it")
    count_bytes = f.read(8)
    if len(count_bytes) != 8:
      raise CheckpointError(f"{path}: truncated before storage {key!r}")
    count = int.from_bytes(count_bytes, "little")
    itemsize = _NUMPY_DTYPES[storage.dtype].itemsize
    if count * itemsize != storage.nbytes:
      raise CheckpointError(f"{path}: storage {key!r} holds {count} elements, the pickle says "
                            f"{storage.nbytes // itemsize}")
    data_offsets[key] = f.tell()
    if f.tell() + storage.nbytes > file_size:
      raise CheckpointError(f"{path}: truncated in storage {key!r} (needs {storage.nbytes} "
                            f"bytes from offset {f.tell()}, the file has {file_size})")
    f.seek(storage.nbytes, os.SEEK_CUR)
  missing = sorted(set(storages) - set(data_offsets))
  if missing:
    raise CheckpointError(f"{path}: missing storage records {missing}")

  def storage_bytes(key: str) -> bytes:
    f.seek(data_offsets[key])
    return f.read(storages[key].nbytes)

  return _materialize(path, obj, storage_bytes, "little", file_size)


def _state_dict_of(path: str, obj: Any) -> dict:
  """The top-level dict itself, or the state dict inside a training checkpoint."""
  if isinstance(obj, _TensorRef):
    raise CheckpointError(f"{path}: holds a single tensor, not a state dict")
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: top-level object is a {type(obj).__name__}, not a state dict")
  if not any(isinstance(v, _TensorRef) for v in obj.values()):
    for wrapper in ("state_dict", "model"):
      if isinstance(obj.get(wrapper), dict):
        return obj[wrapper]
  return obj


def _materialize(path: str, obj: Any, storage_bytes: Callable[[str], bytes], byteorder: str,
                 file_size: int) -> dict[str, np.ndarray]:
  """Numpy arrays for the tensors of the state dict in `obj`, in its order."""
  refs: dict[str, _TensorRef] = {}
  for key, value in _state_dict_of(path, obj).items():
    if not isinstance(key, str):
      raise CheckpointError(f"{path}: state dict key {key!r} is not a string")
    if isinstance(value, _TensorRef):
      refs[key] = value
    elif value is not None and not isinstance(value, (bool, int, float, str, bytes)):
      raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor "
                            "(nested containers are not read)")
    # Plain scalars beside the tensors are bookkeeping (epochs, versions), not weights.

  # Identical views (tied weights) become one array, so that the arrays together never
  # exceed the file's size, whatever the pickle claims.
  views: dict[tuple, list[str]] = {}
  for key, ref in refs.items():
    itemsize = _NUMPY_DTYPES[ref.dtype].itemsize
    view = (ref.storage.root, ref.dtype, ref.storage.byte_offset + ref.offset * itemsize,
            ref.shape, ref.stride)
    views.setdefault(view, []).append(key)
  total = sum(_NUMPY_DTYPES[v[1]].itemsize * int(np.prod(v[3], dtype=object)) for v in views)
  if total > file_size:
    raise CheckpointError(f"{path}: tensors would take {total} bytes, more than the file's "
                          f"{file_size}")

  arrays: dict[str, np.ndarray] = {}
  by_root: dict[str, list[list[str]]] = {}
  for keys in views.values():
    by_root.setdefault(refs[keys[0]].storage.root, []).append(keys)
  for root, groups in by_root.items():
    data = storage_bytes(root)  # read once per storage, released after its tensors
    for keys in groups:
      array = _view_to_array(path, keys[0], refs[keys[0]], data, byteorder)
      for key in keys:
        arrays[key] = array
  return {key: arrays[key] for key in refs}


def _view_to_array(path: str, key: str, ref: _TensorRef, data: bytes,
                   byteorder: str) -> np.ndarray:
  dtype = _NUMPY_DTYPES[ref.dtype]
  start, stop = ref.storage.byte_offset, ref.storage.byte_offset + ref.storage.nbytes
  if stop > len(data):
    raise CheckpointError(f"{path}: tensor {key!r}: storage view bytes [{start}, {stop}) reach "
                          f"beyond storage {ref.storage.root!r} of {len(data)} bytes")
  elements = (stop - start) // dtype.itemsize
  numel = int(np.prod(ref.shape, dtype=object))
  if numel == 0:
    array = np.zeros(ref.shape, dtype)
  else:
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if last >= elements:
      raise CheckpointError(
          f"{path}: tensor {key!r} (offset {ref.offset}, size {ref.shape}, stride {ref.stride}) "
          f"reaches element {last} of storage {ref.storage.root!r}, which holds {elements}")
    flat = np.frombuffer(data, dtype, count=elements, offset=start)
    array = np.lib.stride_tricks.as_strided(
        flat[ref.offset:], ref.shape, [s * dtype.itemsize for s in ref.stride],
        writeable=False).copy()
  if byteorder != sys.byteorder and dtype.itemsize > 1:
    # ml_dtypes' types swap as the unsigned integers of their width.
    array = (array.byteswap() if dtype.isbuiltin
             else array.view(f"u{dtype.itemsize}").byteswap().view(dtype))
  if ref.dtype in _WIDENED:
    array = array.astype(np.float32)
  return array
