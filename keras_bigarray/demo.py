"""`keras-bigarray demo`: writes a synthetic classification dataset to disk in
chunks (never the whole array in memory, so it may be larger than RAM), trains a
small Dense model streaming from it, and reports throughput, memory and accuracy."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from keras_bigarray._memory import PeakMemory, available_memory, format_bytes

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "DEFAULT_SIZE",
    "DemoData",
    "DemoResult",
    "default_dir",
    "run_demo",
    "write_dataset",
]

FEATURES = 256  # float32: 1 KiB a row
CLASSES = 10
HIDDEN = 64
X_DTYPE = np.dtype("float32")
Y_DTYPE = np.dtype("int32")
ROW_NBYTES = FEATURES * X_DTYPE.itemsize + Y_DTYPE.itemsize

# The default size: writing it takes ~6 s and one epoch over it with the
# default model and batch size ~3 s on a 2-core CPU with TensorFlow (~300k
# rows/s measured), so the demo's two epochs finish in well under a minute on a
# busy laptop too. Larger sizes stream the same way, only longer.
DEFAULT_SIZE = "1GB"
DEFAULT_EPOCHS = 2
DEFAULT_BATCH_SIZE = 1024

# Logit noise of the teacher, relative to the clean logits' unit variance: the
# noiseless teacher then agrees with ~75% of the labels, and the demo's model
# learns most of that in one pass over ~10^5 rows.
TEACHER_NOISE = 0.3

# Rows generated and written at a time: 64 MiB of x keeps writing at disk speed
# while the writer's memory stays far below any dataset worth streaming.
WRITE_CHUNK_ROWS = (64 << 20) // (FEATURES * X_DTYPE.itemsize)

# HDF5 chunk of 1024 rows of x = 1 MiB: the block size of block shuffle.
H5_CHUNK_ROWS = 1024

# Held-out fraction for validation (the last rows, never shuffled into training).
VALIDATION_FRACTION = 0.05

MIN_ROWS = 200

# Above this share of the available memory the npy demo defaults to block
# shuffle: the page cache cannot be counted on to keep the file.
BLOCK_ABOVE_MEMORY_FRACTION = 0.5

# Steps of the in-memory comparison run: ~1-2 s of a 2-core CPU at this model size.
STEP_ONLY_STEPS = 500

# Bumped whenever the generator changes, so an old cache is rewritten.
_GENERATOR_VERSION = 2


def default_dir() -> Path:
    """`$XDG_CACHE_HOME/keras-bigarray/demo`, by default `~/.cache/...`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return Path(base) / "keras-bigarray" / "demo"


@dataclass
class DemoData:
    """The demo dataset on disk."""

    directory: Path
    format: str
    rows: int
    x: str  # what open_array takes
    y: str
    key_x: str | None = None
    key_y: str | None = None
    nbytes: int = 0
    reused: bool = False
    write_seconds: float = 0.0

    def open(self) -> tuple[Any, Any]:
        import keras_bigarray as kb

        return kb.open_array(self.x, key=self.key_x), kb.open_array(
            self.y, key=self.key_y
        )


@dataclass
class DemoResult:
    """What the demo measured."""

    data: DemoData
    shuffle: str
    batch_size: int
    epochs: int
    train_rows: int
    val_rows: int
    train_seconds: float
    rows_per_second: float
    memory_baseline: int
    memory_peak: int
    memory_growth: int
    memory_source: str
    val_accuracy: float
    chance_accuracy: float
    teacher_accuracy: float
    step_only_rows_per_second: float
    total_seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)


# ---- the data -------------------------------------------------------------------


def _teacher(seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0])
    return (rng.standard_normal((FEATURES, CLASSES)) / np.sqrt(FEATURES)).astype(
        np.float32
    )


