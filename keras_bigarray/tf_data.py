"""The tf.data path: a `BigArrayDataset` as a `tf.data.Dataset` of batches, read in
parallel in a deterministic order, with static shapes and the storage dtype, no
data in the graph, and optional prefetching to a device. Imports TensorFlow."""

from __future__ import annotations

import atexit
import functools
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import tensorflow as tf

from keras_bigarray import _keras_adapter
from keras_bigarray._rowmap import map_rows
from keras_bigarray.reading import BatchReadError, flatten, map_structure
from keras_bigarray.sampling import _CHUNK as _SAMPLER_CHUNK_ROWS
from keras_bigarray.sources import MemoryArray, RowWindow, ShardedArray

if TYPE_CHECKING:
    from keras_bigarray.dataset import BigArrayDataset

__all__ = ["distribute_dataset", "element_spec", "for_input_context", "to_tf_dataset"]


# ---- calls from TensorFlow's threads into Python, and the exit -----------------------
# A script that leaves an iteration mid-epoch and exits hung when reads were in
# flight (measured, to_tf_dataset with per-batch reads over cold files: 2 of 2
# exits after 5 batches of an 8 GB .npy hung, 5 of 5 after 300 of a 29 GiB
# one, 3 of 3 of a 256 MiB one; after the fix, none). As the interpreter finalizes, a
# thread that TensorFlow called into Python loses itself at its next GIL
# acquire, and the iterator, deleted at exit, waits for that call forever. So
# every Python call of this module's pipelines is counted, and at exit (atexit
# runs before finalization) new calls fail at once while the calls in flight
# finish, for at most `_EXIT_WAIT_S`.
_EXIT_WAIT_S = 30.0
_EXIT_QUIET_S = 0.1  # no call for this long: TensorFlow has stopped calling
_calls_lock = threading.Lock()
_calls_in_flight = 0
_last_call_end = 0.0
_exiting = False


class InterpreterExitingError(RuntimeError):
    """A batch asked for after the interpreter began to exit."""


