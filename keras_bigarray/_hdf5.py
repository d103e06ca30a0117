"""The HDF5 source. Uncompressed data (contiguous, or chunked without filters) is
read straight from the file's bytes through a memory map, with no h5py lock;
compressed data is read by whole chunks, each decoded once. Imports h5py lazily."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from keras_bigarray.sources import BigArray, DuckArray, _check_dtype, touch_row_heads

__all__ = ["HDF5Array", "from_h5py_dataset"]

# h5py's own chunk cache is 1 MiB, smaller than one window of block shuffle, so
# every batch would decode its chunks again. 64 MiB holds a 16-chunk window of
# 4 MiB chunks; slots are a prime about 100x the chunks that fit (HDF5 docs).
CHUNK_CACHE_BYTES = 64 << 20
CHUNK_CACHE_SLOTS = 100_003

# One h5py read of adjacent chunks holds at most this much decoded data (plus
# one chunk): a batch spread over many chunks never costs more memory than this.
MAX_READ_BYTES = 32 << 20

# Chunk-offset tables longer than this are not pickled (8 bytes a chunk): the
# receiving process rebuilds them from the file on first read.
_PICKLED_PLAN_CHUNKS = 4096


_REBUILD = "rebuild"  # a pickled plan too long to send: rebuilt on first read


def _h5py():
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is a dependency
        raise ImportError("reading HDF5 needs h5py: pip install h5py") from e
    return h5py


def _list_datasets(f: Any) -> list[str]:
    h5py = _h5py()
    names: list[str] = []
    f.visititems(
        lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None
    )
    return names


class HDF5Array(BigArray):
    """One dataset of an HDF5 file, reopened lazily in each process.

    Args:
        path: the HDF5 file.
        key: the dataset's path in the file; may be left out when the file holds
            exactly one dataset.
        chunk_cache_bytes: size of HDF5's chunk cache for compressed data.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        key: str | None = None,
        *,
        chunk_cache_bytes: int = CHUNK_CACHE_BYTES,
    ):
        h5py = _h5py()
        self.path = os.fspath(path)
        self.chunk_cache_bytes = int(chunk_cache_bytes)
        if not h5py.is_hdf5(self.path):
            raise ValueError(f"'{self.path}' is not an HDF5 file")
        with h5py.File(self.path, "r") as f:
            present = _list_datasets(f)
            if key is None:
                if len(present) != 1:
                    raise KeyError(
                        f"'{self.path}' holds {len(present)} datasets "
                        f"({', '.join(present) or 'none'}); pass key= to pick one"
                    )
                key = present[0]
            obj = f.get(key)
            if not isinstance(obj, h5py.Dataset):
                what = "a group, not a dataset" if obj is not None else "missing"
                raise KeyError(
                    f"key {key!r} is {what} in '{self.path}'; datasets present: "
                    f"{', '.join(present) or 'none'}"
                )
            self.key = obj.name
            self.shape = tuple(int(s) for s in obj.shape or ())
            if not self.shape:
                raise ValueError(
                    f"'{self.path}' key {self.key!r} is a scalar dataset; it has "
                    "no rows"
                )
            if h5py.check_vlen_dtype(obj.dtype) is not None:
                raise TypeError(
                    f"'{self.path}' key {self.key!r} holds variable-length data "
                    f"({obj.dtype}); keras-bigarray reads fixed-size numbers only."
                )
            self.dtype = _check_dtype(obj.dtype, f"'{self.path}' key {self.key!r}")
            self.chunks = obj.chunks
            self.filters = sorted(
                str(k)
                for k in obj._filters  # noqa: SLF001 - h5py's filter map
            )
            self._byte_plan = self._plan_direct_reads(obj)
        self._local = threading.local()
        self._pid = -1

    # ---- how rows are found in the file --------------------------------------
    def _plan_direct_reads(self, ds: Any) -> tuple[int, np.ndarray | None] | None:
        """`(rows per chunk, chunk byte offsets)` when bytes can be read directly.

        Contiguous data is one chunk of every row. None: go through h5py.
        """
        if self.dtype.byteorder == ">" or ds.id.get_create_plist().get_external_count():
            return None
        if ds.chunks is None:
            offset = ds.id.get_offset()
            if offset is None:  # never written: HDF5 serves the fill value
                return None
            return len(self), np.array([offset], dtype=np.int64)
        if self.filters or ds.chunks[1:] != self.shape[1:]:
            return None
        rows = ds.chunks[0]
        n_chunks = -(-len(self) // rows)
        offsets = np.full(n_chunks, -1, dtype=np.int64)
        if hasattr(ds.id, "chunk_iter"):

            def visit(info: Any) -> None:
                offsets[info.chunk_offset[0] // rows] = info.byte_offset

            ds.id.chunk_iter(visit)
        else:  # pragma: no cover - HDF5 < 1.12.3
            for i in range(ds.id.get_num_chunks()):
                info = ds.id.get_chunk_info(i)
                offsets[info.chunk_offset[0] // rows] = info.byte_offset
        if (offsets < 0).any():  # unwritten chunks hold the fill value
            return None
        return rows, offsets

    @property
    def direct(self) -> bool:
        """True when rows are read from the file's bytes without h5py."""
        return self._byte_plan is not None

    @property
    def compressed(self) -> bool:
        return bool(self.filters)

    @property
    def block_rows(self) -> int:
        if self.chunks is not None:
            return int(self.chunks[0])
        return super().block_rows

    # ---- opening, per process and per thread ------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_local"]
        state["_pid"] = -1
        plan = state["_byte_plan"]
        if plan is not None and plan[1].size > _PICKLED_PLAN_CHUNKS:
            state["_byte_plan"] = _REBUILD
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _handles(self) -> Any:
        # After fork the parent's handles are unusable: reopen in each process.
        pid = os.getpid()
        if self._pid != pid:
            self._local = threading.local()
            self._pid = pid
        local = self._local
        if not hasattr(local, "bytes"):
            local.bytes = None
            local.ds = None
        return local

    def _file_bytes(self) -> np.ndarray:
        local = self._handles()
        if local.bytes is None:
            local.bytes = np.memmap(self.path, dtype=np.uint8, mode="r")
        return local.bytes

    def _dataset(self) -> Any:
        local = self._handles()
        if local.ds is None:
            h5py = _h5py()
            f = h5py.File(
                self.path,
                "r",
                rdcc_nbytes=self.chunk_cache_bytes,
                rdcc_nslots=CHUNK_CACHE_SLOTS,
            )
            local.ds = f[self.key]
        return local.ds

    # ---- reading -----------------------------------------------------------------
    def _plan(self) -> tuple[int, np.ndarray]:
        if isinstance(self._byte_plan, str):
            self._byte_plan = self._plan_direct_reads(self._dataset())
        return self._byte_plan  # type: ignore[return-value]

    def _gather_bytes(self, idx: np.ndarray) -> np.ndarray:
        rows, offsets = self._plan()
        width = self.row_nbytes
        where = offsets[idx // rows] + (idx % rows) * width
        raw = self._file_bytes()
        if width == 0:
            return np.empty((idx.size, *self.shape[1:]), dtype=self.dtype)
        # Every byte offset as one `width`-byte item: a gather copies each row
        # with one memcpy (a (n, width) uint8 view copies byte by byte).
        touch_row_heads(raw, where, width)
        rows_at = np.ndarray(
            shape=(raw.size - width + 1,),
            dtype=np.dtype((np.void, width)),
            buffer=raw,
            strides=(1,),
        )
        out = rows_at[where]
        return out.view(self.dtype).reshape(idx.size, *self.shape[1:])

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        if self._byte_plan is not None:
            rows, offsets = self._plan()
            if offsets.size == 1:  # contiguous: one slice of the file
                width = self.row_nbytes
                raw = self._file_bytes()
                a = int(offsets[0]) + start * width
                block = np.array(raw[a : a + (stop - start) * width])
                return block.view(self.dtype).reshape(stop - start, *self.shape[1:])
            return self._gather_bytes(np.arange(start, stop, dtype=np.int64))
        return np.asarray(self._dataset()[start:stop])

    def _read_sorted(self, idx: np.ndarray) -> np.ndarray:
        if self._byte_plan is not None:
            return self._gather_bytes(idx)
        # Through h5py: read whole chunks, each once, then gather in memory
        # (h5py's own fancy indexing reads chunk by chunk per point, ~800x slower).
        rows = self.block_rows
        chunk = idx // rows
        # A new read where chunks stop being adjacent, or where one read would
        # pass MAX_READ_BYTES: memory stays bounded whatever the batch spans.
        per_read = max(1, MAX_READ_BYTES // max(1, rows * self.row_nbytes))
        gap = np.diff(chunk) > 1
        run_id = np.concatenate(([0], np.cumsum(gap)))
        run_first = chunk[np.concatenate(([0], np.flatnonzero(gap) + 1))]
        piece = (chunk - run_first[run_id]) // per_read
        starts = np.flatnonzero(gap | (np.diff(piece) != 0)) + 1
        first = np.concatenate(([0], starts))
        last = np.concatenate((starts, [idx.size]))
        ds = self._dataset()
        out = np.empty((idx.size, *self.shape[1:]), dtype=self.dtype)
        for a, b in zip(first.tolist(), last.tolist(), strict=True):
            lo = int(chunk[a]) * rows
            hi = min(len(self), (int(chunk[b - 1]) + 1) * rows)
            block = ds[lo:hi]
            out[a:b] = block[idx[a:b] - lo]
        return out

    def _where(self) -> str:
        return f"'{self.path}', key={self.key!r}"

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "path": self.path,
            "key": self.key,
            "chunks": self.chunks,
            "filters": self.filters,
            "direct_reads": self.direct,
        }


def from_h5py_dataset(ds: Any) -> BigArray:
    """Reopens an open `h5py.Dataset` by file name and key, so it pickles."""
    h5py = _h5py()
    if not isinstance(ds, h5py.Dataset):
        raise TypeError(
            f"expected an h5py.Dataset, received {type(ds).__name__}; open a "
            "dataset with f[key]"
        )
    f = ds.file
    if f.mode == "r" and f.driver in ("sec2", "stdio") and os.path.exists(f.filename):
        return HDF5Array(f.filename, ds.name)
    # Open for writing, or in memory: read through this handle (it cannot be
    # pickled, so worker processes need a path instead).
    return DuckArray(ds)
