"""Sources: `open_array` turns a path, a list of shards or an array-like into a
`BigArray`, a lazy, read-only, picklable view of one array indexed on axis 0.
numpy only; the HDF5 source lives in `_hdf5.py` and imports h5py on first use."""

from __future__ import annotations

import abc
import ctypes
import errno
import functools
import glob as _glob
import math
import mmap
import os
import re
import threading
import warnings
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from keras_bigarray import _index

__all__ = [
    "BigArray",
    "DuckArray",
    "MemoryArray",
    "NpyArray",
    "RawArray",
    "ShardedArray",
    "SupportsArrayRead",
    "open_array",
]

# Rows of at least this many bytes make one natural I/O block when the format
# has no block of its own, and the least block of block shuffle. On a cold
# 29 GiB .npy, with read-ahead hints (`will_need`), 1 MiB and 4 MiB blocks both
# read faster than one sequential stream; in the page cache 1 MiB gathers ~12%
# faster, a window of 16 x 1 MiB fits any page cache and, decoded, the 64 MiB
# chunk cache of compressed HDF5.
DEFAULT_BLOCK_BYTES = 1 << 20

# Rows of this many bytes gather faster when each row's first byte is read
# first, all in one tight loop: the loop's independent loads overlap their TLB
# and cache misses, which the row-by-row copy that follows takes one at a time
# (measured on 1 GiB in the page cache: 1 KiB rows +20%, 4 KiB +30%; 512 B and
# smaller slower, 16 KiB even).
_TOUCH_ROW_BYTES = (1024, 8192)

_NPY_MAGIC = b"\x93NUMPY"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5", ".nc")


@runtime_checkable
class SupportsArrayRead(Protocol):
    """The duck-typed arrays `open_array` accepts (zarr, dask, h5py, ...)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...

    def __getitem__(self, key: Any) -> Any: ...


# ---- batch buffers ----------------------------------------------------------------
# A batch read by one thread and dropped by another (reader threads feeding the
# consumer) is freed into the reader's malloc arena, which glibc then trims:
# the next batch faults in fresh zeroed pages. With 2 reader threads of 1 MiB
# batches that doubled the CPU time of a batch (page faults 30% of it) and
# made 2 threads slower than 1. Batches of at least `_BATCH_POOL_MIN` bytes
# are therefore views of reused buffers: a buffer goes back to the pool when
# the last array over it is gone (it is their base), so reuse never changes
# an array that is still alive.
_BATCH_POOL_MIN = 64 << 10
_BATCH_POOL_BYTES = 64 << 20  # kept free at most, all sizes together
_BATCH_ALIGN = 64  # TensorFlow takes 64-byte aligned arrays without a copy


class _BatchPool:
    def __init__(self) -> None:
        self.free: dict[int, list[np.ndarray]] = {}
        self.kept = 0
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        with self.lock:
            got = self.free.get(nbytes)
            if got:
                self.kept -= nbytes
                return got.pop()
        raw = np.empty(nbytes + _BATCH_ALIGN, dtype=np.uint8)
        return raw[(-raw.ctypes.data) % _BATCH_ALIGN :][:nbytes]

    def give(self, buf: np.ndarray) -> None:
        n = buf.size
        with self.lock:
            if self.kept + n <= _BATCH_POOL_BYTES:
                self.free.setdefault(n, []).append(buf)
                self.kept += n


_BATCHES = _BatchPool()


def _give_back(slot: Any) -> None:
    try:
        _BATCHES.give(slot.buf)
    except Exception:  # pragma: no cover - interpreter shutdown
        pass


@functools.lru_cache(maxsize=64)
def _slot_type(nbytes: int) -> type:
    # The base of every array over one pooled buffer (a ctypes array exports
    # its memory and, subclassed, runs `__del__`): when the last of them goes,
    # so does the slot, and the buffer is free again. ~1 us a batch.
    return type(
        "_BatchSlot",
        (ctypes.c_char * nbytes,),
        {"__slots__": ("buf",), "__del__": _give_back},
    )


def batch_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialized C-order array for one batch; see `_BatchPool`."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _BATCH_POOL_MIN or dtype.hasobject:
        return np.empty(shape, dtype=dtype)
    buf = _BATCHES.take(nbytes)
    slot = _slot_type(nbytes).from_buffer(buf)
    slot.buf = buf
    return np.ndarray(shape, dtype=dtype, buffer=slot)


def take_rows(rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """`np.take(rows, idx, axis=0)` at sorted, in-range `idx`, into a batch
    buffer (numpy copies a source that is not C-contiguous first)."""
    if idx.size and (idx[0] < 0 or idx[-1] >= rows.shape[0]):
        bad = int(idx[0]) if idx[0] < 0 else int(idx[-1])
        raise IndexError(f"row {bad} is out of range for {rows.shape[0]} rows")
    out = batch_array((idx.size, *rows.shape[1:]), rows.dtype)
    # In range by the check above; mode="raise" would copy through a buffer.
    return np.take(rows, idx, axis=0, out=out, mode="clip")


def copy_rows(rows: np.ndarray) -> np.ndarray:
    """A C-order copy of `rows` in a batch buffer."""
    out = batch_array(rows.shape, rows.dtype)
    np.copyto(out, rows)
    return out


def _concatenate(pieces: list[np.ndarray]) -> np.ndarray:
    rows = sum(p.shape[0] for p in pieces)
    out = batch_array((rows, *pieces[0].shape[1:]), pieces[0].dtype)
    return np.concatenate(pieces, out=out)


def gather_rows(rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """`np.take(rows, idx, axis=0)` of a C-contiguous array (a memory map) at
    sorted `idx`, each row's first byte read first where that gathers faster."""
    w = rows.strides[0]
    touch_row_heads(rows, idx * w, w)
    return take_rows(rows, idx)


