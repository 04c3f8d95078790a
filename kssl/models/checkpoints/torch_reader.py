"""Reads PyTorch checkpoint files with numpy alone (no torch), treating them as untrusted.

Two layouts are understood, the two that `torch.save` has written:

* zip (torch >= 1.6): a zip archive with one top folder (any name) holding `data.pkl` (the
  pickled object), `data/<key>` (each storage's raw bytes) and optionally `byteorder`
  ("little" or "big"). In `data.pkl` a storage is a persistent id
  `('storage', storage_type, key, location, numel)`.
* legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): five things written
  back to back: a pickled magic number, a pickled protocol version (1001), a pickled
  `sys_info` dict (byte order, C type sizes), the pickled object (persistent ids
  `('storage', storage_type, key, location, numel, view_metadata)`), a pickled list of
  storage keys, then for each key in that order an int64 element count followed by the
  storage's raw bytes.

Pickles run code by design, so they are read with a restricted unpickler that resolves
only the globals a tensor checkpoint needs (the tensor- and parameter-rebuild functions,
the storage types, `collections.OrderedDict`, `torch.Size`, and `_codecs.encode` for
latin-1 byte strings), each mapped to a function of this module; torch itself is never
imported. Any other global (a pickled `nn.Module`, `numpy` scalars, `os.system`, ...)
raises `UnsafeCheckpointError` naming it, before anything is called.

Tensors come back as C-contiguous numpy arrays of the storage's dtype (little-endian),
built from the storage with the tensor's offset, shape and strides and then copied, so a
transposed tensor or two tensors sharing one storage come out exactly as torch shows them.
bfloat16 storages are widened to float32 (exact: bfloat16 is the top half of a float32).
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch storage type name -> (numpy dtype of the raw bytes, dtype handed back).
STORAGE_DTYPES = {
    "DoubleStorage": (np.float64, np.float64),
    "FloatStorage": (np.float32, np.float32),
    "HalfStorage": (np.float16, np.float16),
    "BFloat16Storage": (np.uint16, np.float32),  # widened, see _bfloat16_to_float32
    "LongStorage": (np.int64, np.int64),
    "IntStorage": (np.int32, np.int32),
    "ShortStorage": (np.int16, np.int16),
    "CharStorage": (np.int8, np.int8),
    "ByteStorage": (np.uint8, np.uint8),
    "BoolStorage": (np.bool_, np.bool_),
    "ComplexFloatStorage": (np.complex64, np.complex64),
    "ComplexDoubleStorage": (np.complex128, np.complex128),
}


class CheckpointError(ValueError):
    """A file that is not a readable PyTorch checkpoint (corrupt, truncated, unsupported)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle names a global outside the allowed set.

    Raised before the global is resolved, so nothing it names is imported or called.
    """


# -- what the restricted unpickler builds ---------------------------------------------------
class _StorageType:
    """Stands for `torch.<name>Storage` inside the unpickled object."""

    def __init__(self, name: str):
        self.name = name
        self.raw_dtype, self.dtype = (np.dtype(d) for d in STORAGE_DTYPES[name])

    def __repr__(self):
        return f"torch.{self.name}"


class _Storage:
    """One storage: its type, element count, and (once read) its raw data as a 1-D array."""

    def __init__(self, storage_type: _StorageType, key: str, numel: int):
        self.type = storage_type
        self.key = key
        self.numel = numel
        self.data: np.ndarray | None = None
        # Legacy storage views (torch < 0.4): a slice of a root storage.
        self.root: _Storage | None = None
        self.root_offset = 0

    def array(self) -> np.ndarray:
        if self.root is not None:
            return self.root.array()[self.root_offset:self.root_offset + self.numel]
        if self.data is None:
            raise CheckpointError(f"storage {self.key!r} has no data in the file")
        return self.data


class _PendingTensor:
    """A tensor whose storage bytes may not have been read yet (legacy files store them
    after the object pickle); replaced by a numpy array once every storage is read."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        if not isinstance(storage, _Storage):
            raise CheckpointError(f"a tensor is rebuilt from {type(storage).__name__}, "
                                  "not from a storage")
        self.storage = storage
        self.offset = _as_int(offset, "storage offset")
        self.size = tuple(_as_int(s, "size") for s in size)
        self.stride = tuple(_as_int(s, "stride") for s in stride)
        if len(self.size) != len(self.stride):
            raise CheckpointError(f"a tensor of size {self.size} has strides {self.stride}")

    def materialise(self) -> np.ndarray:
        """The tensor as a C-contiguous numpy array (a copy: storages may be shared)."""
        data = self.storage.array()
        if any(s < 0 for s in self.size) or any(s < 0 for s in self.stride) or self.offset < 0:
            raise CheckpointError(f"storage {self.storage.key!r}: negative size, stride or "
                                  f"offset (size {self.size}, stride {self.stride}, "
                                  f"offset {self.offset})")
        if 0 in self.size:
            out = np.zeros(self.size, data.dtype)
        else:
            last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
            if last >= data.size:
                raise CheckpointError(
                    f"storage {self.storage.key!r} holds {data.size} elements but a tensor "
                    f"of size {self.size}, stride {self.stride}, offset {self.offset} "
                    f"reaches element {last}")
            view = np.lib.stride_tricks.as_strided(
                data[self.offset:], shape=self.size,
                strides=tuple(s * data.itemsize for s in self.stride), writeable=False)
            out = np.array(view, order="C", copy=True)
        if self.storage.type.name == "BFloat16Storage":
            out = _bfloat16_to_float32(out)
        return out


