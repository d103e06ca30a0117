"""Shared fixtures: small self-describing arrays (row i stores i) in every source
kind, so one assertion checks coverage, order and x/y alignment."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

SOURCE_KINDS = [
    "npy",
    "raw",
    "h5_contiguous",
    "h5_chunked",
    "h5_gzip",
    "shards",
    "ndarray",
    "memmap",
    "h5py_dataset",
    "zarr",
]


def fixture_settings(max_examples: int) -> settings:
    """Hypothesis settings for tests that also take pytest fixture (`tmp_path`):
    no deadline (file I/O), and the fixture kept across examples on purpose."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


def indexed_rows(
    n: int, row_shape: tuple[int, ...] = (3,), dtype: Any = "float32"
) -> np.ndarray:
    """`n` rows whose every element is the row's index plus its position / 1000."""
    dtype = np.dtype(dtype)
    base = np.arange(n, dtype=np.float64).reshape((n,) + (1,) * len(row_shape))
    if np.issubdtype(dtype, np.integer):
        a = np.broadcast_to(base, (n, *row_shape)) % (np.iinfo(dtype).max + 1)
    else:
        a = np.broadcast_to(base, (n, *row_shape))
    return np.ascontiguousarray(a.astype(dtype))


def row_ids(batch: np.ndarray) -> np.ndarray:
    """The row index stored in each row of a batch."""
    b = np.asarray(batch)
    return (
        b.reshape(b.shape[0], -1)[:, 0].astype(np.int64)
        if b.ndim > 1
        else b.astype(np.int64)
    )


def run_tf_script(script: str, *args: str, **env: str) -> dict[str, Any]:
    """Runs `script` in a fresh Python (TensorFlow fixes its devices at start-up);
    returns the JSON object on its last line of stdout."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_source(kind: str, tmp_path: Path, data: np.ndarray, name: str = "x") -> Any:
    """Writes `data` as source `kind` in `tmp_path`; returns what open_array takes."""
    if kind == "npy":
        p = tmp_path / f"{name}.npy"
        np.save(p, data)
        return str(p)
    if kind == "raw":
        p = tmp_path / f"{name}.raw"
        data.tofile(p)
        return dict(source=str(p), dtype=data.dtype, shape=(-1, *data.shape[1:]))
    if kind.startswith("h5"):
        import h5py

        p = tmp_path / f"{name}.h5"
        kw: dict[str, Any] = {}
        if kind in ("h5_chunked", "h5_gzip", "h5py_dataset"):
            kw["chunks"] = (max(1, min(len(data), 7)), *data.shape[1:])
        if kind == "h5_gzip":
            kw["compression"] = "gzip"
        with h5py.File(p, "w") as f:
            f.create_dataset(f"group/{name}", data=data, **kw)
        if kind == "h5py_dataset":
            return h5py.File(p, "r")[f"group/{name}"]
        return dict(source=str(p), key=f"group/{name}")
    if kind == "shards":
        d = tmp_path / f"{name}_shards"
        d.mkdir()
        cuts = [0, len(data) // 3, len(data) // 3, (2 * len(data)) // 3 + 1, len(data)]
        for i in range(len(cuts) - 1):
            np.save(d / f"part-{i}.npy", data[cuts[i] : cuts[i + 1]])
        return str(d / "part-*.npy")
    if kind == "ndarray":
        return data.copy()
    if kind == "memmap":
        p = tmp_path / f"{name}.npy"
        np.save(p, data)
        return np.load(p, mmap_mode="r")
    if kind == "zarr":
        zarr = pytest.importorskip("zarr")
        z = zarr.open_array(
            str(tmp_path / f"{name}.zarr"),
            mode="w",
            shape=data.shape,
            chunks=(5, *data.shape[1:]),
            dtype=data.dtype,
        )
        z[:] = data
        return z
    raise ValueError(kind)


def open_kind(kind: str, tmp_path: Path, data: np.ndarray, name: str = "x"):
    import keras_bigarray as kb

    src = make_source(kind, tmp_path, data, name)
    if isinstance(src, dict):
        src = dict(src)
        return kb.open_array(src.pop("source"), **src)
    return kb.open_array(src)


@pytest.fixture(params=SOURCE_KINDS)
def source_kind(request: pytest.FixtureRequest) -> str:
    return request.param


def assert_reads_like_the_reader(ds: Any, epochs: int = 2) -> None:
    """Every batch of `epochs` iterations equals `reader.read` of that epoch."""
    import tensorflow as tf

    from keras_bigarray import tf_data

    tfds = ds.to_tf_dataset()
    ref = ds.replace()  # the same seed: the same epochs
    for e in range(epochs):
        got = list(tfds)
        assert len(got) == len(ds)
        for i, batch in enumerate(got):
            want = tf_data.flatten(ref.reader.read(e, i)[: len(batch)])
            leaves = tf_data.flatten(tuple(batch))
            assert len(leaves) == len(want)
            for g, w in zip(leaves, want, strict=True):
                assert g.dtype == tf.as_dtype(w.dtype.newbyteorder("="))
                np.testing.assert_array_equal(g.numpy(), w)


def assert_prefetched_to_cpu(ds: Any, n: int) -> None:
    """`to_tf_dataset(device="/cpu:0")` (the GPU path, on the CPU device here)
    delivers rows 0..n-1 once each on that device, x aligned with y."""
    batches = list(ds.to_tf_dataset(device="/cpu:0"))
    assert all("CPU:0" in bx.device for bx, _ in batches)
    ids = np.concatenate([by.numpy() for _, by in batches])
    assert sorted(ids.tolist()) == list(range(n))
    for bx, by in batches:
        np.testing.assert_array_equal(row_ids(bx.numpy()), by.numpy())