def touch_row_heads(data: np.ndarray, starts: np.ndarray, row_nbytes: int) -> None:
    """Reads the byte at each of `starts` (offsets into the bytes of `data`) when
    rows of `row_nbytes` gather faster for it (`_TOUCH_ROW_BYTES`)."""
    lo, hi = _TOUCH_ROW_BYTES
    if lo <= row_nbytes <= hi and starts.size > 1:
        heads = np.ndarray(
            shape=(data.nbytes,), dtype=np.uint8, buffer=data, strides=(1,)
        )
        heads[starts]  # the values are dropped: the loads are the point


# preadv flag: fail with EAGAIN rather than wait for the disk (Linux >= 4.14).
_NOWAIT = getattr(os, "RWF_NOWAIT", 0) if hasattr(os, "preadv") else 0


# Calls in a row, per file, that found every span in the page cache. From
# _CACHED_STREAK on, a call checks only its first and last spans (a file that
# fits in memory stays cached: a window's ~30 checks cost more than the rest
# of its hinting); a span found missing brings the full checks back.
_CACHED_CALLS: dict[str, int] = {}
_CACHED_STREAK = 4
_CACHED_PATHS = 4096


def will_need(path: str, spans: Iterable[tuple[int, int]]) -> bool:
    """Starts reading `(byte offset, length)` spans of the file at `path` into
    the page cache without waiting (`posix_fadvise(WILLNEED)`). A hint: every
    failure is silent. Returns True when every span it checked was in the page
    cache already (nothing to read), False otherwise.

    Reading a cold file through a memory map faults its pages in 128 KiB
    read-arounds, one at a time per reader thread; a hint for a whole
    block-shuffle window ahead keeps the disk busy with large reads instead.
    Each call opens and closes the file (a few microseconds, once a window):
    a descriptor kept per source would double the descriptors of a folder of
    shards, whose memory maps hold one each already.
    """
    if not hasattr(os, "posix_fadvise"):  # pragma: no cover - not Linux
        return False
    spans = [(a, n) for a, n in spans if n > 0]
    if not spans:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    streak = _CACHED_CALLS.get(path, 0)
    try:
        if streak >= _CACHED_STREAK and all(
            _page_cached(fd, a, n) for a, n in (spans[0], spans[-1])
        ):
            return True
        missing = 0
        for offset, length in spans:
            if not _page_cached(fd, offset, length):
                missing += 1
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        if len(_CACHED_CALLS) >= _CACHED_PATHS:  # many shards: start over
            _CACHED_CALLS.clear()
        _CACHED_CALLS[path] = 0 if missing else streak + 1
        return not missing
    except OSError:
        return False
    finally:
        os.close(fd)


def _page_cached(fd: int, offset: int, length: int) -> bool:
    # A span whose first and last bytes are in the page cache is taken as
    # cached: a one-byte read that must not wait (~1 us each) is much cheaper
    # than the hint (~16 us a MiB, even when every page is cached).
    if not _NOWAIT:
        return False
    one = bytearray(1)
    try:
        return all(
            os.preadv(fd, [one], at, _NOWAIT) == 1
            for at in (offset, offset + length - 1)
        )
    except OSError:  # EAGAIN: not cached; or the kernel lacks NOWAIT reads
        return False


# ---- direct I/O -----------------------------------------------------------------
# Block shuffle over a file larger than the page cache can hold reads each
# window's blocks with O_DIRECT: the disk writes straight into the window's
# buffer. Through the page cache (memory map or read()) every byte costs page
# allocation, a copy and, the cache being full, reclaim: on a 2-core VM a cold
# 29 GiB .npy read 1.4 core-seconds a GB that way, against ~0.1 direct, and the
# model's step needs the same cores. Offsets, lengths and buffers of direct
# reads are multiples of this (the largest logical block size in use).
_DIRECT_ALIGN = 4096


