"""The HDF5 source. Uncompressed data (contiguous, or chunked without filters) is
read straight from the file's bytes through a memory map, with no h5py lock.
Chunks filtered only by deflate (gzip), shuffle and fletcher32 are read from the
same map and decoded here (zlib releases the GIL, so reader threads decode in
parallel) into an LRU cache of decoded chunks that each array owns. Any other
filter is decoded by h5py, by whole chunks. Imports h5py lazily."""

from __future__ import annotations

import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from keras_bigarray.sources import (
    BigArray,
    DuckArray,
    RowWindow,
    _check_dtype,
    batch_array,
    copy_rows,
    direct_origin,
    gather_rows,
    read_direct,
    touch_row_heads,
    will_need,
)

__all__ = ["CorruptChunkError", "HDF5Array", "from_h5py_dataset"]

# h5py's own chunk cache is 1 MiB, smaller than one window of block shuffle, so
# every batch would decode its chunks again. 64 MiB holds a 16-chunk window of
# 4 MiB chunks; slots are a prime about 100x the chunks that fit (HDF5 docs).
# The same size bounds the cache of chunks that we decode ourselves: HDF5 sizes
# its cache by the first handle open on a dataset, so a user's own h5py handle
# (1 MiB) would otherwise decide it.
CHUNK_CACHE_BYTES = 64 << 20
CHUNK_CACHE_SLOTS = 100_003

# One h5py read of adjacent chunks holds at most this much decoded data (plus
# one chunk): a batch spread over many chunks never costs more memory than this.
MAX_READ_BYTES = 32 << 20

# Chunk-offset tables longer than this are not pickled (8 bytes a chunk): the
# receiving process rebuilds them from the file on first read.
_PICKLED_PLAN_CHUNKS = 4096


_REBUILD = "rebuild"  # a pickled plan too long to send: rebuilt on first read

# The HDF5 filters decoded here (h5z.FILTER_*); any other goes through h5py.
_DEFLATE, _SHUFFLE, _FLETCHER32 = 1, 2, 3
_OUR_FILTERS = {_DEFLATE: "deflate", _SHUFFLE: "shuffle", _FLETCHER32: "fletcher32"}

# Fletcher32 sums 16-bit words in blocks small enough that float64 sums stay
# exact (< 2**53): one BLAS matrix-vector product a slab of blocks.
_FLETCHER_BLOCK = 1 << 16
_FLETCHER_SLAB = 16 * _FLETCHER_BLOCK


class _Plan(NamedTuple):
    """Where each chunk lies in the file (contiguous data: one chunk)."""

    rows: int  # rows per chunk
    offsets: np.ndarray  # int64 byte offset of each chunk
    sizes: np.ndarray | None = None  # int64 stored bytes (filtered chunks only)
    masks: np.ndarray | None = None  # uint32 skipped filters (filtered only)


class CorruptChunkError(OSError):
    """A stored chunk that does not decode to the bytes its dataset needs."""


def _fletcher32_ok(data: np.ndarray, stored: int) -> bool:
    """True when `stored` (the 4 bytes HDF5 appends, little-endian) is the
    Fletcher-32 checksum of `data`, as HDF5 computes it (16-bit big-endian
    words; an odd last byte is the high byte of a word)."""
    m = (data.size + 1) // 2  # words
    b = _FLETCHER_BLOCK
    weights = np.arange(b, 0, -1, dtype=np.float64)  # b - j for word j of a block
    s1 = s2 = 0
    for lo in range(0, m, _FLETCHER_SLAB):
        hi = min(m, lo + _FLETCHER_SLAB)
        seg = data[2 * lo : 2 * hi]
        if seg.size % 2:
            seg = np.concatenate((seg, np.zeros(1, np.uint8)))
        w = seg.view(">u2").astype(np.float64)
        if w.size % b:
            w = np.concatenate((w, np.zeros(-w.size % b)))
        mat = w.reshape(-1, b)
        sums = mat.sum(axis=1).astype(np.int64) % 65535
        tails = (mat @ weights).astype(np.int64) % 65535  # exact: < 2**48
        # Word j of block r has global index g = lo + r*b + j and weight m - g.
        base = (m - lo - (np.arange(1, mat.shape[0] + 1, dtype=np.int64) * b)) % 65535
        s1 += int(sums.sum())
        s2 += int((base * sums % 65535).sum()) + int(tails.sum())
    s1, s2 = s1 % 65535, s2 % 65535
    # HDF5 before 1.6.3 stored the checksum with the bytes of each half swapped;
    # HDF5 still accepts both. Halves are reduced sums, where 0 and 65535 agree.
    for value in (stored, ((stored & 0x00FF00FF) << 8) | ((stored >> 8) & 0x00FF00FF)):
        if (value & 0xFFFF) % 65535 == s1 and (value >> 16) % 65535 == s2:
            return True
    return False


