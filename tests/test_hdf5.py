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
from conftest import fixture_settings, indexed_rows
from hypothesis import given
from hypothesis import strategies as st

import keras_bigarray as kb
from keras_bigarray._hdf5 import HDF5Array, from_h5py_dataset
from keras_bigarray.sources import DuckArray

h5py = pytest.importorskip("h5py")

N = 50
ROW = (4,)

# name -> (create_dataset keyword arguments, who decodes: "none" for bytes read
# as stored, "ours" for filters undone by keras-bigarray, "h5py")
LAYOUTS: dict[str, tuple[dict[str, Any], str]] = {
    "contiguous": ({}, "none"),
    "chunked": ({"chunks": (7, 4)}, "none"),
    "chunked_one_row": ({"chunks": (1, 4)}, "none"),
    "chunked_bigger_than_data": ({"chunks": (64, 4), "maxshape": (None, 4)}, "none"),
    "gzip": ({"chunks": (7, 4), "compression": "gzip"}, "ours"),
    "lzf": ({"chunks": (7, 4), "compression": "lzf"}, "h5py"),
    "shuffle": ({"chunks": (7, 4), "shuffle": True}, "ours"),
    "fletcher32": ({"chunks": (7, 4), "fletcher32": True}, "ours"),
    "gzip_shuffle_fletcher32": (
        {"chunks": (7, 4), "compression": "gzip", "shuffle": True, "fletcher32": True},
        "ours",
    ),
    "lzf_shuffle": ({"chunks": (7, 4), "compression": "lzf", "shuffle": True}, "h5py"),
    "split_rows": ({"chunks": (7, 2)}, "h5py"),
    "split_rows_gzip": ({"chunks": (3, 1), "compression": "gzip"}, "h5py"),
}

HYPO = fixture_settings(40)


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
    assert x.decode == LAYOUTS[name][1]
    assert x.direct is (x.decode != "h5py")
    assert x.describe()["decode"] == x.decode
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


@pytest.mark.parametrize("order", ["in_order", "reversed", "interleaved"])
def test_chunks_anywhere_in_the_file_read_right(tmp_path: Path, order: str):
    # Chunks stored back to back in row order are read as one array over the
    # file's bytes; stored any other way (reversed, or every other chunk
    # another dataset's: evenly spaced, but not by one chunk), through each
    # row's own byte offset.
    data = indexed_rows(N, ROW, "float32")
    other = -data
    path = tmp_path / "chunks.h5"
    with h5py.File(path, "w") as f:
        x = f.create_dataset("x", shape=data.shape, dtype=data.dtype, chunks=(7, 4))
        z = f.create_dataset("z", shape=data.shape, dtype=data.dtype, chunks=(7, 4))
        starts = list(range(0, N, 7))
        for a in starts[::-1] if order == "reversed" else starts:
            x[a : a + 7] = data[a : a + 7]
            if order == "interleaved":
                z[a : a + 7] = other[a : a + 7]
            f.flush()  # HDF5 gives a chunk its place in the file as it leaves the cache
        if order != "interleaved":
            z[...] = other
    for key, ref in (("x", data), ("z", other)):
        src = kb.open_array(path, key=key)
        assert src.decode == "none"
        in_order = order == "in_order" or (order == "reversed" and key == "z")
        src._file_bytes()
        assert (src._local.rows is not None) is in_order
        idx = np.array([0, 1, 6, 7, 13, 14, 20, 27, 48, 49])
        assert_same(src.read_sorted(idx), ref[idx])
        assert_same(src[5:33], ref[5:33])
        assert_same(src[:], ref)