def _as_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"tensor {what} is {value!r}, not an int")
    return value


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: bfloat16 is a float32's top 16 bits."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    del requires_grad, backward_hooks, metadata  # training-time state, irrelevant to values
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    del requires_grad, backward_hooks, state
    return data  # an nn.Parameter is its tensor as far as values go


def _latin1_encode(text, encoding="latin1"):
    # Protocol-2 pickles store Python 3 bytes as _codecs.encode(str, "latin1"); any other
    # codec name would make Python look codecs up (and import modules), so refuse it.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise CheckpointError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


def _torch_size(dims=()):
    return tuple(dims)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): _torch_size,
    ("_codecs", "encode"): _latin1_encode,
}
_ALLOWED_GLOBALS.update({("torch", name): _StorageType(name) for name in STORAGE_DTYPES})


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED_GLOBALS`; storages through `persistent_load`.

    Every way a pickle reaches a callable (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*) goes
    through `find_class`, so refusing there refuses everything else.
    """

    def __init__(self, file, persistent_load_fn):
        super().__init__(file)
        self._persistent_load_fn = persistent_load_fn

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing global {module}.{name}: a checkpoint may only reference tensor "
                "storages, tensor/parameter rebuild functions and OrderedDict") from None

    def persistent_load(self, pid):
        return self._persistent_load_fn(pid)


# -- reading ------------------------------------------------------------------------------
def read_checkpoint(path) -> Any:
    """The object a PyTorch checkpoint file holds, with every tensor as a numpy array.

    Dicts, OrderedDicts, lists, tuples, strings and numbers come back as themselves.
    Raises `UnsafeCheckpointError` if the pickle names a global outside the allowed set
    (see the module docstring), `CheckpointError` naming the file for anything else that
    stops it being read (truncated, corrupt, not a checkpoint, unsupported storage type).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x80\x02":
            return _read_legacy(path)
        raise CheckpointError("neither a zip-layout nor a legacy-layout PyTorch checkpoint "
                              f"(starts with {head!r})")
    except CheckpointError as e:
        prefix = f"{path}: "
        message = str(e) if str(e).startswith(prefix) else prefix + str(e)
        raise type(e)(message) from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, ValueError,
            TypeError, KeyError, IndexError, AttributeError, OSError, RecursionError,
            MemoryError) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint "
                              f"({type(e).__name__}: {e})") from e


def _storage_type(value) -> _StorageType:
    if not isinstance(value, _StorageType):
        raise CheckpointError(f"persistent id names storage type {value!r}, not one of "
                              f"torch.{', torch.'.join(STORAGE_DTYPES)}")
    return value


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"expected one <folder>/data.pkl in the zip, found "
                                  f"{pickles or 'none'}")
        prefix = pickles[0][:-len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"unknown byteorder {byteorder!r}")
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
                raise CheckpointError(f"unsupported persistent id {pid!r:.200}")
            _, storage_type, key, _location, numel = pid
            storage_type, key = _storage_type(storage_type), str(key)
            if key not in storages:  # several tensors may share one storage
                member = f"{prefix}data/{key}"
                if member not in names:
                    raise CheckpointError(f"storage {key!r} is missing ({member})")
                raw = archive.read(member)
                storage = _Storage(storage_type, key, _as_int(numel, "numel"))
                if len(raw) != storage.numel * storage_type.raw_dtype.itemsize:
                    raise CheckpointError(
                        f"storage {key!r} ({member}) has {len(raw)} bytes, the pickle says "
                        f"{storage.numel} elements of {storage_type!r}")
                storage.data = _storage_array(raw, storage_type, byteorder, key)
                storages[key] = storage
            return storages[key]

        with archive.open(pickles[0]) as f:
            obj = _RestrictedUnpickler(f, persistent_load).load()
    return _materialise(obj)


def _read_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        def plain(what):
            # The header pickles hold only ints, strings and dicts: no globals allowed.
            def refuse(pid):
                raise CheckpointError(f"unexpected persistent id in the {what}")
            return _RestrictedUnpickler(f, refuse).load()

        magic = plain("magic number")
        if magic != LEGACY_MAGIC_NUMBER:
            raise CheckpointError(f"not a legacy PyTorch checkpoint (magic number {magic!r})")
        version = plain("protocol version")
        if version != LEGACY_PROTOCOL_VERSION:
            raise CheckpointError(f"unsupported legacy protocol version {version!r}, "
                                  f"expected {LEGACY_PROTOCOL_VERSION}")
        sys_info = plain("sys_info")
        little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
        byteorder = "little" if little else "big"

        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            if not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage":
                raise CheckpointError(f"unsupported persistent id {pid!r:.200}")
            _, storage_type, key, _location, numel, view = pid
            storage_type, key = _storage_type(storage_type), str(key)
            if key not in storages:
                storages[key] = _Storage(storage_type, key, _as_int(numel, "numel"))
            root = storages[key]
            if view is None:
                return root
            # (view_key, offset, size): a slice of the root storage, in elements.
            view_key, offset, size = view
            view_key = str(view_key)
            if view_key not in storages:
                storage = _Storage(storage_type, view_key, _as_int(size, "view size"))
                storage.root, storage.root_offset = root, _as_int(offset, "view offset")
                storages[view_key] = storage
            return storages[view_key]

        obj = _RestrictedUnpickler(f, persistent_load).load()
        keys = plain("storage key list")
        if not isinstance(keys, list):
            raise CheckpointError(f"storage key list is a {type(keys).__name__}")
        for key in keys:
            key = str(key)
            if key not in storages:
                raise CheckpointError(f"storage {key!r} is listed but no tensor uses it")
            storage = storages[key]
            header = f.read(8)
            if len(header) != 8:
                raise CheckpointError(f"the file ends before storage {key!r} "
                                      f"(truncated at byte {f.tell()})")
            numel = int.from_bytes(header, byteorder, signed=True)
            if numel != storage.numel:
                raise CheckpointError(f"storage {key!r} holds {numel} elements, the pickle "
                                      f"says {storage.numel}")
            nbytes = numel * storage.type.raw_dtype.itemsize
            # Check against what is left before reading: a corrupt count must not make
            # read() allocate an absurd buffer.
            left = os.fstat(f.fileno()).st_size - f.tell()
            raw = f.read(nbytes) if nbytes <= left else b""
            if len(raw) != nbytes:
                raise CheckpointError(f"the file ends inside storage {key!r}: expected "
                                      f"{nbytes} bytes, got {len(raw)} (truncated)")
            storage.data = _storage_array(raw, storage.type, byteorder, key)
    return _materialise(obj)


def _storage_array(raw: bytes, storage_type: _StorageType, byteorder: str,
                   key: str) -> np.ndarray:
    """Raw storage bytes -> a 1-D native-endian array of the storage's raw dtype."""
    dtype = storage_type.raw_dtype.newbyteorder("<" if byteorder == "little" else ">")
    if len(raw) % dtype.itemsize:
        raise CheckpointError(f"storage {key!r} has {len(raw)} bytes, not a multiple of "
                              f"{dtype.itemsize} ({storage_type!r})")
    return np.frombuffer(raw, dtype).astype(storage_type.raw_dtype.newbyteorder("="))


def _materialise(obj, _open: set | None = None):
    """Replaces every pending tensor in `obj` (dicts, lists, tuples) by its numpy array."""
    if isinstance(obj, _PendingTensor):
        return obj.materialise()
    if isinstance(obj, (_Storage, _StorageType)):
        raise CheckpointError("the checkpoint holds a bare storage, not a tensor")
    if not isinstance(obj, (dict, list, tuple)):
        return obj
    # Pickles can build self-referencing containers; a checkpoint has no use for them.
    _open = set() if _open is None else _open
    if id(obj) in _open:
        raise CheckpointError("the checkpoint holds a container that contains itself")
    _open.add(id(obj))
    if isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialise(v, _open)
    elif isinstance(obj, list):
        out = [_materialise(v, _open) for v in obj]
    else:
        out = tuple(_materialise(v, _open) for v in obj)
    _open.discard(id(obj))
    return out


# -- state dicts ----------------------------------------------------------------------------
# Keys under which training scripts commonly nest the weights, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")


def read_state_dict(path, key: str | None = None) -> dict[str, np.ndarray]:
    """A checkpoint's tensors as {name: numpy array}, in file order.

    key: the entry holding the weights, for a checkpoint that wraps them (e.g.
      "state_dict"); None unwraps the common wrappers automatically: while the object is a
      dict that is not all tensors and has one of WRAPPER_KEYS ("state_dict",
      "model_state_dict", "model", "module", "net", "network") holding a dict, descend into
      the first such entry.
    Then, if every name starts with "module." (a model saved from DataParallel or
    DistributedDataParallel), that prefix is stripped.
    Fails, naming the file, if the result is not a flat dict of tensors.
    """
    path = os.fspath(path)
    obj = read_checkpoint(path)
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            found = list(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{path}: no entry {key!r} in the checkpoint (found {found})")
        obj = obj[key]
    else:
        while isinstance(obj, Mapping) and not _all_arrays(obj):
            inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    bad = [(k, type(v).__name__) for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise CheckpointError(f"{path}: not a flat state dict of tensors: entries "
                              f"{bad[:5]}{' ...' if len(bad) > 5 else ''} are not tensors "
                              f"(pass key= to pick the entry holding the weights)")
    names = [str(k) for k in obj]
    if names and all(n.startswith("module.") for n in names):
        return {n[len("module."):]: v for n, v in zip(names, obj.values())}
    return dict(zip(names, obj.values()))


def _all_arrays(mapping: Mapping) -> bool:
    return bool(mapping) and all(isinstance(v, np.ndarray) for v in mapping.values())