class RowWindow:
    """Rows of a few row ranges of one array, in memory: one block-shuffle
    window, read at once. `take` gathers any sorted rows inside the ranges."""

    __slots__ = ("firsts", "lease", "starts", "view")

    def __init__(
        self,
        view: np.ndarray,
        starts: np.ndarray,
        firsts: np.ndarray,
        lease: Any = None,
    ):
        self.view = view  # rows, with gaps between ranges
        self.starts = starts  # first row of each range, ascending
        self.firsts = firsts  # where each range's first row is in `view`
        self.lease = lease  # while held, the buffer under `view` is not reused

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Where each of `rows` (inside the ranges) is in `view`."""
        k = np.searchsorted(self.starts, rows, side="right") - 1
        return rows - self.starts[k] + self.firsts[k]

    def take(self, rows: np.ndarray) -> np.ndarray:
        at = self.positions(rows)
        w = self.view.strides[0]  # the bytes of one row
        touch_row_heads(self.view, at * w, w)
        return take_rows(self.view, at)

    def held_view(self) -> np.ndarray:
        """`view`, holding the buffer's lease for as long as it lives: as
        long as a tensor over it (through DLPack) does."""
        held = self.view.view(_HeldView)
        held.lease = self.lease
        return held


class _HeldView(np.ndarray):
    lease: Any = None


def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted((a, b) for a, b in ranges if a < b):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class _Lease:
    """Held by the `RowWindow` over a pooled buffer: the buffer is free again
    once no window holds its lease (weakly referenced by the pool)."""

    __slots__ = ("__weakref__",)


# Window buffers, reused: a fresh 16 MiB buffer for every window costs page
# faults as the disk fills it, and, freed from the malloc arena of whichever
# thread read it, memory that grew with the threads (188 MiB for one epoch).
_POOL: list[tuple[np.ndarray, weakref.ref[_Lease]]] = []
_POOL_LOCK = threading.Lock()
_POOL_KEEP = 8
_POOL_STEP = 8 << 20  # sizes rounded up to this, so that buffers fit more windows


def _reset_pools() -> None:  # in a forked child: their locks may have been held
    global _POOL_LOCK, _BATCHES
    _POOL_LOCK = threading.Lock()
    _POOL.clear()
    _BATCHES = _BatchPool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pools)


def _window_buffer(nbytes: int) -> tuple[np.ndarray, _Lease]:
    """`nbytes` aligned for O_DIRECT, and the lease that keeps them in use.
    (Huge pages measured slower: zeroing them costs more than the TLB misses
    of the gather that they save.)"""
    lease = _Lease()
    need = nbytes + _DIRECT_ALIGN
    with _POOL_LOCK:
        for k, (raw, ref) in enumerate(_POOL):
            if ref() is None and raw.size >= need:
                _POOL[k] = (raw, weakref.ref(lease))
                break
        else:
            raw = np.empty(-(-need // _POOL_STEP) * _POOL_STEP, dtype=np.uint8)
            free = [k for k, (_, ref) in enumerate(_POOL) if ref() is None]
            if len(_POOL) < _POOL_KEEP:
                _POOL.append((raw, weakref.ref(lease)))
            elif free:  # a free buffer too small: this one takes its place
                _POOL[free[0]] = (raw, weakref.ref(lease))
    return raw[(-raw.ctypes.data) % _DIRECT_ALIGN :][:nbytes], lease


def read_direct(
    path: str,
    offset: int,
    dtype: np.dtype,
    row_shape: tuple[int, ...],
    ranges: Iterable[tuple[int, int]],
) -> RowWindow | None:
    """Rows `[a, b)` of each range of a C-order array stored from byte `offset`
    of `path`, read with O_DIRECT into one buffer (the page cache neither
    filled nor consulted; Linux first writes back any dirty cached pages of
    the file, so the bytes are current). None where the OS or the file system
    has no direct I/O. See `read_direct_files`."""
    return read_direct_files([(path, offset, 0, ranges)], dtype, row_shape)


def direct_origin(offsets: Sequence[int], row_nbytes: int) -> int | None:
    """The byte of a direct-I/O buffer where row "0" would start when rows
    of files whose rows start at `offsets` share it; None where they cannot
    (each row must sit a whole number of rows from one origin, and each read
    start on an aligned byte: offsets must agree modulo gcd(alignment, row
    bytes))."""
    g = math.gcd(_DIRECT_ALIGN, row_nbytes) if row_nbytes else _DIRECT_ALIGN
    if len({o % g for o in offsets}) > 1:
        return None
    return offsets[0] % _DIRECT_ALIGN if offsets else 0


def place_on_grid(cursor: int, head: int, origin: int, w: int, align: int) -> int:
    """The first `align`-aligned position `p >= cursor` for bytes whose byte
    `head` starts a row, such that the row lies a whole number of rows `w`
    past `origin`, not before it (`p + head >= origin`). `head - origin` must
    be a multiple of gcd(align, w)."""
    g = math.gcd(align, w)
    m = w // g
    r = ((origin - head) % w) // g  # align * j = origin - head (mod w)
    j = r * pow(align // g, -1, m) % m if m > 1 else 0
    lo = -(-cursor // align)
    if j < lo:
        j += -(-(lo - j) // m) * m
    while j * align + head < origin:
        j += m
    return j * align


def read_direct_files(
    files: Sequence[tuple[str, int, int, Iterable[tuple[int, int]]]],
    dtype: np.dtype,
    row_shape: tuple[int, ...],
) -> RowWindow | None:
    """Rows of several files' C-order arrays of one dtype and row shape, read
    with O_DIRECT into one buffer, as one `RowWindow`. Each file is `(path,
    byte offset of its row 0, that row's number in the window, row ranges
    [a, b) of the file)`, in ascending window numbering. None where the OS
    or the file system has no direct I/O.

    Each range is read from the aligned bytes around it, and placed on an
    aligned byte of the buffer such that every row sits at a whole number of
    rows from one origin (`direct_origin`, which must exist).
    """
    flag = getattr(os, "O_DIRECT", 0)
    merged = [(path, off, first, _merge_ranges(r)) for path, off, first, r in files]
    merged = [m for m in merged if m[3]]
    if not flag or not merged:
        return None
    w = math.prod(row_shape) * dtype.itemsize
    A = _DIRECT_ALIGN
    origin = direct_origin([off for _, off, _, _ in merged], w)
    if origin is None or w == 0:
        raise ValueError("these files' rows cannot share one direct-I/O buffer")
    plan: list[tuple[str, int, int, int]] = []  # (path, a0, end, base)
    starts, firsts = [], []
    cursor = 0
    for path, offset, first, ranges in merged:
        for a, b in ranges:
            start, end = offset + a * w, offset + b * w
            a0 = start - start % A
            base = place_on_grid(cursor, start - a0, origin, w, A)
            plan.append((path, a0, end, base))
            starts.append(first + a)
            firsts.append((base + start - a0 - origin) // w)
            cursor = base + -(-(end - a0) // A) * A
    buf, lease = _window_buffer(cursor)
    fds: dict[str, int] = {}
    try:
        for path, a0, end, base in plan:
            fd = fds.get(path)
            if fd is None:
                try:
                    fd = fds[path] = os.open(path, os.O_RDONLY | flag)
                except OSError as e:
                    if e.errno == errno.EINVAL:  # this file system has no O_DIRECT
                        return None
                    raise OSError(f"cannot open '{path}' for reading: {e}") from e
            done, need = 0, end - a0
            while done < need:
                piece = memoryview(buf)[base + done : base + -(-need // A) * A]
                try:
                    got = os.preadv(fd, [piece], a0 + done)
                except OSError as e:
                    if e.errno == errno.EINVAL and not done:
                        return None  # O_DIRECT accepted at open, not at read
                    raise OSError(f"reading '{path}' failed: {e}") from e
                if got <= 0:
                    raise OSError(
                        f"'{path}' ends at byte {a0 + done}, before byte {end} "
                        "that its shape needs: the file was truncated"
                    )
                done += got
    finally:
        for fd in fds.values():
            os.close(fd)
    view = np.ndarray(
        ((cursor - origin) // w, *row_shape), dtype=dtype, buffer=buf, offset=origin
    )
    return RowWindow(
        view, np.array(starts, dtype=np.int64), np.array(firsts, dtype=np.int64), lease
    )


def _check_dtype(dtype: np.dtype, what: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise TypeError(
            f"{what} has dtype {dtype}, which holds Python objects; keras-bigarray "
            "reads numeric arrays only (object arrays would need pickle, which "
            "can run code). Store numbers, e.g. with np.asarray(a, dtype='float32')."
        )
    return dtype


class BigArray(abc.ABC):
    """A lazy, read-only view of one array, read by rows (axis 0).

    Indexing follows numpy for the first axis and always returns a new
    `np.ndarray` in the storage dtype: `x[3]`, `x[10:20]`, `x[[5, 2, 9]]`,
    `x[mask]`, `x[idx, :, 0]`. Pickling carries the path and parameters, never
    the data, and the receiving process reopens the file on first read.

    Example:

    ```python
    x = kb.open_array("x.npy")
    x.shape, x.dtype, len(x)
    batch = x[np.array([5, 2, 9])]  # rows 5, 2, 9, in that order
    ```
    """

    shape: tuple[int, ...]
    dtype: np.dtype

    # ---- what a format implements -------------------------------------------
    @abc.abstractmethod
    def _read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows `start:stop` as a new array (0 <= start <= stop <= len)."""

    def _read_sorted(self, idx: np.ndarray) -> np.ndarray:
        """Rows at sorted, unique, in-range indices. Default: one read a run."""
        starts, stops = _index.runs(idx)
        if starts.size == 1:
            return self._read_range(int(starts[0]), int(stops[0]))
        out = np.empty((idx.size, *self.shape[1:]), dtype=self.dtype)
        pos = 0
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
            out[pos : pos + b - a] = self._read_range(a, b)
            pos += b - a
        return out

    @property
    def block_rows(self) -> int:
        """Rows in the natural I/O block (an HDF5 chunk, or about 1 MiB)."""
        return max(1, DEFAULT_BLOCK_BYTES // max(1, self.row_nbytes))

    @property
    def compressed(self) -> bool:
        """True when one row costs decoding a whole block (compressed HDF5)."""
        return False

    def describe(self) -> dict[str, Any]:
        """What `keras-bigarray inspect` prints about this array."""
        return {
            "kind": type(self).__name__,
            "shape": self.shape,
            "dtype": str(self.dtype),
            "nbytes": self.nbytes,
            "row_nbytes": self.row_nbytes,
            "block_rows": self.block_rows,
            "compressed": self.compressed,
        }

    # ---- the array surface ----------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_nbytes(self) -> int:
        """Bytes in one row (one index on axis 0)."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def read_sorted(self, idx: np.ndarray, *, unique: bool = False) -> np.ndarray:
        """Rows at sorted, in-range int64 indices (duplicates allowed).

        The batch primitive of the reading layer: no sorting, one pass of
        coalesced reads.

        Args:
            idx: ascending row indices.
            unique: the caller guarantees no duplicates (the sampler does),
                which skips a check that costs ~5% of a page-cache batch.
        """
        n = idx.size
        if n == 0:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        # Duplicates first: sorted [0, 0, 2] also spans last - first + 1 == n.
        if not unique and n > 1 and not np.all(idx[1:] != idx[:-1]):
            uniq, inverse = np.unique(idx, return_inverse=True)
            return self.read_sorted(uniq, unique=True)[inverse]
        first, last = int(idx[0]), int(idx[-1])
        if last - first + 1 == n:  # one contiguous run: a plain slice
            return self._read_range(first, last + 1)
        return self._read_sorted(idx)

    def will_need(self, ranges: Sequence[tuple[int, int]]) -> bool:
        """Hints that rows `[a, b)` of each range will be read soon, so the OS
        can start reading them from disk now. Does nothing where the source
        cannot tell (in memory, through h5py or a duck array). Returns True
        when there was nothing to read ahead (the rows' bytes were in memory
        already, or the source cannot hint), False otherwise."""
        del ranges  # a hint: sources that cannot act on it ignore it
        return True

    # Whether block shuffle reads each window's blocks with direct I/O (see
    # `read_direct`), where the format allows it (`.npy`, raw files, folders
    # of them, HDF5 datasets stored contiguous or with their chunks back to
    # back): None (the default) when the array is larger than the memory
    # available as reading starts, True always, False never (`x.direct_io =
    # False`).
    direct_io: bool | None = None

    @property
    def direct_capable(self) -> bool:
        """True when `read_window` can read this array's rows directly."""
        return False

    def reads_direct(self, available: int | None) -> bool:
        """Whether block-shuffle windows of this array are read with
        `read_window`, given `available` bytes of memory."""
        if self.direct_io is False or not self.direct_capable:
            return False
        return bool(self.direct_io) or (
            available is not None and self.nbytes > available
        )

    def read_window(self, ranges: Sequence[tuple[int, int]]) -> Any:
        """Rows `[a, b)` of each range, read at once with direct I/O, as a
        `RowWindow`; None where direct I/O is not available."""
        del ranges
        return None

    def window_origin(self) -> int | None:
        """Where `read_window` gives one `RowWindow` over one buffer: the
        byte of that buffer (aligned for direct I/O) where row "0" would
        start; else None."""
        return None

    def file_rows(self) -> tuple[str, int] | None:
        """`(path, byte offset)` where every row lies in one file, one after
        another in C order from that offset, as numpy would lay out the
        array; None otherwise (compressed, sharded, in memory, ...)."""
        return None

    def take(self, indices: Any) -> np.ndarray:
        """Rows at `indices`, in the order given (numpy `take` on axis 0)."""
        idx = _index.normalize_indices(indices, len(self))
        flat = idx.reshape(-1)
        if _index.is_sorted(flat):
            rows = self.read_sorted(flat)
        else:
            order = np.argsort(flat, kind="stable")
            rows = _index.restore_order(self.read_sorted(flat[order]), order)
        return rows.reshape(idx.shape + self.shape[1:])

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            if not key:
                key = slice(None)
            else:
                key, rest = key[0], key[1:]
        if key is Ellipsis:
            key, rest = slice(None), (Ellipsis, *rest)
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                out = self._read_range(start, max(start, stop))
            else:
                out = self.take(np.arange(start, stop, step, dtype=np.int64))
        elif isinstance(key, (bool, np.bool_)) or key is None or isinstance(key, str):
            raise TypeError(f"unsupported index {key!r} for {self!r}")
        elif isinstance(key, (int, np.integer)):
            i = _index.normalize_int(key, len(self))
            # Index the one-row block as numpy indexes the array, so that array
            # indices in `rest` combine with the row index the same way.
            return self._read_range(i, i + 1)[(0, *rest)]
        else:
            idx = _index.normalize_indices(key, len(self))
            if not rest:
                return self.take(idx)
            rows = self.take(idx.reshape(-1))
            # Positions into `rows` stand in for `idx`: numpy broadcasts them
            # with any array in `rest` exactly as it would broadcast `idx`.
            return rows[(np.arange(rows.shape[0]).reshape(idx.shape), *rest)]
        if rest:
            out = out[(slice(None), *rest)]
        return out

    def __iter__(self):  # rows, as numpy would, but in blocks
        step = self.block_rows
        for start in range(0, len(self), step):
            yield from self._read_range(start, min(start + step, len(self)))

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self._where()}, shape={self.shape}, dtype={self.dtype})"

    def _where(self) -> str:
        return "<memory>"