@pytest.mark.parametrize(
    "name", ["contiguous", "chunked", "gzip", "gzip_shuffle_fletcher32", "split_rows"]
)
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
        zpart = f.create_dataset(
            "partial_gzip", shape=(N, 4), dtype="f4", chunks=(7, 4), fillvalue=-1,
            compression="gzip",
        )  # fmt: skip
        zpart[10:20] = indexed_rows(10, (4,)) + 10
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
        names = ["contiguous", "chunked", "default", "partial", "partial_gzip"]
        for name in [*names, "grown", "shrunk"]:
            x = kb.open_array(path, key=name)
            ref = f[name][()]
            assert_same(x[:], ref)
            assert_same(x[idx], ref[idx])
            assert_same(x[5:25], ref[5:25])
    assert not kb.open_array(path, key="contiguous").direct
    assert not kb.open_array(path, key="partial").direct
    assert kb.open_array(path, key="partial_gzip").decode == "h5py"
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
        lzf=(data, {"chunks": (7, 4), "compression": "lzf"}),
    )
    for key in ["c", "z", "lzf"]:
        x = kb.open_array(path, key=key)
        assert_same(x[[5, 1]], data[[5, 1]])
        y = pickle.loads(pickle.dumps(x))
        assert (y.path, y.key, y.shape, y.dtype, y.direct, y.decode) == (
            x.path,
            x.key,
            x.shape,
            x.dtype,
            x.direct,
            x.decode,
        )
        assert_same(y[[40, 0, 7]], data[[40, 0, 7]])


def _check_rows(arrays: list[Any], idx: np.ndarray, expected: np.ndarray) -> None:
    # Runs in a child process; an assertion error makes its exit code 1.
    for x in arrays:
        inherited = getattr(x._local, "ds", None)  # the parent's handle, after fork
        inherited_cache = x._cache  # the parent's decoded chunks, after fork
        got = x[idx]
        assert np.array_equal(got, expected) and got.dtype == expected.dtype, x
        if inherited is not None:  # h5py handles must not cross a fork
            assert x._dataset() is not inherited
        if inherited_cache is not None:  # nor the cache (and its lock)
            assert x._cache is not inherited_cache
        if x.decode == "ours":
            assert x._cache.nbytes > 0  # this process decoded into its own


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_child_processes_read_hdf5(tmp_path: Path, method: str):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    data = indexed_rows(N, ROW)
    path = write(
        tmp_path / "mp.h5",
        chunked=(data, {"chunks": (7, 4)}),
        gzip=(data, {"chunks": (7, 4), "compression": "gzip", "shuffle": True}),
        lzf=(data, {"chunks": (7, 4), "compression": "lzf"}),
        contiguous=(data, {}),
    )
    idx = np.array([49, 3, 3, 20, 0])
    keys = ["chunked", "gzip", "lzf", "contiguous"]
    arrays = [kb.open_array(path, key=k) for k in keys]
    assert [x.decode for x in arrays] == ["none", "ours", "h5py", "none"]
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
        f.create_dataset("x", data=data, chunks=(10, 4), compression="lzf")
    x = kb.open_array(str(tmp_path / "z.h5"), key="x")
    assert x.decode == "h5py"
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


# ---- compressed chunks decoded here (deflate, shuffle, fletcher32) ------------------

# Every pipeline of our filters that h5py writes: gzip level (None: no deflate),
# shuffle, fletcher32.
PIPELINES = [
    (level, shuffle, fletcher32)
    for level in (None, 1, 9)
    for shuffle in (False, True)
    for fletcher32 in (False, True)
    if level is not None or shuffle or fletcher32
]
# Element sizes 1, 2, 4 and 8, a compound type, 1-D and N-D rows.
DECODE_CASES: dict[str, tuple[np.ndarray, tuple[int, ...]]] = {
    "u1": (indexed_rows(N, (5,), "uint8"), (7, 5)),
    "i2_1d": (np.arange(N, dtype="i2") * 7, (8,)),
    "f4_3d": (indexed_rows(N, (3, 2), "float32"), (6, 3, 2)),
    "i4": (indexed_rows(N, (4,), "int32") - 9, (7, 4)),
    "f8": (indexed_rows(N, (3,), "float64") + 0.25, (7, 3)),
    "u8_1d": (np.arange(N, dtype="u8") << 40, (9,)),
}


