"""The `keras-bigarray` command: `demo` (write a synthetic dataset, train on it
streaming, report speed, memory and accuracy) and `inspect` (what an array on disk
is, and which shuffle mode and batch size suit it)."""

from __future__ import annotations

import argparse
import glob
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from keras_bigarray._memory import available_memory, format_bytes, page_cache_fraction

__all__ = ["main", "parse_size", "recommend"]

PROG = "keras-bigarray"

# Batches up to this size keep the prefetch queue (10 batches by default) under
# 80 MiB while amortising the ~1 ms per-batch cost of a Keras step.
_TARGET_BATCH_BYTES = 8 << 20
_MAX_BATCH = 1024
_MIN_BATCH = 32

# An array counts as "fits in RAM" when it uses at most this share of the
# available memory: the rest stays free for the model, TensorFlow and other
# processes, so the page cache can keep the whole array after the first epoch.
_FITS_IN_RAM_FRACTION = 0.5

# Page-cache residency above which random reads cost what sequential ones do.
_CACHED_FRACTION = 0.9

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


class CliError(Exception):
    """An error shown as one line on stderr, with exit status 2."""


def parse_size(text: str) -> int:
    """`"200MB"` -> 200_000_000, `"1.5GiB"` -> 1610612736, `"4096"` -> 4096.

    Decimal units (KB, MB, GB, TB, or K, M, G, T) and binary ones (KiB, MiB,
    GiB, TiB), case-insensitive.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: expected a number with an optional unit, "
            "e.g. 200MB, 1GB, 1.5GiB"
        )
    value = float(m.group(1)) * _UNITS[unit]
    if value < 1 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: must be at least 1 byte"
        )
    return int(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer, received {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, received {value}")
    return value


def _shape(text: str) -> tuple[int, ...]:
    parts = [p for p in re.split(r"[,x\s()]+", text.strip()) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}: expected integers separated by commas, "
            "e.g. -1,28,28"
        ) from None
    if not shape:
        raise argparse.ArgumentTypeError(f"invalid shape {text!r}: no axes")
    return shape


# ---- inspect ----------------------------------------------------------------------


def recommend(
    nbytes: int,
    row_nbytes: int,
    *,
    compressed: bool = False,
    direct: bool = True,
    cached: float | None = None,
    available: int | None = None,
) -> tuple[str, str, int, str]:
    """The shuffle mode and batch size that suit an array, with the reasons.

    Args:
        nbytes: the array's size.
        row_nbytes: bytes in one row.
        compressed: a row costs decoding a whole chunk (compressed HDF5).
        direct: rows can be read from the file's bytes (False: through h5py).
        cached: the fraction of the file in the page cache, or None.
        available: memory available to the page cache, or None.

    Returns:
        `(shuffle, why, batch_size, why)`.
    """
    if compressed:
        mode, why = (
            "block",
            (
                "compressed: reading one row decodes its whole chunk, so a global "
                "shuffle would decode about one chunk per row; block shuffle decodes "
                "each chunk once per epoch"
            ),
        )
    elif not direct:
        mode, why = (
            "block",
            (
                "read through h5py (chunks split rows, or big-endian): whole-chunk "
                "reads in near-sequential order are much faster than scattered rows"
            ),
        )
    elif available is not None and nbytes > available:
        mode, why = (
            "block",
            (
                f"larger than the {format_bytes(available)} of available memory: "
                "every epoch reads from disk, and block shuffle keeps those reads "
                "near-sequential (1 MiB blocks; for .npy and raw files, read with "
                "O_DIRECT, past the page cache)"
            ),
        )
    elif cached is not None and cached >= _CACHED_FRACTION:
        mode, why = (
            "global",
            (
                f"{100 * cached:.0f}% in the page cache: random rows cost about what "
                "sequential ones do, so take the exact uniform shuffle"
            ),
        )
    elif available is None or nbytes <= _FITS_IN_RAM_FRACTION * available:
        where = "" if cached is None else f" ({100 * cached:.0f}% cached now)"
        mode, why = (
            "global",
            (
                f"fits in memory{where}: after the first epoch the page cache holds "
                "it and random reads are cheap (on a spinning or network disk, use "
                "'block' for the first epoch)"
            ),
        )
    else:
        mode, why = (
            "block",
            (
                f"more than half of the {format_bytes(available)} of available "
                "memory: the page cache may not keep it, so favour near-sequential "
                "reads"
            ),
        )

    batch = _MAX_BATCH
    while batch > _MIN_BATCH and batch * max(1, row_nbytes) > _TARGET_BATCH_BYTES:
        batch //= 2
    batch_bytes = batch * row_nbytes
    bwhy = (
        f"{format_bytes(batch_bytes)} per batch: the largest power of two up to "
        f"{_MAX_BATCH} under {format_bytes(_TARGET_BATCH_BYTES)} a batch, so the "
        "prefetch queue stays small; tune for your model"
    )
    if batch * row_nbytes > _TARGET_BATCH_BYTES:
        bwhy = (
            f"{format_bytes(batch_bytes)} per batch: rows are large, so keep "
            "batches small (and max_queue_size low) to bound memory"
        )
    return mode, why, batch, bwhy


def _files_of(arr: Any) -> list[str]:
    parts = getattr(arr, "parts", None)
    if parts is not None:
        return [f for p in parts for f in _files_of(p)]
    path = getattr(arr, "path", None)
    return [path] if isinstance(path, str) else []


def _cached_fraction(files: list[str]) -> float | None:
    total = cached = 0.0
    for f in dict.fromkeys(files):
        frac = page_cache_fraction(f)
        if frac is None:
            return None
        size = os.path.getsize(f)
        total += size
        cached += frac * size
    return cached / total if total else None


def _format_of(arr: Any) -> str:
    kind = type(arr).__name__
    if kind == "NpyArray":
        return ".npy (memory-mapped)"
    if kind == "RawArray":
        return f"raw binary (offset {arr.offset} bytes, memory-mapped)"
    if kind == "HDF5Array":
        layout = "contiguous" if arr.chunks is None else "chunked"
        how = {
            "none": "read from the file's bytes",
            "ours": "read from the file's bytes, chunks decoded by keras-bigarray",
        }.get(getattr(arr, "decode", ""), "read through h5py")
        return f"HDF5 dataset, {layout}, {how}"
    if kind == "ShardedArray":
        inner = _format_of(arr.parts[0])
        return f"{len(arr.parts)} shards of {inner}"
    return kind


def _tf_reads(arr: Any) -> str:
    """How `to_tf_dataset` (and `fit` under TensorFlow) reads this array."""
    from keras_bigarray._rowmap import grid_origin

    parts = getattr(arr, "parts", None)
    why = ""
    if arr.compressed:
        why = "compressed chunks are decoded"
    elif not arr.dtype.isnative:
        why = "the bytes are converted to native byte order"
    elif parts is None:
        where = arr.file_rows()
        if where is None:
            why = "the rows do not lie one after another in the file"
        elif where[1] % 64:
            why = (
                f"the rows start at byte {where[1]} of the file, not a multiple "
                "of 64, which TensorFlow needs"
            )
    else:
        files = arr._files()
        if files is None:
            why = "a shard's rows do not lie one after another in its file"
        elif (
            grid_origin(
                [off for (_, off), p in zip(files, parts, strict=True) if len(p)],
                arr.row_nbytes,
            )
            is None
        ):
            why = "the shards' headers put their rows on no common aligned grid"
    if why:
        text = f"a Python read per batch ({why})"
    elif parts is None:
        text = "tf.gather from the file's memory map, no Python call per batch"
    else:
        text = (
            "tf.gather from one memory map over every shard, no Python call per batch"
        )
    if arr.window_origin() is not None:
        text += (
            "; block shuffle over more than the memory available reads "
            "direct-I/O windows"
        )
    return text


def _describe(arr: Any, out: TextIO, label: str) -> tuple[str, int]:
    """Prints what `arr` is; returns the recommended `(shuffle, batch_size)`."""
    import numpy as np

    files = _files_of(arr)
    compressed = bool(arr.compressed)
    direct = all(
        getattr(p, "direct", True) for p in (getattr(arr, "parts", None) or [arr])
    )
    cached = _cached_fraction(files) if files else None
    avail = available_memory()
    mode, why, batch, bwhy = recommend(
        arr.nbytes,
        arr.row_nbytes,
        compressed=compressed,
        direct=direct,
        cached=cached,
        available=avail,
    )
    row_shape = arr.shape[1:]
    row_items = int(np.prod(row_shape)) if row_shape else 1
    block = arr.block_rows
    rows: list[tuple[str, str]] = [
        ("format", _format_of(arr)),
        ("shape", str(tuple(arr.shape))),
        ("dtype", str(arr.dtype)),
        ("size", f"{format_bytes(arr.nbytes)} ({arr.nbytes:,} bytes)"),
        (
            "row",
            f"{format_bytes(arr.row_nbytes)} ({row_items:,} x {arr.dtype}"
            + (f", shape {tuple(row_shape)}" if len(row_shape) > 1 else "")
            + ")",
        ),
        ("block rows", f"{block:,} ({format_bytes(block * arr.row_nbytes)} per block)"),
    ]
    chunks = getattr(arr, "chunks", None)
    parts = getattr(arr, "parts", None)
    if parts is not None:
        lens = [len(p) for p in parts]
        rows.append(
            (
                "shards",
                f"{len(parts)} files, {min(lens):,} to {max(lens):,} rows each "
                f"({files[0]} ... {files[-1]})"
                if files
                else f"{len(parts)}",
            )
        )
    if hasattr(arr, "chunks"):
        filters = ", ".join(arr.filters) or "none"
        rows.append(
            ("chunks", "none (contiguous)" if chunks is None else str(tuple(chunks)))
        )
        rows.append(("compression", filters))
    else:
        rows.append(("compression", "none"))
    rows.append(
        (
            "page cache",
            "unknown"
            if cached is None
            else f"{100 * cached:.0f}% of the file(s) resident",
        )
    )
    rows.append(("memory", f"{format_bytes(avail)} available"))
    rows.append(("tf.data", _tf_reads(arr)))
    rows.append(("shuffle", f"{mode!r}: {why}"))
    rows.append(("batch_size", f"{batch}: {bwhy}"))
    print(label, file=out)
    for k, v in rows:
        print(f"  {k:<12}{v}", file=out)
    return mode, batch


def _hdf5_keys(path: str) -> list[str]:
    from keras_bigarray import _hdf5

    h5py = _hdf5._h5py()
    with h5py.File(path, "r") as f:
        return _hdf5._list_datasets(f)


def _is_hdf5(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def _is_npy(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(6) == b"\x93NUMPY"


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """`--dtype`, `--shape`, `--offset`: how to read a raw file (inspect, bench)."""
    parser.add_argument(
        "--dtype", default=None, help="element type of a raw file, e.g. uint8"
    )
    parser.add_argument(
        "--shape",
        type=_shape,
        default=None,
        help="shape of a raw file, one -1 to infer, e.g. -1,28,28 (default: -1)",
    )
    parser.add_argument(
        "--offset", type=int, default=0, help="header bytes to skip in a raw file"
    )


def source_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `open_array` keywords given on the command line (key and raw options)."""
    kwargs: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("key", "dtype", "shape")
        if getattr(args, name) is not None
    }
    if args.offset:
        kwargs["offset"] = args.offset
    return kwargs


def cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    import keras_bigarray as kb

    path = args.path
    if not os.path.exists(path) and not glob.has_magic(path):
        raise CliError(f"no such file or folder: '{path}'")
    raw = args.dtype is not None or args.shape is not None or args.offset
    if args.key is None and not raw and _is_hdf5(path):
        keys = _hdf5_keys(path)
        if not keys:
            raise CliError(f"'{path}' is an HDF5 file with no datasets")
        print(f"{path}: HDF5 file, {len(keys)} dataset(s)", file=out)
        picks: list[tuple[str, int]] = []
        for key in keys:
            try:
                arr = kb.open_array(path, key=key)
            except (TypeError, ValueError) as e:
                print(f"\n[{key}]\n  skipped: {e}", file=out)
                continue
            print(file=out)
            picks.append(_describe(arr, out, f"[{key}]"))
        if len(picks) > 1:
            # One BigArrayDataset reads all its arrays in one order: the
            # strictest mode and the smallest batch suit them together.
            mode = "block" if any(m == "block" for m, _ in picks) else "global"
            batch = min(b for _, b in picks)
            print(
                f"\nTogether in one BigArrayDataset (x, y, ...): shuffle={mode!r}, "
                f"batch_size={batch}",
                file=out,
            )
        return 0
    kwargs = source_kwargs(args)
    if not raw and os.path.isfile(path) and not _is_hdf5(path) and not _is_npy(path):
        raise CliError(
            f"cannot tell the format of '{path}': it is neither .npy nor HDF5. "
            "For a raw binary file pass --dtype (and --shape, e.g. "
            "--shape -1,28,28; --offset for a header)."
        )
    arr = kb.open_array(path, **kwargs)
    label = (
        path
        if args.key is None
        else f"{path} [{arr.key if hasattr(arr, 'key') else args.key}]"
    )
    _describe(arr, out, label)
    return 0