def _python_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, counted while it runs and refused once the interpreter exits."""

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        global _calls_in_flight, _last_call_end
        with _calls_lock:
            if _exiting:
                raise InterpreterExitingError(
                    "keras-bigarray: the interpreter is exiting; no more batches"
                )
            _calls_in_flight += 1
        try:
            return fn(*args)
        finally:
            with _calls_lock:
                _calls_in_flight -= 1
                _last_call_end = time.monotonic()

    return call


def _python_iter(make: Callable[[], Iterator[Any]]) -> Callable[[], Iterator[Any]]:
    """A generator factory for `from_generator` whose every step is counted."""

    def gen() -> Iterator[Any]:
        it = _python_call(make)()
        step = _python_call(next)
        while True:
            try:
                item = step(it)
            except StopIteration:
                return
            yield item

    return gen


@atexit.register
def _drain_at_exit(timeout: float = _EXIT_WAIT_S) -> bool:
    """Refuses new calls and waits for the ones in flight; True once none is."""
    global _exiting
    with _calls_lock:
        _exiting = True
    end = time.monotonic() + timeout
    while True:
        with _calls_lock:
            quiet = time.monotonic() - _last_call_end >= _EXIT_QUIET_S
            if _calls_in_flight == 0 and quiet:
                return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.01)


def _all_batches_full(ds: BigArrayDataset) -> bool:
    if ds.pad_remainder or ds.drop_remainder:
        return True
    return all(n % ds.batch_size == 0 for n in ds.sampler.layout.lengths)


def _as_tuples(s: Any) -> Any:
    # tf.data reads a Python list as one tensor to stack, not as a structure:
    # `y=[y1, y2]` for a two-output model must travel as a tuple.
    if isinstance(s, dict):
        return {k: _as_tuples(v) for k, v in s.items()}
    if isinstance(s, (list, tuple)):
        return tuple(_as_tuples(v) for v in s)
    return s


def _native_order(a: np.ndarray) -> np.ndarray:
    # TensorFlow takes an array's bytes as they are: a big-endian one ('>f4',
    # as HDF5 and .npy files may store) would arrive as garbage.
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def _as_spec(leaves: list[Any], spec: Any) -> Any:
    """Batch tensors in `flatten(spec)` order, shaped and nested as `spec`."""
    for t, s in zip(leaves, flatten(spec), strict=True):
        t.set_shape(s.shape)
    it = iter(leaves)
    return map_structure(lambda _s, _p: next(it), spec)


def _claim_op(ds: BigArrayDataset) -> tf.Tensor:
    """The next epoch of `ds`, claimed as an iteration starts."""
    return tf.numpy_function(
        _python_call(lambda: np.int64(ds._claim_epoch())), [], tf.int64, stateful=True
    )


def element_spec(ds: BigArrayDataset) -> tuple[Any, ...]:
    """The `tf.TensorSpec` structure of one batch, from metadata alone."""
    b = ds.batch_size if _all_batches_full(ds) else None

    def spec(src: Any, _: str) -> tf.TensorSpec:
        return tf.TensorSpec((b, *src.shape[1:]), tf.as_dtype(src.dtype))

    x = map_structure(spec, ds.x)
    y = None if ds.y is None else map_structure(spec, ds.y)
    sw = None if ds.sample_weight is None else map_structure(spec, ds.sample_weight)
    if ds.pad_remainder:
        if sw is None:
            sw = tf.TensorSpec((b,), tf.float32)
        else:
            sw = map_structure(
                lambda s, _: tf.TensorSpec(
                    s.shape,
                    tf.as_dtype(np.result_type(s.dtype.as_numpy_dtype, np.float32)),
                ),
                sw,
            )
    if sw is not None and y is not None:
        return _as_tuples((x, y, sw))
    if y is not None:
        return _as_tuples((x, y))
    return _as_tuples((x,))


def to_tf_dataset(
    ds: BigArrayDataset,
    *,
    device: str | None = None,
    num_parallel_reads: int | None = None,
) -> tf.data.Dataset:
    """A `tf.data.Dataset` of the batches of `ds`.

    Each full iteration reads the next epoch (a new order under shuffling), so
    `model.fit(tfds, epochs=3)` reshuffles without help. Batches are read by
    `num_parallel_reads` parallel calls (default: `max(2, ds.workers)`),
    delivered in order, at most `ds.max_queue_size` ahead: memory is bounded
    by the queue, whatever the size of the array. Where every array's rows lie
    one after another in a file (`.npy`, raw, HDF5 stored so), in a folder of
    such shards or in memory, a batch is a `tf.gather` of its rows from
    tensors over the files' memory maps, with no Python call per batch
    (`_gathered`); block shuffle over
    files read with direct I/O (larger than memory) gathers each batch from
    its window's buffer instead (`_windowed`); otherwise a
    `tf.numpy_function` reads it. All give the same batches. A dataset that is one of
    several shards (`num_shards > 1`) turns TensorFlow's auto-sharding off: it
    is sharded already. tf.data's autotuner is off too (every buffer here is
    fixed; on a small machine it stalled whole epochs); for transformations of
    your own with `AUTOTUNE`, turn it back on with `.with_options(opts)`
    where `opts.autotune.enabled = True`.

    Args:
        ds: the `BigArrayDataset`.
        device: prefetch batches to this device (e.g. `"/gpu:0"`); must be the
            last transformation, so apply nothing after it.
        num_parallel_reads: batches read at once; None: `max(2, ds.workers)`.

    Returns:
        A `tf.data.Dataset` whose elements are `(x,)`, `(x, y)` or
        `(x, y, sample_weight)` in the storage dtype.
    """
    spec = element_spec(ds)
    flat_spec = flatten(spec)
    tout = [s.dtype for s in flat_spec]
    reader = ds.reader
    n = len(ds)

    @_python_call
    def read(epoch: np.int64, index: np.int64) -> list[np.ndarray]:
        batch = reader.read(int(epoch), int(index))
        return [_native_order(a) for a in flatten(batch[: len(spec)])]

    def read_op(epoch: tf.Tensor, index: tf.Tensor) -> Any:
        leaves = tf.numpy_function(read, [epoch, index], tout, name="bigarray_read")
        return _as_spec(leaves, spec)

    parallel = num_parallel_reads or max(2, ds.workers)
    mapped = _mapped_tensors(ds, spec)
    if mapped is not None:
        return _finish(ds, _gathered(ds, mapped, spec, parallel), n, device)
    windowed = _windowed(ds, spec, parallel)
    if windowed is not None:
        return _finish(ds, windowed, n, device)

    if ds.use_multiprocessing:
        # Worker processes read; tf.data only carries their batches in order.
        batches = tf.data.Dataset.from_generator(
            _python_iter(
                lambda: (
                    _as_tuples(
                        map_structure(lambda a, _: _native_order(a), b[: len(spec)])
                    )
                    for b in ds.iterate_epoch()
                )
            ),
            output_signature=spec,
        )
        return _finish(ds, batches, n, device)

    epochs = tf.data.Dataset.from_tensors(np.int64(0)).map(lambda _: _claim_op(ds))
    indices = epochs.flat_map(lambda e: tf.data.Dataset.range(n).map(lambda i: (e, i)))
    batches = indices.map(read_op, num_parallel_calls=parallel, deterministic=True)
    return _finish(ds, batches, n, device)


def _mapped_tensors(ds: BigArrayDataset, spec: Any) -> list[_Mapped] | None:
    """Every array of `ds` as a tensor over a memory map of its file, without a
    copy, for `_gathered`; None where that path does not apply.

    It applies where every array's rows lie one after another in a file
    (`BigArray.file_rows`: `.npy`, raw, HDF5 stored so), or in files of a
    folder of shards whose headers agree (`_rowmap.map_rows`), or in memory (C order;
    copied where not aligned, up to `_COPY_IN_MEMORY_BYTES`) at a 64-byte aligned
    address (TensorFlow aborts on less), in native byte order, in threads of
    this process, without padding, and not read with direct I/O (block
    shuffle over arrays larger than memory keeps its own reads). The maps are
    copy-on-write: nothing can reach the file.
    """
    if ds.use_multiprocessing or ds.pad_remainder or not tf.executing_eagerly():
        return None
    reader = ds.reader
    if reader._direct_sources():
        return None
    flat_spec = flatten(spec)
    tensors = []
    for src, _ in _leaves(ds, spec):
        tensor = _mapped_tensor(src, flat_spec[len(tensors)])
        if tensor is None:
            return None
        tensors.append(tensor)
    return tensors


def _leaves(ds: BigArrayDataset, spec: Any) -> list[tuple[Any, str]]:
    """`(source, structure path)` of every array a batch carries, in
    `flatten(spec)` order; the paths are `BatchReader`'s."""
    out: list[tuple[Any, str]] = []
    parts = ds.reader.data[: len(spec)]
    for name, part in zip(("x", "y", "sample_weight"), parts, strict=False):
        map_structure(lambda src, path: out.append((src, path)), part, name)
    return out