def read_all_ways(x: Any, ref: np.ndarray) -> None:
    """x reads exactly what h5py read (`ref`), by every kind of index."""
    n = len(ref)
    assert_same(x[:], ref)
    for s in [slice(3, 4), slice(5, 27), slice(0, n - 1), slice(n - 3, n)]:
        assert_same(x[s], ref[s])
    assert_same(x[::-3], ref[::-3])
    assert_same(x[-1], ref[-1])
    idx = np.array([n - 1, 0, 3, 3, 17, 8, 7, 6, 13, 14, n - 2])
    assert_same(x[idx], ref[idx])
    assert_same(x.take(idx.reshape(1, -1)), ref[idx.reshape(1, -1)])
    for rows in ([1, 1, 6, 7, 8, 20, n - 1], [0, 2, 4, 40, 41, 49], [n - 1]):
        rows = np.array(rows)
        assert_same(x.read_sorted(rows), ref[rows])
    assert_same(x.read_sorted(np.arange(n)), ref)
    rows = list(x)  # iteration, block by block
    assert len(rows) == n
    for got, expected in zip(rows, ref, strict=True):
        assert_same(got, expected)


@pytest.mark.parametrize(
    "level,shuffle,fletcher32",
    PIPELINES,
    ids=[f"gzip{lv}-shuffle{int(s)}-fletcher{int(c)}" for lv, s, c in PIPELINES],
)
def test_our_decoder_reads_like_h5py(
    tmp_path: Path, level: int | None, shuffle: bool, fletcher32: bool
):
    kw: dict[str, Any] = {"shuffle": shuffle, "fletcher32": fletcher32}
    if level is not None:
        kw.update(compression="gzip", compression_opts=level)
    path = write(
        tmp_path / "f.h5",
        **{
            k: (data, {**kw, "chunks": chunks})
            for k, (data, chunks) in DECODE_CASES.items()
        },
    )
    with h5py.File(path, "r") as f:
        for name, (data, _) in DECODE_CASES.items():
            ref = f[name][()]
            assert_same(ref, data)
            assert len(ref) % f[name].chunks[0], "want a partial last chunk"
            x = kb.open_array(path, key=name)
            assert (x.decode, x.direct, x.compressed) == ("ours", True, True), name
            read_all_ways(x, ref)


