"""Writes PyTorch checkpoint files from numpy, in torch.save's byte format, without torch.

Test helper shared by the checkpoint tests (reader, converters). Stable API:

  write_zip_checkpoint(path, obj, archive_name="archive")   torch >= 1.6 zip layout
  write_legacy_checkpoint(path, obj)                         legacy (pickle protocol 2) layout
  Storage(data, storage_type=None)   a 1-D numpy array saved as one torch storage
  Tensor(storage, offset, shape, stride, parameter=False)
                                     a tensor viewing a storage (shared storages, transposes)
  transposed(array, axes=None)       a Tensor with the values of array.transpose(axes), kept
                                     non-contiguous as torch keeps `w.t()` / `permute`
  Global(module, name), Reduce(func, args)
                                     arbitrary pickle GLOBAL / REDUCE (e.g. a malicious file)

`obj` is what torch.save would be given: typically a dict {name: tensor} (written as
`collections.OrderedDict`, as `state_dict()` returns it), possibly nested in dicts, lists
and tuples with ints, floats, strings, bools and None. A plain numpy array is a contiguous
tensor with its own storage. Storage types follow the array dtype (float32 ->
torch.FloatStorage, ...); pass storage_type="BFloat16Storage" with uint16 bit patterns for
bfloat16.

Byte format (what torch.save writes):
  zip: stored (uncompressed) members `<archive>/data.pkl`, `<archive>/byteorder`,
    `<archive>/data/<key>` (raw little-endian bytes, member data aligned to 64 bytes like
    torch's writer) and `<archive>/version`; data.pkl is pickle protocol 2 with storages as
    persistent ids ('storage', torch.<T>Storage, key, 'cpu', numel).
  legacy: pickles of the magic number, the protocol version 1001 and sys_info; the object
    pickle with persistent ids ('storage', torch.<T>Storage, key, 'cpu', numel, None); the
    pickled sorted list of keys; then per key an int64 element count and the raw bytes.
  Tensors pickle as REDUCE of GLOBAL `torch._utils _rebuild_tensor_v2` on
  (storage, offset, size, stride, requires_grad=False, OrderedDict()), parameters wrap that
  in `torch._utils _rebuild_parameter`.

The pickles are emitted by a small writer here (not Python's pickler, which would need torch
importable to pickle torch globals).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import zipfile
from typing import Any, Sequence

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
STORAGE_TYPES = {
    np.dtype(np.float64): "DoubleStorage", np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage", np.dtype(np.complex64): "ComplexFloatStorage",
    np.dtype(np.complex128): "ComplexDoubleStorage",
}
ALIGNMENT = 64  # torch's zip writer aligns each member's data to 64 bytes


class Storage:
    """A torch storage: a 1-D numpy array (its dtype picks the storage type)."""

    def __init__(self, data: np.ndarray, storage_type: str | None = None):
        data = np.asarray(data)
        if data.ndim != 1:
            raise ValueError(f"a storage is 1-D, got shape {data.shape}")
        self.data = np.ascontiguousarray(data)
        self.storage_type = storage_type or STORAGE_TYPES[self.data.dtype]


class Tensor:
    """A tensor viewing `storage` from element `offset` with `shape` and `stride` (elements)."""

    def __init__(self, storage: Storage, offset: int, shape: Sequence[int],
                 stride: Sequence[int], parameter: bool = False):
        self.storage = storage
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.stride = tuple(int(s) for s in stride)
        self.parameter = parameter


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major element strides of `shape`, as torch gives a contiguous tensor."""
    strides, step = [], 1
    for n in reversed(tuple(shape)):
        strides.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(strides))


def tensor(array: np.ndarray, parameter: bool = False) -> Tensor:
    """A contiguous tensor with its own storage holding `array`."""
    array = np.asarray(array)
    return Tensor(Storage(array.reshape(-1)), 0, array.shape, contiguous_strides(array.shape),
                  parameter=parameter)


