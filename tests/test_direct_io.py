"""Direct I/O under block shuffle: a file larger than the memory available has
each window's blocks read with O_DIRECT into one buffer, and every batch
gathered from it. The batches must be exactly those of the memory-mapped path,
whatever the row size, header offset, shard bounds or reader threads."""

from __future__ import annotations

import errno
import os
import pickle

import numpy as np
import pytest
from conftest import (
    assert_prefetched_to_cpu,
    assert_reads_like_the_reader,
    fixture_settings,
    indexed_rows,
    open_kind,
    row_ids,
)
from hypothesis import assume, given
from hypothesis import strategies as st

import keras_bigarray as kb
from keras_bigarray import reading, sources
from keras_bigarray.dataset import _init_worker
from keras_bigarray.reading import BatchReadError

pytestmark = pytest.mark.skipif(
    not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's"
)


@pytest.fixture(autouse=True)
def _needs_direct_io(tmp_path):
    # Some file systems (tmpfs before Linux 6.6) refuse O_DIRECT: the reader
    # then falls back to the memory map, which the fallback test covers.
    p = tmp_path / "probe.bin"
    p.write_bytes(b"\0" * 8192)
    try:
        os.close(os.open(p, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    p.unlink()


def _epoch(x, y, direct: bool, **kw):
    x.direct_io = direct
    ds = kb.BigArrayDataset(x, y, shuffle="block", **kw)
    assert bool(ds.reader._direct_sources()) is direct
    return [ds[i] for i in range(len(ds))]


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)


def _direct_dataset(tmp_path, n: int, **kw):
    """Rows 0..n-1 of 4 values in a .npy read with direct I/O, labels their
    index, block shuffle over blocks of 20 rows."""
    x = open_kind("npy", tmp_path, indexed_rows(n, (4,)))
    x.direct_io = True
    return kb.BigArrayDataset(x, np.arange(n), shuffle="block", block_rows=20, **kw)


def _count_windows(monkeypatch):
    calls = []
    real = sources.read_direct_files

    def counted(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(sources, "read_direct_files", counted)
    return calls


@pytest.mark.parametrize("kind", ["npy", "raw", "shards", "h5_contiguous"])
def test_direct_batches_equal_the_mapped_ones(tmp_path, monkeypatch, kind):
    n = 1000
    x = open_kind(kind, tmp_path, indexed_rows(n, (5,), "float64"))
    y = np.arange(n)
    kw = dict(batch_size=64, seed=3, block_rows=37, shuffle_window=4, rows=(11, n))
    want = _epoch(x, y, False, **kw)
    calls = _count_windows(monkeypatch)
    got = _epoch(x, y, True, **kw)
    assert calls, "the direct path was not taken"
    _same(got, want)
    ids = np.concatenate([row_ids(b[0]) for b in got])
    assert sorted(ids.tolist()) == list(range(11, n))
    np.testing.assert_array_equal(ids, np.concatenate([b[1] for b in got]))


@fixture_settings(25)
@given(
    n=st.integers(1, 600),
    row=st.sampled_from([(1,), (3,), (7,), (256,), (1023,), (2, 3)]),
    dtype=st.sampled_from(["uint8", "int16", "float32", "float64"]),
    offset=st.integers(0, 5000),
    batch_size=st.integers(1, 70),
    block_rows=st.integers(1, 50),
    window=st.integers(1, 5),
    seed=st.integers(0, 2**32),
)
def test_direct_reads_any_layout(
    tmp_path, n, row, dtype, offset, batch_size, block_rows, window, seed
):
    # Raw files with any header length: rows at every alignment to 4 KiB.
    data = indexed_rows(n, row, dtype)
    p = tmp_path / f"x_{n}_{offset}_{dtype}_{len(row)}.raw"
    p.write_bytes(b"\xff" * offset + data.tobytes())
    x = kb.open_array(str(p), dtype=dtype, shape=(-1, *row), offset=offset)
    kw = dict(batch_size=batch_size, seed=seed, block_rows=block_rows)
    kw["shuffle_window"] = window
    _same(_epoch(x, None, True, **kw), _epoch(x, None, False, **kw))


def test_direct_reads_every_row_once_with_threads_and_tf_data(tmp_path):
    n = 3000
    ds = _direct_dataset(
        tmp_path, n, batch_size=50, seed=1, shuffle_window=3, workers=3
    )
    for epoch in (0, 1):
        ids = [
            np.testing.assert_array_equal(row_ids(bx), by) or by
            for bx, by in ds.iterate_epoch(epoch)
        ]
        assert sorted(np.concatenate(ids).tolist()) == list(range(n))
    tfds = ds.to_tf_dataset()
    ids = np.concatenate([by.numpy() for _, by in tfds])
    assert sorted(ids.tolist()) == list(range(n))


def test_direct_io_is_chosen_by_size_and_can_be_forced_or_refused(tmp_path):
    x = open_kind("npy", tmp_path, indexed_rows(100, (4,)))
    assert x.direct_io is None
    assert x.reads_direct(available=x.nbytes - 1)  # larger than the memory left
    assert not x.reads_direct(available=x.nbytes)
    assert not x.reads_direct(available=None)
    x.direct_io = True
    assert x.reads_direct(available=10 * x.nbytes)
    x.direct_io = False
    assert not x.reads_direct(available=0)
    h5 = open_kind("h5_gzip", tmp_path, indexed_rows(100, (4,)), name="h")
    for other in (kb.open_array(np.zeros((100, 4))), h5):
        other.direct_io = True
        assert not other.reads_direct(available=0)  # no file bytes to read directly
    np.save(tmp_path / "f.npy", np.asfortranarray(indexed_rows(10, (3,))))
    with pytest.warns(UserWarning, match="Fortran"):
        f = kb.open_array(str(tmp_path / "f.npy"))
    assert not f.direct_capable  # Fortran order: rows are scattered


@pytest.mark.parametrize("kind", ["h5_gzip", "ndarray", "zarr"])
def test_sources_without_rows_in_one_file_read_no_windows(tmp_path, kind):
    if kind == "zarr":
        pytest.importorskip("zarr")
    x = open_kind(kind, tmp_path, indexed_rows(100, (4,)))
    x.direct_io = True
    assert not x.direct_capable and x.window_origin() is None
    ds = kb.BigArrayDataset(x, batch_size=16, shuffle="block", block_rows=10)
    assert ds.reader._direct_sources() == {}


def test_other_shuffles_and_small_labels_stay_mapped(tmp_path):
    n = 500
    x = open_kind("npy", tmp_path, indexed_rows(n, (4,)))
    y = open_kind("npy", tmp_path, np.arange(n), name="y")
    x.direct_io = True
    for shuffle in (False, True):
        ds = kb.BigArrayDataset(x, y, batch_size=32, shuffle=shuffle)
        assert ds.reader._direct_sources() == {}
    ds = kb.BigArrayDataset(x, y, batch_size=32, shuffle="block")
    assert set(ds.reader._direct_sources()) == {"x"}  # y is small: auto says no


def test_refused_o_direct_falls_back_to_the_memory_map(tmp_path, monkeypatch):
    n = 400
    x = open_kind("npy", tmp_path, indexed_rows(n, (3,)))
    kw = dict(batch_size=32, seed=5, block_rows=10)
    want = _epoch(x, np.arange(n), False, **kw)
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    x2 = kb.open_array(x.path)
    x2.direct_io = True
    ds = kb.BigArrayDataset(x2, np.arange(n), shuffle="block", **kw)
    _same([ds[i] for i in range(len(ds))], want)
    assert not x2.direct_capable
    assert ds.reader._direct_sources() == {}


def test_a_file_truncated_after_opening_names_the_file(tmp_path):
    n = 300
    x = open_kind("npy", tmp_path, indexed_rows(n, (256,)))
    x.direct_io = True
    ds = kb.BigArrayDataset(x, batch_size=300, shuffle="block", seed=0, block_rows=10)
    os.truncate(x.path, os.path.getsize(x.path) - 5000)
    with pytest.raises(BatchReadError, match=r"x\.npy.*truncated"):
        ds[0]


def test_windows_are_bounded_and_a_pickled_reader_starts_empty(tmp_path, monkeypatch):
    n = 4000
    x = open_kind("npy", tmp_path, indexed_rows(n, (2,)))
    x.direct_io = True
    ds = kb.BigArrayDataset(
        x, batch_size=10, shuffle="block", seed=2, block_rows=10, shuffle_window=2
    )
    r = ds.reader
    for order in (range(len(ds)), reversed(range(len(ds))), [5, 390, 7, 200, 3]):
        for i in order:
            r.read(0, i)
            assert len(r._windows._groups) <= reading._Windows.KEEP
    clone = pickle.loads(pickle.dumps(r))
    assert clone._direct is None
    assert not getattr(clone._windows, "_groups", None)
    np.testing.assert_array_equal(clone.read(0, 7)[0], r.read(0, 7)[0])
    # Far behind the others (evicted), a batch reads its window again.
    np.testing.assert_array_equal(r.read(0, 0)[0], clone.read(0, 0)[0])


def test_worker_processes_read_through_the_page_cache(tmp_path):
    # Each process reads a share of every window's batches: whole windows read
    # directly in each would multiply the disk's reads.
    n = 600
    ds = _direct_dataset(
        tmp_path, n, batch_size=40, seed=4, workers=2, use_multiprocessing=True
    )
    assert ds.reader._direct_sources()  # the parent would read directly
    got = list(ds.iterate_epoch(0))
    want = [ds.reader.read(0, i) for i in range(len(ds))]
    _same(got, want)
    clone = pickle.loads(pickle.dumps(ds.reader))
    _init_worker(clone)  # what a worker process runs first
    assert clone._direct_sources() == {}


def test_window_buffers_are_reused_only_once_released(tmp_path):
    n = 2000
    data = indexed_rows(n, (64,))
    x = open_kind("npy", tmp_path, data)
    ranges = [[(a, a + 50)] for a in range(0, 1900, 100)]
    held = [x.read_window(r) for r in ranges[:3]]
    ptrs = {w.view.ctypes.data for w in held}
    assert len(ptrs) == 3  # held windows never share a buffer
    for r in ranges[3:]:  # windows read and dropped at once reuse one buffer
        x.read_window(r)
    for w, r in zip(held, ranges, strict=False):  # still intact
        rows = np.arange(r[0][0], r[0][1])
        np.testing.assert_array_equal(w.take(rows), data[rows])
    ptr = held[1].view.ctypes.data
    del held[1]
    again = x.read_window(ranges[5])
    assert again.view.ctypes.data == ptr  # the released buffer, reused
    assert len(sources._POOL) <= sources._POOL_KEEP


# ---- the tf.data path: a tf.gather from each window --------------------------------


def _windowed(ds) -> bool:
    from keras_bigarray import tf_data

    spec = tf_data.element_spec(ds)
    return tf_data._windowed(ds, spec, 2) is not None


@pytest.mark.filterwarnings("ignore:.*rows are left out")
@fixture_settings(20)
@given(
    kind=st.sampled_from(["npy", "raw", "shards", "h5_contiguous"]),
    n=st.integers(1, 120),
    batch_size=st.integers(1, 40),
    block_rows=st.integers(1, 25),
    window=st.integers(1, 4),
    start=st.integers(0, 5),
    shards=st.integers(1, 3),
    drop_remainder=st.booleans(),
    parts=st.sampled_from(["x", "xy", "xy-direct", "xy-shards", "xyw", "dict"]),
)
def test_tf_batches_gathered_from_windows_are_the_readers(
    tmp_path_factory,
    kind,
    n,
    batch_size,
    block_rows,
    window,
    start,
    shards,
    drop_remainder,
    parts,
):
    pytest.importorskip("tensorflow")
    d = tmp_path_factory.mktemp("w")
    x = open_kind(kind, d, indexed_rows(n, (5,)))
    x.direct_io = True
    ykind = "shards" if parts == "xy-shards" else "npy"
    y = open_kind(ykind, d, np.arange(n, dtype=np.int64), name="y")
    y.direct_io = parts == "xy-direct"
    w = open_kind("npy", d, np.linspace(0, 1, n, dtype=np.float32), name="w")
    kw = {}
    if parts.startswith("xy"):
        kw["y"] = y
    if parts == "xyw":
        kw["sample_weight"] = w
    try:
        ds = kb.BigArrayDataset(
            {"a": x, "b": y} if parts == "dict" else x,
            shuffle="block",
            batch_size=batch_size,
            block_rows=block_rows,
            shuffle_window=window,
            seed=3,
            rows=slice(min(start, n - 1), n),
            num_shards=shards,
            shard_index=shards - 1,
            drop_remainder=drop_remainder,
            **kw,
        )
    except ValueError as e:  # a shard with no batch at all
        assume("no batches" not in str(e))
        raise
    assert _windowed(ds)
    assert_reads_like_the_reader(ds)


def _odd_raw(tmp_path, data, name="odd.raw", head=b"head"):
    (tmp_path / name).write_bytes(head + data.tobytes())
    shape = (-1, *data.shape[1:])
    return kb.open_array(
        tmp_path / name, dtype=data.dtype, shape=shape, offset=len(head)
    )


def test_tf_windows_fall_back_where_they_cannot_apply(tmp_path):
    pytest.importorskip("tensorflow")
    data = indexed_rows(300, (4,))
    odd = _odd_raw(tmp_path, data)
    np.save(tmp_path / "even.npy", data[:100])
    mixed = sources.ShardedArray(  # rows 128 and 4 bytes in: no common origin
        [kb.open_array(tmp_path / "even.npy"), _odd_raw(tmp_path, data[100:], "b.raw")]
    )
    assert mixed.window_origin() is None
    for x in (odd, mixed):  # not 64-byte aligned; no one buffer
        x.direct_io = True
        ds = kb.BigArrayDataset(x, shuffle="block", batch_size=16, block_rows=10)
        assert ds.reader._direct_sources() and not _windowed(ds)
        assert_reads_like_the_reader(ds, epochs=1)


def test_tf_windows_read_rows_where_direct_io_stops(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")
    ds = _direct_dataset(tmp_path, 500, batch_size=16, seed=2)
    want = [ds.reader.read(0, i) for i in range(len(ds))]
    assert _windowed(ds)
    monkeypatch.setattr(sources, "read_direct_files", lambda *a, **k: None)
    ds = ds.replace()  # fresh windows: each read now refused
    got = list(ds.to_tf_dataset())
    _same([tuple(t.numpy() for t in b) for b in got], want)


def test_a_tensor_over_a_window_keeps_its_buffer(tmp_path):
    tf = pytest.importorskip("tensorflow")
    data = indexed_rows(2000, (64,))
    x = open_kind("npy", tmp_path, data)
    window = x.read_window([(100, 150)])
    tensor = tf.experimental.dlpack.from_dlpack(window.held_view().__dlpack__())
    ptr = window.view.ctypes.data
    at = window.positions(np.arange(100, 150))
    del window  # only the tensor holds the buffer now
    for a in range(0, 1900, 100):  # dropped at once: free buffers are reused
        assert x.read_window([(a, a + 50)]).view.ctypes.data != ptr
    np.testing.assert_array_equal(tensor.numpy()[at], data[100:150])
    del tensor
    assert x.read_window([(0, 50)]).view.ctypes.data == ptr


@pytest.mark.parametrize("row", [(4,), (5,), (256,), (1,)])
def test_shards_share_one_window_buffer_whatever_their_headers(tmp_path, row):
    # .npy shards (128-byte headers) and a raw one 4224 bytes in: the rows of all
    # sit a whole number of rows from one origin of one buffer.
    data = indexed_rows(700, row)
    np.save(tmp_path / "a.npy", data[:250])
    parts = [
        kb.open_array(tmp_path / "a.npy"),
        _odd_raw(tmp_path, data[250:480], "b.raw", b"h" * 4224),
    ]
    np.save(tmp_path / "c.npy", data[480:])
    parts.append(kb.open_array(tmp_path / "c.npy"))
    x = sources.ShardedArray(parts)
    assert x.window_origin() is not None
    ranges = [(0, 3), (240, 262), (470, 490), (600, 700), (100, 101)]
    window = x.read_window(ranges)
    assert isinstance(window, sources.RowWindow)
    rows = np.concatenate([np.arange(a, b) for a, b in sorted(ranges)])
    np.testing.assert_array_equal(window.take(rows), data[rows])


def test_tf_windows_prefetch_to_a_device(tmp_path):
    # The GPU path (prefetch_to_device) runs here on the CPU device.
    pytest.importorskip("tensorflow")
    ds = _direct_dataset(tmp_path, 300, batch_size=16, seed=6)
    assert _windowed(ds)
    assert_prefetched_to_cpu(ds, 300)
