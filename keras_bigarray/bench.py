"""`keras-bigarray bench`: reads the user's own array under each shuffle mode
(sequential, global, block) as training would, and prints rows/s, MB/s and the
cost of shuffling against sequential reads, with a progress bar on stderr."""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, TextIO

from keras_bigarray._memory import format_bytes

__all__ = ["BenchRow", "add_arguments", "main_bench", "run_bench"]

MODES = ("sequential", "global", "block")

# Batches read per mode by default: enough to average over many blocks and
# shuffle windows, few enough that a mode takes seconds on a cached file.
DEFAULT_BATCHES = 200

# Each mode stops after this many seconds even before its batches are read:
# global shuffle of compressed HDF5 decodes about the whole file per batch.
DEFAULT_SECONDS = 10.0

_BAR_WIDTH = 30


@dataclass
class BenchRow:
    """What one shuffle mode measured."""

    mode: str
    batches: int
    rows: int
    nbytes: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")


class _Progress:
    """A one-line progress bar on a terminal; one summary line elsewhere."""

    def __init__(self, stream: TextIO | None, label: str, total: int):
        self.stream = stream
        self.label = label
        self.total = max(1, total)
        self.tty = bool(
            stream is not None and getattr(stream, "isatty", lambda: False)()
        )
        self.last = 0.0

    def update(
        self, done: int, nbytes: int, seconds: float, force: bool = False
    ) -> None:
        if self.stream is None or not self.tty:
            return
        now = time.perf_counter()
        if not force and now - self.last < 0.1:
            return
        self.last = now
        filled = int(_BAR_WIDTH * done / self.total)
        rate = nbytes / 1e6 / seconds if seconds > 0 else 0.0
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        self.stream.write(
            f"\r  {self.label:<10} [{bar}] {done}/{self.total} batches  "
            f"{rate:,.0f} MB/s "
        )
        self.stream.flush()

    def close(self, row: BenchRow) -> None:
        if self.stream is None:
            return
        if self.tty:
            self.update(row.batches, row.nbytes, row.seconds, force=True)
            self.stream.write("\n")
        else:
            self.stream.write(
                f"  {self.label:<10} {row.batches} batches in {row.seconds:.2f} s\n"
            )
        self.stream.flush()


def run_bench(
    source: Any,
    *,
    batch_size: int,
    batches: int = DEFAULT_BATCHES,
    seconds: float = DEFAULT_SECONDS,
    workers: int = 1,
    seed: int = 0,
    modes: tuple[str, ...] = MODES,
    progress: TextIO | None = None,
) -> tuple[list[BenchRow], list[str]]:
    """Reads up to `batches` batches of `source` under each shuffle mode.

    Args:
        source: anything `BigArrayDataset` takes as `x` (a `BigArray`, a path).
        batch_size: rows per batch.
        batches: batches read per mode (fewer when the epoch is shorter).
        seconds: a mode stops after this long, having read at least one batch.
        workers: 1 reads in this thread; more reads ahead on that many threads,
            as `model.fit` does with `workers=`.
        seed: the shuffle seed.
        modes: the shuffle modes to measure, in order.
        progress: where the progress bar goes (None: nowhere).

    Returns:
        `(rows, notes)`: one `BenchRow` per mode, and the warnings the dataset
        raised (e.g. global shuffle of compressed data), as text.
    """
    from keras_bigarray.dataset import BigArrayDataset

    rows: list[BenchRow] = []
    notes: list[str] = []
    for mode in modes:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = BigArrayDataset(
                source,
                batch_size=batch_size,
                shuffle=False if mode == "sequential" else mode,
                seed=seed,
                workers=workers,
            )
        for w in caught:
            text = f"{mode}: {w.message}"
            if text not in notes:
                notes.append(text)
        n = min(len(ds), batches)
        bar = _Progress(progress, mode, n)
        row_nbytes = sum(s.row_nbytes for s in ds._sources())
        done = got_rows = 0
        t0 = time.perf_counter()
        if workers <= 1:
            batch_iter: Any = (ds.reader.read(0, i) for i in range(n))
        else:
            batch_iter = ds.iterate_epoch(epoch=0)
        try:
            for batch in batch_iter:
                got_rows += len(batch[0])
                done += 1
                dt = time.perf_counter() - t0
                bar.update(done, got_rows * row_nbytes, dt)
                if done >= n or dt >= seconds:
                    break
        finally:
            close = getattr(batch_iter, "close", None)
            if close is not None:
                close()
        row = BenchRow(
            mode, done, got_rows, got_rows * row_nbytes, time.perf_counter() - t0
        )
        bar.close(row)
        rows.append(row)
    return rows, notes