def _dlpack_tensor(a: np.ndarray, dtype: tf.DType) -> Any:
    """A tensor over `a`'s memory, no copy; None where TensorFlow cannot
    take it so: an address not 64-byte aligned (TensorFlow aborts on less),
    a dtype DLPack cannot carry (bfloat16, ...), or another dtype than the
    batch's."""
    if a.ctypes.data % 64:
        return None
    try:
        tensor = tf.experimental.dlpack.from_dlpack(a.__dlpack__())
    except Exception:
        return None
    return tensor if tensor.dtype == dtype else None


# An array in memory that TensorFlow cannot take as it is (an address not
# 64-byte aligned) is copied into a tensor up to this size (labels, weights).
_COPY_IN_MEMORY_BYTES = 64 << 20


class _Mapped(NamedTuple):
    """A leaf's rows as one tensor (`_mapped_tensor`). For a folder of shards,
    `bounds` (each shard's first row, then the end) and `delta` (added to a
    row of shard k: where it is in `tensor`, `_rowmap.map_rows`)."""

    tensor: Any
    bounds: np.ndarray | None = None
    delta: np.ndarray | None = None

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Where the dataset's `rows` are in `tensor`."""
        if self.bounds is None:
            return rows
        return rows + self.delta[np.searchsorted(self.bounds, rows, "right") - 1]