class _MemmapArray(BigArray):
    """Shared reading for every format whose bytes lie contiguous in a file."""

    def __init__(
        self,
        path: str,
        dtype: np.dtype,
        shape: tuple[int, ...],
        offset: int,
        fortran_order: bool = False,
    ):
        self.path = os.fspath(path)
        self.dtype = _check_dtype(dtype, f"'{self.path}'")
        self.shape = tuple(int(s) for s in shape)
        self.offset = int(offset)
        self.fortran_order = bool(fortran_order) and len(self.shape) > 1
        self._mm: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_mm"] = None
        return state

    def _map(self) -> np.ndarray:
        mm = self._mm
        if mm is None:
            if self.nbytes == 0:
                mm = np.empty(self.shape, dtype=self.dtype)
            else:
                try:
                    mm = np.memmap(
                        self.path,
                        dtype=self.dtype,
                        mode="r",
                        offset=self.offset,
                        shape=self.shape,
                        order="F" if self.fortran_order else "C",
                    )
                except (OSError, ValueError) as e:
                    raise OSError(f"cannot map '{self.path}': {e}") from e
            self._mm = mm
        return mm

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        return copy_rows(self._map()[start:stop])

    def will_need(self, ranges: Sequence[tuple[int, int]]) -> bool:
        if self.fortran_order:  # rows are scattered: no useful span
            return True
        w = self.row_nbytes
        spans = ((self.offset + a * w, (b - a) * w) for a, b in ranges)
        return will_need(self.path, spans)

    @property
    def direct_capable(self) -> bool:
        return (
            hasattr(os, "O_DIRECT")
            and not self.fortran_order
            and self.nbytes > 0
            and not self.__dict__.get("_no_direct", False)
        )

    def file_rows(self) -> tuple[str, int] | None:
        if self.fortran_order or self.nbytes == 0:
            return None
        return self.path, self.offset

    def read_window(self, ranges: Sequence[tuple[int, int]]) -> RowWindow | None:
        if not self.direct_capable:
            return None
        got = read_direct(self.path, self.offset, self.dtype, self.shape[1:], ranges)
        if got is None:
            self._no_direct = True  # the file system refused O_DIRECT
        return got

    def window_origin(self) -> int | None:
        if not self.direct_capable or self.fortran_order:
            return None
        return direct_origin([self.offset], self.row_nbytes)

    def _read_sorted(self, idx: np.ndarray) -> np.ndarray:
        # One C loop over the rows; for page-cache-resident data this is the
        # bare `np.take` the benchmarks compare against.
        mm = self._map()
        if self.fortran_order:
            return np.take(mm, idx, axis=0)
        return gather_rows(mm, idx)

    def _where(self) -> str:
        return repr(self.path)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": self.path, "offset": self.offset}


