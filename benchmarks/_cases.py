"""The benchmark cases. Each returns a `CaseResult` whose variants (ours, the
peers, and the limits) were timed in interleaved rounds; `TARGETS` in `_report.py`
reads the ratios of DESIGN.md from them."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import _data
import numpy as np
from _harness import (
    CaseResult,
    Measurement,
    Variant,
    fmt_rate,
    interleave,
    log,
)

SEED = 1234


def block_note(ds: Any) -> str:
    """How a dataset's block shuffle reads: its block and window sizes."""
    from keras_bigarray._memory import format_bytes

    row = max(s.row_nbytes for s in ds._sources())
    return (
        f"block shuffle: {format_bytes(ds.block_rows * row)} blocks "
        f"({ds.block_rows:,} rows), windows of {ds.shuffle_window} blocks"
    )


@dataclass
class Config:
    data_dir: str
    quick: bool = False
    batch_size: int = 1024
    repeats: int = 5
    fit_repeats: int = 3
    memory_repeats: int = 1
    workers: int = 2
    pipeline_bytes: int = 1 << 30
    h5_bytes: int = 512 << 20
    fit_rows: int = 512 * 1024
    fit_spe: tuple[int, ...] = (1, 32)
    memory_bytes: tuple[int, ...] = (2 * 10**9, 8 * 10**9)
    # Bounded variants (h5py fancy indexing, global shuffle of gzip) read
    # batches until this many seconds have passed, at least one batch.
    bounded_seconds: float = 3.0
    # Any HDF5 measurement stops after this long, so that a slow path cannot
    # hold up the run (its rate is then over the batches it read).
    hdf5_cap_seconds: float = 15.0
    # A pipeline or uncompressed HDF5 measurement repeats whole epochs until
    # this long: one epoch there takes 0.1-0.4 s, and measurements that short
    # swung by 2x from round to round on a 2-core VM.
    min_seconds: float = 1.0
    huge: bool = False
    huge_bytes: int | None = None
    huge_fraction_of_ram: float = 1.25
    gpu_steps: int = 200
    # The GPU case's device: None picks the first GPU, or skips the case
    # without one; "/cpu:0" runs the case's code where there is no GPU.
    gpu_device: str | None = None
    notes: list[str] = field(default_factory=list)


def _dataset(x: Any, y: Any = None, **kw: Any) -> Any:
    import keras_bigarray as kb

    return kb.BigArrayDataset(x, y, **kw)


# ---- pipeline alone, .npy in the page cache ------------------------------------------


def _read_all(reader: Any, epoch: int, n: int) -> None:
    for i in range(n):
        reader.read(epoch, i)


def case_pipeline(cfg: Config) -> CaseResult:
    import keras_bigarray as kb
    from keras_bigarray._memory import page_cache_fraction

    B = cfg.batch_size
    rows = _data.rows_for(cfg.pipeline_bytes, B)
    pair = _data.npy_pair(cfg.data_dir, "pipeline", rows)
    _data.warm(pair.x)
    cached = page_cache_fraction(pair.x)
    x = kb.open_array(pair.x)
    bare = np.load(pair.x, mmap_mode="r").view(np.ndarray)
    nb = rows // B
    batch_bytes = B * x.row_nbytes
    total = (nb * B, nb * batch_bytes)
    case = CaseResult(
        "pipeline",
        "Pipeline alone, .npy in the page cache",
        "MB/s",
        f"{rows * x.row_nbytes / 2**30:.2f} GiB float32 .npy ({rows:,} rows of "
        f"{x.row_nbytes} bytes), batch {B}, {100 * (cached or 0):.0f}% of the "
        f"file in the page cache. A measurement reads whole epochs ({nb} "
        f"batches each) until {cfg.min_seconds:g} s have passed; each epoch of "
        "ours is a fresh shuffle. Batches are produced and dropped (no "
        "training).",
    )

    def make(mode: str, workers: int = 1) -> Any:
        return kb.BigArrayDataset(
            x,
            batch_size=B,
            shuffle=False if mode == "sequential" else mode,
            seed=SEED,
            drop_remainder=True,
            workers=workers,
        )

    case.description += f" {block_note(make('block'))}."

    readers = {m: make(m).reader for m in ("sequential", "global", "block")}
    # np.take gets the very indices our reader reads in epoch 0, computed
    # beforehand: the limit of a gather of those rows, with no index work.
    take_idx = {
        m: [readers[m].sampler.batch(0, i)[0] for i in range(nb)]
        for m in ("global", "block")
    }

    least = cfg.min_seconds

    def copy_run(_r: int) -> Measurement:
        def go(_p: int) -> tuple[int, int]:
            for i in range(nb):
                np.array(bare[i * B : (i + 1) * B])
            return total

        return _passes(go, least)

    def take_run(mode: str):
        def run(_r: int) -> Measurement:
            idx = take_idx[mode]

            def go(_p: int) -> tuple[int, int]:
                for i in range(nb):
                    np.take(bare, idx[i], axis=0)
                return total

            return _passes(go, least)

        return run

    # Round r of ours reads epochs 1000 r, 1000 r + 1, ...: each pass a fresh
    # shuffle, with its sampling paid (the limits' indices are precomputed).
    def reader_run(mode: str):
        def run(r: int) -> Measurement:
            def go(p: int) -> tuple[int, int]:
                _read_all(readers[mode], 1000 * r + p, nb)
                return total

            return _passes(go, least)

        return run

    parallel = {m: make(m, cfg.workers) for m in ("sequential", "global", "block")}

    def iter_run(mode: str):
        def run(r: int) -> Measurement:
            def go(p: int) -> tuple[int, int]:
                for _ in parallel[mode].iterate_epoch(epoch=1000 * r + p):
                    pass
                return total

            return _passes(go, least)

        return run

    tfds: dict[str, Any] = {}

    def tf_run(mode: str):
        def run(_r: int) -> Measurement:
            if mode not in tfds:
                tfds[mode] = make(mode).to_tf_dataset()
            ds = tfds[mode]

            def go(_p: int) -> tuple[int, int]:
                for _ in ds:  # each iteration is the dataset's next epoch
                    pass
                return total

            return _passes(go, least)

        return run

    w = cfg.workers
    variants = [
        Variant(
            "copy",
            "numpy copy of each batch's slice (limit)",
            False,
            copy_run,
            "np.array(x[i*B:(i+1)*B]) on a memmap",
            "NUMPY SLICE COPY",
        ),
        Variant(
            "take_global",
            "np.take, global-shuffle indices (limit)",
            False,
            take_run("global"),
            "np.take(x, idx, axis=0), sorted indices precomputed",
            "NP.TAKE GLOBAL IDX",
        ),
        Variant(
            "take_block",
            "np.take, block-shuffle indices (limit)",
            False,
            take_run("block"),
            "as above, block-shuffle indices",
            "NP.TAKE BLOCK IDX",
        ),
    ]
    for m in ("sequential", "global", "block"):
        variants += [
            Variant(
                f"reader_{m}",
                f"ours {m}, BatchReader.read (1 thread)",
                True,
                reader_run(m),
                "sampling + reading, one thread",
                f"OURS {m} READER",
            ),
            Variant(
                f"iter_{m}",
                f"ours {m}, ds.iterate_epoch() ({w} threads)",
                True,
                iter_run(m),
                f"workers={w}, max_queue_size=10",
                f"OURS {m} ITER W{w}",
            ),
            Variant(
                f"tf_{m}",
                f"ours {m}, ds.to_tf_dataset()",
                True,
                tf_run(m),
                "tf.data, parallel reads (autotuner off), iterated eagerly",
                f"OURS {m} TF.DATA",
            ),
        ]
    interleave(case, variants, cfg.repeats)
    case.notes.append(
        "Targets use the single-thread BatchReader (the same work as the limits: "
        "one thread, no training). The threaded and tf.data rows are what "
        f"users get; on this {os.cpu_count()}-core machine they share the cores."
    )
    return case


