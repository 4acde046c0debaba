"""Read PyTorch checkpoint files (``torch.save``) without PyTorch.

Two on-disk formats exist and both are handled, with nothing but :mod:`pickle`,
:mod:`zipfile` and NumPy:

* **zip** (the default since PyTorch 1.6): a zip archive holding ``<root>/data.pkl`` (the
  pickled object) and one raw little-endian blob per storage at ``<root>/data/<key>``; newer
  archives add ``<root>/byteorder``.
* **legacy** (``_use_new_zipfile_serialization=False``, and every file written before 1.6):
  five things back to back — a pickled magic number, a pickled protocol version, a pickled
  ``sys_info`` dict, the pickled object, a pickled list of storage keys — followed, for each
  key in that list, by the storage's element count (int64) and its raw bytes.

In both, a tensor is pickled as a call to ``torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, ...)`` and a storage as a *persistent id* ``("storage", <type>, key, location,
numel, ...)``. The unpickler here resolves the storages to flat NumPy arrays and the rebuild
calls to strided views of them, copied out so each tensor owns its memory (tensors that shared
one storage in PyTorch come back as independent arrays with the same values).

Only the handful of globals a state dict needs are allowed (the rebuild functions, the storage
types, ``OrderedDict``); anything else is refused, as ``torch.load(weights_only=True)`` does,
so reading a file cannot run code from it.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

__all__ = ["load_pth", "PthError"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class PthError(ValueError):
    """The file is not a PyTorch checkpoint this reader understands."""


def _bfloat16():
    try:
        import ml_dtypes  # ships with jaxlib

        return np.dtype(ml_dtypes.bfloat16)
    except ImportError:  # pragma: no cover - jax always brings ml_dtypes
        raise PthError("The file holds bfloat16 tensors; reading them needs the ml_dtypes package.") from None


# Storage class name -> NumPy dtype (a callable for dtypes NumPy lacks).
_STORAGE_DTYPES: dict[str, Any] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": _bfloat16,
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "ComplexDoubleStorage": np.dtype("<c16"),
    "UntypedStorage": np.dtype("u1"),
}


class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co. inside the pickle."""

    def __init__(self, name: str):
        if name not in _STORAGE_DTYPES:
            raise PthError(f"Unsupported storage type torch.{name}.")
        self.name = name

    @property
    def dtype(self) -> np.dtype:
        d = _STORAGE_DTYPES[self.name]
        return d() if callable(d) else d


class _DtypeMarker:
    """Stands in for a ``torch.float32``-like dtype object (``_rebuild_tensor_v3`` passes one)."""

    _NAMES = {
        "float64": "DoubleStorage",
        "double": "DoubleStorage",
        "float32": "FloatStorage",
        "float": "FloatStorage",
        "float16": "HalfStorage",
        "half": "HalfStorage",
        "bfloat16": "BFloat16Storage",
        "int64": "LongStorage",
        "long": "LongStorage",
        "int32": "IntStorage",
        "int": "IntStorage",
        "int16": "ShortStorage",
        "short": "ShortStorage",
        "int8": "CharStorage",
        "uint8": "ByteStorage",
        "bool": "BoolStorage",
        "complex64": "ComplexFloatStorage",
        "complex128": "ComplexDoubleStorage",
    }

    def __init__(self, name: str):
        if name not in self._NAMES:
            raise PthError(f"Unsupported tensor dtype torch.{name}.")
        self.dtype = _StorageType(self._NAMES[name]).dtype


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused) -> np.ndarray:
    """A tensor: ``size``/``stride`` (in elements) over a flat storage, from ``offset``."""
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    if len(size) != len(stride):
        raise PthError(f"A tensor's size {size} and stride {stride} disagree in rank.")
    offset = int(offset)
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if offset < 0 or last >= storage.size or any(s < 0 for s in stride):
        raise PthError(
            f"A tensor of size {size}, stride {stride} at offset {offset} does not fit its storage "
            f"of {storage.size} elements: the file is damaged."
        )
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view, copy=True, order="C")


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *unused):
    arr = _rebuild_tensor(storage, offset, size, stride)
    want = dtype.dtype if isinstance(dtype, _DtypeMarker) else arr.dtype
    return arr if arr.dtype == want else arr.view(want).reshape(arr.shape)


def _rebuild_parameter(data, *unused):
    return data


def _rebuild_parameter_with_state(data, requires_grad, hooks, state):
    return data


class _Unpickler(pickle.Unpickler):
    """Resolves storages through ``load_storage(key, dtype, numel)``; refuses unknown globals."""

    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
    }

    def __init__(self, file, load_storage):
        super().__init__(file, encoding="latin1")
        self._load_storage = load_storage
        self._cache: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "torch" and name in _DtypeMarker._NAMES:
            return _DtypeMarker(name)
        raise PthError(
            f"The checkpoint refers to {module}.{name}, which this reader does not load (it reads "
            f"tensors, dicts, lists and numbers only, like torch.load(weights_only=True))."
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise PthError(f"Unknown persistent id {pid!r} in the checkpoint.")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], int(pid[4])
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise PthError(f"Unknown storage type {storage_type!r} in the checkpoint.")
        if key not in self._cache:
            self._cache[key] = self._load_storage(key, storage_type.dtype, numel)
        base = self._cache[key]
        if view is not None:  # very old files: (view_key, offset, view_size)
            _view_key, start, length = view
            return base[int(start) : int(start) + int(length)]
        return base