def transposed(array: np.ndarray, axes: Sequence[int] | None = None) -> Tensor:
    """A tensor equal to `array.transpose(axes)` that stays a strided view of a contiguous
    storage holding `array` (what torch saves for `w.t()` or `w.permute(...)`)."""
    array = np.asarray(array)
    axes = tuple(reversed(range(array.ndim))) if axes is None else tuple(axes)
    base = contiguous_strides(array.shape)
    return Tensor(Storage(array.reshape(-1)), 0, tuple(array.shape[a] for a in axes),
                  tuple(base[a] for a in axes))


class Global:
    """A pickle GLOBAL `module name` (resolved by the reader's find_class)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class Reduce:
    """`func(*args)` at unpickling time: pickle REDUCE of `func` (usually a Global)."""

    def __init__(self, func: Any, args: tuple):
        self.func, self.args = func, tuple(args)


# -- a protocol-2 pickle writer ---------------------------------------------------------------
class _Writer:
    """Emits protocol-2 pickle opcodes for the object kinds above; `pid` maps a Storage to
    its persistent id tuple. Globals are memoised (BINPUT/BINGET) as Python's pickler does."""

    def __init__(self, pid):
        self.out = io.BytesIO()
        self.pid = pid
        self.memo: dict[tuple[str, str], int] = {}

    def dumps(self, obj) -> bytes:
        self.out.write(pickle.PROTO + b"\x02")
        self.save(obj)
        self.out.write(pickle.STOP)
        return self.out.getvalue()

    def save(self, obj):  # noqa: C901 - one branch per pickled kind
        w = self.out.write
        if isinstance(obj, Storage):
            self.save(self.pid(obj))
            w(pickle.BINPERSID)
        elif isinstance(obj, Global):
            self.save_global(obj.module, obj.name)
        elif isinstance(obj, Reduce):
            self.save(obj.func)
            self.save(obj.args)
            w(pickle.REDUCE)
        elif isinstance(obj, Tensor):
            args = (obj.storage, obj.offset, obj.shape, obj.stride, False,
                    Reduce(Global("collections", "OrderedDict"), ()))
            rebuilt = Reduce(Global("torch._utils", "_rebuild_tensor_v2"), args)
            if obj.parameter:
                rebuilt = Reduce(Global("torch._utils", "_rebuild_parameter"),
                                 (rebuilt, True, Reduce(Global("collections", "OrderedDict"),
                                                        ())))
            self.save(rebuilt)
        elif isinstance(obj, np.ndarray):
            self.save(tensor(obj))
        elif obj is None:
            w(pickle.NONE)
        elif obj is True or obj is False:
            w(pickle.NEWTRUE if obj else pickle.NEWFALSE)
        elif isinstance(obj, int):
            self.save_int(obj)
        elif isinstance(obj, float):
            w(pickle.BINFLOAT + struct.pack(">d", obj))
        elif isinstance(obj, str):
            data = obj.encode("utf-8")
            w(pickle.BINUNICODE + struct.pack("<I", len(data)) + data)
        elif isinstance(obj, tuple):
            if not obj:
                w(pickle.EMPTY_TUPLE)
            elif len(obj) <= 3:
                for item in obj:
                    self.save(item)
                w((pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3)[len(obj) - 1])
            else:
                w(pickle.MARK)
                for item in obj:
                    self.save(item)
                w(pickle.TUPLE)
        elif isinstance(obj, list):
            w(pickle.EMPTY_LIST)
            if obj:
                w(pickle.MARK)
                for item in obj:
                    self.save(item)
                w(pickle.APPENDS)
        elif isinstance(obj, dict):
            if isinstance(obj, collections.OrderedDict) or _is_state_dict(obj):
                self.save(Reduce(Global("collections", "OrderedDict"), ()))
            else:
                w(pickle.EMPTY_DICT)
            if obj:
                w(pickle.MARK)
                for k, v in obj.items():
                    self.save(k)
                    self.save(v)
                w(pickle.SETITEMS)
        else:
            raise TypeError(f"torch_files cannot pickle {type(obj).__name__}")

    def save_int(self, value: int):
        w = self.out.write
        if 0 <= value < 256:
            w(pickle.BININT1 + bytes([value]))
        elif 0 <= value < 65536:
            w(pickle.BININT2 + struct.pack("<H", value))
        elif -2 ** 31 <= value < 2 ** 31:
            w(pickle.BININT + struct.pack("<i", value))
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            w(pickle.LONG1 + bytes([len(data)]) + data)

    def save_global(self, module: str, name: str):
        key = (module, name)
        if key in self.memo:
            self.out.write(pickle.BINGET + bytes([self.memo[key]]) if self.memo[key] < 256
                           else pickle.LONG_BINGET + struct.pack("<I", self.memo[key]))
            return
        self.out.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
        index = len(self.memo)
        self.memo[key] = index
        self.out.write(pickle.BINPUT + bytes([index]) if index < 256
                       else pickle.LONG_BINPUT + struct.pack("<I", index))


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, (np.ndarray, Tensor)) for v in obj.values())


