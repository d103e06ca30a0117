"""The HDF5 source: which layouts are read straight from the file's bytes, that
every layout (compressed, split chunks, never written) reads what h5py reads,
how keys are found, and that handles survive pickling, spawn and fork."""

from __future__ import annotations

import multiprocessing
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import indexed_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_bigarray as kb
from keras_bigarray._hdf5 import HDF5Array, from_h5py_dataset
from keras_bigarray.sources import DuckArray

h5py = pytest.importorskip("h5py")

N = 50
ROW = (4,)

# name -> (create_dataset keyword arguments, read directly from the bytes?)
LAYOUTS: dict[str, tuple[dict[str, Any], bool]] = {
    "contiguous": ({}, True),
    "chunked": ({"chunks": (7, 4)}, True),
    "chunked_one_row": ({"chunks": (1, 4)}, True),
    "chunked_bigger_than_data": ({"chunks": (64, 4), "maxshape": (None, 4)}, True),
    "gzip": ({"chunks": (7, 4), "compression": "gzip"}, False),
    "lzf": ({"chunks": (7, 4), "compression": "lzf"}, False),
    "shuffle": ({"chunks": (7, 4), "shuffle": True}, False),
    "fletcher32": ({"chunks": (7, 4), "fletcher32": True}, False),
    "split_rows": ({"chunks": (7, 2)}, False),
    "split_rows_gzip": ({"chunks": (3, 1), "compression": "gzip"}, False),
}

HYPO = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def assert_same(got: Any, expected: np.ndarray) -> None:
    got = np.asarray(got)
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def write(path: Path, **datasets: Any) -> Path:
    with h5py.File(path, "w") as f:
        for name, (data, kw) in datasets.items():
            f.create_dataset(name, data=data, **kw)
    return path


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """One file with the same self-indexed rows in every layout."""
    data = indexed_rows(N, ROW, "float32")
    path = tmp_path_factory.mktemp("h5") / "layouts.h5"
    write(path, **{name: (data, kw) for name, (kw, _) in LAYOUTS.items()})
    return path, data


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_reads_like_h5py(layouts: tuple[Path, np.ndarray], name: str):
    path, data = layouts
    x = kb.open_array(path, key=name)
    assert isinstance(x, HDF5Array)
    assert x.direct is LAYOUTS[name][1]
    assert x.compressed is bool(x.filters)
    with h5py.File(path, "r") as f:
        ref = f[name][()]
        chunks = f[name].chunks
    assert_same(ref, data)
    assert x.block_rows == (chunks[0] if chunks else x.block_rows)
    idx = np.array([49, 0, 3, 3, -1, 17, 8, 7, 6, 13, 14])
    for key in [
        slice(None),
        slice(10, 31),
        slice(None, None, 3),
        slice(None, None, -7),
        0,
        -1,
        20,
        idx,
        np.arange(N) % 4 == 1,
        (idx, 2),
    ]:
        assert_same(x[key], ref[key])
    assert_same(
        x.read_sorted(np.array([1, 1, 6, 7, 8, 20, 49])), ref[[1, 1, 6, 7, 8, 20, 49]]
    )


@pytest.mark.parametrize("name", ["contiguous", "chunked", "gzip", "split_rows"])
@HYPO
@given(idx=st.lists(st.integers(-N, N - 1), max_size=60))
def test_random_batches_read_like_h5py(
    layouts: tuple[Path, np.ndarray], name: str, idx: list[int]
):
    path, data = layouts
    x = kb.open_array(path, key=name)
    assert_same(x[np.array(idx, dtype=np.int64)], data[np.array(idx, dtype=np.int64)])
    rows = np.unique(np.array(idx, dtype=np.int64) % N)
    assert_same(x.read_sorted(rows), data[rows])