def _create_with_pipeline(f: Any, name: str, data: np.ndarray, chunks, filters):
    """A dataset whose filters are applied in the order given (h5py's high-level
    API always uses shuffle, deflate, fletcher32)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk(chunks)
    for flt in filters:
        {
            "deflate": lambda: dcpl.set_deflate(6),
            "shuffle": dcpl.set_shuffle,
            "fletcher32": dcpl.set_fletcher32,
        }[flt]()
    space = h5py.h5s.create_simple(data.shape)
    tid = h5py.h5t.py_create(data.dtype, logical=True)
    h5py.h5d.create(f.id, name.encode(), tid, space, dcpl=dcpl)
    f[name][...] = data


def test_our_decoder_follows_the_filter_order(tmp_path: Path):
    data = indexed_rows(N, (3,), "float64")
    orders = [
        ("fletcher32", "shuffle", "deflate"),
        ("deflate", "shuffle"),
        ("deflate", "fletcher32", "shuffle"),
        ("shuffle", "fletcher32"),
        ("fletcher32", "deflate", "fletcher32"),
        ("deflate", "deflate"),
    ]
    path = tmp_path / "order.h5"
    with h5py.File(path, "w") as f:
        for k, order in enumerate(orders):
            _create_with_pipeline(f, f"p{k}", data, (7, 3), order)
    with h5py.File(path, "r") as f:
        for k, order in enumerate(orders):
            ds = f[f"p{k}"]
            plist = ds.id.get_create_plist()
            got = [plist.get_filter(i)[3].decode() for i in range(len(order))]
            assert got == list(order)
            x = kb.open_array(path, key=f"p{k}")
            assert x.decode == "ours", order
            read_all_ways(x, ds[()])


def test_chunks_that_skipped_a_filter(tmp_path: Path):
    # Bit i of a chunk's filter mask set: filter i was not applied to it (an
    # optional filter that failed). Write such chunks directly.
    import zlib

    data = indexed_rows(N, (4,), "int32")
    path = tmp_path / "mask.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(
            "x", shape=data.shape, dtype="i4", chunks=(10, 4), shuffle=True,
            compression="gzip",
        )  # fmt: skip
        for c in range(5):
            raw = np.ascontiguousarray(data[10 * c : 10 * c + 10])
            shuffled = raw.view("u1").reshape(-1, 4).T.tobytes()
            stored, mask = {
                0: (zlib.compress(shuffled), 0b00),
                1: (shuffled, 0b10),  # deflate skipped
                2: (zlib.compress(raw.tobytes()), 0b01),  # shuffle skipped
                3: (raw.tobytes(), 0b11),  # both skipped
                4: (zlib.compress(shuffled, 1), 0b00),
            }[c]
            ds.id.write_direct_chunk((10 * c, 0), stored, filter_mask=mask)
    with h5py.File(path, "r") as f:
        ref = f["x"][()]
        masks = [f["x"].id.get_chunk_info(i).filter_mask for i in range(5)]
    assert masks == [0, 2, 1, 3, 0]
    assert_same(ref, data)
    x = kb.open_array(path, key="x")
    assert x.decode == "ours"
    read_all_ways(x, ref)


def test_other_filters_decode_through_h5py(tmp_path: Path):
    data = indexed_rows(N, (4,), "int16")
    path = write(
        tmp_path / "other.h5",
        lzf=(data, {"chunks": (7, 4), "compression": "lzf"}),
        lzf_gzip_order=(
            data,
            {"chunks": (7, 4), "compression": "lzf", "shuffle": True},
        ),
        big_endian_gzip=(data.astype(">i2"), {"chunks": (7, 4), "compression": "gzip"}),
    )
    with h5py.File(path, "r") as f:
        for name in ["lzf", "lzf_gzip_order", "big_endian_gzip"]:
            x = kb.open_array(path, key=name)
            assert (x.decode, x.direct) == ("h5py", False), name
            read_all_ways(x, f[name][()])


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from keras_bigarray import _hdf5

    calls: list[int] = []
    real = _hdf5._decode_chunk

    def counting(*args: Any) -> np.ndarray:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(_hdf5, "_decode_chunk", counting)
    return calls


def test_a_user_h5py_handle_does_not_shrink_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # HDF5 sizes one chunk cache for every handle on a dataset by the first
    # handle opened; the user's (h5py's 1 MiB) came first here. Block shuffle
    # draws batch after batch from one window of chunks: each must be decoded
    # once, not once a batch.
    rows, width = 1024, 256  # 1 MiB chunks of float32 rows: 8 MiB of data
    data = np.repeat(np.arange(8 * rows, dtype="f4")[:, None], width, axis=1)
    path = write(
        tmp_path / "big.h5",
        x=(data, {"chunks": (rows, width), "compression": "gzip", "shuffle": True}),
    )
    calls = _count_decodes(monkeypatch)
    rng = np.random.default_rng(0)
    with h5py.File(path, "r") as f:
        x = kb.open_array(f["x"])
        assert isinstance(x, HDF5Array) and x.decode == "ours"
        calls.clear()  # the open decodes nothing (no partial last chunk)
        window = np.arange(2 * rows, 6 * rows)  # four chunks
        for _ in range(20):
            idx = np.sort(rng.choice(window, 256, replace=False))
            assert_same(x.read_sorted(idx, unique=True), data[idx])
            assert_same(x[idx], f["x"][idx])
        assert len(calls) == 4
    assert x._cache is not None and x._cache.nbytes <= x.chunk_cache_bytes


def test_the_chunk_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data = indexed_rows(200, (8,), "float64")  # 10-row chunks of 640 bytes
    path = write(
        tmp_path / "c.h5", x=(data, {"chunks": (10, 8), "compression": "gzip"})
    )
    calls = _count_decodes(monkeypatch)
    x = HDF5Array(path, "x", chunk_cache_bytes=3 * 640)
    assert_same(x[:], data)
    assert len(calls) == 20 and x._cache.nbytes <= 3 * 640
    calls.clear()
    assert_same(x[170:200], data[170:200])  # the last three chunks, still cached
    assert not calls
    assert_same(x[[0, 199]], data[[0, 199]])
    assert len(calls) == 1
    tiny = HDF5Array(path, "x", chunk_cache_bytes=100)  # no chunk fits: none kept
    assert_same(tiny[[5, 6, 150]], data[[5, 6, 150]])
    assert tiny._cache.nbytes == 0


def test_threads_decode_into_one_cache(tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    data = indexed_rows(3000, (16,), "float32")
    path = write(
        tmp_path / "t.h5",
        x=(data, {"chunks": (50, 16), "compression": "gzip", "fletcher32": True}),
    )
    # A cache of four chunks, so that threads evict what others read.
    x = HDF5Array(path, "x", chunk_cache_bytes=4 * 50 * 16 * 4)
    rng = np.random.default_rng(1)
    batches = [np.sort(rng.choice(3000, 300, replace=False)) for _ in range(64)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: x.read_sorted(i, unique=True), batches))
    for idx, got in zip(batches, results, strict=True):
        assert_same(got, data[idx])


def test_long_decoded_chunk_tables_are_rebuilt_after_pickling(tmp_path, monkeypatch):
    from keras_bigarray import _hdf5

    data = np.arange(503 * 2, dtype="int32").reshape(503, 2)
    path = write(tmp_path / "c.h5", x=(data, {"chunks": (5, 2), "compression": "gzip"}))
    x = kb.open_array(str(path), key="x")
    assert x.decode == "ours"
    assert_same(x[[3, 500]], data[[3, 500]])
    y = pickle.loads(pickle.dumps(x))  # a short table travels
    assert y._byte_plan is not _hdf5._REBUILD and y.decode == "ours"
    monkeypatch.setattr(_hdf5, "_PICKLED_PLAN_CHUNKS", 10)
    blob = pickle.dumps(x)
    assert len(blob) < 1000
    y = pickle.loads(blob)
    assert y._byte_plan == _hdf5._REBUILD and y._cache is None
    idx = np.array([502, 0, 250, 251, 7])
    assert_same(y[idx], data[idx])
    assert y.decode == "ours" and y.direct


def _corrupt(path: Path, key: str, chunk: int) -> None:
    """Flips the bits of one byte in the middle of a stored chunk."""
    with h5py.File(path, "r") as f:
        info = f[key].id.get_chunk_info(chunk)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        byte = fh.read(1)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_a_corrupt_chunk_raises_one_clear_error(tmp_path: Path):
    from keras_bigarray._hdf5 import CorruptChunkError

    data = indexed_rows(N, (4,), "float32")
    path = write(
        tmp_path / "bad.h5",
        z=(data, {"chunks": (7, 4), "compression": "gzip"}),
        c=(data, {"chunks": (7, 4), "fletcher32": True}),
        s=(data, {"chunks": (7, 4), "shuffle": True, "fletcher32": True}),
    )
    for key in ["z", "c", "s"]:
        _corrupt(path, key, 2)
    for key in ["z", "c", "s"]:
        x = kb.open_array(path, key=key)
        assert x.decode == "ours"
        assert_same(x[:14], data[:14])  # the chunks before it still read
        where = re.escape(f"'{path}', key='/{key}': chunk 2 (rows 14:21")
        with pytest.raises(CorruptChunkError, match=where + ".*does not decode"):
            x[[3, 15]]
        with pytest.raises(OSError, match="chunk 2"):  # h5py raises OSError too
            x[10:30]
        with pytest.raises(OSError), h5py.File(path, "r") as f:
            f[key][14:21]  # h5py agrees the chunk is bad
    with pytest.raises(CorruptChunkError, match="fletcher32 checksum"):
        kb.open_array(path, key="c")[14]


def test_an_edge_chunk_that_does_not_decode_falls_back_to_h5py(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # HDF5 can store partial edge chunks unfiltered, which h5py cannot tell us:
    # the open decodes the last chunk once and compares it with h5py's read.
    from keras_bigarray import _hdf5

    data = indexed_rows(N, (4,), "float32")
    path = write(tmp_path / "e.h5", x=(data, {"chunks": (7, 4), "compression": "gzip"}))
    real = _hdf5._decode_chunk
    monkeypatch.setattr(
        _hdf5, "_decode_chunk", lambda *a: np.zeros_like(real(*a))
    )  # decodes "wrong"
    x = kb.open_array(path, key="x")
    assert (x.decode, x.direct) == ("h5py", False)
    read_all_ways(x, data)
    monkeypatch.setattr(_hdf5, "_decode_chunk", lambda *a: real(a[0][:5], *a[1:]))
    assert kb.open_array(path, key="x").decode == "h5py"  # raises inside: same


def test_inspect_says_who_decodes(layouts: tuple[Path, np.ndarray]):
    from keras_bigarray import cli

    path, _ = layouts
    fmt = {k: cli._format_of(kb.open_array(path, key=k)) for k in ["gzip", "lzf"]}
    assert fmt["gzip"].endswith("chunks decoded by keras-bigarray")
    assert fmt["lzf"].endswith("read through h5py")
    assert cli._format_of(kb.open_array(path, key="chunked")).endswith("file's bytes")


@pytest.mark.parametrize("name", ["chunked", "gzip", "lzf"])
def test_threads_share_one_map_and_one_h5py_file(
    layouts: tuple[Path, np.ndarray], name: str, monkeypatch
):
    # tf.data calls Python from its own threads, each call with a fresh
    # thread state: handles kept per thread were opened again for every batch.
    # Here every batch is read by a new thread; the file is mapped (or opened
    # through h5py) once.
    import threading

    path, data = layouts
    opened: list[str] = []
    memmap, file = np.memmap, h5py.File

    class CountingMemmap(np.memmap):
        def __new__(cls, *args: Any, **kw: Any) -> Any:
            opened.append("map")
            return memmap.__new__(memmap, *args, **kw)

    def counting_file(*args: Any, **kw: Any) -> Any:
        opened.append("h5py")
        return file(*args, **kw)

    x = kb.open_array(str(path), key=name)
    monkeypatch.setattr(np, "memmap", CountingMemmap)
    monkeypatch.setattr(h5py, "File", counting_file)
    got = []
    for i in range(8):
        t = threading.Thread(target=lambda i=i: got.append((i, x[i * 5 : i * 5 + 5])))
        t.start()
        t.join()
    assert len(opened) <= 1, opened
    for i, rows in got:
        np.testing.assert_array_equal(rows, data[i * 5 : i * 5 + 5])


@pytest.mark.parametrize("name", ["chunked", "gzip"])
def test_a_plan_left_out_of_the_pickle_is_rebuilt_on_first_read(
    layouts: tuple[Path, np.ndarray], name: str, monkeypatch
):
    # The first read maps the file under the handles' lock, and finding where
    # the chunks lie opens the file through h5py under the same lock: it must
    # not wait for itself. Read in a thread: a hang fails the test instead.
    import threading

    from keras_bigarray import _hdf5

    path, data = layouts
    monkeypatch.setattr(_hdf5, "_PICKLED_PLAN_CHUNKS", 0)  # every plan left out
    x = pickle.loads(pickle.dumps(kb.open_array(str(path), key=name)))
    assert x._byte_plan == _hdf5._REBUILD
    got: list[np.ndarray] = []

    def first_read() -> None:
        x._file_bytes()  # the map first, as any read path may come to it
        got.append(x[3:20])

    t = threading.Thread(target=first_read, daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "the first read after unpickling hung"
    np.testing.assert_array_equal(got[0], data[3:20])
