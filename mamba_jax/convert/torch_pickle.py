"""Reading and writing PyTorch's ``pytorch_model.bin`` (a zip-format ``torch.save``) safely.

A ``.bin`` is a zip archive ``<name>/data.pkl`` (a pickle) plus one raw little-endian
buffer per storage, ``<name>/data/<key>``. Unpickling runs arbitrary code unless the
globals it may reference are restricted, so this module never calls plain ``pickle.load``:

* :func:`load_torch_state_dict` uses ``torch.load(weights_only=True)`` when torch is
  importable, and otherwise :func:`read_torch_zip`.
* :func:`read_torch_zip` unpickles with an allow-list of the globals a state dict of
  tensors needs (``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``, the typed
  storage classes, ``collections.OrderedDict``) and refuses every other global with a
  ValueError naming it: the guarantee of ``weights_only=True``, without torch. Tensor
  views are bounds-checked against their storage before they are read.
* :func:`write_torch_zip` writes the same archive layout that ``torch.save`` writes
  (storages aligned to 64 bytes, tensors sharing an array sharing one storage), without
  torch, by emitting the few pickle opcodes a state dict needs. ``torch.load`` (with
  ``weights_only=True``) reads it back.

Arrays are numpy; bfloat16 is ``ml_dtypes.bfloat16``.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

# torch's typed storage classes (pickled as the global torch.<Name>) and their element types.
STORAGE_DTYPES: Mapping[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_DTYPE_STORAGES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
_ALIGNMENT = 64  # bytes; torch.save aligns each storage's data in the archive.


class _StorageType:
  """Stands for the global torch.<Name>Storage while unpickling: only carries a dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = STORAGE_DTYPES[name]


def _check_index_tuple(what: str, value: Any) -> tuple[int, ...]:
  if not isinstance(value, tuple) or not all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
    raise ValueError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
  return value


def _rebuild_tensor_v2(storage: np.ndarray, storage_offset: int, size: tuple, stride: tuple,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2 on a numpy storage: a bounds-checked strided copy."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise ValueError("a tensor's storage must come from the archive (a persistent id)")
  size = _check_index_tuple("size", size)
  stride = _check_index_tuple("stride", stride)
  if len(size) != len(stride):
    raise ValueError(f"tensor size {size} and stride {stride} differ in rank")
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise ValueError(f"tensor storage_offset must be an int >= 0, got {storage_offset!r}")
  if 0 not in size:
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
      raise ValueError(f"tensor of size {size}, stride {stride}, offset {storage_offset} "
                       f"reads past its storage of {storage.size} elements")
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:] if storage.size else storage, shape=size,
      strides=tuple(s * item for s in stride), writeable=False)
  return np.array(view, copy=True)


def _rebuild_parameter(data: np.ndarray, requires_grad: Any = False,
                       backward_hooks: Any = None) -> np.ndarray:
  """torch._utils._rebuild_parameter: a Parameter is its data here."""
  del requires_grad, backward_hooks
  if not isinstance(data, np.ndarray):
    raise ValueError("a Parameter must wrap a tensor")
  return data


_ALLOWED_GLOBALS: Mapping[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a torch state dict, resolving only :data:`_ALLOWED_GLOBALS`."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path,
               byteorder: str):
    super().__init__(io.BytesIO(data))
    self._archive = archive
    self._prefix = prefix
    self._path = path
    self._byteorder = byteorder
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise ValueError(
          f"{self._path}: refusing to unpickle the global {module}.{name}: only tensors, "
          "their storages and (ordered) dicts are allowed, the guarantee of "
          "torch.load(weights_only=True). The file is not a plain state dict of tensors, or "
          "it is malicious.") from None

  def persistent_load(self, pid: Any) -> np.ndarray:
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)):
      raise ValueError(f"{self._path}: unexpected persistent id {pid!r}; expected "
                       "('storage', torch.<T>Storage, key, location, numel)")
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      name = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(name)
      except KeyError:
        raise ValueError(f"{self._path}: storage {name!r} is missing from the archive") from None
      dtype = storage_type.dtype
      if (not isinstance(numel, int) or len(raw) % dtype.itemsize
          or len(raw) < numel * dtype.itemsize):
        raise ValueError(f"{self._path}: storage {name!r} has {len(raw)} bytes, not "
                         f"{numel!r} elements of {storage_type.name}")
      array = np.frombuffer(raw, dtype=np.dtype(f"u{dtype.itemsize}"))
      if self._byteorder != sys.byteorder:
        array = array.byteswap()
      self._storages[key] = array.view(dtype)
    storage = self._storages[key]
    if storage.dtype != storage_type.dtype:
      raise ValueError(f"{self._path}: storage {key!r} is read as two different types")
    return storage