def test_dtypes_and_odd_layouts(tmp_path: Path):
    data = indexed_rows(N, ROW, "float32")
    comp = np.zeros(N, [("a", "u1"), ("b", "<f8")])
    comp["a"], comp["b"] = np.arange(N), np.arange(N) * 2.0
    cases = {
        "u8": (data.astype("u1"), {"chunks": (7, 4)}, True),
        "f16": (data.astype("f2"), {}, True),
        "i64_1d": (np.arange(N, dtype="i8"), {"chunks": (8,)}, True),
        "bool": (np.arange(N) % 3 == 0, {}, True),
        "bytes": (np.array([b"r%d" % i for i in range(N)], dtype="S4"), {}, True),
        "compound": (comp, {}, True),
        "compound_chunked": (comp, {"chunks": (6,)}, True),
        "big_endian": (data.astype(">f4"), {}, False),
        "big_endian_chunked": (data.astype(">i2"), {"chunks": (5, 4)}, False),
        "scaleoffset": (data.astype("i4"), {"chunks": (7, 4), "scaleoffset": 0}, False),
        "rows_3d": (indexed_rows(N, (3, 2), "int16"), {"chunks": (4, 3, 2)}, True),
    }
    path = write(tmp_path / "d.h5", **{k: (v[0], v[1]) for k, v in cases.items()})
    idx = np.array([49, 0, 3, 3, -1, 17, 8, 7])
    with h5py.File(path, "r") as f:
        for name, (_, _, direct) in cases.items():
            x = kb.open_array(path, key=name)
            ref = f[name][()]
            assert x.direct is direct, name
            assert x.dtype == ref.dtype, name
            assert_same(x[:], ref)
            assert_same(x[idx], ref[idx])
            assert_same(x[::-4], ref[::-4])


def test_never_written_datasets_give_the_fill_value(tmp_path: Path):
    path = tmp_path / "fill.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("contiguous", shape=(N, 4), dtype="f4", fillvalue=3.5)
        f.create_dataset(
            "chunked", shape=(N, 4), dtype="f4", chunks=(7, 4), fillvalue=2.5
        )
        f.create_dataset("default", shape=(N,), dtype="i2", chunks=(8,))
        part = f.create_dataset(
            "partial", shape=(N, 4), dtype="f4", chunks=(7, 4), fillvalue=-1
        )
        part[10:20] = indexed_rows(10, (4,)) + 10
        grown = f.create_dataset(
            "grown", data=indexed_rows(20, (4,)), chunks=(7, 4), maxshape=(None, 4)
        )
        grown.resize((N, 4))
        grown[20:] = indexed_rows(N, (4,))[20:]
        shrunk = f.create_dataset(
            "shrunk", data=indexed_rows(80, (4,)), chunks=(7, 4), maxshape=(None, 4)
        )
        shrunk.resize((N, 4))  # chunks past the end are gone, or must be ignored
    idx = np.array([0, 49, 12, 12, 33, 9])
    with h5py.File(path, "r") as f:
        for name in ["contiguous", "chunked", "default", "partial", "grown", "shrunk"]:
            x = kb.open_array(path, key=name)
            ref = f[name][()]
            assert_same(x[:], ref)
            assert_same(x[idx], ref[idx])
            assert_same(x[5:25], ref[5:25])
    assert not kb.open_array(path, key="contiguous").direct
    assert not kb.open_array(path, key="partial").direct
    assert kb.open_array(path, key="grown").direct
    assert kb.open_array(path, key="shrunk").direct
    assert (kb.open_array(path, key="contiguous")[:] == 3.5).all()
    assert (kb.open_array(path, key="default")[:] == 0).all()


def test_direct_reads_honour_a_user_block(tmp_path: Path):
    # Chunk and dataset addresses are relative to the superblock, which a user
    # block moves: the direct reads must still land on the right bytes.
    data = indexed_rows(N, ROW)
    path = tmp_path / "ub.h5"
    with h5py.File(path, "w", userblock_size=512) as f:
        f["c"] = data
        f.create_dataset("k", data=data, chunks=(7, 4))
    for key in ["c", "k"]:
        x = kb.open_array(path, key=key)
        assert x.direct
        assert_same(x[:], data)
        assert_same(x[[40, 2, 2, 9]], data[[40, 2, 2, 9]])


