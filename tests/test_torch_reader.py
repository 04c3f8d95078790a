"""kssl.models.checkpoints.torch_reader: PyTorch checkpoints read with numpy, no torch."""

import collections
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch_files
from torch_files import Global, Reduce, Storage, Tensor, transposed

from kssl.models.checkpoints import (CheckpointError, UnsafeCheckpointError, read_checkpoint,
                                     read_state_dict)

WRITERS = {"zip": torch_files.write_zip_checkpoint,
           "legacy": torch_files.write_legacy_checkpoint}


def sample_state_dict():
    """Every supported dtype, a transposed tensor, a shared storage with offsets, a scalar."""
    rng = np.random.RandomState(0)
    shared = Storage(rng.standard_normal(20).astype(np.float32))
    matrix = rng.standard_normal((3, 5)).astype(np.float32)
    tensors = {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "double": rng.standard_normal((2, 3)),
        "long": rng.randint(-2 ** 40, 2 ** 40, (5,), dtype=np.int64),
        "int": rng.randint(-1000, 1000, (2, 2)).astype(np.int32),
        "byte": rng.randint(0, 256, (7,)).astype(np.uint8),
        "mask": rng.rand(3, 2) > 0.5,
        "half": rng.standard_normal((4,)).astype(np.float16),
        "bn.num_batches_tracked": np.array(12345, np.int64),
        "empty": np.zeros((0, 3), np.float32),
        "fc.weight_t": transposed(matrix),                     # stride (1, 5)
        "shared.a": Tensor(shared, 2, (2, 3), (3, 1)),         # elements 2..7
        "shared.b": Tensor(shared, 10, (3, 2), (1, 4)),        # strided, overlapping nothing
        "shared.c": Tensor(shared, 4, (4,), (2,), parameter=True),
    }
    full = shared.data
    expected = {k: v for k, v in tensors.items() if isinstance(v, np.ndarray)}
    expected["fc.weight_t"] = matrix.T
    expected["shared.a"] = full[2:8].reshape(2, 3)
    expected["shared.b"] = np.array([[full[10 + i + 4 * j] for j in range(2)] for i in range(3)])
    expected["shared.c"] = full[4:12:2]
    return tensors, expected


def assert_bit_exact(actual, expected):
    assert list(actual) == list(expected)
    for name, want in expected.items():
        got = actual[name]
        assert isinstance(got, np.ndarray), name
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert got.flags["C_CONTIGUOUS"], name
        assert got.tobytes() == np.ascontiguousarray(want).tobytes(), name


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_round_trip_bit_exact(tmp_path, layout):
    tensors, expected = sample_state_dict()
    path = tmp_path / f"weights_{layout}.pth"
    WRITERS[layout](path, tensors)
    state = read_state_dict(path)
    assert_bit_exact(state, expected)
    # Tensors sharing a storage come back as independent arrays.
    state["shared.a"][...] = 0
    assert not np.any(state["shared.a"]) and np.any(state["shared.c"])


def test_zip_layout_matches_torch(tmp_path):
    """Members as torch.save writes them, data 64-byte aligned, any top folder name."""
    path = tmp_path / "model.pt"
    torch_files.write_zip_checkpoint(path, {"w": np.arange(6, dtype=np.float32)},
                                     archive_name="model")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert names == ["model/data.pkl", "model/byteorder", "model/data/0", "model/version"]
        info = archive.getinfo("model/data/0")
        assert info.compress_type == zipfile.ZIP_STORED
        data_start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        assert data_start % 64 == 0
    np.testing.assert_array_equal(read_state_dict(path)["w"], np.arange(6, dtype=np.float32))


def test_legacy_layout_header(tmp_path):
    path = tmp_path / "legacy.pth"
    torch_files.write_legacy_checkpoint(path, {"w": np.ones(3, np.float32)})
    with open(path, "rb") as f:
        assert pickle.load(f) == torch_files.MAGIC_NUMBER
        assert pickle.load(f) == 1001
        assert pickle.load(f)["little_endian"] is True
    assert read_checkpoint(path)["w"].tolist() == [1.0, 1.0, 1.0]


def test_legacy_storages_in_listed_key_order(tmp_path):
    """More than ten storages: torch lists keys sorted as strings ('0', '1', '10', '2')."""
    arrays = {f"t{i}": np.full((i + 1,), i, np.int32) for i in range(12)}
    path = tmp_path / "many.pth"
    torch_files.write_legacy_checkpoint(path, arrays)
    assert_bit_exact(read_state_dict(path), arrays)