# ---- demo --------------------------------------------------------------------------


def _import_keras_quietly() -> None:
    """Imports Keras (and its backend) with the C++ side's stderr silenced.

    TensorFlow's C++ logging prints INFO lines at import (oneDNN notices)
    before it reads TF_CPP_MIN_LOG_LEVEL; they would clutter the demo's one
    screen. Python errors still surface, raised after stderr is restored.
    Set TF_CPP_MIN_LOG_LEVEL=0 to see everything.
    """
    quiet = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") not in ("", "0")
    saved = devnull = -1
    if quiet:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
        except OSError:  # no real fd 2 (embedded): import as is
            saved = -1
    try:
        import keras  # noqa: F401
    except ImportError as e:
        raise CliError(
            f"the demo needs Keras with a backend ({e}); install one, e.g. "
            "pip install 'keras-bigarray[tf-cpu]'"
        ) from e
    finally:
        if saved >= 0:
            os.dup2(saved, 2)
            os.close(saved)
        if devnull >= 0:
            os.close(devnull)


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from keras_bigarray import demo

    _import_keras_quietly()

    demo.run_demo(
        args.dir,
        size_bytes=args.size,
        fmt=args.format,
        epochs=args.epochs,
        batch_size=args.batch_size,
        shuffle=args.shuffle,
        seed=args.seed,
        verbose="auto" if args.verbose is None else args.verbose,
        out=out,
    )
    return 0


