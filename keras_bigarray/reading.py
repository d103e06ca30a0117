"""Reading: a batch of row indices from the sampler becomes a structure of numpy
arrays (x, y, sample_weight; tuples and dicts for multi-input models), in the
storage dtype, with zero-filled padding rows and their 0/1 weights."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from keras_bigarray._memory import available_memory
from keras_bigarray.sampling import Sampler
from keras_bigarray.sources import BigArray

__all__ = ["BatchReadError", "BatchReader", "flatten", "map_structure"]

# Block shuffle hints each window's blocks ahead (`BatchReader._hint_windows`);
# after this many windows in a row found in the page cache, only one window in
# `_HINT_RECHECK` is hinted (a file evicted later is hinted again from the
# next check on).
_HINT_STREAK = 4
_HINT_RECHECK = 8


class BatchReadError(RuntimeError):
    """A batch could not be read; the message names the batch and the source."""


def map_structure(fn: Callable[[Any], Any], s: Any, path: str = "") -> Any:
    """Applies `fn(leaf, path)` to every leaf of nested tuples, lists and dicts."""
    if isinstance(s, dict):
        return {k: map_structure(fn, v, f"{path}[{k!r}]") for k, v in s.items()}
    if isinstance(s, (tuple, list)):
        return type(s)(map_structure(fn, v, f"{path}[{i}]") for i, v in enumerate(s))
    return fn(s, path)


def flatten(s: Any) -> list[Any]:
    """The leaves of a structure, in `map_structure` order."""
    leaves: list[Any] = []
    map_structure(lambda leaf, _: leaves.append(leaf), s)
    return leaves


class _Windows:
    """Block-shuffle windows read with direct I/O, `AHEAD` groups ahead of the
    reading, each by a thread of its own, so the disk is never idle waiting
    for a batch to ask. At most `KEEP` groups stay in memory (a group is one
    window's batches: each source's window, ~16 MiB at the default blocks).

    A reader that finds its group evicted (far behind the others) reads it
    again: slower, never wrong. After a fork the child starts empty.
    """

    AHEAD = 2
    KEEP = 4

    def __init__(self, load: Callable[[int, int], dict[str, Any]]):
        self._load = load
        self._pid = -1

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[tuple[int, int], _Group] = {}
        self._pid = os.getpid()

    def get(self, epoch: int, group: int, last: int) -> dict[str, Any]:
        if self._pid != os.getpid():
            self._reset()
        with self._lock:
            for g in range(group, min(group + self.AHEAD, last) + 1):
                if (epoch, g) not in self._groups:
                    self._start(epoch, g)
            mine = self._groups[(epoch, group)]
            near = {(epoch, g) for g in range(group - 1, group + self.AHEAD + 1)}
            far = [k for k in self._groups if k not in near]  # oldest first
            for k in far[: max(0, len(self._groups) - self.KEEP)]:
                del self._groups[k]
        return mine.wait()

    def _start(self, epoch: int, group: int) -> None:
        g = _Group()
        self._groups[(epoch, group)] = g
        threading.Thread(
            target=g.fill, args=(self._load, epoch, group), daemon=True
        ).start()


class _Group:
    def __init__(self) -> None:
        self._done = threading.Event()
        self._result: dict[str, Any] | None = None
        self._error: BaseException | None = None

    def fill(self, load: Callable[[int, int], dict[str, Any]], *at: int) -> None:
        try:
            self._result = load(*at)
        except BaseException as e:  # handed to every reader of the group
            self._error = e
        finally:
            self._done.set()

    def wait(self) -> dict[str, Any]:
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class BatchReader:
    """Reads batch `(epoch, index)` of a `Sampler` from a structure of sources.

    Picklable: sources travel as paths and reopen in the receiving process, so
    any worker can read any batch.

    Args:
        data: `(x, y, sample_weight)`, each a structure of `BigArray` or None.
        sampler: the `Sampler` deciding each batch's rows.
        row_offset: added to every sampled row (a dataset over rows `a:b`).
    """

    def __init__(
        self, data: tuple[Any, Any, Any], sampler: Sampler, row_offset: int = 0
    ):
        self.data = data
        self.sampler = sampler
        self.row_offset = int(row_offset)
        self._hinted: list[tuple[int, int]] = []
        self._hinted_blocks: set[tuple[int, int]] = set()
        self._last_group: tuple[int, int] | None = None
        self._cached_windows = 0
        self._hint_skips = 0
        self._hint_lock = threading.Lock()
        self._direct: dict[str, BigArray] | None = None
        self._windows = _Windows(self._load_group)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_hinted"] = []
        state["_hinted_blocks"] = set()
        state["_last_group"] = None
        state["_cached_windows"] = state["_hint_skips"] = 0
        state["_direct"] = None
        del state["_hint_lock"], state["_windows"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._hint_lock = threading.Lock()
        self._windows = _Windows(self._load_group)

    def _group_rows(self) -> int:
        s = self.sampler
        return max(1, (s.block_rows * s.window_blocks) // s.batch_size)

    def _direct_sources(self) -> dict[str, BigArray]:
        """The sources, by structure path, whose block-shuffle windows are read
        with direct I/O (`BigArray.reads_direct`); decided once per process."""
        if self._direct is None:
            found: dict[str, BigArray] = {}
            if self.sampler.mode == "block":
                avail = available_memory()

                def note(src: BigArray | None, path: str) -> None:
                    if src is not None and src.reads_direct(avail):
                        found[path] = src

                for name, part in zip(
                    ("x", "y", "sample_weight"), self.data, strict=True
                ):
                    if part is not None:
                        map_structure(note, part, name)
            self._direct = found
        return self._direct

    def disable_direct_io(self) -> None:
        """Reads every source through its memory map in this process."""
        self._direct = {}

    def _group_ranges(self, epoch: int, group: int) -> list[tuple[int, int]]:
        """Row ranges of every block that the batches of `group` read."""
        s = self.sampler
        per = self._group_rows()
        first = group * per
        touched = s.batch_blocks(epoch, first, min(first + per, s.num_batches))
        return self._block_ranges(touched.tolist())

    def _block_ranges(self, blocks: list[int]) -> list[tuple[int, int]]:
        """The rows `[a, b)` of each block, in the sources' numbering."""
        br, off, n = self.sampler.block_rows, self.row_offset, self.sampler.num_rows
        return [(b * br + off, min(b * br + br, n) + off) for b in blocks]

    def _load_group(self, epoch: int, group: int) -> dict[str, Any]:
        ranges = self._group_ranges(epoch, group)
        windows = {}
        for path, src in list(self._direct.items()):
            window = src.read_window(ranges)
            if window is None:  # the file system refused direct I/O
                self._direct.pop(path, None)
            else:
                windows[path] = window
        return windows

    def _hint_windows(self, epoch: int, index: int) -> None:
        """Under block shuffle, asks the OS to read the blocks of this window's
        and the next window's batches while this one's are read (see
        `sources.will_need`): large reads in flight instead of one page fault
        at a time.

        Batches go in groups of one window's rows; the first batch read of a
        group hints the blocks of its windows and of the next group's, once.
        """
        s = self.sampler
        per = self._group_rows()
        here = (epoch, index // per)
        if self._last_group == here:  # the common case: nothing new to hint
            return
        self._last_group = here
        if self._hint_skips > 0:  # the files are in the page cache
            self._hint_skips -= 1
            return
        cached, checked = True, False
        for group in (index // per, index // per + 1):
            first = group * per
            if first >= s.num_batches:
                break
            with self._hint_lock:
                if (epoch, group) in self._hinted:
                    continue
                self._hinted = [*self._hinted[-7:], (epoch, group)]
            touched = s.batch_blocks(epoch, first, first + per).tolist()
            with self._hint_lock:  # a block in two groups' windows: hint it once
                blocks = [b for b in touched if (epoch, b) not in self._hinted_blocks]
                self._hinted_blocks.update((epoch, b) for b in blocks)
                if len(self._hinted_blocks) > 64 * s.window_blocks:
                    self._hinted_blocks = {(epoch, b) for b in blocks}
            ranges = self._block_ranges(blocks)
            direct = self._direct_sources().values()
            for src in flatten(self.data):
                if src is not None and not any(src is d for d in direct):
                    cached = src.will_need(ranges) is True and cached
                    checked = True
        if not checked:  # every group hinted already (by another thread)
            return
        # Windows found in the page cache in a row: the files fit in memory and
        # stay there, and a hint costs ~10 us a batch for nothing (page-cache
        # checks, spans, bookkeeping; ~5% of a 1 MiB batch). From then on only
        # one window in `_HINT_RECHECK` is hinted, which checks again.
        self._cached_windows = self._cached_windows + 1 if cached else 0
        if self._cached_windows >= _HINT_STREAK:
            self._hint_skips = _HINT_RECHECK - 1

    def read(self, epoch: int, index: int) -> tuple[Any, ...]:
        """Batch `index` of `epoch` as `(x,)`, `(x, y)` or `(x, y, sample_weight)`."""
        windows: dict[str, Any] = {}
        if self.sampler.mode == "block":
            self._hint_windows(epoch, index)
            if self._direct_sources():
                per = self._group_rows()
                last = (self.sampler.num_batches - 1) // per
                try:
                    windows = self._windows.get(epoch, index // per, last)
                except Exception as e:
                    raise BatchReadError(
                        f"reading the window of batch {index} of epoch {epoch} "
                        f"with direct I/O failed: {type(e).__name__}: {e}"
                    ) from e
        rows, num_real = self.sampler.batch(epoch, index)
        rows = rows + self.row_offset if self.row_offset else rows
        size = self.sampler.batch_size if self.sampler.pad_remainder else num_real

        def load(src: BigArray, path: str) -> np.ndarray:
            window = windows.get(path)
            try:
                if window is not None:
                    got = window.take(rows)
                else:
                    got = src.read_sorted(rows, unique=True)  # rows never repeat
            except Exception as e:
                raise BatchReadError(
                    f"reading batch {index} of epoch {epoch} from {path or 'x'} = "
                    f"{src!r} failed: {type(e).__name__}: {e}"
                ) from e
            if size == num_real:
                return got
            out = np.zeros((size, *src.shape[1:]), dtype=src.dtype)
            out[:num_real] = got
            return out

        x, y, sw = self.data
        bx = map_structure(load, x, "x")
        by = None if y is None else map_structure(load, y, "y")
        bw = None if sw is None else map_structure(load, sw, "sample_weight")
        if self.sampler.pad_remainder:
            mask = np.zeros(size, dtype=np.float32)
            mask[:num_real] = 1.0
            bw = mask if bw is None else map_structure(lambda w, _: w * mask, bw)
        if bw is not None:
            return bx, by, bw
        if by is not None:
            return bx, by
        return (bx,)
