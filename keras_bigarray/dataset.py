"""The Keras face: `BigArrayDataset`, a `keras.utils.PyDataset` over arrays on disk
that `model.fit`, `evaluate` and `predict` take directly, with our seeded batch
order, thread or process workers, and a `tf.data` path under TensorFlow."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np

from keras_bigarray import _keras_adapter
from keras_bigarray.reading import BatchReader, flatten, map_structure
from keras_bigarray.sampling import Sampler, draw_seed, normalize_shuffle
from keras_bigarray.sources import DEFAULT_BLOCK_BYTES, BigArray, open_array

__all__ = ["BigArrayDataset"]

# Shuffle windows of this many blocks: 16 x 1 MiB keeps a window in the page
# cache of any machine while mixing rows from 16 places of the file per batch.
DEFAULT_SHUFFLE_WINDOW = 16

# Compressed sources with more blocks than this get a warning under global
# shuffle: below it, every chunk fits h5py's chunk cache and little is lost.
_MANY_BLOCKS = 64


def _open_leaf(leaf: Any, path: str) -> BigArray:
    try:
        return open_array(leaf)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{path}: {e}") from e


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, received {name}={value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, received {name}={value}")
    return int(value)


def _row_range(rows: Any, n: int) -> tuple[int, int]:
    if rows is None:
        return 0, n
    if isinstance(rows, range):
        rows = slice(rows.start, rows.stop, rows.step)
    if isinstance(rows, tuple) and len(rows) == 2:
        rows = slice(*rows)
    if not isinstance(rows, slice):
        raise TypeError(
            f"rows must be a slice, range or (start, stop) pair; received {rows!r}"
        )
    start, stop, step = rows.indices(n)
    if step != 1:
        raise ValueError(f"rows must be contiguous (step 1); received {rows!r}")
    return start, max(start, stop)


# ---- worker pools, shared by the iterators of one dataset ---------------------------

_WORKER_READER: BatchReader | None = None


def _init_worker(reader: BatchReader) -> None:
    global _WORKER_READER
    # Each worker process reads a share of every window's batches: reading
    # whole windows with direct I/O in each would multiply the disk's reads,
    # so worker processes share the page cache instead.
    reader.disable_direct_io()
    _WORKER_READER = reader


def _read_in_worker(epoch: int, index: int) -> tuple[Any, ...]:
    assert _WORKER_READER is not None
    return _WORKER_READER.read(epoch, index)


class BigArrayDataset(keras.utils.PyDataset, _keras_adapter.DataAdapter):
    """Batches of arrays on disk for `model.fit`, `evaluate` and `predict`.

    Rows are read lazily, a batch at a time, in the storage dtype; memory does
    not grow with the array. The batch order is a pure function of `(seed,
    epoch, shard, batch)`: reproducible in any process and with any number of
    workers, different every epoch.

    Args:
        x: the inputs: a `BigArray`, an ndarray, a path (anything `open_array`
            takes), or a tuple, list or dict of them for multi-input models.
        y: the targets, same forms, or None.
        sample_weight: per-row weights, same forms, or None.
        batch_size: rows per batch.
        shuffle: `False` (sequential), `True` or `"global"` (a uniform
            permutation per epoch), or `"block"` (blocks of contiguous rows in
            permuted order, rows shuffled within a window of blocks: near-
            sequential I/O for disks and compressed HDF5). Within a shuffled
            batch, rows come in ascending row order.
        seed: the shuffle seed; None draws one, readable as `ds.seed`.
        drop_remainder: drop the last partial batch.
        pad_remainder: pad the last batch to `batch_size` with zero rows, and
            deliver 0/1 row weights as `sample_weight` (multiplied into given
            weights), so every batch has one shape.
        num_shards: how many shards (e.g. `tf.distribute` workers) split each
            epoch; every shard has the same number of batches and no row is on
            two shards. See `Sampler` for the tail of each epoch.
        shard_index: which shard this dataset reads.
        workers: batches read in parallel by `fit` (threads, or processes with
            `use_multiprocessing`).
        use_multiprocessing: read in worker processes; sources travel as paths
            (HDF5 included) and reopen there.
        max_queue_size: batches read ahead of the training step.
        rows: restrict the dataset to rows `start:stop` of the arrays (a slice,
            `range` or pair), without copying; see `validation_split`.
        block_rows: rows per block for `shuffle="block"`; defaults to the
            source's natural block (HDF5 chunk rows) grown to at least 1 MiB.
        shuffle_window: blocks per shuffle window for `shuffle="block"`.
        mp_context: start method for worker processes (`"fork"`, `"spawn"`,
            `"forkserver"`); None uses Python's default, as Keras does. Sources
            reopen in each worker, so all three work with HDF5; with spawn and
            forkserver the script needs an `if __name__ == "__main__":` guard.
        prefetch_to_device: under the TensorFlow backend, `model.fit(ds)`
            prefetches batches to this device (e.g. `"/gpu:0"`); Keras does no
            device prefetch of its own without a distribution strategy.

    Raises:
        ValueError, TypeError: at construction, for any bad argument or source,
            naming it; `FileNotFoundError` and `KeyError` from `open_array`.

    Example:

    ```python
    import keras_bigarray as kb

    ds = kb.BigArrayDataset("x.npy", "y.npy", batch_size=256, shuffle=True)
    train, val = ds.validation_split(0.1)
    model.fit(train, validation_data=val, epochs=3)
    ```
    """

    def __init__(
        self,
        x: Any,
        y: Any = None,
        sample_weight: Any = None,
        *,
        batch_size: int = 32,
        shuffle: bool | str = True,
        seed: int | None = None,
        drop_remainder: bool = False,
        pad_remainder: bool = False,
        num_shards: int = 1,
        shard_index: int = 0,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
        rows: Any = None,
        block_rows: int | None = None,
        shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
        mp_context: str | None = None,
        prefetch_to_device: str | None = None,
    ):
        super().__init__(
            workers=_check_int("workers", workers, 0),
            use_multiprocessing=bool(use_multiprocessing),
            max_queue_size=_check_int("max_queue_size", max_queue_size, 1),
        )
        if x is None:
            raise ValueError("x is required: the inputs of the model")
        self.x = map_structure(_open_leaf, x, "x")
        self.y = None if y is None else map_structure(_open_leaf, y, "y")
        self.sample_weight = (
            None
            if sample_weight is None
            else map_structure(_open_leaf, sample_weight, "sample_weight")
        )
        self._check_lengths()
        n = len(flatten(self.x)[0])
        self.rows = _row_range(rows, n)

        self._batch_size = _check_int("batch_size", batch_size, 1)
        self.shuffle = normalize_shuffle(shuffle)
        if seed is None:
            seed = draw_seed()
        self.seed = _check_int("seed", seed, 0)
        self.drop_remainder = bool(drop_remainder)
        self.pad_remainder = bool(pad_remainder)
        if self.drop_remainder and self.pad_remainder:
            raise ValueError(
                "drop_remainder=True and pad_remainder=True contradict each "
                "other: drop the last partial batch, or pad it; pass one."
            )
        self.num_shards = _check_int("num_shards", num_shards, 1)
        self.shard_index = _check_int("shard_index", shard_index, 0)
        if self.shard_index >= self.num_shards:
            raise ValueError(
                f"shard_index must be in [0, num_shards); received "
                f"shard_index={shard_index} with num_shards={num_shards}"
            )
        self.shuffle_window = _check_int("shuffle_window", shuffle_window, 1)
        self.block_rows = (
            self._default_block_rows()
            if block_rows is None
            else _check_int("block_rows", block_rows, 1)
        )
        self.mp_context = mp_context
        self.prefetch_to_device = prefetch_to_device
        if (
            mp_context is not None
            and mp_context not in multiprocessing.get_all_start_methods()
        ):
            raise ValueError(
                f"mp_context must be one of {multiprocessing.get_all_start_methods()}, "
                f"received mp_context={mp_context!r}"
            )

        num_rows = self.rows[1] - self.rows[0]
        sampler = Sampler(
            num_rows=num_rows,
            batch_size=self._batch_size,
            mode=self.shuffle,
            seed=self.seed,
            drop_remainder=self.drop_remainder,
            pad_remainder=self.pad_remainder,
            num_shards=self.num_shards,
            shard_index=self.shard_index,
            block_rows=self.block_rows,
            window_blocks=self.shuffle_window,
        )
        if sampler.num_batches == 0:
            raise ValueError(
                f"the dataset has no batches: {num_rows} rows, batch_size="
                f"{self._batch_size}, num_shards={self.num_shards}, "
                f"drop_remainder={self.drop_remainder}. Use a smaller batch_size "
                "or fewer shards, or drop_remainder=False."
            )
        sampler.warn_if_rows_left_out(stacklevel=3)
        if self.shuffle == "global" and any(
            s.compressed and len(s) > _MANY_BLOCKS * s.block_rows
            for s in self._sources()
        ):
            warnings.warn(
                "shuffle='global' on compressed HDF5 decodes a whole chunk for "
                "almost every row; shuffle='block' reads each chunk once per "
                "epoch and is usually many times faster.",
                stacklevel=2,
            )
        self._reader = BatchReader(
            (self.x, self.y, self.sample_weight), sampler, row_offset=self.rows[0]
        )
        self._epoch = 0
        self._claimed = -1
        self._lock = threading.Lock()
        self._pool: cf.Executor | None = None

    # ---- construction helpers ------------------------------------------------
    def _sources(self) -> list[BigArray]:
        return [
            s for s in flatten((self.x, self.y, self.sample_weight)) if s is not None
        ]

    def _check_lengths(self) -> None:
        named: list[tuple[str, int]] = []
        for part, name in (
            (self.x, "x"),
            (self.y, "y"),
            (self.sample_weight, "sample_weight"),
        ):
            if part is not None:
                map_structure(lambda s, p: named.append((p, len(s))), part, name)
        if len({n for _, n in named}) > 1:
            listing = ", ".join(f"{p}: {n} rows" for p, n in named)
            raise ValueError(
                f"x, y and sample_weight must have the same number of rows; "
                f"received {listing}."
            )

    def _default_block_rows(self) -> int:
        # The source that dominates I/O decides the block: its natural block
        # (HDF5 chunk rows), grown by whole blocks to at least 1 MiB.
        widest = max(self._sources(), key=lambda s: s.row_nbytes)
        natural = widest.block_rows
        per_block = max(1, natural * widest.row_nbytes)
        return natural * max(1, -(-DEFAULT_BLOCK_BYTES // per_block))

    # ---- the PyDataset contract ----------------------------------------------------
    def __len__(self) -> int:
        return self._reader.sampler.num_batches

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"batch index {index} is out of range for {n} batches")
        return self._reader.read(self._epoch, i)

    @property
    def epoch(self) -> int:
        """The epoch whose batches `ds[i]` returns; settable, to resume."""
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        with self._lock:
            self._epoch = _check_int("epoch", value, 0)
            self._claimed = -1

    def on_epoch_end(self) -> None:
        """Moves to the next epoch (Keras calls this after each epoch)."""
        with self._lock:
            self._epoch = max(self._epoch + 1, self._claimed)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def num_rows(self) -> int:
        """Rows in the dataset (all shards)."""
        return self.rows[1] - self.rows[0]

    @property
    def sampler(self) -> Sampler:
        return self._reader.sampler

    @property
    def reader(self) -> BatchReader:
        return self._reader

    def __repr__(self) -> str:
        src = flatten(self.x)[0]
        return (
            f"BigArrayDataset({src!r}, rows={self.num_rows}, batch_size="
            f"{self.batch_size}, shuffle={self.shuffle!r}, seed={self.seed}, "
            f"batches={len(self)})"
        )

    # ---- derived datasets ------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return dict(
            batch_size=self._batch_size,
            shuffle=self.shuffle if self.shuffle != "sequential" else False,
            seed=self.seed,
            drop_remainder=self.drop_remainder,
            pad_remainder=self.pad_remainder,
            num_shards=self.num_shards,
            shard_index=self.shard_index,
            workers=self.workers,
            use_multiprocessing=self.use_multiprocessing,
            max_queue_size=self.max_queue_size,
            rows=slice(*self.rows),
            block_rows=self.block_rows,
            shuffle_window=self.shuffle_window,
            mp_context=self.mp_context,
            prefetch_to_device=self.prefetch_to_device,
        )

    def replace(self, **changes: Any) -> BigArrayDataset:
        """A new dataset over the same sources with some arguments changed."""
        config = self._config()
        unknown = set(changes) - set(config)
        if unknown:
            raise TypeError(f"replace() got unknown arguments: {sorted(unknown)}")
        config.update(changes)
        return BigArrayDataset(self.x, self.y, self.sample_weight, **config)

    def validation_split(
        self, fraction: float, *, batch_size: int | None = None
    ) -> tuple[BigArrayDataset, BigArrayDataset]:
        """Holds out the last `fraction` of the rows, like Keras's `validation_split`.

        Returns:
            `(train, validation)`: the training dataset over the first rows with
            this dataset's settings, and an unshuffled dataset over the rest.
            Nothing is copied; the two never share a row.
        """
        if not 0.0 < float(fraction) < 1.0:
            raise ValueError(
                f"fraction must be in (0, 1), received fraction={fraction}"
            )
        start, stop = self.rows
        held = int(round((stop - start) * float(fraction)))
        if held < 1 or held >= stop - start:
            raise ValueError(
                f"fraction={fraction} of {stop - start} rows leaves an empty "
                "training or validation set"
            )
        cut = stop - held
        train = self.replace(rows=slice(start, cut))
        val = self.replace(
            rows=slice(cut, stop),
            shuffle=False,
            drop_remainder=False,
            batch_size=batch_size or self._batch_size,
        )
        return train, val

    # ---- iteration, for fit / evaluate / predict -------------------------------------
    def _claim_epoch(self) -> int:
        # Each full iteration is the next epoch, also when Keras (or tf.data's
        # prefetch) starts the next iteration before calling on_epoch_end.
        with self._lock:
            e = (
                max(self._epoch, self._claimed + 1)
                if self._claimed >= 0
                else self._epoch
            )
            self._claimed = e
            return e

    def _executor(self) -> cf.Executor:
        if self._pool is None:
            workers = max(1, self.workers)
            if self.use_multiprocessing:
                ctx = multiprocessing.get_context(self.mp_context)
                pool: cf.Executor = cf.ProcessPoolExecutor(
                    workers,
                    mp_context=ctx,
                    initializer=_init_worker,
                    initargs=(self._reader,),
                )
            else:
                pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="bigarray")
            weakref.finalize(self, pool.shutdown, wait=False, cancel_futures=True)
            self._pool = pool
        return self._pool

    def iterate_epoch(self, epoch: int | None = None) -> Iterator[tuple[Any, ...]]:
        """Yields every batch of one epoch in order (the next one by default).

        Reads run ahead on `workers` threads or processes, at most
        `max_queue_size` batches ahead.
        """
        e = self._claim_epoch() if epoch is None else int(epoch)
        n = len(self)
        if self.workers <= 1 and not self.use_multiprocessing:
            for i in range(n):
                yield self._reader.read(e, i)
            return
        pool = self._executor()
        submit = (
            (lambda i: pool.submit(_read_in_worker, e, i))
            if self.use_multiprocessing
            else (lambda i: pool.submit(self._reader.read, e, i))
        )
        ahead = max(self.max_queue_size, self.workers)
        pending: deque[cf.Future[Any]] = deque()
        nxt = 0
        try:
            while nxt < n or pending:
                while nxt < n and len(pending) < ahead:
                    pending.append(submit(nxt))
                    nxt += 1
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pool"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ---- Keras DataAdapter: model.fit(ds) takes these, not Keras's PyDataset path ----
    def get_numpy_iterator(self) -> Iterator[tuple[Any, ...]]:
        return self.iterate_epoch()

    def get_jax_iterator(self) -> Any:
        return _keras_adapter.jax_iterator(self.iterate_epoch())

    def get_torch_dataloader(self) -> Any:
        return _keras_adapter.torch_dataloader(self.iterate_epoch())

    def get_tf_dataset(self) -> Any:
        from keras_bigarray import tf_data

        return tf_data.to_tf_dataset(self, device=self.prefetch_to_device)

    def to_tf_dataset(
        self, *, device: str | None = None, num_parallel_reads: int | None = None
    ) -> Any:
        """A `tf.data.Dataset` of the batches; see `tf_data.to_tf_dataset`."""
        from keras_bigarray import tf_data

        return tf_data.to_tf_dataset(
            self, device=device, num_parallel_reads=num_parallel_reads
        )

    def for_input_context(self, context: Any) -> BigArrayDataset:
        """The shard one `tf.distribute` input pipeline reads; see `tf_data`."""
        from keras_bigarray import tf_data

        return tf_data.for_input_context(self, context)

    @property
    def has_partial_batch(self) -> bool:
        return (
            any(length % self._batch_size for length in self.sampler.layout.lengths)
            and not self.pad_remainder
        )

    @property
    def partial_batch_size(self) -> int | None:
        if not self.has_partial_batch:
            return None
        return self.sampler.layout.lengths[self.shard_index] % self._batch_size or None

    def on_epoch_begin(self) -> None:
        pass


if not _keras_adapter.AVAILABLE:  # pragma: no cover
    warnings.warn(
        f"keras {keras.__version__} has no DataAdapter where keras-bigarray "
        "looks for it; model.fit(ds) will reorder batches unless you pass "
        "shuffle=False to fit.",
        stacklevel=2,
    )
