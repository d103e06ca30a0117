"""BigArrayDataset: the contract of DESIGN.md, run against every source kind, every
shuffle mode, shard counts, worker modes and both ways of reading (ds[i] and the
iterators Keras uses); errors; and model.fit / evaluate / predict."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_settings, indexed_rows, make_source, open_kind, row_ids
from hypothesis import given
from hypothesis import strategies as st

import keras_bigarray as kb
from keras_bigarray import sources
from keras_bigarray.sources import ShardedArray

N = 34  # leaves a partial batch at batch_size 16


def epoch_batches(ds, how: str, epoch: int = 0):
    if how == "getitem":
        ds.epoch = epoch
        return [ds[i] for i in range(len(ds))]
    if how == "iterate":
        return list(ds.iterate_epoch(epoch))
    raise ValueError(how)


def check_batches(batches, batch_size: int) -> np.ndarray:
    """Asserts x/y alignment and batch sizes; returns the row ids in order."""
    ids = []
    for b in batches:
        x, y = b[0], b[1]
        assert len(x) <= batch_size
        np.testing.assert_array_equal(row_ids(x), y)
        ids.append(y)
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)


# ---- the contract, over source kinds --------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True, "block"])
def test_every_row_once_for_every_source_kind(tmp_path, source_kind, shuffle):
    data = indexed_rows(N, (3,))
    x = open_kind(source_kind, tmp_path, data)
    y = np.arange(N)
    ds = kb.BigArrayDataset(x, y, batch_size=16, shuffle=shuffle, seed=7, block_rows=5)
    assert len(ds) == 3
    for how in ("getitem", "iterate"):
        ids = check_batches(epoch_batches(ds, how), 16)
        assert sorted(ids.tolist()) == list(range(N))
        if shuffle is False:
            assert ids.tolist() == list(range(N))
    e0 = check_batches(epoch_batches(ds, "iterate", 0), 16)
    e1 = check_batches(epoch_batches(ds, "iterate", 1), 16)
    if shuffle:
        assert e0.tolist() != e1.tolist()
    else:
        assert e0.tolist() == e1.tolist()


@pytest.mark.parametrize("kind", ["npy", "h5_gzip", "shards"])
@fixture_settings(25)
@given(
    n=st.integers(1, 120),
    batch_size=st.integers(1, 40),
    shuffle=st.sampled_from([False, "global", "block"]),
    num_shards=st.integers(1, 4),
    drop=st.booleans(),
    pad=st.booleans(),
    seed=st.integers(0, 2**32),
    block_rows=st.integers(1, 9),
    window=st.integers(1, 4),
)
def test_exactly_once_property(
    tmp_path_factory,
    kind,
    n,
    batch_size,
    shuffle,
    num_shards,
    drop,
    pad,
    seed,
    block_rows,
    window,
):
    if drop and pad:
        pad = False
    tmp = tmp_path_factory.mktemp("p")
    x = open_kind(kind, tmp, indexed_rows(n, (2,)))
    shards = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rows left out of the tail: checked below
        try:
            for k in range(num_shards):
                shards.append(
                    kb.BigArrayDataset(
                        x,
                        np.arange(n),
                        batch_size=batch_size,
                        shuffle=shuffle,
                        seed=seed,
                        drop_remainder=drop,
                        pad_remainder=pad,
                        num_shards=num_shards,
                        shard_index=k,
                        block_rows=block_rows,
                        shuffle_window=window,
                    )
                )
        except ValueError as e:
            assert "no batches" in str(e)
            return
    lens = {len(s) for s in shards}
    assert len(lens) == 1, "every shard must have the same number of batches"
    seen = []
    for s in shards:
        for i in range(len(s)):
            b = s[i]
            if pad:
                x_, y_, w = b
                assert len(x_) == batch_size and len(w) == batch_size
                real = w > 0
                np.testing.assert_array_equal(row_ids(x_)[real], y_[real])
                seen += y_[real].tolist()
            else:
                seen += check_batches([b], batch_size).tolist()
    assert len(seen) == len(set(seen)), "a row was read twice in one epoch"
    dropped = shards[0].sampler.layout.dropped
    if not drop:
        assert len(seen) == n - dropped
        if pad or num_shards == 1:
            assert dropped == 0
        else:
            assert dropped < num_shards


def test_same_seed_same_batches_in_any_instance_and_process(tmp_path):
    src = make_source("npy", tmp_path, indexed_rows(N))
    a = kb.BigArrayDataset(src, np.arange(N), batch_size=8, shuffle=True, seed=3)
    b = kb.BigArrayDataset(src, np.arange(N), batch_size=8, shuffle=True, seed=3)
    c = pickle.loads(pickle.dumps(a))
    for e in range(3):
        ya = [t[1].tolist() for t in a.iterate_epoch(e)]
        assert ya == [t[1].tolist() for t in b.iterate_epoch(e)]
        assert ya == [t[1].tolist() for t in c.iterate_epoch(e)]
    other = kb.BigArrayDataset(src, np.arange(N), batch_size=8, shuffle=True, seed=4)
    assert [t[1].tolist() for t in other.iterate_epoch(0)] != [
        t[1].tolist() for t in a.iterate_epoch(0)
    ]


def test_seed_none_is_drawn_once_and_readable(tmp_path):
    ds = kb.BigArrayDataset(np.zeros((10, 2)), batch_size=4)
    assert isinstance(ds.seed, int) and ds.seed >= 0
    again = kb.BigArrayDataset(np.zeros((10, 2)), batch_size=4, seed=ds.seed)
    assert [b[0].tolist() for b in ds.iterate_epoch(0)] == [
        b[0].tolist() for b in again.iterate_epoch(0)
    ]


@pytest.mark.parametrize(
    "workers,mp,ctx",
    [(2, False, None), (2, True, "fork"), (2, True, "spawn"), (2, True, "forkserver")],
)
def test_workers_give_the_same_batches(tmp_path, workers, mp, ctx):
    src = make_source("h5_gzip", tmp_path, indexed_rows(N))
    x = kb.open_array(src["source"], key=src["key"])
    ref = kb.BigArrayDataset(x, np.arange(N), batch_size=5, shuffle=True, seed=11)
    par = kb.BigArrayDataset(
        x,
        np.arange(N),
        batch_size=5,
        shuffle=True,
        seed=11,
        workers=workers,
        use_multiprocessing=mp,
        mp_context=ctx,
    )
    for e in range(2):
        want = [t[1].tolist() for t in ref.iterate_epoch(e)]
        got = [t[1].tolist() for t in par.iterate_epoch(e)]
        assert got == want
        check_batches(par.iterate_epoch(e), 5)


def test_epochs_advance_with_on_epoch_end_and_iteration(tmp_path):
    ds = kb.BigArrayDataset(
        np.arange(40).reshape(40, 1), np.arange(40), batch_size=8, seed=2
    )
    first = [ds[i][1].tolist() for i in range(len(ds))]
    ds.on_epoch_end()
    assert ds.epoch == 1
    second = [ds[i][1].tolist() for i in range(len(ds))]
    assert first != second
    # Each full iteration of the Keras-facing iterator is the next epoch.
    ds.epoch = 0
    it1 = [b[1].tolist() for b in ds.get_numpy_iterator()]
    it2 = [b[1].tolist() for b in ds.get_numpy_iterator()]
    assert it1 == first and it2 == second


def test_resume_from_epoch_and_batch(tmp_path):
    ds = kb.BigArrayDataset(np.arange(100).reshape(100, 1), batch_size=10, seed=5)
    full = [b[0].ravel().tolist() for b in ds.iterate_epoch(4)]
    resumed = kb.BigArrayDataset(np.arange(100).reshape(100, 1), batch_size=10, seed=5)
    resumed.epoch = 4
    assert [resumed[i][0].ravel().tolist() for i in range(6, 10)] == full[6:]


def test_multi_input_and_output_structures(tmp_path):
    a = indexed_rows(N, (3,))
    b = indexed_rows(N, (2, 2), "uint8")
    np.save(tmp_path / "a.npy", a)
    ds = kb.BigArrayDataset(
        {"a": str(tmp_path / "a.npy"), "b": b},
        (np.arange(N), indexed_rows(N, (1,), "float64")),
        np.ones(N, dtype="float32"),
        batch_size=16,
        shuffle=True,
        seed=0,
    )
    for x, y, w in ds.iterate_epoch(0):
        assert set(x) == {"a", "b"} and x["b"].dtype == np.uint8
        np.testing.assert_array_equal(row_ids(x["a"]), y[0])
        np.testing.assert_array_equal(row_ids(x["b"]), y[0] % 256)
        np.testing.assert_array_equal(row_ids(y[1]), y[0])
        assert w.shape == (len(y[0]),)


def test_storage_dtype_is_kept(tmp_path):
    for dt in ("uint8", "int16", "float16", "float64"):
        ds = kb.BigArrayDataset(
            indexed_rows(20, (2,), dt), batch_size=8, shuffle=True, seed=0
        )
        assert ds[0][0].dtype == np.dtype(dt)


def test_pad_remainder_weights(tmp_path):
    w = np.linspace(0.5, 2.0, N).astype("float32")
    ds = kb.BigArrayDataset(
        indexed_rows(N),
        np.arange(N),
        w,
        batch_size=16,
        shuffle=False,
        pad_remainder=True,
    )
    assert len(ds) == 3
    x, y, sw = ds[2]
    assert x.shape == (16, 3) and y.shape == (16,)
    np.testing.assert_allclose(sw[:2], w[32:])
    assert (sw[2:] == 0).all() and (x[2:] == 0).all()
    x, y, sw = ds[0]
    np.testing.assert_allclose(sw, w[:16])


def test_drop_remainder(tmp_path):
    ds = kb.BigArrayDataset(
        indexed_rows(N), np.arange(N), batch_size=16, drop_remainder=True, seed=1
    )
    assert len(ds) == 2
    ids = check_batches(ds.iterate_epoch(0), 16)
    assert len(ids) == 32 and len(set(ids.tolist())) == 32


def test_validation_split_is_disjoint_and_unshuffled(tmp_path):
    src = make_source("npy", tmp_path, indexed_rows(100))
    ds = kb.BigArrayDataset(src, np.arange(100), batch_size=16, shuffle=True, seed=1)
    train, val = ds.validation_split(0.2)
    t = check_batches(train.iterate_epoch(0), 16)
    v = check_batches(val.iterate_epoch(0), 16)
    assert sorted(t.tolist()) == list(range(80))
    assert v.tolist() == list(range(80, 100))
    assert train.seed == ds.seed and val.shuffle == "sequential"
    with pytest.raises(ValueError, match="fraction"):
        ds.validation_split(1.5)


def test_rows_restricts_without_copy(tmp_path):
    ds = kb.BigArrayDataset(
        indexed_rows(50), np.arange(50), batch_size=7, rows=(10, 30), seed=0
    )
    assert ds.num_rows == 20
    ids = check_batches(ds.iterate_epoch(0), 7)
    assert sorted(ids.tolist()) == list(range(10, 30))


def test_pickled_dataset_is_small(tmp_path):
    src = make_source("npy", tmp_path, indexed_rows(5000, (64,)))
    ds = kb.BigArrayDataset(src, src, batch_size=32)
    assert len(pickle.dumps(ds)) < 4000


# ---- errors --------------------------------------------------------------------


def test_mismatched_lengths_list_every_length(tmp_path):
    with pytest.raises(
        ValueError, match=r"x: 10 rows, y\[0\]: 10 rows, y\[1\]: 9 rows"
    ):
        kb.BigArrayDataset(np.zeros((10, 2)), (np.zeros(10), np.zeros(9)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(batch_size=-3), "batch_size must be >= 1"),
        (dict(batch_size=2.5), "batch_size must be an int"),
        (dict(batch_size=True), "batch_size must be an int"),
        (dict(shuffle="random"), "shuffle must be False, True, 'global' or 'block'"),
        (dict(num_shards=0), "num_shards must be >= 1"),
        (dict(num_shards=2, shard_index=2), "shard_index must be in"),
        (dict(shard_index=-1), "shard_index must be >= 0"),
        (dict(drop_remainder=True, pad_remainder=True), "contradict"),
        (dict(batch_size=64, drop_remainder=True), "no batches"),
        (dict(seed=-1), "seed must be >= 0"),
        (dict(rows=(0, 10, 2)), "rows must be"),
        (dict(mp_context="telepathy"), "mp_context must be one of"),
        (dict(workers=-1), "workers must be >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        kb.BigArrayDataset(np.zeros((20, 2)), np.zeros(20), **kwargs)


def test_bad_sources_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        kb.BigArrayDataset(str(tmp_path / "nope.npy"))
    with pytest.raises(TypeError, match=r"y\['label'\]"):
        kb.BigArrayDataset(
            np.zeros((3, 1)), {"label": np.array([object(), 1, 2], dtype=object)}
        )


def test_worker_read_error_names_batch_and_source(tmp_path):
    p = tmp_path / "x.raw"
    indexed_rows(N).tofile(p)
    ds = kb.BigArrayDataset(
        kb.open_array(str(p), dtype="float32", shape=(-1, 3)),
        np.arange(N),
        batch_size=16,
        shuffle=False,
        workers=2,
        use_multiprocessing=True,
        mp_context="spawn",
    )
    p.write_bytes(b"")  # the file shrinks under the dataset
    with pytest.raises(Exception, match=r"batch \d+ of epoch 0 .*x\.raw"):
        list(ds.iterate_epoch(0))


def test_global_shuffle_on_compressed_hdf5_warns(tmp_path):
    import h5py

    with h5py.File(tmp_path / "z.h5", "w") as f:
        f.create_dataset("x", data=indexed_rows(200), chunks=(1, 3), compression="gzip")
    with pytest.warns(UserWarning, match="shuffle='block'"):
        kb.BigArrayDataset(kb.open_array(str(tmp_path / "z.h5"), key="x"), shuffle=True)


def test_rows_left_out_warns(tmp_path):
    # 2 shards x batch 16: 33 rows leave 1 row for the last round.
    with pytest.warns(UserWarning, match="pad_remainder=True"):
        kb.BigArrayDataset(np.zeros((33, 1)), batch_size=16, num_shards=2)


def test_default_block_is_the_fewest_whole_chunks_of_1_mib(tmp_path):
    import h5py

    from keras_bigarray.sources import DEFAULT_BLOCK_BYTES

    rows = np.zeros((5_000, 256), np.float32)  # 1 KiB rows
    np.save(tmp_path / "x.npy", rows)
    ds = kb.BigArrayDataset(str(tmp_path / "x.npy"), shuffle="block")
    assert ds.block_rows * 1024 == DEFAULT_BLOCK_BYTES == 1 << 20
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("raw", data=rows, chunks=(300, 256))
        f.create_dataset("gz", data=rows, chunks=(300, 256), compression="gzip")
    for key in ("raw", "gz"):
        arr = kb.open_array(str(tmp_path / "c.h5"), key=key)
        got = kb.BigArrayDataset(arr, shuffle="block").block_rows
        assert got % 300 == 0
        assert (got - 300) * 1024 < DEFAULT_BLOCK_BYTES <= got * 1024


# ---- read-ahead hints under block shuffle ---------------------------------------


def _byte_span(src, row: int) -> tuple[str, int, int]:
    """The file and bytes that reading `row` of `src` touches."""
    from keras_bigarray._hdf5 import HDF5Array

    if isinstance(src, ShardedArray):
        k = int(np.searchsorted(src.bounds, row, side="right")) - 1
        return _byte_span(src.parts[k], row - int(src.bounds[k]))
    w = src.row_nbytes
    if isinstance(src, HDF5Array):
        plan = src._plan()
        c = row // plan.rows
        if plan.sizes is not None:  # compressed: the whole stored chunk
            return src.path, int(plan.offsets[c]), int(plan.offsets[c] + plan.sizes[c])
        at = int(plan.offsets[c]) + (row % plan.rows) * w
        return src.path, at, at + w
    return src.path, src.offset + row * w, src.offset + (row + 1) * w


_LINUX_HINTS = pytest.mark.skipif(
    not hasattr(os, "posix_fadvise") or not Path("/proc/self/fd").is_dir(),
    reason="posix_fadvise and /proc are Linux's",
)


@_LINUX_HINTS
@pytest.mark.parametrize(
    "kind", ["npy", "raw", "h5_contiguous", "h5_chunked", "h5_gzip", "shards"]
)
def test_block_shuffle_hints_every_row_before_it_is_read(tmp_path, monkeypatch, kind):
    hinted: dict[str, list[tuple[int, int]]] = {}

    def fadvise(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_WILLNEED
        path = os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))
        hinted.setdefault(path, []).append((offset, offset + length))

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    # As if cold: files just written are in the page cache, so no hint is sent.
    monkeypatch.setattr(sources, "_page_cached", lambda *_: False)
    n = 211
    x = open_kind(kind, tmp_path, indexed_rows(n, (3,)))
    for seed, batch_size in [(0, 4), (1, 4), (2, 7), (3, 16)]:
        hinted.clear()
        ds = kb.BigArrayDataset(
            x,
            batch_size=batch_size,
            shuffle="block",
            block_rows=5,
            shuffle_window=3,
            rows=(9, n),
            seed=seed,
        )
        for i in range(len(ds)):
            (batch,) = ds[i]
            for r in row_ids(batch):
                path, a, b = _byte_span(x, int(r))
                spans = hinted.get(os.path.realpath(path), [])
                assert any(lo <= a and b <= hi for lo, hi in spans), (seed, i, int(r))
        if kind == "npy":  # each block once: no more than the rows read, in bytes
            total = sum(hi - lo for spans in hinted.values() for lo, hi in spans)
            assert total <= (n - 9) * x.row_nbytes


@_LINUX_HINTS
def test_hints_skip_spans_in_the_page_cache(tmp_path, monkeypatch):
    import errno

    sent = []
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: sent.append(a[1:3]))
    p = tmp_path / "x.bin"
    p.write_bytes(b"\1" * 100_000)  # just written: cached
    open_fds = len(os.listdir("/proc/self/fd"))
    sources.will_need(str(p), [(0, 50_000), (60_000, 40_000)])
    assert sent == []
    assert len(os.listdir("/proc/self/fd")) == open_fds  # no descriptor kept

    def not_cached(fd, buffers, offset, flags):
        raise OSError(errno.EAGAIN, "would block")

    monkeypatch.setattr(os, "preadv", not_cached)
    sources.will_need(str(p), [(0, 50_000), (60_000, 40_000)])
    assert sent == [(0, 50_000), (60_000, 40_000)]


@_LINUX_HINTS
def test_hints_of_a_file_found_cached_check_less(tmp_path, monkeypatch):
    # After a few calls that found everything cached, a call checks its first
    # and last spans only; one found missing brings every check back.
    import errno

    p = tmp_path / "x.bin"
    p.write_bytes(b"\1" * 100_000)
    path = str(p)
    spans = [(0, 10_000), (20_000, 10_000), (40_000, 10_000), (60_000, 10_000)]
    cold: set[int] = set()
    checked: list[int] = []
    sent: list[int] = []

    def preadv(fd, buffers, offset, flags):
        checked.append(offset)
        if any(a <= offset < a + n for a, n in spans if a in cold):
            raise OSError(errno.EAGAIN, "would block")
        return 1

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, a, n, adv: sent.append(a))
    monkeypatch.setattr(sources, "_CACHED_CALLS", {})
    for _ in range(sources._CACHED_STREAK):
        sources.will_need(path, spans)
    assert len(checked) == 2 * len(spans) * sources._CACHED_STREAK and not sent
    checked.clear()
    sources.will_need(path, spans)
    assert checked == [0, 9_999, 60_000, 69_999] and not sent
    cold.add(0)  # the first span leaves the page cache
    checked.clear()
    sources.will_need(path, spans)
    assert sent == [0] and len(checked) > 4
    assert sources._CACHED_CALLS[path] == 0


@_LINUX_HINTS
def test_a_reader_hints_files_in_the_page_cache_rarely(tmp_path, monkeypatch):
    # Windows found cached _HINT_STREAK times in a row: one in _HINT_RECHECK is
    # hinted from then on. A file that leaves the page cache is hinted every
    # window again from the next check.
    from keras_bigarray import reading

    cold = [False]
    calls: list[int] = []

    def will_need(path, spans):
        calls.append(len(list(spans)))
        return not cold[0]

    monkeypatch.setattr(sources, "will_need", will_need)
    x = open_kind("npy", tmp_path, indexed_rows(4096, (2,)))
    ds = kb.BigArrayDataset(
        x, batch_size=8, shuffle="block", block_rows=8, shuffle_window=2, seed=1
    )
    windows = len(ds) // 2  # a window is 2 blocks of 8 rows: 2 batches
    ids = np.concatenate([row_ids(b[0]) for b in ds.iterate_epoch(0)])
    assert sorted(ids.tolist()) == list(range(4096))  # skipping reads the same
    streak, every = reading._HINT_STREAK, reading._HINT_RECHECK
    # A window hinted after skipped ones hints its own group and the next.
    assert streak + 1 <= len(calls) <= 2 * (streak + 1 + windows // every + 1)
    assert len(calls) < windows / 2
    cold[0] = True
    calls.clear()
    for _ in ds.iterate_epoch(1):
        pass
    assert len(calls) >= windows - every  # every window, after the next check


def test_failing_hints_change_nothing(tmp_path, monkeypatch):
    def fadvise(*_):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    x = open_kind("npy", tmp_path, indexed_rows(100, (2,)))
    ds = kb.BigArrayDataset(x, batch_size=8, shuffle="block", block_rows=4, seed=3)
    ids = np.concatenate([row_ids(b[0]) for b in ds.iterate_epoch(0)])
    assert sorted(ids.tolist()) == list(range(100))
    assert pickle.loads(pickle.dumps(ds))[0][0].shape == (8, 2)