# ---- HDF5 ----------------------------------------------------------------------------


def _passes(one: Any, min_seconds: float) -> Measurement:
    """Times whole passes `one(p) -> (rows, nbytes)`, p = 0, 1, ..., until
    `min_seconds` have passed (at least one pass)."""
    t0 = time.perf_counter()
    rows = nbytes = p = 0
    while True:
        r, b = one(p)
        rows, nbytes, p = rows + r, nbytes + b, p + 1
        if time.perf_counter() - t0 >= min_seconds:
            break
    return Measurement(time.perf_counter() - t0, rows, nbytes, {"passes": float(p)})


def _bounded(
    fn: Any,
    nb: int,
    seconds: float,
    batch_rows: int,
    row_nbytes: int,
    min_seconds: float = 0.0,
) -> Measurement:
    """Runs `fn(i)` for batches until `seconds` pass (at least one). After
    all `nb` batches, goes on with `fn(nb)`, `fn(nb + 1)`, ... (the next pass:
    pass `i // nb`, batch `i % nb`) while less than `min_seconds` have passed."""
    t0 = time.perf_counter()
    done = 0
    while True:
        fn(done)
        done += 1
        spent = time.perf_counter() - t0
        if spent >= seconds or (done % nb == 0 and spent >= min_seconds):
            break
    dt = time.perf_counter() - t0
    return Measurement(
        dt, done * batch_rows, done * batch_rows * row_nbytes, {"batches": float(done)}
    )


