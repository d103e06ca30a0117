"""The rows of several files as one array in memory, without a copy: each file is
memory-mapped (copy-on-write, so nothing reaches the file) at an address where
its rows fall on one grid of rows. Rows of file k are then rows
`shift[k] : shift[k] + rows[k]` of the array, with unused rows (never read)
between files. For `tf.gather` over a folder of shards (`tf_data`): one tensor,
each row index moved by its shard's shift.

Linux (and other POSIX systems with `mmap(MAP_FIXED)` in libc) only; elsewhere,
or where a map fails, `map_rows` returns None and callers read otherwise.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from keras_bigarray.sources import place_on_grid

__all__ = ["map_rows"]

_libc: Any = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = libc
    return _libc


_MAP_FAILED = ctypes.c_void_p(-1).value


class _Region:
    """An address range reserved with mmap, unmapped (with every file mapped
    into it) when the last array over it goes."""

    def __init__(self, addr: int, size: int):
        self.addr, self.size = addr, size

    def __del__(self) -> None:
        if self.addr:
            _lib().munmap(self.addr, self.size)
            self.addr = 0


def grid_origin(offsets: Sequence[int], w: int) -> int | None:
    """Where `map_rows` puts row 0 of its grid (a byte of the reservation):
    64-byte aligned (TensorFlow aborts on less), and congruent to every
    file's row 0 (`offsets`) modulo gcd(page size, row bytes `w`); None
    where no such byte is (then no one grid holds every file's rows)."""
    g = math.gcd(mmap.PAGESIZE, w) if w else mmap.PAGESIZE
    if not offsets or any((off - offsets[0]) % g for off in offsets):
        return None
    return next((x for x in range(0, 64 * g, 64) if (x - offsets[0]) % g == 0), None)


def map_rows(
    files: Sequence[tuple[str, int, int]],
    dtype: np.dtype,
    row_shape: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray] | None:
    """Maps `(path, byte offset of row 0, rows)` of each file so that all rows
    lie on one grid. Returns `(array, shift)`: row i of file k is
    `array[shift[k] + i]`. None where it cannot: no `mmap(MAP_FIXED)`, rows
    of 0 bytes, offsets that disagree modulo gcd(page size, row bytes) (then
    no one grid holds every file's rows) or allow no 64-byte aligned grid
    (TensorFlow aborts on less), or a map refused (e.g. under strict
    overcommit).

    The array is writable as `np.memmap(mode="c")` is (TensorFlow's DLPack
    import asks for it); writes would go to private pages, never the files.
    """
    if not sys.platform.startswith("linux"):  # MAP_FIXED's value below is Linux's
        return None
    w = math.prod(row_shape) * np.dtype(dtype).itemsize
    used = [f for f in files if f[2] > 0]
    if not used or w == 0:
        return None
    page = mmap.PAGESIZE
    origin = grid_origin([off for _, off, _ in used], w)
    if origin is None:
        return None
    plan, shift, cursor = [], [], 0
    for path, offset, rows in files:
        if rows <= 0:
            shift.append(0)  # no row of it is ever asked for
            continue
        at = place_on_grid(cursor, offset, origin, w, page)
        length = -(-(offset + rows * w) // page) * page
        plan.append((path, at, length))
        shift.append((at + offset - origin) // w)
        cursor = at + length
    try:
        libc = _lib()
    except OSError:  # pragma: no cover - no libc to call
        return None
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    addr = libc.mmap(None, cursor, 0, flags, -1, 0)  # PROT_NONE: reserved only
    if addr in (None, _MAP_FAILED):
        return None
    region = _Region(addr, cursor)  # unmaps everything below if we give up
    fixed = mmap.MAP_PRIVATE | 0x10  # MAP_FIXED: inside our own reservation
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    for path, at, length in plan:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            got = libc.mmap(addr + at, length, prot, fixed, fd, 0)
        finally:
            os.close(fd)
        if got != addr + at:
            return None
    buf = (ctypes.c_uint8 * cursor).from_address(addr)
    buf.region = region  # the array keeps `buf`, `buf` keeps the region
    array = np.ndarray(
        ((cursor - origin) // w, *row_shape), dtype=dtype, buffer=buf, offset=origin
    )
    return array, np.array(shift, dtype=np.int64)