def _chunk(
    seed: int, index: int, rows: int, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    # Each chunk has its own stream, so the data does not depend on the order
    # or the size of the writes around it.
    rng = np.random.default_rng([seed, 1, index])
    x = rng.standard_normal((rows, FEATURES), dtype=np.float32)
    logits = x @ w + TEACHER_NOISE * rng.standard_normal(
        (rows, CLASSES), dtype=np.float32
    )
    return x, np.argmax(logits, axis=1).astype(Y_DTYPE)


def _chunks(rows: int, seed: int):
    w = _teacher(seed)
    for i, start in enumerate(range(0, rows, WRITE_CHUNK_ROWS)):
        n = min(WRITE_CHUNK_ROWS, rows - start)
        yield start, *_chunk(seed, i, n, w)


def _npy_header(f: Any, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": shape,
    }
    np.lib.format.write_array_header_1_0(f, header)


def _write_npy(directory: Path, rows: int, seed: int, progress: Any) -> list[Path]:
    xp, yp = directory / "x.npy", directory / "y.npy"
    xt, yt = directory / "x.npy.partial", directory / "y.npy.partial"
    with open(xt, "wb") as fx, open(yt, "wb") as fy:
        _npy_header(fx, X_DTYPE, (rows, FEATURES))
        _npy_header(fy, Y_DTYPE, (rows,))
        for start, x, y in _chunks(rows, seed):
            x.tofile(fx)
            y.tofile(fy)
            progress(start + len(x))
    os.replace(xt, xp)
    os.replace(yt, yp)
    return [xp, yp]


def _write_h5(directory: Path, rows: int, seed: int, progress: Any) -> list[Path]:
    import h5py

    path, tmp = directory / "data.h5", directory / "data.h5.partial"
    with h5py.File(tmp, "w") as f:
        chunk = min(H5_CHUNK_ROWS, rows)
        dx = f.create_dataset(
            "x", shape=(rows, FEATURES), dtype=X_DTYPE, chunks=(chunk, FEATURES)
        )
        dy = f.create_dataset("y", shape=(rows,), dtype=Y_DTYPE, chunks=(chunk,))
        for start, x, y in _chunks(rows, seed):
            dx[start : start + len(x)] = x
            dy[start : start + len(y)] = y
            progress(start + len(x))
    os.replace(tmp, path)
    return [path]


def _data_for(directory: Path, fmt: str, rows: int) -> DemoData:
    if fmt == "npy":
        return DemoData(
            directory, fmt, rows, str(directory / "x.npy"), str(directory / "y.npy")
        )
    return DemoData(
        directory,
        fmt,
        rows,
        str(directory / "data.h5"),
        str(directory / "data.h5"),
        "x",
        "y",
    )


def _files(data: DemoData) -> list[Path]:
    return sorted({Path(data.x), Path(data.y)})


def write_dataset(
    directory: str | os.PathLike[str],
    size_bytes: int,
    fmt: str = "npy",
    *,
    seed: int = 0,
    out: TextIO | None = None,
) -> DemoData:
    """Writes (or reuses) the demo dataset of about `size_bytes` in `directory`.

    x is float32 rows of 256 features, y int32 labels of 10 classes from a fixed
    random linear teacher with noise. Written `WRITE_CHUNK_ROWS` rows at a
    time, so memory stays at one chunk whatever the size; a dataset already
    there with the same parameters is reused.

    Args:
        directory: the cache folder (created if missing).
        size_bytes: bytes of x and y together, about.
        fmt: `"npy"` (x.npy and y.npy) or `"h5"` (data.h5, datasets x and y,
            chunks of 1024 rows).
        seed: the teacher's and the data's seed.
        out: where progress goes; None for silence.

    Raises:
        ValueError: a bad format, or a size under `MIN_ROWS` rows.
        OSError: not enough free disk space, or the folder is not writable.
    """
    if fmt not in ("npy", "h5"):
        raise ValueError(f"format must be 'npy' or 'h5', received format={fmt!r}")
    rows = int(size_bytes) // ROW_NBYTES
    if rows < MIN_ROWS:
        raise ValueError(
            f"size={format_bytes(size_bytes)} makes {rows} rows of "
            f"{ROW_NBYTES} bytes; the demo needs at least {MIN_ROWS} rows "
            f"({format_bytes(MIN_ROWS * ROW_NBYTES)})."
        )
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    data = _data_for(directory, fmt, rows)
    meta_path = directory / f"{fmt}.json"
    meta = {
        "format": fmt,
        "rows": rows,
        "features": FEATURES,
        "classes": CLASSES,
        "seed": seed,
        "noise": TEACHER_NOISE,
        "version": _GENERATOR_VERSION,
    }
    expected = rows * ROW_NBYTES
    try:
        old = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        old = None
    files = _files(data)
    if old == meta and all(p.exists() for p in files):
        data.nbytes = sum(p.stat().st_size for p in files)
        data.reused = True
        return data

    meta_path.unlink(missing_ok=True)  # invalid until the new files are complete
    have = sum(p.stat().st_size for p in files if p.exists())
    free = shutil.disk_usage(directory).free + have
    if free < expected + (64 << 20):
        raise OSError(
            f"not enough disk space in '{directory}' for a {format_bytes(expected)} "
            f"dataset ({format_bytes(free)} free). Pass a smaller --size or "
            "another --dir."
        )

    last = [0.0]
    t0 = time.perf_counter()

    def progress(done: int) -> None:
        if out is None or not out.isatty():
            return
        now = time.perf_counter()
        if now - last[0] > 0.5 or done == rows:
            last[0] = now
            out.write(f"\r  writing: {100 * done / rows:5.1f}%")
            out.flush()

    if out is not None:
        print(
            f"Writing the demo dataset: {rows:,} rows x {FEATURES} float32 features "
            f"+ int32 labels ({format_bytes(expected)}) to {directory}",
            file=out,
            flush=True,
        )
    writer = _write_npy if fmt == "npy" else _write_h5
    paths = writer(directory, rows, seed, progress)
    data.write_seconds = time.perf_counter() - t0
    if out is not None and out.isatty():
        out.write("\n")
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    data.nbytes = sum(p.stat().st_size for p in paths)
    return data


# ---- training -----------------------------------------------------------------------


def _build_model(seed: int) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(HIDDEN, activation="relu"),
            keras.layers.Dense(CLASSES),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _timer_callback() -> Any:
    import keras

    class TrainTimer(keras.callbacks.Callback):
        """Seconds spent in training batches (validation excluded)."""

        def __init__(self) -> None:
            super().__init__()
            self.seconds = 0.0
            self._t0 = 0.0
            self._last = 0.0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._t0 = self._last = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self._last = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.seconds += self._last - self._t0

    return TrainTimer()


def _default_shuffle(data: DemoData, out: TextIO) -> str:
    # HDF5: block, aligned to its chunks. npy: the exact global shuffle while
    # the page cache can hold the file; past that, every random row would be a
    # disk read, and block shuffle keeps reads near-sequential.
    if data.format != "npy":
        return "block"
    avail = available_memory()
    if avail is not None and data.nbytes > avail * BLOCK_ABOVE_MEMORY_FRACTION:
        print(
            f"Using shuffle='block': the {format_bytes(data.nbytes)} dataset is more "
            f"than half the {format_bytes(avail)} of available memory, so the page "
            "cache cannot keep it (pass --shuffle global to override)",
            file=out,
            flush=True,
        )
        return "block"
    return "global"


def _step_only_rate(model: Any, batch: tuple[Any, Any], steps: int) -> float:
    """Rows/s of `fit` fed one in-memory batch over and over: the pure step cost."""
    timer = _timer_callback()
    try:
        import tensorflow as tf

        feed: Any = tf.data.Dataset.from_tensors(batch).repeat(steps)
    except ImportError:  # another Keras backend without TensorFlow

        def repeat() -> Any:
            for _ in range(steps):
                yield batch

        feed = repeat()
    model.fit(
        feed,
        epochs=1,
        steps_per_epoch=steps,
        verbose=0,
        shuffle=False,
        callbacks=[timer],
    )
    return steps * len(batch[1]) / max(timer.seconds, 1e-9)


def _teacher_accuracy(x: Any, y: Any, val: Any, seed: int) -> float:
    # How often the noiseless teacher agrees with the labels: the best accuracy
    # any model can expect on these rows.
    w = _teacher(seed)
    lo, hi = val.rows
    hits = 0
    for a in range(lo, hi, WRITE_CHUNK_ROWS):
        b = min(hi, a + WRITE_CHUNK_ROWS)
        hits += int(np.count_nonzero(np.argmax(x[a:b] @ w, axis=1) == y[a:b]))
    return hits / max(1, hi - lo)


def _chance(y: Any, val: Any) -> float:
    # The majority class of the validation rows: what always guessing it scores.
    lo, hi = val.rows
    labels = y[lo:hi]
    return float(np.bincount(labels, minlength=CLASSES).max() / max(1, len(labels)))


def run_demo(
    directory: str | os.PathLike[str] | None = None,
    *,
    size_bytes: int,
    fmt: str = "npy",
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    shuffle: str | None = None,
    seed: int = 0,
    verbose: int | str = "auto",
    out: TextIO | None = None,
) -> DemoResult:
    """Writes (or reuses) the dataset, trains on it streaming, prints a summary.

    Args:
        directory: the cache folder; None for `default_dir()`.
        size_bytes: dataset size (x and y), about.
        fmt: `"npy"` or `"h5"`.
        epochs: passes over the training rows.
        batch_size: rows per batch.
        shuffle: `"global"` or `"block"`; None: block for h5, and for npy
            global, or block when the file is over half the available memory.
        seed: data, shuffle and model-initialisation seed.
        verbose: `model.fit`'s verbosity; "auto": a progress bar on a terminal,
            a line per epoch otherwise.
        out: where to print (default stdout).

    Returns:
        A `DemoResult` with the measurements.
    """
    out = sys.stdout if out is None else out
    t_start = time.perf_counter()
    if shuffle not in (None, "global", "block"):
        raise ValueError(f"shuffle must be 'global' or 'block', received {shuffle=}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, received {epochs=}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, received {batch_size=}")
    data = write_dataset(
        directory if directory is not None else default_dir(),
        size_bytes,
        fmt,
        seed=seed,
        out=out,
    )
    if data.reused:
        print(f"Reusing the demo dataset in {data.directory}", file=out, flush=True)
    if shuffle is None:
        shuffle = _default_shuffle(data, out)

    import keras_bigarray as kb

    x, y = data.open()
    ds = kb.BigArrayDataset(x, y, batch_size=batch_size, shuffle=shuffle, seed=seed)
    train, val = ds.validation_split(VALIDATION_FRACTION)
    model = _build_model(seed)

    # One warm-up step traces the training and test functions, so the memory
    # measured below is the data pipeline's and the step's, not TF's one-off
    # graph building; it trains on a single batch.
    xb, yb = train[0]
    model.train_on_batch(xb, yb)
    model.test_on_batch(*val[0])
    del xb, yb

    if verbose == "auto":
        verbose = 1 if out.isatty() else 2
    timer = _timer_callback()
    print(
        f"Training {epochs} epoch(s) on {train.num_rows:,} rows, validating on "
        f"{val.num_rows:,}",
        file=out,
        flush=True,
    )
    stdout = sys.stdout
    try:
        sys.stdout = out  # Keras prints its progress to sys.stdout
        with PeakMemory() as mem:
            history = model.fit(
                train,
                validation_data=val,
                epochs=epochs,
                verbose=verbose,
                callbacks=[timer],
            )
    finally:
        sys.stdout = stdout

    # The same model fed one batch from memory, as many steps as one epoch
    # (at most STEP_ONLY_STEPS): what the pipeline's throughput is measured against.
    step_only = _step_only_rate(model, train[0], min(len(train), STEP_ONLY_STEPS))

    hist = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    train_rows = train.num_rows * epochs
    result = DemoResult(
        data=data,
        shuffle=shuffle,
        batch_size=batch_size,
        epochs=epochs,
        train_rows=train_rows,
        val_rows=val.num_rows,
        train_seconds=timer.seconds,
        rows_per_second=train_rows / max(timer.seconds, 1e-9),
        memory_baseline=mem.baseline,
        memory_peak=mem.peak,
        memory_growth=mem.growth,
        memory_source=mem.source,
        val_accuracy=hist["val_accuracy"][-1],
        chance_accuracy=_chance(y, val),
        teacher_accuracy=_teacher_accuracy(x, y, val, seed),
        step_only_rows_per_second=step_only,
        total_seconds=time.perf_counter() - t_start,
        history=hist,
    )
    print_summary(result, out)
    return result


def print_summary(r: DemoResult, out: TextIO) -> None:
    """The one-screen summary at the end of the demo (under 80 columns wide,
    but for the dataset's path)."""
    d = r.data
    files = " + ".join(sorted({Path(d.x).name, Path(d.y).name}))
    how = "reused" if d.reused else f"written in {d.write_seconds:.1f} s"
    ram = available_memory()
    anon = r.memory_source == "RssAnon"
    share = 100 * r.memory_growth / max(1, d.nbytes)
    of_step = 100 * r.rows_per_second / max(r.step_only_rows_per_second, 1e-9)
    x_rate = format_bytes(r.rows_per_second * FEATURES * X_DTYPE.itemsize)
    per_epoch = r.train_rows // r.epochs
    lines = [
        "",
        "keras-bigarray demo: summary",
        f"  dataset     {d.directory}",
        f"              {files}, {format_bytes(d.nbytes)} ({how})",
        f"              {d.rows:,} rows: {FEATURES} float32 features, "
        f"a label of {CLASSES} classes",
        f"  training    {r.epochs} epoch(s) x {per_epoch:,} rows, "
        f"shuffle={r.shuffle!r}, batch_size={r.batch_size}",
        f"              validation: the last {r.val_rows:,} rows; "
        f"model Dense {FEATURES}-{HIDDEN}-{CLASSES}",
        f"  throughput  {r.rows_per_second:,.0f} rows/s ({x_rate}/s), "
        f"{r.train_seconds:.1f} s of training steps",
        f"              = {of_step:.0f}% of the same model fed one in-memory batch",
        f"              over and over ({r.step_only_rows_per_second:,.0f} rows/s)",
        f"  memory      peak growth during fit: {format_bytes(r.memory_growth)}"
        f" = {share:.1f}% of the {format_bytes(d.nbytes)} dataset",
        (
            "              (anonymous memory: page cache and mapped files excluded;"
            if anon
            else "              (peak RSS, mapped file pages included: rough;"
        ),
        f"              baseline {format_bytes(r.memory_baseline)}, "
        f"peak {format_bytes(r.memory_peak)}"
        + (f", {format_bytes(ram)} available)" if ram else ")"),
        "              model.fit(np.load(path, mmap_mode='r')) would copy the",
        "              whole array into memory instead",
        f"  accuracy    {100 * r.val_accuracy:.1f}% on validation (chance "
        f"{100 * r.chance_accuracy:.1f}%; the noiseless",
        f"              teacher that labelled the data: "
        f"{100 * r.teacher_accuracy:.1f}%)",
        f"  total       {r.total_seconds:.1f} s",
    ]
    print("\n".join(lines), file=out, flush=True)