def _read_zip(zf: zipfile.ZipFile):
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pkl:
        raise PthError("A zip file, but not a PyTorch checkpoint: it has no <root>/data.pkl.")
    root = pkl[0].split("/")[0]
    order = "little"
    if f"{root}/byteorder" in names:
        order = zf.read(f"{root}/byteorder").decode("ascii").strip()
    if order not in ("little", "big"):
        raise PthError(f"Unknown byte order {order!r} in the checkpoint.")

    def load_storage(key, dtype, numel):
        raw = zf.read(f"{root}/data/{key}")
        dt = dtype.newbyteorder("<" if order == "little" else ">") if dtype.itemsize > 1 else dtype
        arr = np.frombuffer(raw, dtype=dt)
        if arr.size < numel:
            raise PthError(f"Storage {key} holds {arr.size} elements; the checkpoint expects {numel}.")
        return arr.astype(dtype.newbyteorder("=") if dtype.itemsize > 1 else dtype, copy=False)

    with zf.open(pkl[0]) as f:
        return _Unpickler(io.BytesIO(f.read()), load_storage).load()


def _read_legacy(buf: bytes):
    f = io.BytesIO(buf)

    def plain_load():
        return pickle.Unpickler(f, encoding="latin1").load()

    try:
        magic = plain_load()
    except Exception as e:
        raise PthError(
            f"Not a PyTorch checkpoint (neither a zip archive nor a legacy pickle stream): {e}"
        ) from None
    if magic != _LEGACY_MAGIC:
        raise PthError(
            "Not a PyTorch checkpoint: the pickle stream does not start with torch's magic number."
        )
    protocol = plain_load()
    if protocol != _LEGACY_PROTOCOL:
        raise PthError(f"Unsupported legacy checkpoint protocol {protocol!r} (expected {_LEGACY_PROTOCOL}).")
    sys_info = plain_load()
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True

    wanted: dict[str, tuple[np.dtype, int]] = {}

    def defer(key, dtype, numel):
        # The raw data comes after the object's pickle: hand out a placeholder now, fill later.
        wanted[key] = (dtype, numel)
        return _Placeholder(key)

    obj = _DeferredUnpickler(f, defer).load()
    keys = plain_load()
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        key = str(key)
        (count,) = struct.unpack("<q" if little else ">q", f.read(8))
        dtype = wanted.get(key, (np.dtype("u1"), count))[0]
        nbytes = count * dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise PthError(f"The checkpoint ends inside storage {key}: the file is truncated.")
        dt = dtype.newbyteorder("<" if little else ">") if dtype.itemsize > 1 else dtype
        storages[key] = np.frombuffer(raw, dtype=dt).astype(
            dtype.newbyteorder("=") if dtype.itemsize > 1 else dtype, copy=False
        )
    missing = set(wanted) - set(storages)
    if missing:
        raise PthError(f"The checkpoint lacks the data of storage(s) {sorted(missing)}.")
    return _resolve(obj, storages)


class _Placeholder:
    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key


class _PendingTensor:
    """A tensor whose storage data is not read yet (legacy format)."""

    __slots__ = ("key", "start", "length", "args", "rebuild")

    def __init__(self, key, rebuild, args, start=0, length=None):
        self.key, self.rebuild, self.args, self.start, self.length = key, rebuild, args, start, length


class _DeferredUnpickler(_Unpickler):
    """For the legacy format: tensors become :class:`_PendingTensor` until the data is read."""

    def find_class(self, module, name):
        fn = super().find_class(module, name)
        if fn in (_rebuild_tensor, _rebuild_tensor_v3):
            return lambda storage, *args: self._pending(fn, storage, args)
        return fn

    def persistent_load(self, pid):
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise PthError(f"Unknown storage type {storage_type!r} in the checkpoint.")
        self._load_storage(key, storage_type.dtype, numel)
        view = pid[5] if len(pid) > 5 else None
        if view is not None:
            return ("view", key, int(view[1]), int(view[2]))
        return ("whole", key)

    @staticmethod
    def _pending(fn, storage, args):
        if isinstance(storage, tuple) and storage[0] == "view":
            return _PendingTensor(storage[1], fn, args, storage[2], storage[3])
        if isinstance(storage, tuple) and storage[0] == "whole":
            return _PendingTensor(storage[1], fn, args)
        raise PthError("A tensor in the checkpoint is not backed by a storage.")


def _resolve(obj, storages):
    """Replace pending tensors inside dicts/lists/tuples by arrays."""
    if isinstance(obj, _PendingTensor):
        base = storages[obj.key]
        if obj.length is not None:
            base = base[obj.start : obj.start + obj.length]
        return obj.rebuild(base, *obj.args)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _resolve(v, storages)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _resolve(v, storages) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v, storages) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v, storages) for v in obj)
    return obj


def load_pth(file: str | os.PathLike | BinaryIO) -> Any:
    """Load what ``torch.save`` wrote, with tensors as NumPy arrays — no PyTorch needed.

    Args:
      file: a path or a binary file object, in the zip format or the legacy one.

    Returns:
      The saved object (typically an ``OrderedDict`` state dict) with every tensor replaced by
      a C-contiguous ``np.ndarray`` of the same shape and dtype (``bfloat16`` via
      ``ml_dtypes``). Parameters come back as plain arrays.

    Raises:
      PthError: the file is not a PyTorch checkpoint, is truncated, or refers to Python objects
        other than tensors and containers.
    """
    if hasattr(file, "read"):
        buf = file.read()
    else:
        with open(os.fspath(file), "rb") as fh:
            buf = fh.read()
    if buf[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(buf)) as zf:
            return _read_zip(zf)
    return _read_legacy(buf)