def test_virtual_dataset_reads_through_h5py(tmp_path: Path):
    data = indexed_rows(N, ROW)
    write(tmp_path / "src.h5", a=(data[:30], {}), b=(data[30:], {"chunks": (7, 4)}))
    layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
    layout[:30] = h5py.VirtualSource(str(tmp_path / "src.h5"), "a", shape=(30, 4))
    layout[30:] = h5py.VirtualSource(str(tmp_path / "src.h5"), "b", shape=(20, 4))
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_virtual_dataset("v", layout)
    x = kb.open_array(tmp_path / "v.h5", key="v")
    assert not x.direct
    assert_same(x[:], data)
    assert_same(x[[49, 0, 29, 30, 30]], data[[49, 0, 29, 30, 30]])


# ---- keys ----------------------------------------------------------------------------


def test_key_none_with_one_dataset(tmp_path: Path):
    data = indexed_rows(N, ROW)
    path = tmp_path / "one.h5"
    with h5py.File(path, "w") as f:
        f.create_group("empty_group")
        f.create_dataset("deep/inside/x", data=data)
        f.attrs["note"] = "attributes are not datasets"
    x = kb.open_array(path)
    assert x.key == "/deep/inside/x"
    assert_same(x[:], data)
    assert_same(kb.open_array(path, key="/deep/inside/x")[3], data[3])


def test_key_errors_list_what_is_present(tmp_path: Path):
    path = tmp_path / "many.h5"
    with h5py.File(path, "w") as f:
        f["train/x"] = indexed_rows(4)
        f["train/y"] = np.arange(4)
        f["meta"] = np.arange(3)
    name = re.escape(str(path))
    with pytest.raises(KeyError, match=name + ".*3 datasets.*meta, train/x, train/y"):
        kb.open_array(path)
    with pytest.raises(KeyError, match=r"'images' is missing.*meta, train/x, train/y"):
        kb.open_array(path, key="images")
    with pytest.raises(KeyError, match=r"'train' is a group.*" + name):
        kb.open_array(path, key="train")
    empty = tmp_path / "empty.h5"
    h5py.File(empty, "w").close()
    with pytest.raises(KeyError, match=r"0 datasets \(none\)"):
        kb.open_array(empty)


def test_bad_hdf5_inputs(tmp_path: Path):
    fake = tmp_path / "fake.h5"
    fake.write_bytes(b"not hdf5 at all")
    with pytest.raises(ValueError, match=re.escape(str(fake)) + ".*not an HDF5"):
        kb.open_array(fake)
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        kb.open_array(tmp_path / "missing.h5", key="x")
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        f["scalar"] = 3.0
        f.create_dataset("strings", data=["a", "bc"], dtype=h5py.string_dtype())
    with pytest.raises(ValueError, match=r"'/scalar' is a scalar"):
        kb.open_array(path, key="scalar")
    with pytest.raises(TypeError, match=r"'/strings'.*variable-length"):
        kb.open_array(path, key="strings")
    npy = tmp_path / "x.npy"
    np.save(npy, np.arange(3))
    with pytest.raises(ValueError, match="not an HDF5 file"):
        kb.open_array(npy, key="x")


# ---- open datasets, pickling, processes ----------------------------------------------


def test_open_h5py_dataset(tmp_path: Path):
    data = indexed_rows(N, ROW, "uint8")
    path = write(tmp_path / "o.h5", x=(data, {"chunks": (7, 4)}))
    with h5py.File(path, "r") as f:
        x = kb.open_array(f["x"])
        assert isinstance(x, HDF5Array) and x.direct
        assert x.path == str(path) and x.key == "/x"
        assert len(pickle.dumps(x)) < 1000
    assert_same(x[[3, 1, 1]], data[[3, 1, 1]])  # still reads: its own handle
    # A file open for writing cannot be reopened by path: read through it.
    with h5py.File(path, "a") as f:
        x = kb.open_array(f["x"])
        assert isinstance(x, DuckArray)
        assert_same(x[[30, 2, 2, -1]], data[[30, 2, 2, -1]])
        assert_same(x[4:4], data[4:4])
    with pytest.raises(TypeError, match="h5py.Dataset"):
        from_h5py_dataset(np.zeros(3))


