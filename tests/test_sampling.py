"""Sampling: the keyed permutation is a bijection without N-sized arrays, and a
Sampler's epoch covers every row once across shards, in equal batch counts,
deterministically per (seed, epoch), local in block mode, uniform in global mode."""

from __future__ import annotations

import pickle
import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_bigarray.sampling import (
    FEISTEL_ROUNDS,
    Permutation,
    Sampler,
    draw_seed,
    normalize_shuffle,
    plan_shards,
)

SEEDS = st.integers(0, 2**64 - 1)
KEYS = st.lists(
    st.integers(0, 2**64 - 1), min_size=FEISTEL_ROUNDS, max_size=FEISTEL_ROUNDS
).map(lambda v: np.array(v, dtype=np.uint64))
HYPO = settings(max_examples=50, deadline=None)


def epoch(
    n: int, batch_size: int, epoch_: int = 0, num_shards: int = 1, **kw: Any
) -> list[list[tuple[np.ndarray, int]]]:
    """Every shard's batches of one epoch: `[shard][batch] -> (rows, num_real)`."""
    out = []
    for k in range(num_shards):
        s = Sampler(n, batch_size, num_shards=num_shards, shard_index=k, **kw)
        out.append([s.batch(epoch_, i) for i in range(s.num_batches)])
    return out


def order(n: int, epoch_: int = 0, **kw: Any) -> np.ndarray:
    """The whole epoch's row order (one shard, positions 0..n)."""
    return Sampler(n, 1, **kw).positions(epoch_, 0, n)


# ---- Permutation ---------------------------------------------------------------------