def _mapped_tensor(src: Any, leaf_spec: tf.TensorSpec) -> _Mapped | None:
    """`_mapped_rows` of `src`, or None (see `_mapped_tensors`)."""
    if isinstance(src, ShardedArray):
        files = src._files()
        if files is None or not src.dtype.isnative:
            return None
        got = map_rows(
            [(*f, len(p)) for f, p in zip(files, src.parts, strict=True)],
            src.dtype,
            src.shape[1:],
        )
        if got is None:
            return None
        array, shift = got
        tensor = _dlpack_tensor(array, leaf_spec.dtype)
        if tensor is None:
            return None
        return _Mapped(tensor, src.bounds.copy(), shift - src.bounds[:-1])
    tensor = _mapped_rows(src, leaf_spec)
    return None if tensor is None else _Mapped(tensor)


def _mapped_rows(src: Any, leaf_spec: tf.TensorSpec) -> Any:
    """A tensor over a copy-on-write memory map of the rows of `src` or, for
    an array in memory, over the array itself (a copy if small and not
    aligned); None where neither applies."""
    if isinstance(src, MemoryArray):
        a = src.array
        if not (a.flags.c_contiguous and a.dtype.isnative):
            return None
        tensor = _dlpack_tensor(a, leaf_spec.dtype)
        if tensor is None and a.nbytes <= _COPY_IN_MEMORY_BYTES:
            tensor = tf.convert_to_tensor(a)
        return (
            tensor if tensor is not None and tensor.dtype == leaf_spec.dtype else None
        )
    where = src.file_rows()
    if where is None or not src.dtype.isnative:
        return None
    path, offset = where
    try:
        rows = np.memmap(path, src.dtype, "c", offset, src.shape)
    except (OSError, ValueError):  # e.g. refused under strict overcommit
        return None
    return _dlpack_tensor(rows, leaf_spec.dtype)


