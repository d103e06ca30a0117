"""Benchmark data: `.npy` and HDF5 files of 1 KiB float32 rows (256 features) and
int32 labels, written in chunks (never whole in memory, so they may exceed RAM),
cached in the data folder and reused while the generator is unchanged."""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import threading
import time
from dataclasses import dataclass

import numpy as np
from _harness import log

FEATURES = 256  # float32: 1 KiB a row
ROW_NBYTES = FEATURES * 4
CLASSES = 10

# A pool of this many random rows is tiled into every file: generating fresh
# random numbers for an 8 GB file would take longer than writing it, and the
# pipeline's speed does not depend on the values.
POOL_ROWS = 1 << 16  # 64 MiB of float32 rows

# Rows written at a time: 64 MiB keeps the writer's memory small.
WRITE_ROWS = 1 << 16

# HDF5 chunks of 1024 rows = 1 MiB, the size of a block of block shuffle.
H5_CHUNK_ROWS = 1024
H5_GZIP_LEVEL = 4  # h5py's default for compression="gzip"

# Bumped when the files' content or layout changes, so old caches are rewritten.
GENERATOR_VERSION = 1


def default_data_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return os.path.join(base, "keras-bigarray", "bench")


def _pool() -> np.ndarray:
    # Values on a grid of 1/8 (about 70 distinct floats): gzip finds something
    # to compress, as it would in real features (pixels, quantised sensors).
    rng = np.random.default_rng(12345)
    pool = rng.standard_normal((POOL_ROWS, FEATURES), dtype=np.float32)
    return np.round(pool * 8.0) / 8.0


def rows_chunk(pool: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows `start:stop` of every benchmark file: pool rows in a scrambled order."""
    i = np.arange(start, stop, dtype=np.int64)
    return pool[(i * 40503 + (i >> 16)) % POOL_ROWS]


def labels_chunk(start: int, stop: int) -> np.ndarray:
    i = np.arange(start, stop, dtype=np.int64)
    return (((i * 2654435761) >> 7) % CLASSES).astype(np.int32)


def _meta_ok(path: str, meta: dict) -> bool:
    try:
        with open(path + ".meta.json") as f:
            return json.load(f) == meta and os.path.exists(path)
    except (OSError, ValueError):
        return False


def _write_meta(path: str, meta: dict) -> None:
    with open(path + ".meta.json", "w") as f:
        json.dump(meta, f)


def need_free_bytes(directory: str, nbytes: int, what: str) -> str | None:
    """None when `directory` has room for `nbytes` more (plus 1 GiB), else why not."""
    os.makedirs(directory, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < nbytes + (1 << 30):
        return (
            f"{what} needs {nbytes / 1e9:.1f} GB (+1 GB to spare) in {directory}, "
            f"which has {free / 1e9:.1f} GB free; pass --data-dir on a larger disk"
        )
    return None


def write_npy(path: str, rows: int, *, labels: bool = False) -> bool:
    """Writes `rows` rows to `path` unless a matching file is there; True if written."""
    shape = (rows,) if labels else (rows, FEATURES)
    dtype = np.dtype("int32" if labels else "float32")
    meta = {"v": GENERATOR_VERSION, "shape": list(shape), "dtype": dtype.str}
    if _meta_ok(path, meta):
        return False
    t0 = time.perf_counter()
    pool = None if labels else _pool()
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        header = {
            "descr": np.lib.format.dtype_to_descr(dtype),
            "fortran_order": False,
            "shape": shape,
        }
        np.lib.format.write_array_header_1_0(f, header)
        for a in range(0, rows, WRITE_ROWS):
            b = min(rows, a + WRITE_ROWS)
            chunk = labels_chunk(a, b) if labels else rows_chunk(pool, a, b)
            f.write(chunk.tobytes())
    os.replace(tmp, path)
    _write_meta(path, meta)
    if not labels:
        log(
            f"  wrote {path} ({rows * ROW_NBYTES / 1e9:.2f} GB) in "
            f"{time.perf_counter() - t0:.1f} s"
        )
    return True


def write_h5(path: str, rows: int, *, gzip: bool) -> bool:
    import h5py

    meta = {"v": GENERATOR_VERSION, "rows": rows, "gzip": gzip, "chunk": H5_CHUNK_ROWS}
    if _meta_ok(path, meta):
        return False
    t0 = time.perf_counter()
    pool = _pool()
    tmp = path + ".partial"
    kw = {"compression": "gzip", "compression_opts": H5_GZIP_LEVEL} if gzip else {}
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset(
            "x",
            shape=(rows, FEATURES),
            dtype="float32",
            chunks=(H5_CHUNK_ROWS, FEATURES),
            **kw,
        )
        for a in range(0, rows, WRITE_ROWS):
            b = min(rows, a + WRITE_ROWS)
            ds[a:b] = rows_chunk(pool, a, b)
    os.replace(tmp, path)
    _write_meta(path, meta)
    log(
        f"  wrote {path} ({'gzip' if gzip else 'chunked, uncompressed'}, "
        f"{os.path.getsize(path) / 1e9:.2f} GB on disk) in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return True


@dataclass
class NpyPair:
    x: str
    y: str
    rows: int


def npy_pair(data_dir: str, name: str, rows: int) -> NpyPair:
    os.makedirs(data_dir, exist_ok=True)
    x = os.path.join(data_dir, f"{name}_{rows}x{FEATURES}_f32.npy")
    y = os.path.join(data_dir, f"{name}_{rows}_labels.npy")
    write_npy(x, rows)
    write_npy(y, rows, labels=True)
    return NpyPair(x, y, rows)


def h5_file(data_dir: str, rows: int, *, gzip: bool) -> str:
    os.makedirs(data_dir, exist_ok=True)
    kind = "gzip" if gzip else "chunked"
    path = os.path.join(data_dir, f"h5_{kind}_{rows}x{FEATURES}_f32.h5")
    write_h5(path, rows, gzip=gzip)
    return path


def rows_for(nbytes: int, batch_size: int) -> int:
    """Whole batches of 1 KiB rows in about `nbytes` (at least one batch)."""
    return max(1, nbytes // ROW_NBYTES // batch_size) * batch_size


# ---- the page cache ---------------------------------------------------------------


def warm(path: str) -> None:
    """Reads a file once so that its pages are in the page cache."""
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def evict(path: str) -> None:
    """Asks the kernel to drop a file's clean, unmapped pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _timed_reads(
    fd: int, starts: list[int], chunk: int, threads: int
) -> tuple[int, float]:
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()

    def read(at: int) -> int:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = mmap.mmap(-1, chunk)  # page-aligned, per thread
        return os.preadv(fd, [buf], at)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        done = sum(ex.map(read, starts))
    return done, time.perf_counter() - t0


