"""`_rowmap.map_rows`: several files' rows as one array over their memory maps,
each file at an address where its rows fall on one grid of rows."""

from __future__ import annotations

import hashlib
import math
import mmap
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_settings, indexed_rows
from hypothesis import given
from hypothesis import strategies as st

from keras_bigarray._rowmap import map_rows

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="map_rows maps on Linux only"
)


@fixture_settings(40)
@given(
    lengths=st.lists(st.integers(0, 60), min_size=1, max_size=6),
    row=st.sampled_from([(1,), (3,), (16,), (256,), (1023,), (2, 5)]),
    dtype=st.sampled_from(["uint8", "int16", "float32", "float64"]),
    heads=st.lists(st.integers(0, 3), min_size=6, max_size=6),
)
def test_every_file_s_rows_are_where_the_shift_says(
    tmp_path_factory, lengths, row, dtype, heads
):
    d = tmp_path_factory.mktemp("m")
    w = math.prod(row) * np.dtype(dtype).itemsize
    g = math.gcd(mmap.PAGESIZE, w)
    data = indexed_rows(sum(lengths), row, dtype)
    files, at = [], 0
    for k, n in enumerate(lengths):
        # Header lengths that keep every file on one grid: the first a
        # multiple of 64 (its first row's alignment), the others that plus
        # multiples of gcd(page, row bytes).
        head = 64 * (1 + heads[0]) + (heads[k] * g * (1 + 4096 // g // 3) if k else 0)
        p = d / f"part-{k}.bin"
        p.write_bytes(b"\xee" * head + data[at : at + n].tobytes())
        files.append((str(p), head, n))
        at += n
    digests = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f, _, _ in files]
    got = map_rows(files, np.dtype(dtype), row)
    if sum(lengths) == 0 or w == 0:
        assert got is None
        return
    assert got is not None
    array, shift = got
    assert array.ctypes.data % 64 == 0 and shift.shape == (len(files),)
    at = 0
    for (_, _, n), s in zip(files, shift, strict=True):
        np.testing.assert_array_equal(array[s : s + n], data[at : at + n])
        at += n
    del array
    after = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f, _, _ in files]
    assert after == digests


def test_files_on_no_common_grid_are_not_mapped(tmp_path):
    data = indexed_rows(20, (4,), "float32")  # 16-byte rows
    for name, head in (("a", 128), ("b", 132)):
        (tmp_path / name).write_bytes(b"h" * head + data.tobytes())
    files = [(str(tmp_path / "a"), 128, 20), (str(tmp_path / "b"), 132, 20)]
    assert map_rows(files, np.dtype("float32"), (4,)) is None
    # The first row not 64-byte aligned: TensorFlow would abort on it.
    assert map_rows(files[1:], np.dtype("float32"), (4,)) is None


def test_writes_to_the_array_stay_private(tmp_path):
    data = indexed_rows(30, (8,), "float32")
    p = tmp_path / "x.bin"
    p.write_bytes(b"\0" * 64 + data.tobytes())
    array, shift = map_rows([(str(p), 64, 30)], np.dtype("float32"), (8,))
    array[shift[0]] = -1.0  # a private page: the file keeps its bytes
    del array
    assert p.read_bytes()[64:] == data.tobytes()