def format_table(rows: list[BenchRow]) -> str:
    """The result table: one line per mode, with the ratio to sequential."""
    seq = next((r for r in rows if r.mode == "sequential"), None)
    lines = [
        f"{'mode':<12}{'batches':>8}{'rows/s':>14}{'MB/s':>12}{'vs sequential':>16}"
    ]
    for r in rows:
        vs = f"{r.rows_per_s / seq.rows_per_s:.2f}x" if seq and seq.rows_per_s else "-"
        lines.append(
            f"{r.mode:<12}{r.batches:>8}{r.rows_per_s:>14,.0f}{r.mb_per_s:>12,.0f}{vs:>16}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `keras-bigarray bench`."""
    from keras_bigarray.cli import _positive_int, add_source_options

    parser.add_argument(
        "path", help="a .npy, HDF5 or raw file, a shard folder or a quoted glob"
    )
    parser.add_argument(
        "--key", default=None, help="HDF5 dataset (needed when there are several)"
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="rows per batch (default: what `keras-bigarray inspect` recommends)",
    )
    parser.add_argument(
        "--batches",
        type=_positive_int,
        default=DEFAULT_BATCHES,
        help=f"batches read per shuffle mode (default: {DEFAULT_BATCHES})",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help=f"stop a mode after this many seconds (default: {DEFAULT_SECONDS:g})",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="reader threads; 1 reads in the foreground (default: 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    add_source_options(parser)


def main_bench(args: argparse.Namespace, out: TextIO, err: TextIO | None = None) -> int:
    """Runs `keras-bigarray bench` with parsed `args`; the table goes to `out`."""
    import keras_bigarray as kb
    from keras_bigarray.cli import (
        _cached_fraction,
        _files_of,
        recommend,
        source_kwargs,
    )

    err = sys.stderr if err is None else err
    if not args.seconds > 0:
        raise ValueError(f"--seconds must be > 0, received {args.seconds}")
    kwargs = source_kwargs(args)
    if not os.path.exists(args.path) and not glob.has_magic(args.path):
        raise FileNotFoundError(f"no such file or folder: '{args.path}'")
    arr = kb.open_array(args.path, **kwargs)
    batch = (
        args.batch_size
        or recommend(arr.nbytes, arr.row_nbytes, compressed=arr.compressed)[2]
    )
    files = _files_of(arr)
    cached = _cached_fraction(files) if files else None
    where = args.path if args.key is None else f"{args.path} [{args.key}]"
    print(
        f"{where}: {len(arr):,} rows x {format_bytes(arr.row_nbytes)} "
        f"({format_bytes(arr.nbytes)}, {arr.dtype}), batch {batch}, up to "
        f"{args.batches} batches or {args.seconds:g} s per mode, "
        f"{args.workers} reader thread{'s' if args.workers > 1 else ''}",
        file=out,
    )
    if cached is not None:
        print(
            f"page cache: {100 * cached:.0f}% of the file(s) resident at the start",
            file=out,
        )
    out.flush()
    rows, notes = run_bench(
        arr,
        batch_size=batch,
        batches=args.batches,
        seconds=args.seconds,
        workers=args.workers,
        seed=args.seed,
        progress=err,
    )
    print(file=out)
    print(format_table(rows), file=out)
    if cached is not None and cached < 0.9:
        print(
            "\nnote: the file was not all in the page cache, so the first mode read "
            "more from disk than the later ones; run again to compare cached reads.",
            file=out,
        )
    for n in notes:
        print(f"note: {n}", file=out)
    return 0