def test_bfloat16_widened_to_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact in bfloat16
    storage = Storage(bits, storage_type="BFloat16Storage")
    path = tmp_path / "bf16.pth"
    torch_files.write_zip_checkpoint(path, {"x": Tensor(storage, 0, (2, 2), (2, 1))})
    out = read_state_dict(path)["x"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, values.reshape(2, 2))


def test_checkpoint_object_and_wrappers(tmp_path):
    weights = {"module.conv.weight": np.ones((2, 2), np.float32),
               "module.conv.bias": np.zeros(2, np.float32)}
    obj = {"epoch": 7, "best": 0.5, "name": "run", "flags": [True, None, (1, 2.0)],
           "state_dict": weights}
    path = tmp_path / "ckpt.pth"
    torch_files.write_zip_checkpoint(path, obj)
    raw = read_checkpoint(path)
    assert raw["epoch"] == 7 and raw["name"] == "run" and raw["flags"] == [True, None, (1, 2.0)]
    assert isinstance(raw["state_dict"], collections.OrderedDict)
    state = read_state_dict(path)
    assert list(state) == ["conv.weight", "conv.bias"]  # unwrapped, "module." stripped
    assert list(read_state_dict(path, key="state_dict")) == ["conv.weight", "conv.bias"]
    with pytest.raises(CheckpointError, match=r"no entry 'model'.*'epoch'"):
        read_state_dict(path, key="model")


def test_not_a_state_dict_names_the_entry(tmp_path):
    path = tmp_path / "mixed.pth"
    torch_files.write_legacy_checkpoint(path, {"w": np.ones(2, np.float32), "epoch": 3})
    with pytest.raises(CheckpointError, match=r"mixed\.pth.*'epoch'"):
        read_state_dict(path)


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_malicious_global_refused_without_running(tmp_path, layout):
    marker = tmp_path / "pwned"
    payload = {"w": np.ones(2, np.float32),
               "evil": Reduce(Global("os", "system"), (f"touch {marker}",))}
    path = tmp_path / "evil.pth"
    WRITERS[layout](path, payload)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*os\.system"):
        read_checkpoint(path)
    assert not marker.exists()


def test_other_globals_refused(tmp_path):
    for module, name in [("torch.storage", "_load_from_bytes"), ("builtins", "eval"),
                         ("numpy.core.multiarray", "scalar"), ("torch.nn.modules.conv", "Conv2d")]:
        path = tmp_path / f"{name}.pth"
        torch_files.write_zip_checkpoint(path, {"x": Reduce(Global(module, name), ("1",))})
        with pytest.raises(UnsafeCheckpointError, match=f"{module}.{name}"):
            read_checkpoint(path)


def test_codecs_only_latin1(tmp_path):
    ok = tmp_path / "bytes.pth"
    torch_files.write_zip_checkpoint(ok, {"b": Reduce(Global("_codecs", "encode"),
                                                      ("\xff\x00", "latin1"))})
    assert read_checkpoint(ok)["b"] == b"\xff\x00"
    bad = tmp_path / "codec.pth"
    torch_files.write_zip_checkpoint(bad, {"b": Reduce(Global("_codecs", "encode"),
                                                       ("x", "rot13"))})
    with pytest.raises(CheckpointError, match="rot13"):
        read_checkpoint(bad)


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_truncated_file_names_it(tmp_path, layout):
    path = tmp_path / f"cut_{layout}.pth"
    WRITERS[layout](path, {"w": np.arange(1000, dtype=np.float32)})
    data = path.read_bytes()
    for keep in (len(data) - 100, len(data) // 2, 20):
        path.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=f"cut_{layout}\\.pth"):
            read_state_dict(path)


def test_out_of_range_view_refused(tmp_path):
    path = tmp_path / "bad_view.pth"
    storage = Storage(np.zeros(4, np.float32))
    torch_files.write_zip_checkpoint(path, {"w": Tensor(storage, 2, (2, 2), (2, 1))})
    with pytest.raises(CheckpointError, match="holds 4 elements"):
        read_state_dict(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        read_checkpoint(tmp_path / "missing.pth")
    assert os.path.exists(path)


def test_self_referencing_container_refused(tmp_path):
    path = tmp_path / "cycle.pth"
    with zipfile.ZipFile(path, "w") as archive:  # a list that contains itself
        archive.writestr("archive/data.pkl", b"\x80\x02]q\x00h\x00a.")
    with pytest.raises(CheckpointError, match=r"cycle\.pth.*contains itself"):
        read_checkpoint(path)