def test_pickle_after_reading_reopens(tmp_path: Path):
    data = indexed_rows(N, ROW)
    path = write(
        tmp_path / "p.h5",
        c=(data, {}),
        z=(data, {"chunks": (7, 4), "compression": "gzip"}),
    )
    for key in ["c", "z"]:
        x = kb.open_array(path, key=key)
        assert_same(x[[5, 1]], data[[5, 1]])
        y = pickle.loads(pickle.dumps(x))
        assert (y.path, y.key, y.shape, y.dtype, y.direct) == (
            x.path,
            x.key,
            x.shape,
            x.dtype,
            x.direct,
        )
        assert_same(y[[40, 0, 7]], data[[40, 0, 7]])


def _check_rows(arrays: list[Any], idx: np.ndarray, expected: np.ndarray) -> None:
    # Runs in a child process; an assertion error makes its exit code 1.
    for x in arrays:
        inherited = getattr(x._local, "ds", None)  # the parent's handle, after fork
        got = x[idx]
        assert np.array_equal(got, expected) and got.dtype == expected.dtype, x
        if inherited is not None:  # h5py handles must not cross a fork
            assert x._dataset() is not inherited


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_child_processes_read_hdf5(tmp_path: Path, method: str):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    data = indexed_rows(N, ROW)
    path = write(
        tmp_path / "mp.h5",
        chunked=(data, {"chunks": (7, 4)}),
        gzip=(data, {"chunks": (7, 4), "compression": "gzip"}),
        contiguous=(data, {}),
    )
    idx = np.array([49, 3, 3, 20, 0])
    arrays = [kb.open_array(path, key=k) for k in ["chunked", "gzip", "contiguous"]]
    for x in arrays:
        assert_same(x[idx], data[idx])  # the parent holds open handles now
    ctx = multiprocessing.get_context(method)
    with warnings.catch_warnings():
        # Python >= 3.12 warns that fork in a threaded process may deadlock.
        warnings.filterwarnings("ignore", ".*fork.*", DeprecationWarning)
        p = ctx.Process(target=_check_rows, args=(arrays, idx, data[idx]))
        p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        pytest.fail(f"the {method} child hung")
    assert p.exitcode == 0, f"the {method} child read wrong rows or failed"
    for x in arrays:
        assert_same(x[idx], data[idx])  # and the parent still reads


def test_compressed_reads_are_split_to_bound_memory(tmp_path, monkeypatch):
    from keras_bigarray import _hdf5

    data = np.arange(4000 * 4, dtype="float32").reshape(4000, 4)
    with h5py.File(tmp_path / "z.h5", "w") as f:
        f.create_dataset("x", data=data, chunks=(10, 4), compression="gzip")
    x = kb.open_array(str(tmp_path / "z.h5"), key="x")
    spans = []
    real = _hdf5.HDF5Array._dataset

    class Spy:
        def __init__(self, ds):
            self.ds = ds

        def __getitem__(self, key):
            spans.append(key.stop - key.start)
            return self.ds[key]

    monkeypatch.setattr(_hdf5, "MAX_READ_BYTES", 10 * 4 * 4 * 3)  # three chunks
    monkeypatch.setattr(_hdf5.HDF5Array, "_dataset", lambda self: Spy(real(self)))
    idx = np.arange(0, 4000, 3)
    np.testing.assert_array_equal(x[idx], data[idx])
    assert max(spans) <= 30


def test_long_chunk_tables_are_rebuilt_after_pickling(tmp_path, monkeypatch):
    from keras_bigarray import _hdf5

    data = np.arange(500 * 2, dtype="int32").reshape(500, 2)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("x", data=data, chunks=(5, 2))
    x = kb.open_array(str(tmp_path / "c.h5"), key="x")
    assert x.direct
    monkeypatch.setattr(_hdf5, "_PICKLED_PLAN_CHUNKS", 10)
    blob = pickle.dumps(x)
    assert len(blob) < 1000
    y = pickle.loads(blob)
    idx = np.array([499, 0, 250, 251, 7])
    np.testing.assert_array_equal(y[idx], data[idx])
    assert y.direct


def test_hdf5_with_a_user_block_and_no_suffix(tmp_path):
    data = np.arange(12, dtype="float64").reshape(6, 2)
    p = tmp_path / "data.bin"
    with h5py.File(p, "w", userblock_size=512) as f:
        f.create_dataset("x", data=data)
    np.testing.assert_array_equal(kb.open_array(str(p), key="x")[:], data)