def case_hdf5(cfg: Config, gzip: bool) -> CaseResult:
    import h5py

    import keras_bigarray as kb
    from keras_bigarray.reading import BatchReader

    B = cfg.batch_size
    rows = _data.rows_for(cfg.h5_bytes, B)
    path = _data.h5_file(cfg.data_dir, rows, gzip=gzip)
    _data.warm(path)
    x = kb.open_array(path, key="x")
    nb = rows // B
    rb = x.row_nbytes
    ratio = rows * rb / os.path.getsize(path)
    kind = "gzip" if gzip else "uncompressed"
    cap = cfg.hdf5_cap_seconds
    case = CaseResult(
        f"hdf5_{kind}",
        f"HDF5, chunked {kind}",
        "MB/s",
        f"{rows * rb / 2**20:.0f} MiB float32 dataset ({rows:,} rows of {rb} bytes), "
        f"chunks of {_data.H5_CHUNK_ROWS} rows (1 MiB)"
        + (
            f", gzip level {_data.H5_GZIP_LEVEL} (ratio {ratio:.1f}x)"
            if gzip
            else ", no filters (ours reads the chunks' bytes through a memory map)"
        )
        + f", file in the page cache, batch {B}, single thread. Each "
        f"measurement reads the epoch's {nb} batches in order"
        + (
            ""
            if gzip
            else f", and whole epochs again until {cfg.min_seconds:g} s have passed"
        )
        + f", stopping after {cap:g} s; bounded ones stop after "
        f"{cfg.bounded_seconds:g} s (at least one batch). Rates are over the "
        "batches read. Each epoch ours reads is a fresh shuffle; "
        + (
            "ours opens the file in each round, so its chunk cache starts cold "
            "like h5py's."
            if gzip
            else "ours keeps the file open across rounds, as training does across "
            "epochs (the row-gather limit keeps its memory map too)."
        ),
    )

    def make(mode: str) -> Any:
        return kb.BigArrayDataset(
            x,
            batch_size=B,
            shuffle=False if mode == "sequential" else mode,
            seed=SEED,
            drop_remainder=True,
        ).reader

    with warnings.catch_warnings():
        # BigArrayDataset warns against global shuffle of gzip: measured here.
        warnings.simplefilter("ignore")
        samplers = {m: make(m).sampler for m in ("sequential", "global", "block")}
    case.description += f" {block_note(kb.BigArrayDataset(x, shuffle='block'))}."
    global_idx = [samplers["global"].batch(0, i)[0] for i in range(nb)]

    # HDF5 keeps one chunk cache per dataset per process, sized by whichever
    # handle opened it first, and shares it with every later handle. So each
    # measurement opens its own handle and closes it, and no two are open at
    # once; "user's handle open" measures what happens when they are.
    def h5py_run(fn: Any, budget: float):
        def run(_r: int) -> Measurement:
            with h5py.File(path, "r") as f:
                d = f["x"]
                return _bounded(lambda i: fn(d, i % nb), nb, budget, B, rb, least)

        return run

    # Uncompressed, ours reads through a memory map and holds no h5py handle:
    # it stays open across rounds, as a training job's dataset does across
    # epochs (the row-gather limit keeps its map too). Compressed, each round
    # opens it afresh, so our chunk cache starts as cold as h5py's. Pass p of
    # round r reads epoch 1000 r + p: a fresh shuffle, nothing of the
    # sampler's carried over.
    kept = None if gzip else kb.open_array(path, key="x")
    least = 0.0 if gzip else cfg.min_seconds  # gzip: an epoch takes seconds

    def ours(mode: str, budget: float, user_handle_open: bool = False):
        def run(r: int) -> Measurement:
            user = h5py.File(path, "r") if user_handle_open else None
            if user is not None:
                user["x"][:1]  # opened and read, as a user's script would
            src = kept if kept is not None else kb.open_array(path, key="x")
            reader = BatchReader((src, None, None), samplers[mode])
            try:
                return _bounded(
                    lambda i: reader.read(1000 * r + i // nb, i % nb),
                    nb,
                    budget,
                    B,
                    rb,
                    least,
                )
            finally:
                reader = src = None
                gc.collect()  # closes a fresh handle before the next variant
                if user is not None:
                    user.close()

        return run

    bounded = cfg.bounded_seconds
    variants = [
        Variant(
            "h5py_seq",
            "h5py sequential slicing ds[a:b]",
            False,
            h5py_run(lambda d, i: d[i * B : (i + 1) * B], cap),
            "h5py defaults (1 MiB chunk cache)",
            "H5PY SLICES",
        ),
        Variant(
            "h5py_fancy",
            "h5py fancy indexing ds[sorted idx] (bounded)",
            False,
            h5py_run(lambda d, i: d[global_idx[i]], bounded),
            "global-shuffle indices, sorted",
            "H5PY FANCY INDEXING",
        ),
        Variant(
            "reader_sequential",
            "ours sequential",
            True,
            ours("sequential", cap),
            "BatchReader.read",
            "OURS SEQUENTIAL",
        ),
        Variant(
            "reader_block",
            "ours block",
            True,
            ours("block", cap),
            "BatchReader.read, blocks aligned to chunks",
            "OURS BLOCK",
        ),
        Variant(
            "reader_global",
            "ours global" + (" (bounded)" if gzip else ""),
            True,
            ours("global", bounded if gzip else cap),
            "BatchReader.read",
            "OURS GLOBAL",
        ),
    ]
    if not gzip:
        # What users get: reader threads, and tf.data (a Python call a batch:
        # chunks out of row order cannot be mapped as one tensor).
        total = (nb * B, nb * B * rb)
        threaded = kb.BigArrayDataset(
            kept,
            batch_size=B,
            shuffle="block",
            seed=SEED,
            drop_remainder=True,
            workers=cfg.workers,
        )
        tfds: dict[str, Any] = {}

        def user_run(kind: str):
            def run(r: int) -> Measurement:
                if kind == "tf" and "tf" not in tfds:
                    tfds["tf"] = threaded.to_tf_dataset()

                def go(p: int) -> tuple[int, int]:
                    it = (
                        tfds["tf"]
                        if kind == "tf"
                        else threaded.iterate_epoch(epoch=1000 * r + p)
                    )
                    for _ in it:  # tf.data: each iteration is the next epoch
                        pass
                    return total

                return _passes(go, least)

            return run

        variants += [
            Variant(
                "iter_block",
                f"ours block, ds.iterate_epoch() ({cfg.workers} threads)",
                True,
                user_run("iter"),
                f"workers={cfg.workers}, max_queue_size=10",
                "OURS BLOCK ITER",
            ),
            Variant(
                "tf_block",
                "ours block, ds.to_tf_dataset()",
                True,
                user_run("tf"),
                "tf.data, a tf.numpy_function a batch, parallel reads, iterated "
                "eagerly",
                "OURS BLOCK TF.DATA",
            ),
        ]
        block_idx = [samplers["block"].batch(0, i)[0] for i in range(nb)]
        variants.insert(
            2,
            Variant(
                "gather_block",
                "gather of the block-shuffle rows from the file's bytes (limit)",
                False,
                gather_limit(path, block_idx, cap, least),
                "1 KiB items gathered from a memmap of the file, indices precomputed",
                "ROW GATHER, BLOCK IDX (LIMIT)",
            ),
        )
    if gzip:
        variants.append(
            Variant(
                "reader_block_shared",
                "ours block, a user's h5py handle open (bounded)",
                True,
                ours("block", bounded, user_handle_open=True),
                "h5py.File(path) open in the same process (HDF5 would share its "
                "1 MiB chunk cache with any handle of ours)",
                "OURS BLOCK, H5PY HANDLE OPEN",
            )
        )
    interleave(case, variants, cfg.repeats)
    if not gzip:
        case.notes.append(
            "The target uses the single-thread BatchReader, as h5py reads here "
            "(HDF5 serializes every call: a second thread does not help it). The "
            "threaded and tf.data rows are what users get, on the same cores."
        )
    if gzip:
        case.notes.append(
            "Global shuffle over gzip decodes almost every chunk for each batch "
            "(1024 random rows hit most of the chunks), which is why "
            "BigArrayDataset warns and recommends shuffle='block' there."
        )
        case.notes.append(
            "HDF5 gives all handles on one dataset in a process one chunk cache, "
            "sized by the handle opened first, so a user's own h5py handle "
            "(e.g. `open_array(h5py_file['x'])`, which reopens by path) would "
            "leave any reader of ours with h5py's 1 MiB and every chunk decoded "
            "again for each batch. keras-bigarray decodes gzip/shuffle/fletcher32 "
            "chunks itself, into a 64 MiB cache of its own (a 16-chunk shuffle "
            "window fits): compare 'ours block' with 'ours block, a user's h5py "
            "handle open'."
        )
    return case


def gather_limit(
    path: str, batches: list[np.ndarray], budget: float, least: float = 0.0
):
    """The bare cost of gathering given rows of an uncompressed HDF5 dataset.

    Each row is one `np.void` item at its byte offset in a memory map of the
    file, so a batch is one fancy index of whole rows: no index work, no
    checks. (Not `np.take`: it copies a non-contiguous source first.)
    """
    import keras_bigarray as kb

    src = kb.open_array(path, key="x")
    rows_per_chunk, offsets = src._byte_plan[:2]
    width = src.row_nbytes
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    items = np.ndarray(
        buffer=raw,
        dtype=np.dtype((np.void, width)),
        shape=(raw.size - width + 1,),
        strides=(1,),
    )
    where = [
        offsets[i // rows_per_chunk] + (i % rows_per_chunk) * width for i in batches
    ]
    B = batches[0].size

    n = len(batches)

    def run(_r: int) -> Measurement:
        return _bounded(lambda i: items[where[i % n]], n, budget, B, width, least)

    return run


# ---- model.fit -----------------------------------------------------------------------


def _per_step(steps: int, op: Any, workers: int) -> Any:
    """A tf.data of `op(i)` for step i, `workers` calls in parallel, 10 batches
    ahead, with the autotuner off: the fixed buffers of keras-bigarray's own
    pipeline, which no epoch of the limits stalls (see tf_data._finish)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return (
        tf.data.Dataset.range(steps)
        .map(op, num_parallel_calls=workers, deterministic=True)
        .prefetch(10)
        .with_options(options)
    )


def make_model(spe: int) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((_data.FEATURES,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(_data.CLASSES),
        ]
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=spe,
    )
    return model


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _clocked(fn: Any) -> tuple[float, float]:
    """Runs `fn()`: its wall time and the process's CPU time, in seconds."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    fn()
    return time.perf_counter() - t0, _cpu_seconds() - c0


def _epoch_timer() -> Any:
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Each epoch's wall time, and the CPU time of the process (every
        thread, user + system) over it."""

        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []
            self.cpu: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.t0 = time.perf_counter()
            self.c0 = _cpu_seconds()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append(_cpu_seconds() - self.c0)

    return EpochTimer()


def hand_written_pydataset(x: Any, y: Any, batch_size: int, **kw: Any) -> Any:
    """What a user writes today: a PyDataset of sorted random gathers on memmaps."""
    import keras

    class RandomGathers(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(**kw)
            self.rng = np.random.default_rng(0)
            self.perm = self.rng.permutation(len(x))

        def __len__(self) -> int:
            return len(x) // batch_size

        def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
            idx = np.sort(self.perm[i * batch_size : (i + 1) * batch_size])
            return x[idx], y[idx]

        def on_epoch_end(self) -> None:
            self.perm = self.rng.permutation(len(x))

    return RandomGathers()


def _fit_data(cfg: Config) -> tuple[int, Any, int, int, int, np.ndarray, np.ndarray]:
    """The fit and GPU cases' data: the first fit_rows of the pipeline file."""
    B = cfg.batch_size
    rows = _data.rows_for(cfg.pipeline_bytes, B)
    pair = _data.npy_pair(cfg.data_dir, "pipeline", rows)
    n = min(rows, max(B, cfg.fit_rows // B * B))
    xm = np.load(pair.x, mmap_mode="r")
    ym = np.load(pair.y, mmap_mode="r")
    return B, pair, n, n // B, _data.ROW_NBYTES, xm, ym


def _fit_dataset(cfg: Config, pair: Any, n: int) -> Any:
    """Ours in the fit and GPU cases: global shuffle over the first n rows."""
    return _dataset(
        pair.x,
        pair.y,
        batch_size=cfg.batch_size,
        shuffle=True,
        seed=SEED,
        rows=slice(0, n),
        workers=cfg.workers,
    )


def case_fit(cfg: Config, spe: int) -> CaseResult:
    import tensorflow as tf

    B, pair, n, steps, rb, xm, ym = _fit_data(cfg)
    case = CaseResult(
        f"fit_spe{spe}",
        f"model.fit end to end, steps_per_execution={spe}",
        "rows/s",
        f"Dense(64, relu) -> Dense(10) on {n:,} rows of 256 float32 features "
        f"(the first {n * rb / 2**20:.0f} MiB of the pipeline file, in the page "
        f"cache), batch {B}, {steps} steps an epoch, Adam. Each measurement "
        "builds and compiles a fresh model, runs fit(epochs=2) and times the "
        "second epoch (the first one traces, and for the in-memory peers "
        "copies the array); 'first epoch' is the first epoch's wall time.",
    )

    def measure(make_input: Any, fit_kw: dict[str, Any]) -> Measurement:
        model = make_model(spe)
        t0 = time.perf_counter()
        inputs = make_input()
        setup = time.perf_counter() - t0
        timer = _epoch_timer()
        model.fit(*inputs, epochs=2, verbose=0, callbacks=[timer], **fit_kw)
        return Measurement(
            timer.times[1],
            steps * B,
            steps * B * rb,
            {
                "first_epoch_s": timer.times[0] + setup,
                "cpu_cores": timer.cpu[1] / timer.times[1],
            },
        )

    batch_x = np.array(xm[:B])
    batch_y = np.array(ym[:B])

    def step_only(_r: int) -> Measurement:
        return measure(
            lambda: (tf.data.Dataset.from_tensors((batch_x, batch_y)).repeat(),),
            {"steps_per_epoch": steps},
        )

    # The rows of fit(ds)'s second epoch (epoch 1 of its sampler), gathered by
    # a bare np.take inside the same tf.data plumbing: the limit of any reader
    # that gathers these rows on this CPU while the model trains.
    limit_sampler = _dataset(
        pair.x, pair.y, batch_size=B, shuffle=True, seed=SEED, rows=slice(0, n)
    ).sampler
    limit_idx = [limit_sampler.batch(1, i)[0] for i in range(steps)]
    bare_x = xm.view(np.ndarray)
    bare_y = ym.view(np.ndarray)

    def batch_per_step(op: Any) -> Measurement:
        """fit on `op(i)` for step i, in workers parallel calls."""
        return measure(lambda: (_per_step(steps, op, cfg.workers),), {})

    def gather_limit(_r: int) -> Measurement:
        def take(i: np.int64) -> tuple[np.ndarray, np.ndarray]:
            idx = limit_idx[int(i)]
            return np.take(bare_x, idx, axis=0), np.take(bare_y, idx, axis=0)

        def op(i: Any) -> Any:
            bx, by = tf.numpy_function(take, [i], (tf.float32, tf.int32))
            bx.set_shape((B, _data.FEATURES))
            by.set_shape((B,))
            return bx, by

        return batch_per_step(op)

    # The same rows again, gathered by TensorFlow from tensors in memory: no
    # Python, no file, no checks. The cheapest way to feed fit these rows.
    ram_x = tf.constant(np.array(xm[:n]))
    ram_y = tf.constant(np.array(ym[:n]))
    ram_idx = tf.constant(np.stack(limit_idx))

    def ram_gather_limit(_r: int) -> Measurement:
        def op(i: Any) -> Any:
            idx = ram_idx[i]
            return tf.gather(ram_x, idx), tf.gather(ram_y, idx)

        return batch_per_step(op)

    def ours() -> Any:
        return _fit_dataset(cfg, pair, n)

    def ours_ds(_r: int) -> Measurement:
        return measure(lambda: (ours(),), {})

    def ours_tf(_r: int) -> Measurement:
        return measure(lambda: (ours().to_tf_dataset(),), {})

    def memmap(_r: int) -> Measurement:
        return measure(lambda: (xm[:n], ym[:n]), {"batch_size": B, "shuffle": True})

    def pydataset(_r: int) -> Measurement:
        return measure(
            lambda: (hand_written_pydataset(xm[:n], ym[:n], B, workers=cfg.workers),),
            {},
        )

    def recipe(_r: int) -> Measurement:
        def make() -> tuple[Any]:
            ds = (
                tf.data.Dataset.from_tensor_slices((xm[:n], ym[:n]))
                .shuffle(10_000, seed=SEED)
                .batch(B)
                .prefetch(tf.data.AUTOTUNE)
            )
            return (ds,)

        return measure(make, {})

    w = cfg.workers
    variants = [
        Variant(
            "step",
            "pure step: one in-memory batch repeated (limit)",
            False,
            step_only,
            "tf.data.Dataset.from_tensors(batch).repeat()",
            "PURE STEP (LIMIT)",
        ),
        Variant(
            "gather",
            "bare np.take of the same rows in tf.data (limit)",
            False,
            gather_limit,
            f"precomputed indices, {w} parallel numpy_function "
            "calls: no sampling, no checks",
            "BARE GATHER IN TF.DATA (LIMIT)",
        ),
        Variant(
            "ram_gather",
            "tf.gather of the same rows from memory in tf.data (limit)",
            False,
            ram_gather_limit,
            f"the rows in tensors in RAM, precomputed indices, {w} parallel "
            "tf.gather calls: no Python, no file",
            "TF.GATHER FROM RAM (LIMIT)",
        ),
        Variant(
            "ours_ds",
            f"ours: fit(BigArrayDataset), global, workers={w}",
            True,
            ours_ds,
            "the DataAdapter path",
            "OURS FIT(DS)",
        ),
        Variant(
            "ours_tf",
            "ours: fit(ds.to_tf_dataset()), global",
            True,
            ours_tf,
            "tf.data, parallel reads",
            "OURS FIT(DS.TO_TF_DATASET())",
        ),
        Variant(
            "memmap",
            "model.fit(memmap, shuffle=True)",
            False,
            memmap,
            "Keras copies the array into memory first",
            "FIT(MEMMAP)",
        ),
        Variant(
            "pydataset",
            f"hand-written PyDataset, sorted random gathers, workers={w}",
            False,
            pydataset,
            "x[np.sort(perm[i*B:(i+1)*B])] on memmaps",
            "HAND-WRITTEN PYDATASET",
        ),
        Variant(
            "recipe",
            "from_tensor_slices(x, y).shuffle(10k).batch.prefetch",
            False,
            recipe,
            "the tf.data recipe over the memmap",
            "FROM_TENSOR_SLICES RECIPE",
        ),
    ]
    interleave(case, variants, cfg.fit_repeats)
    step_v = case.get("step")
    step_busy = step_v.extra_median("cpu_cores") if step_v is not None else None
    case.notes.append(
        "CPU busy: the process's CPU time (all threads, user + system) over "
        "the timed epoch's wall time, in cores. "
        + (
            f"The pure step alone keeps {step_busy:.2f} of this machine's "
            f"{os.cpu_count()} cores busy. "
            if step_busy is not None
            else ""
        )
        + "Every input pipeline adds its own CPU work (gathering 1 MiB of "
        "fresh rows a step, carrying it through tf.data) on the same cores, "
        "which is why even TensorFlow's own gather from RAM stays below the "
        "pure step. Rounds where CPU busy drops to about one core ran with "
        "both cores half idle for the whole epoch: tf.data's autotuner "
        "settles into that state on this 2-core VM now and then. "
        "keras-bigarray's pipeline and the two limits run with the autotuner "
        "off and fixed buffers; the peers run as their users get them, "
        "Keras's own adapter and the recipe autotuned."
    )
    gc.collect()
    return case


# ---- peak memory, in a fresh process per measurement ---------------------------------

# Keras copies a memmap given to fit into memory, about 3.2 arrays at the peak
# (DESIGN.md: a 2 GB memmap peaked at 6.4 GB of RSS): run it only with room.
KERAS_MEMMAP_PEAK_FACTOR = 3.3


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: one fit epoch, sampling RssAnon. Returns the numbers."""
    from keras_bigarray._memory import PeakMemory

    model = make_model(1)
    n, B = spec["rows"], spec["batch_size"]
    if spec["variant"] == "ours":
        inputs: tuple[Any, ...] = (
            _dataset(
                spec["x"],
                spec["y"],
                batch_size=B,
                shuffle=True,
                seed=SEED,
                rows=slice(0, n),
                workers=spec["workers"],
            ),
        )
        kw: dict[str, Any] = {}
    else:
        xm = np.load(spec["x"], mmap_mode="r")[:n]
        ym = np.load(spec["y"], mmap_mode="r")[:n]
        inputs = (xm, ym)
        kw = {"batch_size": B, "shuffle": True}
    gc.collect()
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        model.fit(*inputs, epochs=1, verbose=0, **kw)
    dt = time.perf_counter() - t0
    return {
        "baseline": mem.baseline,
        "peak": mem.peak,
        "growth": mem.growth,
        "source": mem.source,
        "seconds": dt,
        "rows": n,
    }


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    run_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py")
    proc = subprocess.run(
        [sys.executable, run_py, "--child-memory", json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"child exited {proc.returncode}: " + " | ".join(tail))
    return json.loads(lines[-1])


def case_memory(cfg: Config) -> CaseResult:
    from keras_bigarray._memory import available_memory, format_bytes

    B = cfg.batch_size
    sizes = sorted(cfg.memory_bytes)
    rows_max = _data.rows_for(sizes[-1], B)
    case = CaseResult(
        "memory",
        "Peak anonymous memory of model.fit",
        "rows/s",
        "Growth of RssAnon (anonymous resident memory: heap, numpy buffers, "
        "tensors; not the page cache, not memmapped file pages), sampled every "
        "20 ms during one fit epoch, over its value just before fit, in a fresh "
        "process per measurement (TensorFlow imported and the model built "
        f"before the baseline). Model of the fit case, batch {B}. The smaller "
        "sizes are the first rows of one file.",
    )
    x_path = os.path.join(cfg.data_dir, f"memory_{rows_max}x{_data.FEATURES}_f32.npy")
    why = _data.need_free_bytes(
        cfg.data_dir, rows_max * _data.ROW_NBYTES, "the memory case"
    )
    if why and not os.path.exists(x_path):
        case.skipped = why
        return case
    pair = _data.npy_pair(cfg.data_dir, "memory", rows_max)
    table: list[dict[str, Any]] = []
    for r in range(cfg.memory_repeats):
        for size in sizes:
            n = _data.rows_for(size, B)
            nbytes = n * _data.ROW_NBYTES
            for variant in ("ours", "keras"):
                label = (
                    "ours: fit(BigArrayDataset)"
                    if variant == "ours"
                    else "model.fit(memmap)"
                )
                row: dict[str, Any] = {
                    "variant": label,
                    "key": variant,
                    "size": nbytes,
                    "round": r + 1,
                }
                need = KERAS_MEMMAP_PEAK_FACTOR * nbytes + (1 << 30)
                avail = available_memory()
                if variant == "keras" and avail is not None and need > avail:
                    row["skipped"] = (
                        f"needs about {format_bytes(need)} "
                        f"({KERAS_MEMMAP_PEAK_FACTOR}x "
                        f"the array + 1 GiB), {format_bytes(avail)} available"
                    )
                    log(
                        f"  memory {format_bytes(nbytes)} | {label}: skipped, "
                        f"{row['skipped']}"
                    )
                    table.append(row)
                    continue
                spec = {
                    "variant": variant,
                    "x": pair.x,
                    "y": pair.y,
                    "rows": n,
                    "batch_size": B,
                    "workers": cfg.workers,
                }
                try:
                    got = _run_child(spec)
                except Exception as e:  # noqa: BLE001
                    row["error"] = str(e)
                    log(f"  memory {format_bytes(nbytes)} | {label}: FAILED {e}")
                    table.append(row)
                    continue
                row.update(got)
                row["growth_per_array"] = got["growth"] / nbytes
                log(
                    f"  memory {format_bytes(nbytes)} | {label}: growth "
                    f"{format_bytes(got['growth'])} ({got['growth'] / nbytes:.2f}x the "
                    f"array), {n / got['seconds'] / 1e3:.0f}k rows/s incl. setup"
                )
                table.append(row)
    case.table = table
    return case


# ---- GPU -----------------------------------------------------------------------------


def case_gpu(cfg: Config) -> CaseResult:
    import tensorflow as tf

    case = CaseResult(
        "gpu",
        "GPU: device prefetch against data already on the device",
        "rows/s",
        "model.fit step time (second epoch) fed by to_tf_dataset(device='/gpu:0') "
        "against the same model fed one batch that already lives on the GPU.",
    )
    device = cfg.gpu_device
    if device is None:
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            case.skipped = "no GPU (tf.config.list_physical_devices('GPU') is empty)"
            return case
        device, name = "/gpu:0", gpus[0].name
    else:
        name = f"{device} (--gpu-device)"
    B, pair, n, steps, rb, xm, ym = _fit_data(cfg)
    with tf.device(device):
        bx = tf.constant(np.array(xm[:B]))
        by = tf.constant(np.array(ym[:B]))

    def measure(make_input: Any, fit_kw: dict[str, Any]) -> Measurement:
        model = make_model(1)
        timer = _epoch_timer()
        model.fit(make_input(), epochs=2, verbose=0, callbacks=[timer], **fit_kw)
        return Measurement(timer.times[1], steps * B, steps * B * rb)

    def on_device(_r: int) -> Measurement:
        return measure(
            lambda: tf.data.Dataset.from_tensors((bx, by)).repeat(),
            {"steps_per_epoch": steps},
        )

    def prefetched(_r: int) -> Measurement:
        return measure(
            lambda: _fit_dataset(cfg, pair, n).to_tf_dataset(device=device),
            {},
        )

    variants = [
        Variant(
            "on_device",
            "data already on the GPU (limit)",
            False,
            on_device,
            f"one batch on {device}, repeated",
            "DATA ON DEVICE",
        ),
        Variant(
            "ours_device",
            f"ours: to_tf_dataset(device='{device}')",
            True,
            prefetched,
            "prefetch_to_device",
            "OURS DEVICE PREFETCH",
        ),
    ]
    case.description += f" {name}, {steps} steps an epoch, batch {B}."
    return interleave(case, variants, cfg.fit_repeats)


# ---- larger than RAM -----------------------------------------------------------------


def case_huge(cfg: Config) -> CaseResult:
    from keras_bigarray._memory import (
        PeakMemory,
        format_bytes,
        page_cache_fraction,
        total_memory,
    )

    case = CaseResult(
        "huge",
        "Larger than RAM: one epoch with block shuffle",
        "MB/s",
        "",
    )
    if not cfg.huge:
        case.skipped = (
            "not run (pass --huge: writes a .npy larger than this machine's RAM)"
        )
        return case
    B = cfg.batch_size
    ram = total_memory() or 0
    size = cfg.huge_bytes or int(ram * cfg.huge_fraction_of_ram)
    rows = _data.rows_for(size, B)
    nbytes = rows * _data.ROW_NBYTES
    x_path = os.path.join(cfg.data_dir, f"huge_{rows}x{_data.FEATURES}_f32.npy")
    if not os.path.exists(x_path):
        why = _data.need_free_bytes(cfg.data_dir, nbytes, "--huge")
        if why:
            case.skipped = why
            return case
    log(f"  huge: {format_bytes(nbytes)} against {format_bytes(ram)} of RAM")
    pair = _data.npy_pair(cfg.data_dir, "huge", rows)
    case.description = (
        f"{format_bytes(nbytes)} float32 .npy ({rows:,} rows of 1 KiB) on a machine "
        f"with {format_bytes(ram)} of RAM"
        + ("" if nbytes > ram else " (NOT larger than RAM: --huge-size override)")
        + f", batch {B}, {block_note(_dataset(pair.x, shuffle='block'))}. "
        "The file's pages are dropped from "
        "the page cache (posix_fadvise DONTNEED) before each measurement. The "
        "disk's rate is a plain sequential read of the whole file with "
        "8 MiB reads, bypassing the page cache (O_DIRECT) where the file "
        "system allows: the disk's own rate, higher than buffered reads reach "
        "once the page cache is full."
    )
    disk_bytes = min(nbytes, 8 << 30)
    block_bytes = _dataset(pair.x).sampler.block_rows * _data.ROW_NBYTES
    how: dict[str, str] = {}

    def disk_run(read_bytes: int = disk_bytes, **kw: Any):
        def run(_r: int) -> Measurement:
            c0 = _cpu_seconds()
            rate, done, how[kw.get("chunk", 0)] = _data.disk_read_rate(
                pair.x, read_bytes, **kw
            )
            busy = (_cpu_seconds() - c0) * rate / done
            return Measurement(
                done / rate, done // _data.ROW_NBYTES, done, {"cpu_cores": busy}
            )

        return run

    def second_epoch(ds: Any, steps: int, **fit_kw: Any) -> Measurement:
        """A fresh model's fit(epochs=2) on `ds`, timing the second epoch."""
        model = make_model(32)
        timer = _epoch_timer()
        model.fit(ds, epochs=2, verbose=0, callbacks=[timer], **fit_kw)
        model = None  # released before the next variant
        gc.collect()
        return Measurement(
            timer.times[1],
            steps * B,
            steps * B * _data.ROW_NBYTES,
            {"cpu_cores": timer.cpu[1] / timer.times[1]},
        )

    def ram_fit(_r: int) -> Measurement:
        # The same model fed block-shuffled rows that TensorFlow gathers from
        # tensors in RAM: no file, no Python. What fit reaches on this CPU with
        # the cheapest input there is, whatever the disk does.
        import tensorflow as tf

        k = _data.rows_for(min(nbytes, 1 << 30), B)
        steps = k // B
        sampler = _dataset(
            pair.x, batch_size=B, shuffle="block", seed=SEED, rows=slice(0, k)
        ).sampler
        idx = tf.constant(np.stack([sampler.batch(1, i)[0] for i in range(steps)]))
        rx = tf.constant(np.array(np.load(pair.x, mmap_mode="r")[:k]))
        ry = tf.constant(np.array(np.load(pair.y, mmap_mode="r")[:k]))
        ds = _per_step(
            steps, lambda i: (tf.gather(rx, idx[i]), tf.gather(ry, idx[i])), cfg.workers
        )
        return second_epoch(ds, steps)

    def pipeline(_r: int) -> Measurement:
        _data.evict(pair.x)
        ds = _dataset(
            pair.x, batch_size=B, shuffle="block", seed=SEED, workers=cfg.workers
        )
        nb = len(ds)
        limit = min(nb, disk_bytes // (B * _data.ROW_NBYTES))
        it = ds.iterate_epoch(epoch=0)

        def read() -> None:
            for _ in range(limit):  # each batch dropped as soon as it is read
                next(it)

        dt, cpu = _clocked(read)
        it.close()
        ds = it = None  # released before the next variant
        gc.collect()
        return Measurement(
            dt, limit * B, limit * B * _data.ROW_NBYTES, {"cpu_cores": cpu / dt}
        )

    def fit(_r: int) -> Measurement:
        _data.evict(pair.x)
        _data.evict(pair.y)
        resident = page_cache_fraction(pair.x)
        model = make_model(32)
        ds = _dataset(
            pair.x,
            pair.y,
            batch_size=B,
            shuffle="block",
            seed=SEED,
            workers=cfg.workers,
        )
        with PeakMemory() as mem:
            dt, cpu = _clocked(lambda: model.fit(ds, epochs=1, verbose=0))
        ds = model = None  # released before the next variant
        gc.collect()
        return Measurement(
            dt,
            rows,
            nbytes,
            {
                "resident_before": resident or 0.0,
                "cpu_cores": cpu / dt,
                "anon_growth": float(mem.growth),
            },
        )

    def step(_r: int) -> Measurement:
        # The model alone, fed one in-memory batch: fit can go no faster than
        # this, whatever the disk does.
        import tensorflow as tf

        xm = np.load(pair.x, mmap_mode="r")
        ym = np.load(pair.y, mmap_mode="r")
        batch = (np.array(xm[:B]), np.array(ym[:B]))
        steps = max(64, min(4096, rows // B))  # an epoch's worth, at most 4096
        return second_epoch(
            tf.data.Dataset.from_tensors(batch).repeat(), steps, steps_per_epoch=steps
        )

    variants = [
        Variant(
            "step",
            "pure step: the model fed one in-memory batch (limit of fit)",
            False,
            step,
            f"steps_per_execution=32, {max(64, min(4096, rows // B))} steps",
            "PURE STEP (LIMIT OF FIT)",
        ),
        Variant(
            "ram_fit",
            "fit from RAM: tf.gather of block-shuffled rows (limit of fit)",
            False,
            ram_fit,
            "steps_per_execution=32, the first 1 GiB of rows in tensors, "
            f"{cfg.workers} parallel tf.gather calls, second epoch",
            "FIT FROM RAM (LIMIT OF FIT)",
        ),
        Variant(
            "disk",
            "disk sequential read (limit)",
            False,
            disk_run(read_bytes=nbytes),
            f"all {format_bytes(nbytes)}, cold",
            "DISK SEQUENTIAL READ",
        ),
        Variant(
            "disk_blocks",
            f"disk, {format_bytes(block_bytes)} reads at random offsets (limit "
            "of block shuffle)",
            False,
            disk_run(chunk=block_bytes, random_order=True, threads=2),
            f"{format_bytes(disk_bytes)} in blocks of the sampler's size, 2 in "
            "flight, cold",
            "DISK RANDOM BLOCKS",
        ),
        Variant(
            "pipeline_block",
            f"ours block, iterate_epoch ({cfg.workers} threads)",
            True,
            pipeline,
            f"first {format_bytes(disk_bytes)} of batches, cold, no training",
            "OURS PIPELINE BLOCK",
        ),
        Variant(
            "fit_block",
            "ours: model.fit(ds), block, one full epoch",
            True,
            fit,
            "steps_per_execution=32, cold",
            "OURS FIT ONE EPOCH",
        ),
    ]
    interleave(case, variants, 1)
    fit_v = case.get("fit_block")
    growth = fit_v.extra_median("anon_growth") if fit_v is not None else None
    if growth is not None:
        case.notes.append(
            f"Peak anonymous memory (sampled RssAnon) of ours grew "
            f"{format_bytes(growth)} during the epoch over the "
            f"{format_bytes(nbytes)} file: the model, TensorFlow's buffers, "
            "the queue and the direct-I/O windows, none of which grows with "
            "the file."
        )
    if how:
        case.notes.append(
            "The disk was read with "
            + " and ".join(sorted(set(how.values())))
            + " reads. keras-bigarray reads each window's blocks with O_DIRECT "
            "too when the file is larger than the memory available (the "
            "`direct_io` attribute of an array), so the full page cache costs "
            "it no reclaim."
        )
    bound = _cpu_bound_note(case, ("step", "pipeline_block"), "disk")
    if bound:
        case.notes.append(bound)
    return case


def _cpu_bound_note(case: CaseResult, parts: tuple[str, ...], ref: str) -> str:
    """What the CPU allows when the work of `parts` (each measured alone, with
    its CPU busy) runs together on this machine's cores, against `ref`."""
    cores = os.cpu_count() or 1
    per_mb, said = 0.0, []
    for key in parts:
        v = case.get(key)
        busy = v.extra_median("cpu_cores") if v is not None else None
        if busy is None or not v.measurements:
            return ""
        rate = v.median(case.unit)
        per_mb += busy / rate
        said.append(
            f"{v.name} kept {busy:.2f} cores busy at {fmt_rate(rate, case.unit)} "
            f"({busy / rate * 1e3:.2f} core-s a GB)"
        )
    r = case.get(ref)
    if r is None or not r.measurements or not per_mb:
        return ""
    bound = cores / per_mb
    return (
        "CPU limit: " + "; ".join(said) + f". Together on {cores} cores they can "
        f"go at most {cores} / {per_mb * 1e3:.2f} core-s a GB = "
        f"{fmt_rate(bound, case.unit)}, {bound / r.median(case.unit):.2f}x the "
        f"{r.name}."
    )