def _unshuffle(data: np.ndarray, size: int) -> np.ndarray:
    """Undoes HDF5's byte shuffle: byte j of every element first, for each j."""
    n = data.size // size
    out = np.empty(data.size, dtype=np.uint8)
    out[: n * size].reshape(n, size)[...] = data[: n * size].reshape(size, n).T
    out[n * size :] = data[n * size :]  # a tail shorter than one element stays
    return out


def _decode_chunk(
    raw: np.ndarray, pipeline: tuple[tuple[int, int], ...], mask: int, nbytes: int
) -> np.ndarray:
    """The `nbytes` decoded bytes of one stored chunk (read-only uint8).

    `pipeline` holds `(filter id, shuffle element size)` in the order HDF5 applied
    the filters; bit i of `mask` set means filter i was skipped for this chunk.
    Raises ValueError on bytes that do not decode.
    """
    # The size each filter received when the chunk was written; unknown (None)
    # after a deflate.
    sizes: list[int | None] = [nbytes]
    for i, (fid, _) in enumerate(pipeline):
        size = sizes[-1]
        if size is not None and not mask >> i & 1:
            size = None if fid == _DEFLATE else size + (4 if fid == _FLETCHER32 else 0)
        sizes.append(size)
    data, owned = raw, False  # owned: no longer a view of the file's bytes
    for i in range(len(pipeline) - 1, -1, -1):
        if mask >> i & 1:
            continue
        fid, elem = pipeline[i]
        if fid == _DEFLATE:
            try:
                out = zlib.decompress(data, bufsize=sizes[i] or zlib.DEF_BUF_SIZE)
            except zlib.error as e:
                raise ValueError(f"deflate: {e}") from None
            data = np.frombuffer(out, np.uint8)
            owned = True
        elif fid == _FLETCHER32:
            if data.size < 4:
                raise ValueError("too short for its fletcher32 checksum")
            stored = int.from_bytes(data[-4:].tobytes(), "little")
            data = data[:-4]
            if not _fletcher32_ok(data, stored):
                raise ValueError("fletcher32 checksum mismatch")
        elif fid == _SHUFFLE and elem > 1:
            data, owned = _unshuffle(data, elem), True
        if sizes[i] is not None and data.size != sizes[i]:
            raise ValueError(
                f"{_OUR_FILTERS[fid]} gave {data.size} bytes, expected {sizes[i]}"
            )
    if data.size != nbytes:
        raise ValueError(f"decoded {data.size} bytes, expected {nbytes}")
    if not owned:
        data = np.array(data)
    data.flags.writeable = False
    return data


class _Handles:
    """One process's handles on a dataset: the file's memory map (and the
    views of its rows) and, where rows are read through h5py, one open
    dataset, shared by the process's threads (h5py serializes its calls).

    Shared, not per thread: tf.data calls Python from its own threads, each
    call with a fresh Python thread state, so handles kept per thread were
    opened again for every batch (a memory map a batch, faulted in anew:
    2-7 ms a batch of 1 MiB, against ~0.2 ms).
    """

    __slots__ = ("bytes", "ds", "items", "lock", "rows")

    def __init__(self) -> None:
        self.bytes: np.ndarray | None = None
        self.rows: np.ndarray | None = None
        self.items: np.ndarray | None = None
        self.ds: Any = None
        # Reentrant: mapping the file may first open it through h5py to find
        # where the chunks lie (a plan left out of a pickle), under the lock.
        self.lock = threading.RLock()


