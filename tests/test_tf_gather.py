"""The tf.data path's gather from memory-mapped files: `to_tf_dataset` gathers
each batch with `tf.gather` from tensors over the files' memory maps where every
array allows it, with no Python call per batch. Its batches must be exactly
the reader's, it must copy no rows beyond the batches, leave the files as they
are, and keep the per-batch reads wherever the maps do not apply."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    assert_prefetched_to_cpu,
    assert_reads_like_the_reader,
    fixture_settings,
    indexed_rows,
    row_ids,
)
from hypothesis import assume, given
from hypothesis import strategies as st

import keras_bigarray as kb
from keras_bigarray import sources, tf_data
from keras_bigarray._memory import PeakMemory

tf = pytest.importorskip("tensorflow")
h5py = pytest.importorskip("h5py")

ROW = (4,)


def write_kind(kind: str, path: Path, data: np.ndarray) -> Any:
    """`data` saved as `kind` at `path`; the `open_array` of it."""
    if kind == "memory":
        return kb.open_array(data)
    if kind == "folder":  # shards of uneven lengths, one of them empty
        path.mkdir()
        cuts = [0, len(data) // 3, len(data) // 3, len(data) // 2 + 1, len(data)]
        for i in range(len(cuts) - 1):
            np.save(path / f"part-{i}.npy", data[cuts[i] : cuts[i + 1]])
        return kb.open_array(str(path))
    if kind == "npy":
        np.save(path, data)
        return kb.open_array(path)
    if kind == "raw":
        data.tofile(path)
        return kb.open_array(path, dtype=data.dtype, shape=(-1, *data.shape[1:]))
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=data)  # contiguous
    return kb.open_array(path, key="x")


def mapped(ds: kb.BigArrayDataset) -> bool:
    return tf_data._mapped_tensors(ds, tf_data.element_spec(ds)) is not None


@pytest.mark.filterwarnings("ignore:.*rows are left out")
@fixture_settings(25)
@given(
    kind=st.sampled_from(["npy", "raw", "h5", "memory", "folder"]),
    n=st.integers(1, 90),
    batch_size=st.integers(1, 32),
    shuffle=st.sampled_from([False, "global", "block"]),
    start=st.integers(0, 5),
    shards=st.integers(1, 3),
    drop_remainder=st.booleans(),
    parts=st.sampled_from(["x", "xy", "xyw", "dict"]),
)
def test_gathered_batches_are_the_readers(
    tmp_path_factory: pytest.TempPathFactory,
    kind: str,
    n: int,
    batch_size: int,
    shuffle: Any,
    start: int,
    shards: int,
    drop_remainder: bool,
    parts: str,
):
    d = tmp_path_factory.mktemp("g")
    x = write_kind(kind, d / f"x.{kind}", indexed_rows(n, ROW, "float32"))
    y = write_kind(kind, d / f"y.{kind}", np.arange(n, dtype=np.int64))
    w = write_kind(kind, d / f"w.{kind}", np.linspace(0, 1, n, dtype=np.float32))
    start = min(start, n - 1)
    kw: dict[str, Any] = {}
    if parts in ("xy", "xyw"):
        kw["y"] = y
    if parts == "xyw":
        kw["sample_weight"] = w
    xs = {"a": x, "b": y} if parts == "dict" else x
    try:
        ds = kb.BigArrayDataset(
            xs,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=5,
            rows=slice(start, n),
            num_shards=shards,
            shard_index=shards - 1,
            drop_remainder=drop_remainder,
            block_rows=3,
            **kw,
        )
    except ValueError as e:  # a shard with no batch at all
        assume("no batches" not in str(e))
        raise
    assert mapped(ds)
    assert_reads_like_the_reader(ds)
    if parts == "xy" and len(ds):
        batch = next(iter(ds.to_tf_dataset()))
        np.testing.assert_array_equal(row_ids(batch[0].numpy()), batch[1].numpy())


def fallback(tmp_path: Path, case: str) -> kb.BigArrayDataset:
    data = indexed_rows(40, ROW, "float32")
    npy = str(tmp_path / "x.npy")
    np.save(npy, data)

    def make(x: Any, **kw: Any) -> kb.BigArrayDataset:
        return kb.BigArrayDataset(x, batch_size=6, shuffle=True, seed=1, **kw)

    if case == "fortran":
        np.save(tmp_path / "f.npy", np.asfortranarray(data))
        with pytest.warns(UserWarning, match="Fortran order"):
            return make(str(tmp_path / "f.npy"))
    if case == "shards without one grid":  # rows 128 and 4 bytes into the files
        np.save(tmp_path / "0.npy", data[:25])
        (tmp_path / "1.raw").write_bytes(b"head" + data[25:].tobytes())
        odd = kb.open_array(
            tmp_path / "1.raw", dtype="float32", shape=(-1, 4), offset=4
        )
        return make(sources.ShardedArray([kb.open_array(tmp_path / "0.npy"), odd]))
    if case == "misaligned":  # rows 4 bytes past alignment: TensorFlow would abort
        (tmp_path / "odd.raw").write_bytes(b"head" + data.tobytes())
        raw = tmp_path / "odd.raw"
        return make(kb.open_array(raw, dtype="float32", shape=(-1, 4), offset=4))
    if case in ("gzip", "big-endian"):
        kw = {"chunks": (8, 4), "compression": "gzip"} if case == "gzip" else {}
        with h5py.File(tmp_path / "z.h5", "w") as f:
            f.create_dataset("x", data=data if kw else data.astype(">f4"), **kw)
        return make(kb.open_array(tmp_path / "z.h5", key="x"))
    if case == "direct I/O":
        x = kb.open_array(npy)
        x.direct_io = True
        return kb.BigArrayDataset(x, batch_size=6, shuffle="block")
    return {
        "strided in memory": lambda: make(np.repeat(data, 2, axis=1)[:, ::2]),
        "padded": lambda: make(npy, pad_remainder=True),
        "processes": lambda: make(npy, workers=2, use_multiprocessing=True),
    }[case]()


@pytest.mark.parametrize(
    "case",
    [
        "strided in memory",
        "padded",
        "processes",
        "fortran",
        "shards without one grid",
        "misaligned",
        "gzip",
        "big-endian",
        "direct I/O",  # its own tf.gather from each window: test_direct_io
    ],
)
def test_reads_per_batch_where_rows_cannot_be_mapped(tmp_path: Path, case: str):
    ds = fallback(tmp_path, case)
    assert not mapped(ds)
    if case == "processes":  # worker processes: their own epochs, checked elsewhere
        ids = np.concatenate([row_ids(b[0].numpy()) for b in ds.to_tf_dataset()])
        assert sorted(ids.tolist()) == list(range(40))
    else:
        assert_reads_like_the_reader(ds)


def test_arrays_in_memory_are_gathered_too(tmp_path: Path):
    data = indexed_rows(40, ROW, "float32")
    np.save(tmp_path / "x.npy", data)
    for x, y in ((data, None), (str(tmp_path / "x.npy"), np.arange(40))):
        ds = kb.BigArrayDataset(x, y, batch_size=6, shuffle=True, seed=1)
        assert mapped(ds)
        assert_reads_like_the_reader(ds)


@pytest.mark.parametrize("layout", ["one file", "shards"])
def test_gathering_copies_no_rows_and_leaves_the_file(tmp_path: Path, layout: str):
    # 128 MiB of rows, gathered 64 KiB a batch: a copy of the array in the
    # pipeline (as tf.data makes of a tensor captured in its graph) would show
    # as anonymous memory; the maps are file pages, and copy-on-write.
    rows = 1 << 17
    parts = 1 if layout == "one file" else 3
    cuts = np.linspace(0, rows, parts + 1).astype(int)
    (tmp_path / "x").mkdir()
    files = [tmp_path / "x" / f"part-{i}.npy" for i in range(parts)]
    for i, f in enumerate(files):
        x = np.lib.format.open_memmap(
            f, mode="w+", dtype="float32", shape=(int(cuts[i + 1] - cuts[i]), 256)
        )
        x[:, 0] = np.arange(cuts[i], cuts[i + 1])
        x.flush()
        del x

    def digest() -> list[str]:
        return [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]

    before = digest()
    src = str(files[0] if parts == 1 else tmp_path / "x")  # a file, or a folder
    ds = kb.BigArrayDataset(src, batch_size=64, shuffle=True)
    assert mapped(ds)
    warm = kb.BigArrayDataset(np.zeros((256, 256), "float32"), batch_size=64)
    list(warm.to_tf_dataset())  # TensorFlow's own start-up allocations
    tfds = ds.to_tf_dataset()
    with PeakMemory() as peak:
        seen = 0
        for (bx,) in tfds:
            seen += int(bx.shape[0])
    assert seen == rows
    assert peak.growth < 64 << 20, f"grew {peak.growth / 2**20:.0f} MiB"
    assert digest() == before


def test_gathered_batches_prefetch_to_a_device(tmp_path: Path):
    # The GPU path (prefetch_to_device) runs here on the CPU device.
    np.save(tmp_path / "x.npy", indexed_rows(50, ROW, "float32"))
    np.save(tmp_path / "y.npy", np.arange(50))
    ds = kb.BigArrayDataset(
        str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), batch_size=8, seed=4
    )
    assert mapped(ds)
    assert_prefetched_to_cpu(ds, 50)


@pytest.mark.parametrize("kind", ["gzip", "misaligned"])
def test_per_batch_reads_kept_as_tensors_keep_their_rows(tmp_path: Path, kind: str):
    # Batches of 128 KiB come from reused buffers (`sources.batch_array`);
    # TensorFlow may take one without a copy, and then holds the array. Every
    # batch of three epochs is kept while the next are read: a buffer reused
    # too early would show another batch's rows.
    n, row = 1024, (256,)
    data = indexed_rows(n, row, "float32")
    if kind == "gzip":
        with h5py.File(tmp_path / "x.h5", "w") as f:
            f.create_dataset("x", data=data, chunks=(64, *row), compression="gzip")
        x = kb.open_array(str(tmp_path / "x.h5"), key="x")
    else:  # rows 4 bytes past an aligned address: no tensor over the file
        (tmp_path / "x.raw").write_bytes(b"\0" * 4 + data.tobytes())
        x = kb.open_array(
            str(tmp_path / "x.raw"), dtype="float32", shape=(-1, *row), offset=4
        )
    ds = kb.BigArrayDataset(x, batch_size=128, shuffle=True, seed=4)
    assert not mapped(ds)
    assert 128 * x.shape[1] * 4 >= sources._BATCH_POOL_MIN
    tfds = ds.to_tf_dataset()
    kept = [[b[0] for b in tfds] for _ in range(3)]
    for epoch, batches in enumerate(kept):
        assert len(batches) == len(ds)
        for i, got in enumerate(batches):
            rows, _ = ds.sampler.batch(epoch, i)
            np.testing.assert_array_equal(got.numpy(), data[rows])