def _pickle_with_storages(obj, legacy: bool) -> tuple[bytes, dict[str, Storage]]:
    """The object pickle and the storages it references, by key (in first-use order)."""
    keys: dict[int, str] = {}
    storages: dict[str, Storage] = {}

    def pid(storage: Storage):
        if id(storage) not in keys:
            keys[id(storage)] = str(len(keys))
            storages[keys[id(storage)]] = storage
        key = keys[id(storage)]
        ident = ("storage", Global("torch", storage.storage_type), key, "cpu",
                 int(storage.data.size))
        return ident + (None,) if legacy else ident

    return _Writer(pid).dumps(obj), storages


def _raw_bytes(storage: Storage) -> bytes:
    data = storage.data
    if data.dtype.byteorder == ">" or (data.dtype.byteorder == "=" and sys.byteorder == "big"):
        data = data.byteswap().view(data.dtype.newbyteorder())
    return data.tobytes()


# -- files ------------------------------------------------------------------------------------
def write_zip_checkpoint(path, obj, archive_name: str = "archive") -> None:
    """Writes `obj` as torch.save (torch >= 1.6) would: the zip layout, little-endian."""
    data_pkl, storages = _pickle_with_storages(obj, legacy=False)
    members = [("data.pkl", data_pkl), ("byteorder", b"little")]
    members += [(f"data/{key}", _raw_bytes(s)) for key, s in storages.items()]
    members += [("version", b"3\n")]
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
        for name, payload in members:
            info = zipfile.ZipInfo(f"{archive_name}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            # Local header is 30 bytes + name + extra; pad the extra field so the member's
            # data starts on a 64-byte boundary, as torch's writer does ("FB" field).
            start = f.tell() + 30 + len(info.filename.encode("utf-8")) + 4
            pad = (-start) % ALIGNMENT
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            archive.writestr(info, payload)


def write_legacy_checkpoint(path, obj) -> None:
    """Writes `obj` as torch.save(..., _use_new_zipfile_serialization=False) would."""
    sys_info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 8}}
    body, storages = _pickle_with_storages(obj, legacy=True)
    keys = sorted(storages)  # torch writes the storages in sorted key order
    with open(path, "wb") as f:
        f.write(pickle.dumps(MAGIC_NUMBER, protocol=2))
        f.write(pickle.dumps(PROTOCOL_VERSION, protocol=2))
        f.write(pickle.dumps(sys_info, protocol=2))
        f.write(body)
        f.write(pickle.dumps(keys, protocol=2))
        for key in keys:
            storage = storages[key]
            f.write(struct.pack("<q", storage.data.size))
            f.write(_raw_bytes(storage))