def _batch_rows(
    ds: BigArrayDataset, epoch: int, first: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows (in the sources' numbering) of batches `first:stop` of `epoch`,
    one batch a row, zero-padded, and each batch's length. Under block
    shuffle, hints the blocks of their windows to the OS as `reader.read`
    does."""
    sampler, reader = ds.sampler, ds.reader
    rows = np.zeros((stop - first, ds.batch_size), dtype=np.int64)
    lengths = np.zeros(stop - first, dtype=np.int32)
    for j, i in enumerate(range(first, stop)):
        if sampler.mode == "block":
            reader._hint_windows(epoch, i)
        got, _ = sampler.batch(epoch, i)
        rows[j, : got.size] = got
        lengths[j] = got.size
    rows += reader.row_offset
    return rows, lengths


def _gather_batch(
    idx: Any,
    length: Any,
    arrays: Any,
    picks: list[tuple[int, int]],
    full: bool,
    spec: Any,
) -> Any:
    """One batch: leaf j is `tf.gather(arrays[a], idx[k])` for `(a, k) =
    picks[j]`, each index array cut to `length` unless every batch is full."""
    idx = idx if full else tuple(i[:length] for i in idx)
    return _as_spec([tf.gather(arrays[a], idx[k]) for a, k in picks], spec)


def _gathered(
    ds: BigArrayDataset, mapped: list[_Mapped], spec: Any, parallel: int
) -> tf.data.Dataset:
    """The batches of `ds` as `tf.gather` of each batch's rows from the
    tensors of `mapped` (`_mapped_tensors`): no Python call per batch, and no
    copy of the rows but the batch itself. The rows are the sampler's, so
    every batch is the one `reader.read` returns.

    The tensors reach the pipeline through a `py_function` once per epoch,
    never captured in its graph: a captured tensor would be copied whenever
    tf.data rewrites or serializes the graph (default optimizations,
    `tf.distribute`'s replication).
    """
    n, b = len(ds), ds.batch_size
    per = max(1, _SAMPLER_CHUNK_ROWS // b)  # one sampler chunk a Python call
    tensors = [m.tensor for m in mapped]
    touts = [t.dtype for t in tensors]
    # Index arrays: 0 is the dataset's rows; a folder of shards has its own.
    moved = [i for i, m in enumerate(mapped) if m.bounds is not None]
    picks = [(i, 1 + moved.index(i) if i in moved else 0) for i in range(len(mapped))]
    full = _all_batches_full(ds)

    @_python_call
    def the_tensors() -> list[Any]:
        return tensors

    @_python_call
    def indices(epoch: np.int64, chunk: np.int64) -> list[np.ndarray]:
        first = int(chunk) * per
        rows, lengths = _batch_rows(ds, int(epoch), first, min(first + per, n))
        return [rows, *(mapped[i].rows(rows) for i in moved), lengths]

    def start_epoch(_: Any) -> tuple[Any, ...]:
        epoch = _claim_op(ds)
        arrays = tf.py_function(the_tensors, [], touts)
        for a, t in zip(arrays, tensors, strict=True):
            a.set_shape(t.shape)
        return epoch, tuple(arrays)

    def epoch_rows(epoch: Any, arrays: Any) -> tf.data.Dataset:
        def chunk_rows(c: Any) -> tf.data.Dataset:
            outs = tf.numpy_function(
                indices,
                [epoch, c],
                [tf.int64] * (1 + len(moved)) + [tf.int32],
                name="bigarray_rows",
            )
            for t in outs[:-1]:
                t.set_shape((None, b))
            outs[-1].set_shape((None,))
            return tf.data.Dataset.from_tensor_slices((tuple(outs[:-1]), outs[-1]))

        chunks = tf.data.Dataset.range(-(-n // per)).flat_map(chunk_rows)
        return chunks.map(lambda idx, length: (idx, length, arrays))

    def gather(idx: Any, length: Any, arrays: Any) -> Any:
        return _gather_batch(idx, length, arrays, picks, full, spec)

    epochs = tf.data.Dataset.from_tensors(np.int64(0)).map(start_epoch)
    return epochs.flat_map(epoch_rows).map(
        gather, num_parallel_calls=parallel, deterministic=True
    )


def _windowed(ds: BigArrayDataset, spec: Any, parallel: int) -> Any:
    """Block shuffle over arrays that read their windows with direct I/O
    (larger than memory): each window reaches TensorFlow once, as a tensor
    over the window's own buffer (DLPack, no copy), and every batch is a
    `tf.gather` from it, as `_gathered` does from whole files. Arrays read
    otherwise are gathered from their memory maps. The batches are the
    sampler's, the ones `reader.read` returns. None where this does not apply
    (as `_mapped_tensors`, and for a direct array whose windows are not one
    buffer with rows 64-byte aligned: `BigArray.window_origin`).

    A window's buffer goes back to the pool only once no tensor over it lives
    (`RowWindow.held_view`). Measured on a 29 GiB `.npy`, cold, 2,000
    batches iterated eagerly: 0.72-0.80 core-seconds a GB, against 1.09-1.18
    for the per-batch reads, which copy each batch twice (the gather, then
    into a tensor); one fit epoch over its first 8 GB: 680-692 MB/s against
    666-669. On 4 GiB of `.npy` shards, cold: 0.60-0.65 against 0.83-0.85
    core-seconds a GB, 1,977-2,057 against 1,592-1,643 MB/s.
    """
    reader, sampler = ds.reader, ds.sampler
    if (
        sampler.mode != "block"
        or ds.use_multiprocessing
        or ds.pad_remainder
        or not tf.executing_eagerly()
    ):
        return None
    direct = reader._direct_sources()
    if not direct:
        return None
    flat_spec = flatten(spec)
    windowed: list[tuple[Any, str, Any]] = []  # (source, path, dtype), direct
    mapped: list[_Mapped] = []  # the others
    # Per leaf: (windowed?, its index there). Index arrays: 0 is the
    # dataset's rows, then one per windowed array (its window's positions),
    # then one per folder of shards mapped (`_Mapped.rows`).
    order: list[tuple[bool, int]] = []
    for (src, path), leaf_spec in zip(_leaves(ds, spec), flat_spec, strict=True):
        if path in direct:
            origin = src.window_origin()
            raw = np.zeros(src.dtype.itemsize * math.prod(src.shape[1:]) + 64, np.uint8)
            probe = raw[-raw.ctypes.data % 64 :][: raw.size - 64].view(src.dtype)
            if (
                origin is None
                or origin % 64
                or not src.dtype.isnative
                or _dlpack_tensor(probe, leaf_spec.dtype) is None
            ):
                return None
            order.append((True, len(windowed)))
            windowed.append((src, path, leaf_spec.dtype))
        else:
            m = _mapped_tensor(src, leaf_spec)
            if m is None:
                return None
            order.append((False, len(mapped)))
            mapped.append(m)
    n, b = len(ds), ds.batch_size
    per = reader._group_rows()
    last = (n - 1) // per
    full = _all_batches_full(ds)
    k, m = len(windowed), len(mapped)
    moved = [i for i, mp in enumerate(mapped) if mp.bounds is not None]
    picks = [
        (i, 1 + i)
        if is_window
        else (k + i, 1 + k + moved.index(i) if i in moved else 0)
        for is_window, i in order
    ]
    touts = (
        [dtype for _, _, dtype in windowed]
        + [mp.tensor.dtype for mp in mapped]
        + [tf.int64] * (1 + k + len(moved))
        + [tf.int32]
    )

    @_python_call
    def group(epoch: Any, g: Any) -> list[Any]:
        e, g = int(epoch), int(g)
        first, stop = g * per, min(g * per + per, n)
        rows, lengths = _batch_rows(ds, e, first, stop)  # hints the mapped arrays
        real = np.arange(b) < lengths[:, None]
        try:
            windows = reader._windows.get(e, g, last)
        except Exception as err:
            raise BatchReadError(
                f"reading the window of batches {first}-{stop - 1} of epoch {e} "
                f"with direct I/O failed: {type(err).__name__}: {err}"
            ) from err
        held, positions = [], []
        for src, path, dtype in windowed:
            pos = np.zeros_like(rows)
            window = windows.get(path)
            tensor = None
            if isinstance(window, RowWindow):
                pos[real] = window.positions(rows[real])
                tensor = _dlpack_tensor(window.held_view(), dtype)
            if tensor is None:  # direct I/O refused after all: the rows, read
                parts = [
                    src.read_sorted(r[r_real], unique=True)
                    for r, r_real in zip(rows, real, strict=True)
                ]
                pos[real] = np.arange(int(lengths.sum()))
                tensor = tf.convert_to_tensor(np.concatenate(parts))
            held.append(tensor)
            positions.append(pos)
        return [
            *held,
            *(mp.tensor for mp in mapped),
            rows,
            *positions,
            *(mapped[i].rows(rows) for i in moved),
            lengths,
        ]

    def group_batches(epoch: Any, g: Any) -> tf.data.Dataset:
        outs = tf.py_function(group, [epoch, g], touts)
        for t, (src, _, _) in zip(outs[:k], windowed, strict=True):
            t.set_shape((None, *src.shape[1:]))
        for t, mp in zip(outs[k : k + m], mapped, strict=True):
            t.set_shape(mp.tensor.shape)
        for t in outs[k + m : -1]:
            t.set_shape((None, b))
        outs[-1].set_shape((None,))
        arrays = tuple(outs[: k + m])
        slices = (tuple(outs[k + m : -1]), outs[-1])
        return tf.data.Dataset.from_tensor_slices(slices).map(
            lambda idx, length: (idx, length, arrays)
        )

    def gather(idx: Any, length: Any, arrays: Any) -> Any:
        return _gather_batch(idx, length, arrays, picks, full, spec)

    groups = tf.data.Dataset.range(last + 1)
    epochs = tf.data.Dataset.from_tensors(np.int64(0)).map(lambda _: _claim_op(ds))
    batches = epochs.flat_map(lambda e: groups.flat_map(lambda g: group_batches(e, g)))
    return batches.map(gather, num_parallel_calls=parallel, deterministic=True)


def _finish(
    ds: BigArrayDataset, batches: tf.data.Dataset, n: int, device: str | None
) -> tf.data.Dataset:
    batches = batches.apply(tf.data.experimental.assert_cardinality(n))
    options = tf.data.Options()
    # Every buffer and parallelism here is fixed, so the autotuner has nothing
    # to tune, and on a 2-core VM it did harm: with it on, 5 of 14 fit epochs
    # (steps_per_execution=32) ran at ~55% speed with both cores half idle for
    # the whole epoch; with it off, none of 14 did.
    options.autotune.enabled = False
    if ds.num_shards > 1:
        # Already one shard of several: sharding again would drop rows.
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF
        )
    # A fixed queue, not AUTOTUNE: tf.data's autotuner grows its buffers over a
    # long epoch, so memory would grow with the array. max_queue_size batches
    # ahead of the step keep a reader busy while the step runs.
    batches = batches.with_options(options).prefetch(ds.max_queue_size)
    if device is not None:
        batches = batches.apply(tf.data.experimental.prefetch_to_device(device))
    return batches


def for_input_context(
    ds: BigArrayDataset, context: tf.distribute.InputContext
) -> BigArrayDataset:
    """The part of `ds` that one `tf.distribute` input pipeline reads.

    `ds.batch_size` is the global batch. The result is shard
    `context.input_pipeline_id` of `context.num_input_pipelines`, batched for
    the replicas this pipeline feeds: `to_tf_dataset` splits each of its
    batches into per-replica batches (`get_per_replica_batch_size`).
    """
    per_replica = context.get_per_replica_batch_size(ds.batch_size)
    local = context.num_replicas_in_sync // context.num_input_pipelines
    return ds.replace(
        batch_size=per_replica * local,
        num_shards=ds.num_shards * context.num_input_pipelines,
        shard_index=ds.shard_index * context.num_input_pipelines
        + context.input_pipeline_id,
    )


def distribute_dataset(
    strategy: tf.distribute.Strategy,
    ds: BigArrayDataset,
    *,
    device: str | None = None,
) -> Any:
    """`ds` as per-worker pipelines of `strategy` (`distribute_datasets_from_function`).

    Each input pipeline (one per worker) reads its own shard, with no rows
    read and discarded, and splits its batches over its local replicas. Pass
    the result to `model.fit`, which then runs exactly `len(shard)` steps an
    epoch on every worker. With `pad_remainder=True` every replica gets a
    full batch on every step.

    Args:
        strategy: a `tf.distribute.Strategy`, e.g. `MirroredStrategy` or
            `MultiWorkerMirroredStrategy`.
        ds: the dataset, with `batch_size` the global batch size.
        device: unused by tf.distribute (it places batches on each replica's
            device itself); accepted for symmetry and must be None.
    """
    if device is not None:
        raise ValueError(
            "device= does not apply here: tf.distribute prefetches each "
            "replica's batches to its own device"
        )

    parts: list[BigArrayDataset] = []

    def make(context: tf.distribute.InputContext) -> tf.data.Dataset:
        part = for_input_context(ds, context)
        parts.append(part)
        local = context.num_replicas_in_sync // context.num_input_pipelines
        batches = to_tf_dataset(part)
        if local > 1:
            batches = batches.rebatch(part.batch_size // local)
        return batches

    distributed = strategy.distribute_datasets_from_function(make)
    return DistributedBatches(distributed, len(parts[0]), ds.batch_size)


class DistributedBatches(_keras_adapter.DataAdapter):
    """Per-worker pipelines with a known step count, for `model.fit`.

    Keras cannot count the steps of a distributed dataset, so it would read
    until the input runs out; tf.distribute then feeds a last step of dummy
    zero rows (static shapes), which would be trained on. Knowing the steps,
    Keras stops exactly at the end of the epoch. Iterate it as the
    `tf.distribute.DistributedDataset` it wraps.
    """

    def __init__(self, distributed: Any, num_batches: int, batch_size: int):
        self.distributed = distributed
        self._num_batches = num_batches
        self._batch_size = batch_size

    def __iter__(self) -> Any:
        return iter(self.distributed)

    def get_tf_dataset(self) -> Any:
        return self.distributed

    def get_numpy_iterator(self) -> Any:
        raise NotImplementedError(
            "distribute_dataset() is for the TensorFlow backend; with other "
            "backends pass the BigArrayDataset itself to fit"
        )

    get_jax_iterator = get_torch_dataloader = get_numpy_iterator

    @property
    def num_batches(self) -> int:
        return self._num_batches

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def has_partial_batch(self) -> bool:
        return False

    @property
    def partial_batch_size(self) -> None:
        return None