def disk_read_rate(
    path: str,
    nbytes: int,
    *,
    chunk: int = 8 << 20,
    random_order: bool = False,
    threads: int = 1,
    seed: int = 0,
) -> tuple[float, int, str]:
    """Reads about `nbytes` of a file from disk in reads of `chunk` bytes: the
    first bytes in order, or chunk-aligned pieces in a random order, `threads`
    reads at a time. Returns `(bytes/s, bytes read, how)`.

    With O_DIRECT where the file system takes it: the disk's own rate, not
    the page cache's (a read through the page cache also pays for allocating,
    copying and, the cache being full, reclaiming its pages).
    """
    size = os.path.getsize(path)
    count = max(1, min(nbytes, size) // chunk)
    if random_order:
        rng = np.random.default_rng(seed)
        starts = rng.choice(max(1, size // chunk), count, replace=False) * chunk
    else:
        starts = np.arange(count, dtype=np.int64) * chunk
    for flags, how in ((getattr(os, "O_DIRECT", 0), "O_DIRECT"), (0, "buffered")):
        if how == "O_DIRECT" and not flags:
            continue
        evict(path)
        try:
            fd = os.open(path, os.O_RDONLY | flags)
        except OSError as e:
            if e.errno == errno.EINVAL:
                continue  # no O_DIRECT on this file system
            raise

        try:
            done, dt = _timed_reads(fd, starts.tolist(), chunk, threads)
        except OSError as e:
            if e.errno == errno.EINVAL and flags:
                continue
            raise
        finally:
            os.close(fd)
        evict(path)
        return done / dt, done, how
    raise OSError(f"cannot read '{path}'")