class NpyArray(_MemmapArray):
    """A `.npy` file, read through a read-only memory map (never unpickled)."""

    def __init__(self, path: str | os.PathLike[str]):
        path = os.fspath(path)
        shape, fortran_order, dtype, offset = _read_npy_header(path)
        super().__init__(path, dtype, shape, offset, fortran_order)
        if not self.shape:
            raise ValueError(
                f"'{path}' holds a 0-d array (a scalar); a BigArray needs at "
                "least one axis of rows."
            )
        if self.fortran_order:
            warnings.warn(
                f"'{path}' is stored in Fortran order, so each row is scattered "
                "across the file and reads are slow. Rewrite it once in C order: "
                "np.save(new_path, np.ascontiguousarray(np.load(path, "
                "mmap_mode='r')))",
                stacklevel=4,  # the caller of open_array
            )


def _read_npy_header(path: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                # 3.0 (utf-8 field names) has no public reader; numpy 2 moved
                # the private one to numpy.lib._format_impl.
                impl = getattr(np.lib, "_format_impl", fmt)
                read = getattr(impl, "_read_array_header", None)
                if version != (3, 0) or read is None:
                    raise ValueError(
                        f"unsupported .npy format version {version[0]}.{version[1]}"
                    )
                shape, fortran, dtype = read(f, version)
            offset = f.tell()
    except FileNotFoundError:
        raise
    except (ValueError, OSError, SyntaxError, EOFError) as e:
        raise ValueError(
            f"'{path}' is not a readable .npy file: {e}. For a raw binary file, "
            "pass dtype= and shape= to open_array."
        ) from e
    dtype = _check_dtype(dtype, f"'{path}'")
    need = math.prod(shape) * dtype.itemsize
    have = os.path.getsize(path) - offset
    if have < need:
        raise ValueError(
            f"'{path}' is truncated: its header says shape {tuple(shape)} "
            f"{dtype} ({need} bytes of data) but the file holds {have} bytes "
            "after the header. Re-create or re-copy the file."
        )
    return tuple(shape), bool(fortran), dtype, offset


class RawArray(_MemmapArray):
    """A headerless binary file of one dtype, C order, after `offset` bytes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        dtype: Any,
        shape: Sequence[int] | int | None = None,
        offset: int = 0,
    ):
        path = os.fspath(path)
        dtype = _check_dtype(dtype, f"raw file '{path}'")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, received offset={offset}")
        size = os.path.getsize(path)
        if offset > size:
            raise ValueError(
                f"offset={offset} is past the end of '{path}' ({size} bytes)"
            )
        shape = _resolve_raw_shape(path, dtype, shape, size - offset)
        super().__init__(path, dtype, shape, offset)

    @classmethod
    def _of_memmap(
        cls, path: str, dtype: np.dtype, shape: tuple[int, ...], offset: int
    ) -> RawArray:
        # A memmap, or a view of one, may cover only part of its file: no
        # whole-file size check.
        self = cls.__new__(cls)
        _MemmapArray.__init__(self, path, dtype, shape, offset)
        return self

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "format": "raw"}


def _resolve_raw_shape(
    path: str, dtype: np.dtype, shape: Sequence[int] | int | None, avail: int
) -> tuple[int, ...]:
    if shape is None:
        shape = (-1,)
    elif isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError(f"shape must have at least one axis, received shape={shape}")
    unknown = [i for i, s in enumerate(shape) if s == -1]
    if len(unknown) > 1 or any(s < -1 for s in shape):
        raise ValueError(
            f"shape may hold one -1 (the axis to infer) and otherwise sizes >= 0; "
            f"received shape={shape}"
        )
    if unknown:
        known = math.prod(s for s in shape if s != -1) * dtype.itemsize
        if known == 0 or avail % known:
            raise ValueError(
                f"raw file '{path}' has {avail} bytes of data, not a whole number "
                f"of {known}-byte rows of shape {shape} {dtype} (remainder "
                f"{avail % known if known else avail} bytes). Check dtype=, "
                "shape= and offset=."
            )
        shape = tuple(avail // known if s == -1 else s for s in shape)
    else:
        need = math.prod(shape) * dtype.itemsize
        if need != avail:
            raise ValueError(
                f"raw file '{path}' has {avail} bytes of data but shape={shape} "
                f"{dtype} needs {need}. Pass shape=(-1, ...) to infer the row "
                "count, or fix dtype= or offset=."
            )
    return shape


class MemoryArray(BigArray):
    """An in-memory ndarray (pickles with its data, as numpy does)."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array)
        self.dtype = _check_dtype(self.array.dtype, "the array")
        self.shape = self.array.shape
        if not self.shape:
            raise ValueError("a 0-d array has no rows; pass an array with ndim >= 1")

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        return copy_rows(self.array[start:stop])

    def _read_sorted(self, idx: np.ndarray) -> np.ndarray:
        return take_rows(self.array, idx)


class DuckArray(BigArray):
    """Any object with `shape`, `dtype` and slicing on axis 0 (zarr, dask, ...)."""

    def __init__(self, array: Any):
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)
        if not self.shape:
            raise ValueError(f"{type(array).__name__} is 0-d; it has no rows")
        self.dtype = _check_dtype(np.dtype(array.dtype), type(array).__name__)

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        out = np.asarray(self.array[start:stop])
        if out.flags.owndata:  # a fresh array (zarr, h5py): convert only if needed
            return np.asarray(out, dtype=self.dtype, order="C")
        # A view may share memory with the source: copy, so writes stay ours.
        return np.array(out, dtype=self.dtype, order="C")

    def _read_sorted(self, idx: np.ndarray) -> np.ndarray:
        oindex = getattr(self.array, "oindex", None)  # zarr's orthogonal reads
        if oindex is not None:
            return np.asarray(oindex[idx], dtype=self.dtype)
        return super()._read_sorted(idx)

    @property
    def block_rows(self) -> int:
        chunks = getattr(self.array, "chunks", None)
        if isinstance(chunks, tuple) and chunks and isinstance(chunks[0], int):
            return max(1, chunks[0])
        return super().block_rows

    def _where(self) -> str:
        return type(self.array).__name__