def read_torch_zip(path: str | Path) -> dict[str, np.ndarray]:
  """Reads a zip-format ``torch.save`` of a flat ``{name: tensor}`` dict, without torch.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: not a zip-format torch file, a global outside the allow-list, a malformed
      tensor, or not a flat dict of tensors.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no such file: {path}")
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not a zip-format torch file (legacy torch < 1.6 format?); "
                     "re-save it with a recent torch, or install torch to read it")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")
               and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one '<name>/data.pkl' in the archive, found "
                       f"{pickles}")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
      byteorder = archive.read(f"{prefix}byteorder").decode().strip()
    if byteorder not in ("little", "big"):
      raise ValueError(f"{path}: unknown byteorder {byteorder!r}")
    unpickler = _RestrictedUnpickler(archive.read(pickles[0]), archive, prefix, path,
                                     byteorder=byteorder)
    try:
      result = unpickler.load()
    except pickle.UnpicklingError as e:
      raise ValueError(f"{path}: malformed pickle in {pickles[0]}: {e}") from e
  if not isinstance(result, dict):
    raise ValueError(f"{path} holds a {type(result).__name__}, not a dict of tensors")
  for key, value in result.items():
    if not isinstance(key, str) or not isinstance(value, np.ndarray):
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                       "expected a flat state dict {name: tensor}")
  return dict(result)


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """``{name: array}`` from a ``pytorch_model.bin``: torch.load(weights_only=True) if torch is
  importable, :func:`read_torch_zip` otherwise. Never a plain unpickle."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no such file: {path}")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return read_torch_zip(path)
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, dict):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
  out = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().contiguous()
    if value.dtype == torch.bfloat16:
      out[key] = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    else:
      out[key] = value.numpy().copy()
  return out


# Writing: a pickle of {name: _rebuild_tensor_v2(persistent storage, ...)} in protocol 2.


def _op_int(n: int) -> bytes:
  if 0 <= n < 1 << 8:
    return pickle.BININT1 + struct.pack("<B", n)
  if 0 <= n < 1 << 16:
    return pickle.BININT2 + struct.pack("<H", n)
  if -(1 << 31) <= n < 1 << 31:
    return pickle.BININT + struct.pack("<i", n)
  body = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
  return pickle.LONG1 + struct.pack("<B", len(body)) + body


def _op_str(s: str) -> bytes:
  data = s.encode("utf-8")
  return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _op_tuple(items: tuple[int, ...]) -> bytes:
  return pickle.MARK + b"".join(_op_int(i) for i in items) + pickle.TUPLE


def _op_global(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")


def _tensor_pickle(key: str, storage_name: str, numel: int, shape: tuple[int, ...]) -> bytes:
  strides, step = [], 1
  for n in reversed(shape):
    strides.append(step)
    step *= max(n, 1)
  pid = (pickle.MARK + _op_str("storage") + _op_global("torch", storage_name) + _op_str(key)
         + _op_str("cpu") + _op_int(numel) + pickle.TUPLE + pickle.BINPERSID)
  args = (pickle.MARK + pid + _op_int(0) + _op_tuple(shape) + _op_tuple(tuple(reversed(strides)))
          + pickle.NEWFALSE + _op_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE
          + pickle.REDUCE + pickle.TUPLE)
  return _op_global("torch._utils", "_rebuild_tensor_v2") + args + pickle.REDUCE


def _aligned_info(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
  """A stored ZipInfo whose data starts at a multiple of 64 bytes, as torch.save aligns it."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  offset = archive.fp.tell() + 30 + len(name.encode("utf-8")) + 4  # header, name, extra id+len
  pad = (-offset) % _ALIGNMENT
  info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
  return info


def write_torch_zip(path: str | Path, tensors: Mapping[str, np.ndarray],
                    archive_name: str = "pytorch_model") -> None:
  """Writes ``{name: array}`` as a zip-format ``torch.save`` file, without torch.

  Entries that are the same array object share one storage (as a tied embedding and LM
  head do in a torch state dict).
  """
  path = Path(path)
  storages: dict[int, tuple[str, np.ndarray]] = {}
  body = [pickle.PROTO + b"\x02", pickle.EMPTY_DICT, pickle.MARK]
  for name, value in tensors.items():
    if not isinstance(name, str) or not isinstance(value, np.ndarray):
      raise ValueError(f"write_torch_zip: entry {name!r} must be a str -> numpy array, got "
                       f"{type(value).__name__}")
    if value.dtype not in _DTYPE_STORAGES:
      raise ValueError(f"write_torch_zip: {name!r} has dtype {value.dtype}, which has no torch "
                       f"storage here; expected one of {sorted(map(str, _DTYPE_STORAGES))}")
    if id(value) not in storages:
      storages[id(value)] = (str(len(storages)), value)
    key, _ = storages[id(value)]
    body.append(_op_str(name))
    body.append(_tensor_pickle(key, _DTYPE_STORAGES[value.dtype], value.size, value.shape))
  body += [pickle.SETITEMS, pickle.STOP]
  prefix = f"{archive_name}/"
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
    records = [("data.pkl", b"".join(body)), (".format_version", b"1"),
               (".storage_alignment", str(_ALIGNMENT).encode()), ("byteorder", b"little")]
    for key, value in storages.values():
      data = np.ascontiguousarray(value).view(np.dtype(f"u{value.itemsize}"))
      records.append((f"data/{key}", (data if sys.byteorder == "little" else data.byteswap())
                      .tobytes()))
    records += [("version", b"3\n")]
    for name, data in records:
      archive.writestr(_aligned_info(archive, prefix + name), data)
