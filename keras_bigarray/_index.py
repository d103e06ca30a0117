"""Index algebra shared by every source: normalise a numpy-style row key, sort a
batch of row indices, split it into contiguous runs, and put the rows back in the
order they were asked for. Pure numpy, no I/O."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

__all__ = ["normalize_indices", "runs", "is_sorted", "restore_order"]


def normalize_indices(key: Any, length: int) -> np.ndarray:
    """Returns `key` (an integer or boolean array-like) as int64 row indices.

    Negative indices count from the end, as in numpy.

    Raises:
        IndexError: an index is out of range, or a boolean mask has the wrong
            length.
        TypeError: the key is not integer or boolean.
    """
    idx = np.asarray(key)
    if idx.dtype == np.bool_:
        if idx.shape != (length,):
            raise IndexError(
                f"boolean index of shape {idx.shape} does not match the array's "
                f"{length} rows"
            )
        return np.flatnonzero(idx).astype(np.int64, copy=False)
    if idx.size == 0:
        return np.zeros(idx.shape, dtype=np.int64)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(
            f"row indices must be integers or booleans, received dtype {idx.dtype}"
        )
    idx = idx.astype(np.int64, copy=False)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < -length or hi >= length:
        bad = lo if lo < -length else hi
        raise IndexError(f"index {bad} is out of bounds for an array of {length} rows")
    if lo < 0:
        idx = np.where(idx < 0, idx + length, idx)
    return idx


def normalize_int(key: Any, length: int) -> int:
    """Returns an integer row key as a non-negative index, numpy-style."""
    i = operator.index(key)
    if not -length <= i < length:
        raise IndexError(f"index {i} is out of bounds for an array of {length} rows")
    return i + length if i < 0 else i


def is_sorted(idx: np.ndarray) -> bool:
    """True when `idx` is non-decreasing."""
    return idx.size < 2 or bool(np.all(idx[1:] >= idx[:-1]))


def runs(sorted_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Splits sorted, unique indices into contiguous runs.

    Returns:
        `(starts, stops)`: run `k` covers rows `starts[k]:stops[k]`.
    """
    if sorted_idx.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
    first = np.concatenate(([0], breaks))
    last = np.concatenate((breaks, [sorted_idx.size]))
    return sorted_idx[first], sorted_idx[last - 1] + 1


def restore_order(sorted_rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Inverts `sorted_rows = rows[order]`, giving `rows`."""
    out = np.empty_like(sorted_rows)
    out[order] = sorted_rows
    return out