class ShardedArray(BigArray):
    """Several arrays concatenated on axis 0 (a list or glob of `.npy` shards)."""

    def __init__(self, parts: Sequence[BigArray]):
        parts = list(parts)
        if not parts:
            raise ValueError("a sharded array needs at least one shard")
        first = parts[0]
        for p in parts[1:]:
            if p.dtype != first.dtype:
                raise ValueError(
                    f"shard {p._where()} has dtype {p.dtype} but the first shard "
                    f"{first._where()} has {first.dtype}; every shard must share "
                    "one dtype."
                )
            if p.shape[1:] != first.shape[1:]:
                raise ValueError(
                    f"shard {p._where()} has rows of shape {p.shape[1:]} (shape "
                    f"{p.shape}) but the first shard {first._where()} has "
                    f"{first.shape[1:]} (shape {first.shape}); shards may differ "
                    "in length only."
                )
        self.parts = parts
        self.dtype = first.dtype
        self.bounds = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
        self.shape = (int(self.bounds[-1]), *first.shape[1:])

    def _split(self, idx: np.ndarray):
        # idx sorted: each shard's rows are one contiguous slice of idx.
        cuts = np.searchsorted(idx, self.bounds)
        for k, part in enumerate(self.parts):
            a, b = int(cuts[k]), int(cuts[k + 1])
            if a < b:
                yield part, a, b, int(self.bounds[k])

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        return self._read_sorted(np.arange(start, stop, dtype=np.int64))

    def _split_ranges(self, ranges: Sequence[tuple[int, int]]):
        """`(k, shard k, its rows of the ranges)` for each shard they touch."""
        bounds = self.bounds.tolist()
        for k, part in enumerate(self.parts):
            lo, hi = bounds[k], bounds[k + 1]
            mine = [(max(a, lo) - lo, min(b, hi) - lo) for a, b in ranges]
            mine = [(a, b) for a, b in mine if a < b]
            if mine:
                yield k, part, mine

    def will_need(self, ranges: Sequence[tuple[int, int]]) -> bool:
        cached = [part.will_need(mine) for _, part, mine in self._split_ranges(ranges)]
        return all(cached)

    @property
    def direct_capable(self) -> bool:
        return all(p.direct_capable for p in self.parts if len(p))

    def _files(self) -> list[tuple[str, int]] | None:
        """`(path, offset)` of each shard's rows, where every shard with rows
        holds them one after another in a file."""
        files = []
        for p in self.parts:
            where = p.file_rows() if len(p) else ("", 0)
            if where is None:
                return None
            files.append(where)
        return files

    def window_origin(self) -> int | None:
        files = self._files()
        if files is None or not self.direct_capable:
            return None
        offsets = [
            off for (path, off), p in zip(files, self.parts, strict=True) if len(p)
        ]
        return direct_origin(offsets, self.row_nbytes)

    def read_window(self, ranges: Sequence[tuple[int, int]]) -> Any:
        if self.window_origin() is not None:
            # One buffer for every shard's blocks: one RowWindow, which the
            # tf.data path can hand to TensorFlow whole.
            files = self._files()
            assert files is not None
            bounds = self.bounds.tolist()
            got = read_direct_files(
                [
                    (*files[k], bounds[k], mine)
                    for k, _, mine in self._split_ranges(ranges)
                ],
                self.dtype,
                self.shape[1:],
            )
            if got is None:  # the file system refused O_DIRECT
                for p in self.parts:
                    p._no_direct = True
            return got
        parts: list[tuple[int, Any]] = []
        for k, part, mine in self._split_ranges(ranges):
            got = part.read_window(mine)
            if got is None:
                return None
            parts.append((k, got))
        return _ShardedWindow(self, parts)

    def _read_sorted(self, idx: np.ndarray) -> np.ndarray:
        pieces = [
            part.read_sorted(idx[a:b] - base, unique=True)
            for part, a, b, base in self._split(idx)
        ]
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        return _concatenate(pieces)

    @property
    def block_rows(self) -> int:
        return self.parts[0].block_rows

    @property
    def compressed(self) -> bool:
        return any(p.compressed for p in self.parts)

    def _where(self) -> str:
        first, last = self.parts[0]._where(), self.parts[-1]._where()
        return f"{len(self.parts)} shards: {first} ... {last}"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "shards": len(self.parts)}


