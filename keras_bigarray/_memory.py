"""Memory measurements for the demo, `inspect` and the benchmarks: the process's
anonymous resident memory sampled in a thread (page cache and memmapped file
pages excluded), the machine's available memory, page-cache residency of files.
numpy and the standard library only."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading
from types import TracebackType
from typing import Literal

import numpy as np

__all__ = [
    "PeakMemory",
    "anon_rss",
    "available_memory",
    "format_bytes",
    "page_cache_fraction",
    "total_memory",
]

# 20 ms: short enough to catch a batch-sized allocation that lives for one
# training step (~5-50 ms for small models on CPU), long enough that reading
# /proc/self/status (~20 us) costs < 0.1% of a core.
DEFAULT_INTERVAL_S = 0.02

_STATUS = "/proc/self/status"
_MEMINFO = "/proc/meminfo"


def _proc_kib(path: str, field: str) -> int | None:
    """The `field:  N kB` line of a /proc file, in bytes; None where missing."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(field.encode() + b":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _maxrss() -> int:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux and the BSDs report KiB; macOS reports bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def anon_rss() -> int | None:
    """The process's anonymous resident memory (`RssAnon`) in bytes.

    Anonymous memory is what the process allocated itself (heap, numpy
    buffers, tensors); file-backed pages of memory-mapped arrays and the page
    cache are not counted, since the kernel can drop them at any time. None
    where /proc is missing (macOS, Windows).
    """
    return _proc_kib(_STATUS, "RssAnon")


class PeakMemory:
    """Samples memory in a daemon thread while a block of code runs.

    Reports the baseline on entry, the peak seen, and the growth (peak minus
    baseline), in bytes. On Linux it samples `RssAnon` every `interval`
    seconds; elsewhere it falls back to the process's peak resident set size
    (`ru_maxrss`: a rough figure, since it counts memory-mapped file pages too
    and cannot see a peak lower than an earlier one).

    Args:
        interval: seconds between samples.

    Example:

    ```python
    with PeakMemory() as mem:
        model.fit(ds)
    print(format_bytes(mem.growth), "of memory growth")
    ```
    """

    def __init__(self, interval: float = DEFAULT_INTERVAL_S):
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, received {interval=}")
        self.interval = float(interval)
        self.source: Literal["RssAnon", "ru_maxrss"] = (
            "RssAnon" if anon_rss() is not None else "ru_maxrss"
        )
        self.baseline = 0
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        """Takes one sample now and returns it (bytes)."""
        value = anon_rss() if self.source == "RssAnon" else None
        if value is None:
            value = _maxrss()
        if value > self.peak:
            self.peak = value
        self.samples += 1
        return value

    @property
    def growth(self) -> int:
        """Peak minus baseline, in bytes (never negative)."""
        return max(0, self.peak - self.baseline)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> PeakMemory:
        if self._thread is not None:
            raise RuntimeError("PeakMemory is already running")
        self.peak = 0
        self.samples = 0
        self.baseline = self.sample()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="keras-bigarray-memory", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> PeakMemory:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()
        return self

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"PeakMemory(source={self.source!r}, "
            f"baseline={format_bytes(self.baseline)}, "
            f"peak={format_bytes(self.peak)}, growth={format_bytes(self.growth)})"
        )


def available_memory() -> int | None:
    """Memory the machine can give out without swapping, in bytes.

    `MemAvailable` (free memory plus reclaimable page cache) on Linux; the
    physical memory size elsewhere; None when neither is known.
    """
    avail = _proc_kib(_MEMINFO, "MemAvailable")
    if avail is not None:
        return avail
    return total_memory()


def total_memory() -> int | None:
    """The machine's physical memory in bytes, or None."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


_libc: ctypes.CDLL | None | bool = False


def _mincore_fn():  # type: ignore[no-untyped-def]
    global _libc
    if _libc is False:
        try:
            name = ctypes.util.find_library("c")
            lib = ctypes.CDLL(name, use_errno=True) if name else None
            if lib is not None and hasattr(lib, "mincore"):
                lib.mincore.argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_size_t,
                    ctypes.c_void_p,
                ]
                lib.mincore.restype = ctypes.c_int
            else:
                lib = None
        except OSError:
            lib = None
        _libc = lib
    return None if _libc is None else _libc.mincore  # type: ignore[union-attr]


def page_cache_fraction(path: str | os.PathLike[str]) -> float | None:
    """The fraction of a file's pages now in the page cache (0.0 to 1.0).

    Uses `mincore(2)` on a read-only map of the file, which reads nothing.
    None where that is unavailable (no libc `mincore`, an unmappable file).
    """
    fn = _mincore_fn()
    if fn is None:
        return None
    try:
        size = os.path.getsize(path)
        if size == 0:
            return 1.0
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    try:
        page = mmap.PAGESIZE
        pages = -(-size // page)
        vec = np.zeros(pages, dtype=np.uint8)
        view = np.frombuffer(mm, dtype=np.uint8)
        try:
            rc = fn(view.ctypes.data, size, vec.ctypes.data)
        finally:
            del view  # the map cannot close while numpy holds its buffer
        if rc != 0:
            return None
        return float(np.count_nonzero(vec & 1)) / pages
    finally:
        mm.close()


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: float | None) -> str:
    """`1536` -> `"1.5 KiB"`; binary units, three significant digits."""
    if n is None:
        return "unknown"
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    for unit in _UNITS:
        if unit == "B" and value < 1024:
            return f"{sign}{int(value)} B"
        digits = 2 if value < 9.995 else 1 if value < 99.95 else 0
        if round(value, digits) < 1024 or unit == _UNITS[-1]:
            if unit != "B":
                return f"{sign}{value:.{digits}f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