@HYPO
@given(n=st.integers(1, 5000), keys=KEYS)
def test_permutation_is_a_bijection_and_inverse_inverts(n: int, keys: np.ndarray):
    p = Permutation(n, keys)
    x = np.arange(n)
    y = p(x)
    assert y.dtype == np.int64 and y.shape == (n,)
    np.testing.assert_array_equal(np.sort(y), x)
    np.testing.assert_array_equal(p.inverse(y), x)
    np.testing.assert_array_equal(p(p.inverse(x)), x)
    # Pure per index: any subset, in any order and shape, maps the same way.
    sub = np.array([n - 1, 0, n // 2, n // 2]).reshape(2, 2)
    np.testing.assert_array_equal(p(sub), y[sub])
    assert Permutation(n, keys)(x).tolist() == y.tolist()


def test_permutation_needs_no_n_sized_array():
    n = 2**34
    p = Permutation(n, np.arange(1, FEISTEL_ROUNDS + 1, dtype=np.uint64))
    x = (np.arange(1000, dtype=np.int64) * 17_179_869_143) % n
    x[:2] = [0, n - 1]
    tracemalloc.start()
    try:
        y = p(x)
        back = p.inverse(y)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # bytes; an N-sized index would be 128 GiB
    assert y.min() >= 0 and y.max() < n
    assert np.unique(y).size == 1000
    np.testing.assert_array_equal(back, x)


def test_permutation_rejects_bad_domains():
    keys = np.arange(FEISTEL_ROUNDS, dtype=np.uint64)
    with pytest.raises(ValueError, match="n >= 1"):
        Permutation(0, keys)
    p = Permutation(10, keys)
    assert p(np.zeros(0, dtype=np.int64)).shape == (0,)
    for bad in [[10], [-1], [3, 11]]:
        with pytest.raises(IndexError, match=r"\[0, 10\)"):
            p(np.array(bad))
        with pytest.raises(IndexError, match=r"\[0, 10\)"):
            p.inverse(np.array(bad))
    np.testing.assert_array_equal(Permutation(1, keys)(np.zeros(3, int)), [0, 0, 0])


# ---- Sampler: the epoch contract -----------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(1, 400),
    batch_size=st.integers(1, 40),
    mode=st.sampled_from(["sequential", "global", "block"]),
    num_shards=st.integers(1, 5),
    drop_remainder=st.booleans(),
    pad_remainder=st.booleans(),
    block_rows=st.integers(1, 20),
    window_blocks=st.integers(1, 5),
    seed=SEEDS,
    epoch_=st.integers(0, 1000),
)
def test_epoch_contract(
    n: int,
    batch_size: int,
    mode: str,
    num_shards: int,
    drop_remainder: bool,
    pad_remainder: bool,
    block_rows: int,
    window_blocks: int,
    seed: int,
    epoch_: int,
):
    kw = dict(
        mode=mode,
        seed=seed,
        drop_remainder=drop_remainder,
        pad_remainder=pad_remainder,
        block_rows=block_rows,
        window_blocks=window_blocks,
    )
    shards = epoch(n, batch_size, epoch_, num_shards, **kw)
    layout = Sampler(n, batch_size, num_shards=num_shards, **kw).layout
    # Equal batch counts on every shard: collectives never wait on a missing one.
    assert len({len(b) for b in shards}) == 1
    assert len(shards[0]) == layout.num_batches
    seen = []
    for k, batches in enumerate(shards):
        assert sum(r for _, r in batches) == layout.lengths[k]
        for i, (rows, num_real) in enumerate(batches):
            assert rows.dtype == np.int64 and rows.shape == (num_real,)
            last = i == len(batches) - 1
            if drop_remainder:
                assert num_real == batch_size
            elif not last:
                assert num_real == batch_size  # only the last batch is short
            else:
                assert (0 if pad_remainder else 1) <= num_real <= batch_size
            if mode == "sequential":
                assert np.all(np.diff(rows) == 1)  # one contiguous run
            else:
                assert np.all(np.diff(rows) > 0)  # sorted, for sequential reads
            seen.append(rows)
    rows = np.concatenate(seen) if seen else np.zeros(0, np.int64)
    # No row twice, on one shard or on two.
    assert np.unique(rows).size == rows.size
    assert rows.size == n - layout.dropped
    assert rows.size == 0 or (rows.min() >= 0 and rows.max() < n)
    if not drop_remainder and layout.dropped == 0:
        np.testing.assert_array_equal(np.sort(rows), np.arange(n))
    if pad_remainder and not drop_remainder:
        assert layout.dropped == 0
    # Same seed and epoch: the same batches, also from a pickled copy.
    again = pickle.loads(
        pickle.dumps(
            Sampler(
                n, batch_size, num_shards=num_shards, shard_index=num_shards - 1, **kw
            )
        )
    )
    for i, (rows_i, real_i) in enumerate(shards[-1]):
        got, got_real = again.batch(epoch_, i)
        assert got_real == real_i
        np.testing.assert_array_equal(got, rows_i)


def test_batch_index_out_of_range():
    s = Sampler(34, 16)
    assert s.num_batches == 3
    for i in [-1, 3]:
        with pytest.raises(IndexError, match="3 batches"):
            s.batch(0, i)


@HYPO
@given(seed=SEEDS, mode=st.sampled_from(["global", "block"]))
def test_epochs_and_seeds_change_the_order(seed: int, mode: str):
    n = 500
    kw = dict(mode=mode, block_rows=10, window_blocks=4)
    first = order(n, 0, seed=seed, **kw)
    np.testing.assert_array_equal(np.sort(first), np.arange(n))
    assert not np.array_equal(first, np.arange(n))
    assert not np.array_equal(first, order(n, 1, seed=seed, **kw))
    assert not np.array_equal(first, order(n, 0, seed=seed ^ 1, **kw))
    np.testing.assert_array_equal(first, order(n, 0, seed=seed, **kw))


def test_seed_words_do_not_alias():
    # A big seed is two 32-bit words: (2**32 + s, epoch 0) once reused (s, epoch 1).
    for mode in ["global", "block"]:
        kw = dict(mode=mode, block_rows=4, window_blocks=2)
        assert not np.array_equal(
            order(300, 0, seed=2**32 + 7, **kw), order(300, 1, seed=7, **kw)
        )
        assert not np.array_equal(
            order(300, 0, seed=7, **kw), order(300, 0, seed=7 + 2**32, **kw)
        )
        assert not np.array_equal(
            order(300, 2**32, seed=0, **kw), order(300, 0, seed=1, **kw)
        )


def test_positions_across_cache_chunks():
    n = 70_000  # more than one 65536-position chunk of the cache
    for mode in ["global", "block"]:
        s = Sampler(n, 1000, mode=mode, seed=3, block_rows=100, window_blocks=8)
        full = s.positions(5, 0, n)
        np.testing.assert_array_equal(np.sort(full), np.arange(n))
        fresh = Sampler(n, 1000, mode=mode, seed=3, block_rows=100, window_blocks=8)
        np.testing.assert_array_equal(
            fresh.positions(5, 65_000, 66_000), full[65_000:66_000]
        )
        np.testing.assert_array_equal(fresh.positions(5, 69_990, n), full[69_990:])


def test_block_slots_kept_in_pieces_give_the_same_order(monkeypatch):
    # Block-order slots are evaluated _SLOTS at a time and kept: windows and
    # hints that straddle two pieces must see exactly the one permutation.
    import keras_bigarray.sampling as sampling

    kw = dict(mode="block", seed=11, block_rows=7, window_blocks=5)
    n = 2_000  # 286 blocks, the last one partial
    whole = Sampler(n, 64, **kw)
    want_order = whole.positions(3, 0, n)
    want_blocks = [whole.batch_blocks(3, i, i + 3) for i in range(whole.num_batches)]
    monkeypatch.setattr(sampling, "_SLOTS", 4)
    pieces = Sampler(n, 64, **kw)
    np.testing.assert_array_equal(pieces.positions(3, 0, n), want_order)
    for i, want in enumerate(want_blocks):
        np.testing.assert_array_equal(pieces.batch_blocks(3, i, i + 3), want)
    np.testing.assert_array_equal(np.sort(want_order), np.arange(n))


# ---- block mode ----------------------------------------------------------------------


@HYPO
@given(
    n=st.integers(1, 600),
    block_rows=st.integers(1, 30),
    window_blocks=st.integers(1, 6),
    seed=SEEDS,
    epoch_=st.integers(0, 50),
)
def test_block_mode_is_local(
    n: int, block_rows: int, window_blocks: int, seed: int, epoch_: int
):
    rows = order(
        n,
        epoch_,
        mode="block",
        seed=seed,
        block_rows=block_rows,
        window_blocks=window_blocks,
    )
    np.testing.assert_array_equal(np.sort(rows), np.arange(n))
    window = block_rows * window_blocks
    blocks = rows // block_rows
    # Each block is read within one window of positions ...
    for b in np.unique(blocks):
        where = np.flatnonzero(blocks == b)
        assert where.max() - where.min() < window
    # ... and, when blocks tile the rows, each window is whole blocks, at most
    # window_blocks of them.
    if n % block_rows == 0:
        for start in range(0, n, window):
            inside = blocks[start : start + window]
            assert np.unique(inside).size <= window_blocks
            assert np.all(np.bincount(inside)[np.unique(inside)] == block_rows)


@HYPO
@given(
    n=st.integers(1, 400),
    batch_size=st.integers(1, 40),
    block_rows=st.integers(1, 30),
    window_blocks=st.integers(1, 6),
    num_shards=st.integers(1, 3),
    data=st.data(),
)
def test_batch_blocks_hold_every_row_of_the_batches(
    n, batch_size, block_rows, window_blocks, num_shards, data
):
    # The read-ahead hints ask for batch_blocks(...): every row the batches
    # read must be in those blocks, and they span at most the batches' windows.
    if n < num_shards:
        return
    s = Sampler(
        n,
        batch_size,
        mode="block",
        seed=data.draw(SEEDS),
        block_rows=block_rows,
        window_blocks=window_blocks,
        num_shards=num_shards,
        shard_index=data.draw(st.integers(0, num_shards - 1)),
        pad_remainder=data.draw(st.booleans()),
    )
    epoch_ = data.draw(st.integers(0, 20))
    start = data.draw(st.integers(0, s.num_batches))
    stop = data.draw(st.integers(start, s.num_batches))
    held = set(s.batch_blocks(epoch_, start, stop).tolist())
    read = {
        int(r) // block_rows
        for i in range(start, stop)
        for r in s.batch(epoch_, i)[0][: s.batch(epoch_, i)[1]]
    }
    assert read <= held
    windows = -(-stop * batch_size // (block_rows * window_blocks)) + 1
    assert len(held) <= windows * window_blocks


def test_block_order_is_shuffled():
    n, br = 64 * 5, 5
    for seed in range(5):
        rows = order(n, 0, mode="block", seed=seed, block_rows=br, window_blocks=4)
        blocks = rows // br
        _, first = np.unique(blocks, return_index=True)
        by_appearance = blocks[np.sort(first)]
        assert not np.array_equal(by_appearance, np.arange(64))
        assert not np.array_equal(rows[: 4 * br], np.sort(rows[: 4 * br]))


# ---- global mode uniformity, golden values -------------------------------------------


def test_global_mode_is_roughly_uniform():
    # Position of row 0 over 2000 fixed seeds; chi-square with 9 degrees of
    # freedom has mean 9, and 45 lies beyond p = 1e-6: loose, and deterministic.
    for n, bins in [(10, 10), (37, 10), (1000, 10)]:
        where = np.array(
            [
                np.flatnonzero(order(n, 0, mode="global", seed=s) == 0)[0]
                for s in range(2000)
            ]
        )
        counts = np.bincount(where * bins // n, minlength=bins)
        expected = np.bincount(np.arange(n) * bins // n, minlength=bins) * 2000 / n
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 45, (n, counts)


def test_golden_batches():
    # Pins the exact order across versions: a change here changes every user's
    # shuffles for a given seed, which must be deliberate.
    s = Sampler(1000, 8, mode="global", seed=1234, shard_index=1, num_shards=2)
    assert s.batch(2, 0)[0].tolist() == GOLDEN_GLOBAL
    s = Sampler(1000, 8, mode="block", seed=1234, block_rows=16, window_blocks=4)
    assert s.batch(2, 0)[0].tolist() == GOLDEN_BLOCK
    p = Permutation(1000, np.arange(1, FEISTEL_ROUNDS + 1, dtype=np.uint64))
    assert p(np.arange(8)).tolist() == GOLDEN_PERMUTATION


GOLDEN_GLOBAL = [20, 27, 83, 300, 336, 619, 623, 993]
GOLDEN_BLOCK = [160, 164, 450, 454, 456, 640, 641, 655]
GOLDEN_PERMUTATION = [155, 652, 667, 81, 830, 936, 556, 37]


# ---- plan_shards: the tail of an epoch -----------------------------------------------


@pytest.mark.parametrize(
    "n, batch_size, num_shards, drop, pad, lengths, num_batches, dropped",
    [
        (34, 16, 1, False, False, (34,), 3, 0),
        (34, 16, 1, True, False, (32,), 2, 2),
        (34, 16, 1, False, True, (34,), 3, 0),
        # 13 rows, 4 shards, batch 2: 4+3+3+3, every shard's last batch non-empty.
        (13, 2, 4, False, False, (4, 3, 3, 3), 2, 0),
        # 10 rows: 3+3+2+2 would leave shards 2, 3 an empty last batch, so the
        # last round is left out (2 rows < 4 shards) ...
        (10, 2, 4, False, False, (2, 2, 2, 2), 1, 2),
        # ... unless padded: every row, shards 2 and 3 get an all-padding batch.
        (10, 2, 4, False, True, (3, 3, 2, 2), 2, 0),
        (9, 2, 4, False, False, (2, 2, 2, 2), 1, 1),
        (13, 2, 4, True, False, (2, 2, 2, 2), 1, 5),
        (3, 2, 4, False, False, (0, 0, 0, 0), 0, 3),
        (3, 2, 4, False, True, (1, 1, 1, 0), 1, 0),
    ],
)
def test_plan_shards_tail(
    n: int,
    batch_size: int,
    num_shards: int,
    drop: bool,
    pad: bool,
    lengths: tuple[int, ...],
    num_batches: int,
    dropped: int,
):
    layout = plan_shards(n, batch_size, num_shards, drop, pad)
    assert layout.lengths == lengths
    assert layout.num_batches == num_batches
    assert layout.dropped == dropped
    assert layout.starts == tuple(np.cumsum((0,) + lengths[:-1]).tolist())


@HYPO
@given(
    n=st.integers(0, 3000), batch_size=st.integers(1, 64), num_shards=st.integers(1, 8)
)
def test_plan_shards_leaves_rows_out_only_below_num_shards(
    n: int, batch_size: int, num_shards: int
):
    # Without drop_remainder or padding, rows are left out only when fewer than
    # num_shards rows remain for the last round: exactly n % num_shards of them,
    # when n // num_shards fills whole batches.
    layout = plan_shards(n, batch_size, num_shards, False, False)
    whole = (n // num_shards) % batch_size == 0
    assert layout.dropped == (n % num_shards if whole else 0)
    assert layout.dropped < num_shards
    assert plan_shards(n, batch_size, num_shards, False, True).dropped == 0
    dropped = plan_shards(n, batch_size, num_shards, True, False).dropped
    assert dropped == n % (num_shards * batch_size)


def test_rows_left_out_warns():
    s = Sampler(10, 2, num_shards=4)
    assert s.layout.dropped == 2
    with pytest.warns(UserWarning, match=r"2 of 10 rows.*pad_remainder=True"):
        s.warn_if_rows_left_out()
    Sampler(10, 2, num_shards=4, pad_remainder=True).warn_if_rows_left_out()
    Sampler(10, 2, num_shards=4, drop_remainder=True).warn_if_rows_left_out()


# ---- arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mode="Global"), "mode must be one of"),
        (dict(batch_size=0), "batch_size must be >= 1, received batch_size=0"),
        (dict(num_rows=-1), "num_rows must be >= 0"),
        (dict(num_shards=0), "num_shards must be >= 1"),
        (dict(num_shards=2, shard_index=2), r"shard_index must be in \[0, 2\)"),
        (dict(shard_index=-1), "shard_index"),
        (dict(block_rows=0), "block_rows must be >= 1"),
        (dict(window_blocks=0), "window_blocks must be >= 1"),
        (dict(seed=-1), r"seed must be in \[0, 2\*\*64\)"),
        (dict(seed=2**64), "seed"),
    ],
)
def test_sampler_rejects_bad_arguments(kw: dict[str, Any], match: str):
    args = dict(num_rows=10, batch_size=2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        Sampler(**args)


def test_normalize_shuffle_and_draw_seed():
    assert normalize_shuffle(False) == "sequential"
    assert normalize_shuffle(None) == "sequential"
    assert normalize_shuffle(True) == "global"
    for mode in ["sequential", "global", "block"]:
        assert normalize_shuffle(mode) == mode
    for bad in ["random", 1, "Block"]:
        with pytest.raises(ValueError, match="shuffle must be"):
            normalize_shuffle(bad)
    seeds = {draw_seed() for _ in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


def test_cached_batches_cannot_be_corrupted():
    s = Sampler(100, 10, mode="global", seed=5)
    before = s.positions(0, 0, 100).copy()
    s.positions(0, 10, 20)[:] = -1  # positions() hands out fresh arrays
    rows, _ = s.batch(0, 1)
    with pytest.raises(ValueError, match="read-only"):
        rows[:] = -1  # batches are cached and shared: read-only
    np.testing.assert_array_equal(s.positions(0, 0, 100), before)
    np.testing.assert_array_equal(s.batch(0, 1)[0], np.sort(before[10:20]))