class _ShardedWindow:
    """A `RowWindow` of each shard that a window's ranges touch."""

    def __init__(self, array: ShardedArray, parts: list[tuple[int, RowWindow]]):
        self.array = array
        self.parts = dict(parts)

    def take(self, rows: np.ndarray) -> np.ndarray:
        bounds = self.array.bounds
        cuts = np.searchsorted(rows, bounds).tolist()
        pieces = [
            self.parts[k].take(rows[cuts[k] : cuts[k + 1]] - bounds[k])
            for k in sorted(self.parts)
            if cuts[k] < cuts[k + 1]
        ]
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            a = self.array
            return np.empty((0, *a.shape[1:]), dtype=a.dtype)
        return _concatenate(pieces)


# ---- open_array ------------------------------------------------------------------


def _natural_key(s: str) -> list[Any]:
    # "part-10" after "part-9", as a person numbers shards.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _glob_paths(pattern: str) -> list[str]:
    paths = sorted(_glob.glob(pattern), key=_natural_key)
    if not paths:
        raise FileNotFoundError(f"no file matches the pattern '{pattern}'")
    return paths


def _file_magic(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def _is_hdf5_with_user_block(path: str) -> bool:
    # HDF5 puts its signature at 0, 512, 1024, 2048, ... bytes (after a user
    # block); look at those before calling the file unknown.
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        where = 512
        while where + 8 <= size and where <= 1 << 30:
            f.seek(where)
            if f.read(8) == _HDF5_MAGIC:
                return True
            where *= 2
    return False


def _memmap_origin(mm: np.memmap) -> tuple[str, int] | None:
    """The (file, byte offset) of a C-contiguous memmap or view of one."""
    base = getattr(mm, "_mmap", None)
    filename = getattr(mm, "filename", None)
    if base is None or filename is None or not mm.flags.c_contiguous:
        return None
    if getattr(mm, "mode", None) == "c":  # copy-on-write: changes are not in the file
        return None
    try:
        start = np.frombuffer(base, dtype=np.uint8).ctypes.data
    except (TypeError, ValueError):
        return None
    aligned = mm.offset - mm.offset % mmap.ALLOCATIONGRANULARITY
    return filename, aligned + (mm.ctypes.data - start)


def open_array(
    source: Any,
    *,
    key: str | None = None,
    dtype: Any = None,
    shape: Sequence[int] | int | None = None,
    offset: int = 0,
) -> BigArray:
    """Opens an array on disk (or wraps one in memory) as a `BigArray`.

    Nothing is read but headers and metadata; the file is never written.

    Args:
        source: a `.npy` path; an HDF5 path (with `key`); a raw binary path (with
            `dtype` and `shape`); a list of `.npy` paths, a glob pattern or a
            folder of `.npy` files (shards concatenated on axis 0, in natural
            order: `part-2` before `part-10`); an `np.ndarray` or `np.memmap`;
            an `h5py.Dataset`; any array-like with `shape`, `dtype` and slicing
            (zarr); or a `BigArray`, returned as is.
        key: the dataset's path inside an HDF5 file, e.g. `"images"` or
            `"train/x"`. May be left out when the file holds one dataset.
        dtype: the element type of a raw file.
        shape: the shape of a raw file, with at most one `-1` to infer.
        offset: bytes to skip at the start of a raw file.

    Returns:
        A `BigArray`.

    Raises:
        FileNotFoundError: the path, or every path of a glob, is missing.
        KeyError: `key` is not a dataset of the HDF5 file (the message lists
            those present).
        ValueError: a truncated `.npy`, a raw size that is not a whole number of
            rows, shards that disagree in dtype or row shape.
        TypeError: object dtype, or a source of an unsupported type.

    Example:

    ```python
    x = kb.open_array("x.npy")
    images = kb.open_array("data.h5", key="images")
    raw = kb.open_array("raw.u8", dtype="uint8", shape=(-1, 28, 28))
    shards = kb.open_array("shards/part-*.npy")
    ```
    """
    raw_args = dtype is not None or shape is not None or offset != 0
    if isinstance(source, BigArray):
        if key is not None or raw_args:
            raise ValueError(
                f"{source!r} is already open; key=, dtype=, shape= and offset= "
                "apply only when opening a path."
            )
        return source
    if isinstance(source, (str, os.PathLike)):
        return _open_path(os.fspath(source), key, dtype, shape, offset)
    if key is not None or raw_args:
        what = "key=" if key is not None else "dtype=, shape= and offset="
        raise ValueError(f"{what} apply to a path; received a {type(source).__name__}.")
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("open_array received an empty list of shards")
        return ShardedArray([open_array(s) for s in source])
    if isinstance(source, np.memmap):
        origin = _memmap_origin(source)
        if origin is not None and source.ndim:
            return RawArray._of_memmap(origin[0], source.dtype, source.shape, origin[1])
        return MemoryArray(np.asarray(source))
    if isinstance(source, np.ndarray):
        return MemoryArray(source)
    if type(source).__module__.startswith("h5py"):
        from keras_bigarray import _hdf5

        return _hdf5.from_h5py_dataset(source)
    if isinstance(source, SupportsArrayRead):
        return DuckArray(source)
    raise TypeError(
        "open_array takes a path, a list or glob of .npy shards, an ndarray, an "
        "h5py.Dataset or an array-like with shape, dtype and slicing; received "
        f"{type(source).__name__}."
    )


def _open_path(
    path: str, key: str | None, dtype: Any, shape: Any, offset: int
) -> BigArray:
    if not os.path.exists(path) and _glob.has_magic(path):
        # key=, dtype=, shape= and offset= apply to every match, not to none.
        return ShardedArray(
            [_open_path(p, key, dtype, shape, offset) for p in _glob_paths(path)]
        )
    if os.path.isdir(path):
        if key is not None or dtype is not None or shape is not None or offset:
            raise ValueError(
                f"'{path}' is a folder, read as its .npy shards; key=, dtype=, "
                "shape= and offset= apply to a file or a glob pattern."
            )
        paths = _glob_paths(os.path.join(_glob.escape(path), "*.npy"))
        return ShardedArray([NpyArray(p) for p in paths])
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: '{path}'")
    if dtype is not None:
        if key is not None:
            raise ValueError(
                "key= is for HDF5 files and dtype= for raw files; pass one"
            )
        return RawArray(path, dtype, shape, offset)
    if shape is not None or offset:
        raise ValueError(
            f"shape= and offset= describe a raw file; pass dtype= too to read "
            f"'{path}' as raw bytes."
        )
    magic = _file_magic(path)
    if (
        magic.startswith(_HDF5_MAGIC)
        or path.lower().endswith(_HDF5_SUFFIXES)
        or (not magic.startswith(_NPY_MAGIC) and _is_hdf5_with_user_block(path))
    ):
        from keras_bigarray import _hdf5

        return _hdf5.HDF5Array(path, key)
    if key is not None:
        raise ValueError(f"key={key!r} was given but '{path}' is not an HDF5 file")
    if magic.startswith(_NPY_MAGIC):
        return NpyArray(path)
    if magic.startswith(b"PK"):
        raise ValueError(
            f"'{path}' is a zip archive (.npz?); save each array as its own .npy "
            "(np.save) so it can be memory-mapped."
        )
    raise ValueError(
        f"cannot tell the format of '{path}': it is neither .npy nor HDF5. For a "
        "raw binary file pass dtype= and shape= (e.g. shape=(-1, 28, 28))."
    )