class _ChunkCache:
    """Decoded chunks, least recently used dropped first; thread-safe."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.nbytes = 0
        self._lock = threading.Lock()
        self._items: OrderedDict[int, tuple[np.ndarray, int]] = OrderedDict()

    def get(self, key: int) -> np.ndarray | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: int, value: np.ndarray, cost: int) -> None:
        if cost > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:  # another thread decoded it too
                self.nbytes -= old[1]
            self._items[key] = (value, cost)
            self.nbytes += cost
            while self.nbytes > self.capacity:
                self.nbytes -= self._items.popitem(last=False)[1][1]


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
        chunk_cache_bytes: size of the cache of decoded chunks for compressed
            data (ours for deflate, shuffle and fletcher32; HDF5's otherwise).
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
        self._local = _Handles()
        self._pid = -1
        self._cache: _ChunkCache | None = None
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
            self._pipeline = self._our_pipeline(obj)
            self._byte_plan = self._plan_direct_reads(obj)
            if not self._edge_chunk_decodes(obj):
                self._byte_plan = None

    # ---- how rows are found in the file --------------------------------------
    def _our_pipeline(self, ds: Any) -> tuple[tuple[int, int], ...] | None:
        """The filters in the order HDF5 applied them, as `(filter id, shuffle
        element size)`; None when one of them is not decoded here."""
        plist = ds.id.get_create_plist()
        pipeline = []
        for i in range(plist.get_nfilters()):
            fid, _flags, values, _name = plist.get_filter(i)
            if fid not in _OUR_FILTERS:
                return None
            elem = int(values[0]) if fid == _SHUFFLE and values else 0
            pipeline.append((int(fid), elem or self.dtype.itemsize))
        return tuple(pipeline)

    def _plan_direct_reads(self, ds: Any) -> _Plan | None:
        """Where each chunk's bytes lie, when they can be read without h5py:
        unfiltered, or filtered only by filters decoded here.

        Contiguous data is one chunk of every row. None: go through h5py.
        """
        if self.dtype.byteorder == ">" or ds.id.get_create_plist().get_external_count():
            return None
        if ds.id.get_type().get_size() != self.dtype.itemsize:
            return None  # the file's element is not numpy's: let HDF5 convert
        if ds.chunks is None:
            offset = ds.id.get_offset()
            if offset is None:  # never written: HDF5 serves the fill value
                return None
            return _Plan(len(self), np.array([offset], dtype=np.int64))
        if self._pipeline is None or ds.chunks[1:] != self.shape[1:]:
            return None
        filtered = bool(self._pipeline)
        if filtered and self.row_nbytes == 0:
            return None
        rows = ds.chunks[0]
        n_chunks = -(-len(self) // rows)
        offsets = np.full(n_chunks, -1, dtype=np.int64)
        sizes = np.zeros(n_chunks, dtype=np.int64)
        masks = np.zeros(n_chunks, dtype=np.uint32)

        def visit(info: Any) -> None:
            c = info.chunk_offset[0] // rows
            if c < n_chunks:
                offsets[c] = info.byte_offset
                sizes[c] = info.size
                masks[c] = info.filter_mask

        if hasattr(ds.id, "chunk_iter"):
            ds.id.chunk_iter(visit)
        else:  # pragma: no cover - HDF5 < 1.12.3
            for i in range(ds.id.get_num_chunks()):
                visit(ds.id.get_chunk_info(i))
        if (offsets < 0).any():  # unwritten chunks hold the fill value
            return None
        if filtered:
            return _Plan(rows, offsets, sizes, masks)
        return _Plan(rows, offsets)

    def _edge_chunk_decodes(self, ds: Any) -> bool:
        """False when a partial last chunk does not decode to what h5py reads.

        HDF5 may store partial edge chunks unfiltered (a layout option h5py
        cannot query); one chunk decoded at open rules that out.
        """
        plan = self._byte_plan
        if plan is None or plan.sizes is None or not len(self) % plan.rows:
            return True
        last = plan.offsets.size - 1
        try:
            got = self._chunk(last, cache=False)
        except CorruptChunkError:
            return False
        expected = np.ascontiguousarray(ds[last * plan.rows :])
        return got.tobytes() == expected.tobytes()

    @property
    def direct(self) -> bool:
        """True when rows are read from the file's bytes without h5py (and
        decoded here when the chunks are compressed)."""
        return self._byte_plan is not None

    @property
    def decode(self) -> str:
        """Who turns stored bytes into rows: "none" (stored as they are, read
        directly), "ours" (filters undone here, without h5py) or "h5py"."""
        if self._byte_plan is None:
            return "h5py"
        return "ours" if self._pipeline else "none"

    @property
    def compressed(self) -> bool:
        return bool(self.filters)

    @property
    def block_rows(self) -> int:
        if self.chunks is not None:
            return int(self.chunks[0])
        return super().block_rows

    # ---- opening, once per process ----------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_local"]
        state.pop("_bases", None)  # rebuilt from the plan
        state["_cache"] = None
        state["_pid"] = -1
        plan = state["_byte_plan"]
        if isinstance(plan, _Plan) and plan.offsets.size > _PICKLED_PLAN_CHUNKS:
            state["_byte_plan"] = _REBUILD
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = _Handles()

    def _handles(self) -> _Handles:
        # After fork the parent's handles, and its cache's lock, are unusable:
        # each process opens its own and decodes into its own cache.
        pid = os.getpid()
        if self._pid != pid:
            self._local = _Handles()
            self._cache = _ChunkCache(self.chunk_cache_bytes)
            self._pid = pid
        return self._local

    def _file_bytes(self) -> np.ndarray:
        local = self._handles()
        if local.bytes is None:
            with local.lock:
                if local.bytes is None:
                    self._map_file(local)
        return local.bytes  # type: ignore[return-value]

    def _map_file(self, local: _Handles) -> None:
        raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        at = self._rows_offset()
        if at is not None:
            local.rows = np.ndarray((len(self), *self.shape[1:]), self.dtype, raw, at)
        plan, w = self._plan(), self.row_nbytes
        if at is None and plan.sizes is None and 0 < w <= raw.size:
            # Each row as one `w`-byte item at any byte offset: a gather
            # copies each row with one memcpy (a (n, w) uint8 view copies
            # byte by byte).
            local.items = np.ndarray(
                (raw.size - w + 1,), np.dtype((np.void, w)), raw, strides=(1,)
            )
        local.bytes = raw  # last: threads that find it set use the rest unlocked

    def file_rows(self) -> tuple[str, int] | None:
        at = self._rows_offset()
        return None if at is None else (self.path, at)

    # Direct I/O for block shuffle over a dataset larger than memory, where its
    # rows lie one after another in the file (`file_rows`), as for a `.npy`.
    @property
    def direct_capable(self) -> bool:
        return (
            hasattr(os, "O_DIRECT")
            and not self.__dict__.get("_no_direct", False)
            and self.file_rows() is not None
        )

    def read_window(self, ranges: Sequence[tuple[int, int]]) -> RowWindow | None:
        if not self.direct_capable:
            return None
        at = self._rows_offset()
        assert at is not None  # direct_capable
        got = read_direct(self.path, at, self.dtype, self.shape[1:], ranges)
        if got is None:
            self._no_direct = True  # the file system refused O_DIRECT
        return got

    def window_origin(self) -> int | None:
        if not self.direct_capable:
            return None
        return direct_origin([self._rows_offset() or 0], self.row_nbytes)

    def _row_bases(self) -> np.ndarray:
        """Per chunk c, where row 0 would lie if chunk c held it: row i of chunk
        c lies at byte `bases[c] + i * row_nbytes`. Once per process."""
        bases = self.__dict__.get("_bases")
        if bases is None:
            plan = self._plan()
            steps = np.arange(plan.offsets.size, dtype=np.int64) * plan.rows
            bases = self._bases = plan.offsets - steps * self.row_nbytes
        return bases

    def _rows_offset(self) -> int | None:
        """The byte of the file where row 0 lies when every row lies one after
        another from it: contiguous data, or chunks stored back to back in row
        order (as h5py writes a dataset given whole); else None. Gathers from
        such rows run at np.take's speed, ~1.3x the per-row byte offsets of
        `_gather_bytes` under global shuffle. From the plan and the file's
        size, once per object: the window threads of direct I/O ask for it
        on every window."""
        if "_rows_at" not in self.__dict__:
            at = None
            plan = self._plan() if self._byte_plan is not None else None
            w, n = self.row_nbytes, len(self)
            if plan is not None and plan.sizes is None and n * w:
                first = int(plan.offsets[0])
                in_order = not np.any(np.diff(plan.offsets) != plan.rows * w)
                if in_order and first + n * w <= os.path.getsize(self.path):
                    at = first
            self._rows_at = at
        return self._rows_at

    def _dataset(self) -> Any:
        local = self._handles()
        if local.ds is None:
            with local.lock:
                if local.ds is None:
                    f = _h5py().File(
                        self.path,
                        "r",
                        rdcc_nbytes=self.chunk_cache_bytes,
                        rdcc_nslots=CHUNK_CACHE_SLOTS,
                    )
                    local.ds = f[self.key]
        return local.ds

    # ---- reading -----------------------------------------------------------------
    def _plan(self) -> _Plan:
        if isinstance(self._byte_plan, str):
            self._byte_plan = self._plan_direct_reads(self._dataset())
        return self._byte_plan  # type: ignore[return-value]

    def will_need(self, ranges: Sequence[tuple[int, int]]) -> bool:
        if self._byte_plan is None:  # read through h5py: no byte spans
            return True
        plan = self._plan()
        rows, w = plan.rows, self.row_nbytes
        spans = []
        for a, b in ranges:
            for c in range(a // rows, -(-b // rows)):
                if plan.sizes is not None:  # compressed: the whole stored chunk
                    spans.append((int(plan.offsets[c]), int(plan.sizes[c])))
                else:  # the rows' own bytes (contiguous data is one chunk)
                    lo, hi = max(a, c * rows), min(b, (c + 1) * rows)
                    at = int(plan.offsets[c]) + (lo - c * rows) * w
                    spans.append((at, (hi - lo) * w))
        return will_need(self.path, spans)

    def _gather_bytes(self, idx: np.ndarray) -> np.ndarray:
        plan = self._plan()
        rows, width = plan.rows, self.row_nbytes
        if width == 0:
            return np.empty((idx.size, *self.shape[1:]), dtype=self.dtype)
        raw = self._file_bytes()
        local = self._local
        if local.rows is not None:
            return gather_rows(local.rows, idx)
        if local.items is None:  # not even one row: the file was cut short
            raise OSError(f"{self._where()}: the file ends before its rows")
        if rows & (rows - 1) == 0:  # a power of two: a shift, not a division
            chunk = idx >> (rows.bit_length() - 1)
        else:
            chunk = idx // rows
        where = self._row_bases()[chunk]
        where += idx * width
        touch_row_heads(raw, where, width)
        out = local.items[where]
        return out.view(self.dtype).reshape(idx.size, *self.shape[1:])

    def _chunk(self, c: int, cache: bool = True) -> np.ndarray:
        """Chunk `c` decoded here, as read-only rows (cut at the dataset's end).

        Decoded chunks go to this process's LRU cache; two threads that miss
        the same chunk both decode it, and the cache keeps one.
        """
        self._handles()
        lru = self._cache
        if cache and lru is not None:
            block = lru.get(c)
            if block is not None:
                return block
        plan = self._plan()
        rows = plan.rows
        at, size = int(plan.offsets[c]), int(plan.sizes[c])  # type: ignore[index]
        nbytes = rows * self.row_nbytes  # HDF5 stores edge chunks whole
        stored = self._file_bytes()[at : at + size]
        try:
            if stored.size != size:
                raise ValueError("the file ends inside it")
            mask = int(plan.masks[c])  # type: ignore[index]
            data = _decode_chunk(stored, self._pipeline, mask, nbytes)  # type: ignore[arg-type]
        except ValueError as e:
            lo = c * rows
            raise CorruptChunkError(
                f"{self._where()}: chunk {c} (rows {lo}:{min(len(self), lo + rows)},"
                f" {size} bytes at byte {at}) does not decode: {e}"
            ) from e
        block = data.view(self.dtype).reshape(rows, *self.shape[1:])
        block = block[: min(rows, len(self) - c * rows)]
        if cache and lru is not None:
            lru.put(c, block, nbytes)
        return block

    def _read_decoded(self, idx: np.ndarray) -> np.ndarray:
        # Chunk by chunk, each taken from the cache or decoded once: memory
        # stays at the cache, the batch and the chunk being decoded.
        rows = self._plan().rows
        chunk = idx // rows
        cuts = np.flatnonzero(chunk[1:] != chunk[:-1]) + 1
        first = np.concatenate(([0], cuts)).tolist()
        last = np.concatenate((cuts, [idx.size])).tolist()
        out = batch_array((idx.size, *self.shape[1:]), self.dtype)
        for a, b in zip(first, last, strict=True):
            c = int(chunk[a])
            # In range by construction; mode="raise" would copy through a buffer.
            np.take(
                self._chunk(c), idx[a:b] - c * rows, axis=0, out=out[a:b], mode="clip"
            )
        return out

    def _read_decoded_range(self, start: int, stop: int) -> np.ndarray:
        out = batch_array((stop - start, *self.shape[1:]), self.dtype)
        rows = self._plan().rows
        if stop > start:
            for c in range(start // rows, (stop - 1) // rows + 1):
                lo = c * rows
                a, b = max(start, lo), min(stop, lo + rows)
                out[a - start : b - start] = self._chunk(c)[a - lo : b - lo]
        return out

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        if self._byte_plan is not None:
            plan = self._plan()
            if plan.sizes is not None:
                return self._read_decoded_range(start, stop)
            self._file_bytes()
            if self._local.rows is not None:
                return copy_rows(self._local.rows[start:stop])
            return self._gather_bytes(np.arange(start, stop, dtype=np.int64))
        return np.asarray(self._dataset()[start:stop])

    def _read_sorted(self, idx: np.ndarray) -> np.ndarray:
        if self._byte_plan is not None:
            if self._plan().sizes is not None:
                return self._read_decoded(idx)
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
        out = batch_array((idx.size, *self.shape[1:]), self.dtype)
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
            "decode": self.decode,
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
