"""The source contract, run against every source kind: numpy is the oracle for
indexing, dtype is kept, results are new arrays, pickles are small and reopen in
other processes, and bad input fails at once with an error naming the culprit."""

from __future__ import annotations

import hashlib
import multiprocessing
import operator
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    SOURCE_KINDS,
    fixture_settings,
    indexed_rows,
    make_source,
    open_kind,
    row_ids,
)
from hypothesis import given
from hypothesis import strategies as st

import keras_bigarray as kb
from keras_bigarray import sources

N = 34  # leaves a partial batch of 16, and a zero-length shard in "shards"

# Kinds that name a file (or files): their pickle carries a path, never data.
PATH_KINDS = [k for k in SOURCE_KINDS if k not in ("ndarray", "zarr")]

HYPO = fixture_settings(40)


def tree_digest(root: Path) -> str:
    """One hash of every file's bytes under `root`: proves nothing was written."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def assert_same(got: Any, expected: np.ndarray) -> None:
    got = np.asarray(got)
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def row_keys(n: int) -> st.SearchStrategy[Any]:
    """Every axis-0 key numpy takes: ints, slices, int lists/arrays in any order
    with duplicates and negatives, 2-D int arrays, boolean masks."""
    ints = st.integers(-n, n - 1)
    bound = st.none() | st.integers(-n - 3, n + 3)
    steps = st.none() | st.integers(-5, 5).filter(bool)
    return st.one_of(
        ints,
        st.builds(slice, bound, bound, steps),
        st.lists(ints, max_size=40).map(lambda v: np.array(v, dtype=np.int64)),
        st.lists(ints, min_size=1, max_size=10),
        st.lists(ints, max_size=20).map(
            lambda v: np.array(v[: len(v) // 2 * 2], dtype=np.int32).reshape(-1, 2)
        ),
        st.lists(st.booleans(), min_size=n, max_size=n).map(np.array),
    )


def rests(ndim: int) -> st.SearchStrategy[tuple[Any, ...]]:
    """What may follow the row key: nothing, or indices into the row axes."""
    if ndim == 1:
        return st.just(())
    return st.sampled_from(
        [
            (),
            (0,),
            (-1,),
            (slice(None, None, -1),),
            (Ellipsis, 0),
            (np.array([0]),),
            (slice(1, None),),
        ]
    )


# ---- the array surface, every kind ---------------------------------------------------


@pytest.mark.parametrize("row_shape", [(3,), (4, 3), ()], ids=["2d", "3d", "1d"])
def test_metadata(source_kind: str, tmp_path: Path, row_shape: tuple[int, ...]):
    data = indexed_rows(N, row_shape)
    x = open_kind(source_kind, tmp_path, data)
    assert isinstance(x, kb.BigArray)
    assert x.shape == data.shape
    assert x.dtype == data.dtype
    assert x.ndim == data.ndim
    assert x.nbytes == data.nbytes
    assert len(x) == N
    assert x.row_nbytes == data[0].nbytes
    assert x.block_rows >= 1
    assert_same(np.stack(list(x)), data)  # iteration yields every row in order


@pytest.fixture(params=[(3,), (4, 3), ()], ids=["2d", "3d", "1d"])
def opened(source_kind: str, tmp_path: Path, request: pytest.FixtureRequest):
    """`(data, x)`: self-indexed rows and the same rows as a source."""
    data = indexed_rows(N, request.param)
    return data, open_kind(source_kind, tmp_path, data)


@HYPO
@given(st.data())
def test_indexing_matches_numpy(opened: tuple[np.ndarray, Any], data: st.DataObject):
    arr, x = opened
    key = data.draw(row_keys(N), label="key")
    rest = data.draw(rests(arr.ndim), label="rest")
    full = (key, *rest) if rest else key
    assert_same(x[full], arr[full])


def test_basic_keys(source_kind: str, tmp_path: Path):
    data = indexed_rows(N, (4, 3))
    x = open_kind(source_kind, tmp_path, data)
    idx = np.array([7, -1, 0, 7, 33, -34, 5])
    mask = np.arange(N) % 3 == 1
    for key in [
        0,
        5,
        -1,
        -N,
        np.int64(3),
        slice(2, 9),
        slice(None, None, 4),
        slice(None, None, -3),
        slice(30, 2, -5),
        slice(5, 5),
        idx,
        list(idx),
        mask,
        (idx, 0),
        (idx, slice(None), -1),
        (3, 2, 1),
        (slice(1, 30, 7), 1),
        Ellipsis,
        (),
    ]:
        assert_same(x[key], data[key])
    assert_same(x.take(idx), data[idx])
    assert_same(x.read_sorted(np.array([0, 0, 2])), data[[0, 0, 2]])
    assert_same(
        x.read_sorted(np.array([0, 0, 2, 2, 3, 9, 9])), data[[0, 0, 2, 2, 3, 9, 9]]
    )
    assert_same(x.read_sorted(np.zeros(0, dtype=np.int64)), data[:0])


@pytest.mark.parametrize("dtype", ["uint8", "float16", "int16", "float64"])
def test_storage_dtype_is_kept(source_kind: str, tmp_path: Path, dtype: str):
    data = indexed_rows(N, (3,), dtype)
    x = open_kind(source_kind, tmp_path, data)
    assert x.dtype == np.dtype(dtype)
    for key in [
        3,
        slice(1, 7),
        slice(None, None, -2),
        [5, 1, 1, -2],
        np.arange(N) % 2 == 0,
    ]:
        got = x[key]
        assert got.dtype == np.dtype(dtype)
        assert_same(got, data[key])


def test_results_are_new_arrays(source_kind: str, tmp_path: Path):
    data = indexed_rows(N, (4, 3), "uint8")
    src = make_source(source_kind, tmp_path, data)
    if isinstance(src, dict):
        x = kb.open_array(src.pop("source"), **src)
    else:
        x = kb.open_array(src)
    before = tree_digest(tmp_path)
    in_memory = src if isinstance(src, np.ndarray) else None
    results = [
        x[2],
        x[1:5],
        x[::3],
        x[::-2],
        x[[4, 1, 1, -1]],
        x[np.arange(N) > 30],
        x.take([3, 2]),
        x.read_sorted(np.array([0, 1, 2])),
        x[5, 1],
    ]
    for r in results:
        assert isinstance(r, np.ndarray)
        assert r.flags.writeable
        if in_memory is not None:
            assert not np.shares_memory(r, in_memory)
        r[...] = 255
    assert tree_digest(tmp_path) == before
    assert_same(x[:], data)
    if in_memory is not None:
        assert_same(np.asarray(in_memory), data)


def test_pickle_is_small_and_reads_the_same(source_kind: str, tmp_path: Path):
    data = indexed_rows(N, (3,))
    x = open_kind(source_kind, tmp_path, data)
    assert_same(x[[3, 1]], data[[3, 1]])  # opened handles must not travel
    blob = pickle.dumps(x)
    if source_kind in PATH_KINDS:
        assert len(blob) < 1000, f"{source_kind} pickles {len(blob)} bytes"
    y = pickle.loads(blob)
    assert type(y) is type(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    idx = np.array([33, 0, 17, 17, 8])
    assert_same(y[idx], data[idx])
    assert_same(y[:], data)


def test_spawned_process_reads_pickled_sources(tmp_path: Path):
    data = indexed_rows(N, (4, 3))
    kinds = PATH_KINDS
    arrays = []
    for kind in kinds:
        (tmp_path / kind).mkdir()
        x = open_kind(kind, tmp_path / kind, data)
        x[[0, 5]]  # open handles in the parent first
        arrays.append(x)
    idx = np.array([30, 2, 2, 17, 9])
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        got = pool.starmap(operator.getitem, [(x, idx) for x in arrays])
    for kind, g in zip(kinds, got, strict=True):
        assert np.array_equal(g, data[idx]), kind


# ---- layouts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["npy", "raw", "h5_contiguous", "shards", "ndarray", "memmap", "zarr"]
)
def test_zero_rows(kind: str, tmp_path: Path):
    data = indexed_rows(0, (3,))
    x = open_kind(kind, tmp_path, data)
    assert x.shape == (0, 3) and len(x) == 0 and x.nbytes == 0
    assert_same(x[:], data)
    assert_same(x[[]], data[[]])
    with pytest.raises(IndexError):
        x[0]


def test_shards_zero_length_and_natural_order(tmp_path: Path):
    # part-2 must come before part-10; zero-length shards anywhere are skipped.
    sizes = [3, 0, 5, 1, 0, 4, 2, 0, 3, 6, 2, 1, 0]
    data = indexed_rows(sum(sizes), (2,), "int32")
    folder = tmp_path / "shards"
    folder.mkdir()
    pos = 0
    for i, s in enumerate(sizes):
        np.save(folder / f"part-{i}.npy", data[pos : pos + s])
        pos += s
    (folder / "notes.txt").write_text("not a shard")
    for src in [str(folder / "part-*.npy"), str(folder), folder]:
        x = kb.open_array(src)
        assert isinstance(x, sources.ShardedArray)
        assert len(x.parts) == len(sizes)
        assert_same(x[:], data)
        idx = np.array([0, 2, 3, 8, 9, 8, 24, 25, 26, 9, -1])
        assert_same(x[idx], data[idx])
        assert row_ids(x[::-1]).tolist() == list(range(len(data) - 1, -1, -1))
    # A list keeps the caller's order.
    parts = [str(folder / f"part-{i}.npy") for i in (2, 0)]
    assert_same(kb.open_array(parts)[:], np.concatenate([data[3:8], data[0:3]]))


def test_multi_dim_rows_every_kind(source_kind: str, tmp_path: Path):
    data = indexed_rows(N, (4, 3), "int16")
    x = open_kind(source_kind, tmp_path, data)
    assert row_ids(x[[9, 2, 30]]).tolist() == [9, 2, 30]
    assert_same(x[[9, 2], :, 1], data[[9, 2], :, 1])
    assert_same(x[np.array([[1, 2], [3, 4]]), 0], data[np.array([[1, 2], [3, 4]]), 0])
    assert_same(x[[1, 2, 3], [0, 1, 2]], data[[1, 2, 3], [0, 1, 2]])
    assert_same(x[3, :, [0, 2]], data[3, :, [0, 2]])


def test_memmap_views_and_partial_files(tmp_path: Path):
    data = indexed_rows(N, (3,))
    np.save(tmp_path / "m.npy", data)
    mm = np.load(tmp_path / "m.npy", mmap_mode="r")
    for view in [mm, mm[5:20], mm[30:], mm[7]]:
        x = kb.open_array(view)
        assert isinstance(x, sources.RawArray)  # reads the file, pickles a path
        assert_same(x[:], np.asarray(view))
        assert len(pickle.dumps(x)) < 1000
        assert_same(pickle.loads(pickle.dumps(x))[:], np.asarray(view))
    strided = kb.open_array(mm[::2])
    assert_same(strided[:], data[::2])
    # A memmap over the middle of a bigger raw file.
    data.tofile(tmp_path / "r.raw")
    part = np.memmap(
        tmp_path / "r.raw", dtype=data.dtype, mode="r", offset=24, shape=(5, 3)
    )
    assert_same(kb.open_array(part)[:], data[2:7])
    # Copy-on-write changes live only in memory: read them, not the file.
    cow = np.load(tmp_path / "m.npy", mmap_mode="c")
    cow[0] = -1
    assert_same(kb.open_array(cow)[:2], np.asarray(cow[:2]))


class _ViewingArray:
    """A duck array whose slices are views of its own buffer."""

    def __init__(self, a: np.ndarray):
        self.a = a
        self.shape = a.shape
        self.dtype = a.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.a[key]


def test_duck_array_results_do_not_alias(tmp_path: Path):
    data = indexed_rows(N, (3,))
    for buf in [data.copy(), np.asfortranarray(data)]:
        duck = _ViewingArray(buf)
        x = kb.open_array(duck)
        assert isinstance(x, sources.DuckArray)
        for r in [x[3], x[2:9], x[[1, 4]]]:
            assert r.flags.writeable and not np.shares_memory(r, buf)
            r[...] = -1
        assert_same(buf, data)
        assert x[2:9].flags.c_contiguous


def test_open_array_passes_bigarray_through(tmp_path: Path):
    x = kb.open_array(indexed_rows(5))
    assert kb.open_array(x) is x
    with pytest.raises(ValueError, match="already open"):
        kb.open_array(x, key="k")


# ---- errors --------------------------------------------------------------------------


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.npy"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        kb.open_array(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        kb.open_array([str(path)])


def test_truncated_npy(tmp_path: Path):
    path = tmp_path / "t.npy"
    np.save(path, indexed_rows(N))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 5)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated"):
        kb.open_array(path)


def test_object_npy_is_never_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "o.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)

    def no_pickle(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle.load must not be called")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    with pytest.raises(TypeError, match=re.escape(str(path)) + ".*object"):
        kb.open_array(path)
    with pytest.raises(TypeError, match="object"):
        kb.open_array(np.array([1, "a"], dtype=object))


def test_npz_and_unknown_format(tmp_path: Path):
    npz = tmp_path / "z.npz"
    np.savez(npz, a=indexed_rows(3))
    with pytest.raises(ValueError, match=re.escape(str(npz)) + ".*zip"):
        kb.open_array(npz)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"0123456789")
    with pytest.raises(ValueError, match=re.escape(str(junk)) + ".*dtype="):
        kb.open_array(junk)
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"\x93NUMPY\x01\x00garbage")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        kb.open_array(bad)


def test_raw_errors(tmp_path: Path):
    path = tmp_path / "r.raw"
    data = indexed_rows(10, (3,))
    data.tofile(path)
    name = re.escape(str(path))
    with pytest.raises(ValueError, match=name + ".*120 bytes.*remainder 8"):
        kb.open_array(path, dtype="float32", shape=(-1, 7))
    with pytest.raises(ValueError, match=r"one -1.*shape=\(-1, -1\)"):
        kb.open_array(path, dtype="float32", shape=(-1, -1))
    with pytest.raises(ValueError, match=name + r".*shape=\(9, 3\).*needs 108"):
        kb.open_array(path, dtype="float32", shape=(9, 3))
    with pytest.raises(ValueError, match="dtype="):
        kb.open_array(path, shape=(10, 3))
    with pytest.raises(ValueError, match="offset"):
        kb.open_array(path, dtype="float32", offset=-4)
    with pytest.raises(ValueError, match="past the end"):
        kb.open_array(path, dtype="float32", offset=1000)
    with pytest.raises(ValueError, match="at least one axis"):
        kb.open_array(path, dtype="float32", shape=())
    # Good raw reads, for contrast: offset, inferred and exact shapes.
    assert_same(kb.open_array(path, dtype="float32", shape=(-1, 3))[:], data)
    assert_same(kb.open_array(path, dtype="float32", shape=(10, 3))[:], data)
    assert_same(
        kb.open_array(path, dtype="float32", shape=(-1, 3), offset=12)[:], data[1:]
    )
    assert_same(kb.open_array(path, dtype="float32")[:], data.reshape(-1))


def test_shards_that_disagree(tmp_path: Path):
    a = indexed_rows(4, (3,))
    np.save(tmp_path / "part-0.npy", a)
    np.save(tmp_path / "part-1.npy", a.astype("float64"))
    with pytest.raises(
        ValueError, match=re.escape(str(tmp_path / "part-1.npy")) + ".*dtype float64"
    ):
        kb.open_array(str(tmp_path / "part-*.npy"))
    np.save(tmp_path / "part-1.npy", a[:, :2].copy())
    with pytest.raises(
        ValueError, match=re.escape(str(tmp_path / "part-1.npy")) + r".*shape \(2,\)"
    ):
        kb.open_array([tmp_path / "part-0.npy", tmp_path / "part-1.npy"])


def test_empty_glob_folder_and_list(tmp_path: Path):
    pattern = str(tmp_path / "none-*.npy")
    with pytest.raises(FileNotFoundError, match=re.escape(pattern)):
        kb.open_array(pattern)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "empty"))):
        kb.open_array(tmp_path / "empty")
    with pytest.raises(ValueError, match="empty list"):
        kb.open_array([])


def test_fortran_order_npy_reads_right_and_warns(tmp_path: Path):
    data = indexed_rows(N, (4, 3))
    path = tmp_path / "f.npy"
    np.save(path, np.asfortranarray(data))
    with pytest.warns(UserWarning, match=re.escape(str(path)) + ".*Fortran") as rec:
        x = kb.open_array(path)
    assert rec[0].filename == __file__  # points at the caller, not the library
    idx = np.array([5, 0, 33, 5, -2])
    assert_same(x[:], data)
    assert_same(x[idx], data[idx])
    assert_same(x[::-3], data[::-3])
    # 1-D Fortran and C order are the same bytes: no warning.
    np.save(tmp_path / "f1.npy", np.asfortranarray(indexed_rows(5, ())))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(kb.open_array(tmp_path / "f1.npy")[:], indexed_rows(5, ()))


def test_zero_d_arrays(tmp_path: Path):
    path = tmp_path / "s.npy"
    np.save(path, np.float32(3))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*0-d"):
        kb.open_array(path)
    with pytest.raises(ValueError, match="0-d"):
        kb.open_array(np.array(3.0))
    (tmp_path / "r.raw").write_bytes(b"\0" * 4)
    with pytest.raises(ValueError, match="at least one axis"):
        kb.open_array(tmp_path / "r.raw", dtype="float32", shape=())


def test_index_errors(source_kind: str, tmp_path: Path):
    x = open_kind(source_kind, tmp_path, indexed_rows(N, (3,)))
    for key in [N, -N - 1, [0, N], np.array([-N - 1]), np.ones(N - 1, bool)]:
        with pytest.raises(IndexError, match=str(N)):
            x[key]
    with pytest.raises(IndexError):
        x[np.int64(N), 0]
    for key in [1.0, np.array([1.5]), "a", None, True]:
        with pytest.raises(TypeError):
            x[key]


def test_unsupported_sources_and_arguments(tmp_path: Path):
    with pytest.raises(TypeError, match="int"):
        kb.open_array(3)
    with pytest.raises(ValueError, match="key="):
        kb.open_array(indexed_rows(3), key="x")
    path = tmp_path / "x.npy"
    np.save(path, indexed_rows(3))
    with pytest.raises(ValueError, match="not an HDF5 file"):
        kb.open_array(path, key="x")


def _npy_bytes(data: np.ndarray, version: tuple[int, int]) -> bytes:
    """A .npy file written by hand, for header versions numpy does not pick."""
    header = repr(
        {
            "descr": np.lib.format.dtype_to_descr(data.dtype),
            "fortran_order": False,
            "shape": data.shape,
        }
    ).encode()
    size = 4 if version[0] >= 2 else 2
    pad = -(8 + size + len(header) + 1) % 64
    header += b" " * pad + b"\n"
    return (
        b"\x93NUMPY"
        + bytes(version)
        + len(header).to_bytes(size, "little")
        + header
        + data.tobytes()
    )


def test_npy_header_versions(tmp_path: Path):
    data = indexed_rows(N, (3,))
    for version in [(1, 0), (2, 0), (3, 0)]:
        path = tmp_path / f"v{version[0]}.npy"
        path.write_bytes(_npy_bytes(data, version))
        assert_same(np.load(path), data)  # the hand-written file is valid
        x = kb.open_array(path)
        assert_same(x[:], data)
        assert_same(x[[5, 0, 5]], data[[5, 0, 5]])
    bad = tmp_path / "v9.npy"
    bad.write_bytes(_npy_bytes(data, (9, 0)))
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*version 9.0"):
        kb.open_array(bad)


def test_glob_passes_key_and_raw_layout_to_every_shard(tmp_path: Path):
    import h5py

    data = indexed_rows(N, (3,), "uint8")
    cuts = [0, 10, 10, 25, N]
    for i in range(len(cuts) - 1):
        part = data[cuts[i] : cuts[i + 1]]
        with h5py.File(tmp_path / f"h-{i}.h5", "w") as f:
            f["x"] = part
            f["y"] = part.astype("float32") + 1000  # the key decides, not the order
        part.tofile(tmp_path / f"r-{i}.raw")
        np.save(tmp_path / f"n-{i}.npy", part)
    x = kb.open_array(str(tmp_path / "h-*.h5"), key="x")
    assert_same(x[:], data)
    assert_same(x[[30, 2, 11]], data[[30, 2, 11]])
    raw = kb.open_array(str(tmp_path / "r-*.raw"), dtype="uint8", shape=(-1, 3))
    assert_same(raw[:], data)
    with pytest.raises(KeyError, match="2 datasets"):
        kb.open_array(str(tmp_path / "h-*.h5"))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*folder"):
        kb.open_array(tmp_path, key="x")
    with pytest.raises(ValueError, match="apply to a path; received a list"):
        kb.open_array([str(tmp_path / "h-0.h5")], key="x")


# ---- batch buffers ------------------------------------------------------------------


def test_batch_buffers_are_reused_only_once_every_array_over_them_is_gone(
    monkeypatch,
):
    monkeypatch.setattr(sources, "_BATCHES", sources._BatchPool())
    shape = (sources._BATCH_POOL_MIN // 4, 2)  # 2x the pool's least size
    a = sources.batch_array(shape, np.float32)
    a[:] = 1.0
    where = a.ctypes.data
    assert where % sources._BATCH_ALIGN == 0
    view = a[5:9].reshape(-1)  # a view outlives the batch
    del a
    b = sources.batch_array(shape, np.float32)
    assert b.ctypes.data != where
    b[:] = 2.0
    np.testing.assert_array_equal(view, 1.0)  # untouched by the new batch
    del view
    c = sources.batch_array(shape, np.float32)
    assert c.ctypes.data == where  # free again: reused
    # Small batches are plain arrays: nothing to gain from a pool.
    small = sources.batch_array((4, 3), np.int64)
    assert small.flags.owndata


def test_the_batch_pool_keeps_at_most_its_bytes(monkeypatch):
    pool = sources._BatchPool()
    monkeypatch.setattr(sources, "_BATCHES", pool)
    monkeypatch.setattr(sources, "_BATCH_POOL_BYTES", 3 * (256 << 10))
    held = [sources.batch_array((256 << 10,), np.uint8) for _ in range(5)]
    assert pool.kept == 0
    del held
    assert pool.kept == 3 * (256 << 10)  # two buffers were freed, not kept
    again = [sources.batch_array((256 << 10,), np.uint8) for _ in range(4)]
    assert pool.kept == 0
    assert len({a.ctypes.data for a in again}) == 4


@pytest.mark.parametrize("kind", ["npy", "h5_chunked", "shards", "ndarray"])
def test_batches_held_across_epochs_keep_their_rows(kind: str, tmp_path: Path):
    # Batches big enough for pooled buffers, read by two threads and all kept
    # while later epochs are read: a buffer reused too early would show another
    # batch's rows.
    n, width = 600, 256  # 1 KiB rows, batches of 100 KiB
    data = indexed_rows(n, (width,))
    x = open_kind(kind, tmp_path, data)
    kept = []
    for shuffle in ["global", "block", False]:
        ds = kb.BigArrayDataset(
            x, batch_size=100, shuffle=shuffle, seed=5, workers=2, block_rows=50
        )
        for epoch in range(3):
            batches = [b[0] for b in ds.iterate_epoch(epoch)]
            kept.append((ds, epoch, batches))
    for ds, epoch, batches in kept:
        for i, got in enumerate(batches):
            rows, _ = ds.sampler.batch(epoch, i)
            np.testing.assert_array_equal(got, data[rows])