# ---- bench -------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace, out: TextIO) -> int:
    from keras_bigarray import bench

    _import_keras_quietly()
    return bench.main_bench(args, out)


# ---- the parser --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from keras_bigarray import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Arrays on disk as a first-class Keras input.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from keras_bigarray.demo import (
        DEFAULT_BATCH_SIZE,
        DEFAULT_EPOCHS,
        DEFAULT_SIZE,
        default_dir,
    )

    d = sub.add_parser(
        "demo",
        help="write a synthetic dataset to disk, train a small model streaming it",
        description=(
            "Writes a synthetic classification dataset (float32 rows of 256 "
            "features, int32 labels of 10 classes from a noisy linear teacher) "
            "to a cache folder in chunks, then trains a small Dense model on it "
            "with BigArrayDataset, holding out the last 5% for validation, and "
            "prints training rows/s, the peak growth of anonymous memory during "
            "fit against the dataset size, and the validation accuracy. The "
            f"default ({DEFAULT_SIZE}, {DEFAULT_EPOCHS} epochs) takes well under a "
            "minute on a 2-core CPU; sizes larger than RAM work too (the data "
            "is streamed), they only take longer."
        ),
    )
    d.add_argument(
        "--size",
        type=parse_size,
        default=parse_size(DEFAULT_SIZE),
        metavar="SIZE",
        help=f"dataset size, e.g. 200MB, 1GB, 30GB (default: {DEFAULT_SIZE})",
    )
    d.add_argument(
        "--format", choices=("npy", "h5"), default="npy", help="default: npy"
    )
    d.add_argument(
        "--epochs",
        type=_positive_int,
        default=DEFAULT_EPOCHS,
        help=f"default: {DEFAULT_EPOCHS}",
    )
    d.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"default: {DEFAULT_BATCH_SIZE}",
    )
    d.add_argument(
        "--shuffle",
        choices=("global", "block"),
        default=None,
        help=(
            "default: block for h5; for npy global, or block when the dataset "
            "is over half the available memory"
        ),
    )
    d.add_argument(
        "--dir",
        default=None,
        help=f"cache folder, reused across runs (default: {default_dir()})",
    )
    d.add_argument("--seed", type=int, default=0, help="default: 0")
    d.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=None,
        help="model.fit verbosity (default: a progress bar on a terminal, else 2)",
    )
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser(
        "inspect",
        help="describe an array on disk and recommend a shuffle mode and batch size",
        description=(
            "Describes a .npy file, a raw binary file (with --dtype), an HDF5 "
            "file (every dataset, or --key), or a folder or glob of .npy shards: "
            "shape, dtype, chunking, compression, size, bytes per row, block "
            "rows, and the shuffle mode and batch size that suit it, with why."
        ),
    )
    i.add_argument("path", help="a file, a folder of .npy shards, or a quoted glob")
    i.add_argument("--key", default=None, help="HDF5 dataset (default: all of them)")
    add_source_options(i)
    i.set_defaults(func=cmd_inspect)

    from keras_bigarray import bench

    b = sub.add_parser(
        "bench",
        help="time reading your array under each shuffle mode",
        description=(
            "Reads batches of an array on disk under each shuffle mode "
            "(sequential, global, block) as training would, with a progress bar "
            "on stderr, and prints rows/s, MB/s and each mode against sequential."
        ),
    )
    bench.add_arguments(b)
    b.set_defaults(func=cmd_bench)
    return parser


def _join_negative_values(argv: list[str]) -> list[str]:
    # argparse takes "-1,28,28" for an option; "--shape -1,28,28" is what
    # people type, so pass it on as "--shape=-1,28,28".
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--shape":
            nxt = next(it, None)
            if nxt is not None and nxt.startswith("-") and nxt[1:2].isdigit():
                out.append(f"--shape={nxt}")
                continue
            out.append(a)
            if nxt is not None:
                out.append(nxt)
            continue
        out.append(a)
    return out


def _error_message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `keras-bigarray` command; returns the exit status.

    0 on success; 2 for a usage error or a bad path, key or argument (one line
    on stderr, no traceback); 130 when interrupted.
    """
    # Before TensorFlow is imported: keep its C++ INFO and WARNING lines out of
    # the command's output (the user's own setting wins).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    argv = _join_negative_values(sys.argv[1:] if argv is None else list(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed the usage and the problem
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    out = sys.stdout
    try:
        return int(args.func(args, out))
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as a Unix tool does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CliError, FileNotFoundError, KeyError, ValueError, TypeError, OSError) as e:
        print(f"{PROG} {args.command}: error: {_error_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
