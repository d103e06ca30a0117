"""Sampling: which rows make batch `b` of epoch `e` on shard `k`, as a pure function
of `(seed, epoch, shard, batch)`. No I/O and no N-sized arrays: a global shuffle
is a keyed bijection on `[0, N)` evaluated for the batch's positions only."""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Permutation", "Sampler", "normalize_shuffle", "draw_seed"]

SHUFFLE_MODES = ("sequential", "global", "block")

# Feistel rounds. Four make a keyed pseudorandom permutation (Luby-Rackoff);
# six mix small domains (a few hundred rows) noticeably better in the
# uniformity tests, for about 1 us per 1024 indices a round.
FEISTEL_ROUNDS = 6

# Positions computed together for one cache entry: numpy's per-call overhead
# (~1 us) dominates at batch size, so a chunk of positions amortises it.
_CHUNK = 1 << 16
_CACHE_ENTRIES = 8
# Block-order slots evaluated together (one small cache entry: 32 KiB).
_SLOTS = 1 << 12

# Halves up to this size (n <= 2**32 rows) run their rounds in uint32.
_SMALL_HALF = 1 << 16
_K1 = np.uint32(0x9E3779B1)
_K2 = np.uint32(0x85EBCA6B)
_S15 = np.uint32(15)
_S16 = np.uint32(16)

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_C1 = np.uint64(0x9E3779B97F4A7C15)
_C2 = np.uint64(0xBF58476D1CE4E5B9)
_C3 = np.uint64(0x94D049BB133111EB)


def normalize_shuffle(shuffle: Any) -> str:
    """Maps the `shuffle` argument to one of `SHUFFLE_MODES`."""
    if shuffle is False or shuffle is None:
        return "sequential"
    if shuffle is True:
        return "global"
    if isinstance(shuffle, str) and shuffle in SHUFFLE_MODES:
        return shuffle
    raise ValueError(
        "shuffle must be False, True, 'global' or 'block'; received "
        f"shuffle={shuffle!r}"
    )


def draw_seed() -> int:
    """A fresh seed from the OS's entropy, in [0, 2**63)."""
    return int(np.random.SeedSequence().entropy % (1 << 63))


_SCRATCH = threading.local()


def _scratch_uint32(n: int, count: int) -> list[np.ndarray]:
    """`count` uint32 work arrays of length `n`, reused by this thread.

    Fresh arrays of a few hundred KiB come from mmap and fault in every page
    when first written; reusing them made the Feistel rounds ~2.5x faster.
    """
    if n > _CHUNK:  # larger than any chunk: not kept for this thread
        return [np.empty(n, dtype=np.uint32) for _ in range(count)]
    have = getattr(_SCRATCH, "arrays", None)
    if have is None or have.shape[0] < count:
        have = np.empty((max(count, 4), _CHUNK), dtype=np.uint32)
        _SCRATCH.arrays = have
    return [have[i, :n] for i in range(count)]


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    # splitmix64's finaliser over (x + key): a fast, well-mixed round function.
    z = (x + key) * _C1
    z ^= z >> np.uint64(30)
    z *= _C2
    z ^= z >> np.uint64(27)
    z *= _C3
    z ^= z >> np.uint64(31)
    return z


def _keys(*words: int) -> np.ndarray:
    # Each word as two 32-bit halves, so the entropy has one spelling: a plain
    # list lets SeedSequence split a big seed into two words and pad short
    # lists with zeros, making (seed=2**32 + s, epoch=0) the key of (s, 1).
    halves = [h for w in words for h in (int(w) & 0xFFFFFFFF, int(w) >> 32)]
    return np.random.SeedSequence(halves).generate_state(
        FEISTEL_ROUNDS, dtype=np.uint64
    )


class Permutation:
    """A keyed bijection on `[0, n)`, evaluated on any indices in O(len).

    A balanced Feistel network on `Z_a x Z_a` with `a = ceil(sqrt(n))`, and
    cycle walking for the fewer than `2a + 1` values past `n`.

    Args:
        n: the domain size.
        keys: `FEISTEL_ROUNDS` uint64 round keys.
    """

    def __init__(self, n: int, keys: np.ndarray):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, received n={n}")
        self.n = int(n)
        self.a = max(1, math.isqrt(self.n - 1) + 1)
        self.keys = [np.uint64(k) for k in keys]
        # Up to 2**32 rows a half holds at most 2**16 values: rounds then run in
        # uint32 (SIMD-wide in numpy, no division), ~3x faster than uint64.
        self._keys32 = [
            np.uint32((int(k) ^ (int(k) >> 32)) & 0xFFFFFFFF) for k in self.keys
        ]

    def _rounds32(self, x: np.ndarray, inverse: bool) -> np.ndarray:
        a = self.a
        a32 = np.uint32(a)
        # x < a * a <= 2**32: the split runs in uint32 (numpy's int64 division
        # is ~6x slower).
        x32, left, right, spare = _scratch_uint32(x.size, 4)
        np.copyto(x32, x, casting="unsafe")
        np.floor_divide(x32, a32, out=left)
        np.multiply(left, a32, out=right)
        np.subtract(x32, right, out=right)
        tmp = x32
        keys = self._keys32 if not inverse else self._keys32[::-1]
        for k in keys:
            # (L, R) -> (R, (L + F(R)) mod a); inverse: (L', R') ->
            # ((R' + a - F(L')) mod a, L'). F: a multiply-xorshift hash of
            # (half ^ k), its top 16 bits scaled into [0, a) without division.
            half = left if inverse else right
            f = spare
            np.bitwise_xor(half, k, out=f)
            np.multiply(f, _K1, out=f)
            np.right_shift(f, _S15, out=tmp)
            np.bitwise_xor(f, tmp, out=f)
            np.multiply(f, _K2, out=f)
            np.right_shift(f, _S16, out=f)
            np.multiply(f, a32, out=f)
            np.right_shift(f, _S16, out=f)
            if inverse:
                np.subtract(a32, f, out=f)
                np.add(f, right, out=f)
            else:
                np.add(f, left, out=f)
            np.subtract(f, a32, out=tmp)  # f < 2a; wraps to huge when f < a
            np.minimum(f, tmp, out=f)
            if inverse:
                left, right, spare = f, left, right
            else:
                left, right, spare = right, f, left
        out = left.astype(np.int64)
        out *= a
        out += right
        return out

    def _rounds(self, x: np.ndarray, inverse: bool) -> np.ndarray:
        if self.a <= _SMALL_HALF:
            return self._rounds32(x.astype(np.int64, copy=False), inverse)
        a = np.uint64(self.a)
        x = x.astype(np.uint64, copy=False)
        left, right = x // a, x % a
        if not inverse:
            for k in self.keys:
                left, right = right, (left + _mix(right, k) % a) % a
        else:
            for k in reversed(self.keys):
                left, right = (right + a - _mix(left, k) % a) % a, left
        return (left * a + right).astype(np.int64)

    def _apply(self, x: np.ndarray, inverse: bool) -> np.ndarray:
        y = np.asarray(x, dtype=np.int64)
        if y.size and (int(y.min()) < 0 or int(y.max()) >= self.n):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise IndexError(f"{bad} is outside the permutation's domain [0, {self.n})")
        if self.n == 1:
            return np.zeros_like(y)
        out = self._rounds(y.reshape(-1), inverse)
        todo = np.flatnonzero(out >= self.n)
        while todo.size:  # cycle walking: stays a bijection on [0, n)
            out[todo] = self._rounds(out[todo], inverse)
            todo = todo[out[todo] >= self.n]
        return out.reshape(y.shape)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x, inverse=False)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return self._apply(y, inverse=True)


@dataclass(frozen=True)
class ShardLayout:
    """Where shard `k`'s positions lie in the epoch order, and its batch count."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    num_batches: int
    dropped: int  # rows of each epoch that no shard reads


def plan_shards(
    n: int,
    batch_size: int,
    num_shards: int,
    drop_remainder: bool,
    pad_remainder: bool,
) -> ShardLayout:
    """Splits an epoch of `n` rows into `num_shards` runs of equal batch count.

    Without `drop_remainder`, runs differ by at most one row and every row is
    read once, except when fewer than `num_shards` rows would be left for the
    last batch round without `pad_remainder`: those rows are left out of that
    epoch (a different set each shuffled epoch), so no shard waits on an empty
    batch. With `drop_remainder`, every shard reads `n // (num_shards *
    batch_size)` full batches.
    """
    s, b = num_shards, batch_size
    if drop_remainder:
        nb = n // (s * b)
        lengths = [nb * b] * s
    else:
        nb = -(-n // (s * b))
        base, extra = divmod(n, s)
        lengths = [base + (k < extra) for k in range(s)]
        if not pad_remainder and base <= (nb - 1) * b:
            nb -= 1
            lengths = [nb * b] * s
    starts = np.cumsum([0, *lengths[:-1]]).tolist()
    used = sum(lengths)
    return ShardLayout(tuple(starts), tuple(lengths), nb, n - used)


@dataclass
class Sampler:
    """The rows of every batch, for one shard of a dataset of `num_rows` rows.

    `batch(epoch, i)` returns `(rows, num_real)`: `rows` are the row indices of
    batch `i` (sorted ascending for shuffled modes, which costs nothing in
    training and makes reads sequential), `num_real` how many are real rows;
    with `pad_remainder` the last batch has `batch_size - num_real` padding
    slots, which the reader fills with zeros.
    """

    num_rows: int
    batch_size: int
    mode: str = "sequential"
    seed: int = 0
    drop_remainder: bool = False
    pad_remainder: bool = False
    num_shards: int = 1
    shard_index: int = 0
    block_rows: int = 1
    window_blocks: int = 16
    layout: ShardLayout = field(init=False)

    def __post_init__(self) -> None:
        if self.mode not in SHUFFLE_MODES:
            raise ValueError(
                f"mode must be one of {SHUFFLE_MODES}, received mode={self.mode!r}"
            )
        for name, low in (
            ("num_rows", 0),
            ("batch_size", 1),
            ("num_shards", 1),
            ("block_rows", 1),
            ("window_blocks", 1),
        ):
            value = getattr(self, name)
            if value < low:
                raise ValueError(f"{name} must be >= {low}, received {name}={value}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(
                f"shard_index must be in [0, {self.num_shards}) for num_shards="
                f"{self.num_shards}, received shard_index={self.shard_index}"
            )
        if not 0 <= self.seed < 1 << 64:
            raise ValueError(f"seed must be in [0, 2**64), received seed={self.seed}")
        self.layout = plan_shards(
            self.num_rows,
            self.batch_size,
            self.num_shards,
            self.drop_remainder,
            self.pad_remainder,
        )
        self._cache: dict[tuple[int, int], list[np.ndarray]] = {}
        self._perms: dict[tuple[int, int], Permutation] = {}
        self._small: dict[tuple[Any, ...], Any] = {}  # per-epoch block-order parts
        self._lock = threading.Lock()
        self._compute_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}
        state["_perms"] = {}
        state["_small"] = {}
        del state["_lock"], state["_compute_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._compute_lock = threading.Lock()

    @property
    def num_batches(self) -> int:
        return self.layout.num_batches

    @property
    def num_blocks(self) -> int:
        """Blocks of `block_rows` rows (the last one may be partial)."""
        return -(-self.num_rows // self.block_rows)

    def warn_if_rows_left_out(self, stacklevel: int = 3) -> None:
        d = self.layout.dropped
        if d and not self.drop_remainder:
            warnings.warn(
                f"{d} of {self.num_rows} rows are left out of each epoch: with "
                f"num_shards={self.num_shards} and batch_size={self.batch_size}, "
                "the last batch round has fewer rows than shards. Pass "
                "pad_remainder=True to read every row (padded rows get weight 0).",
                stacklevel=stacklevel,
            )

    # ---- epoch order -----------------------------------------------------------
    def _perm(self, epoch: int, stream: int, n: int) -> Permutation:
        key = (epoch, stream)
        perm = self._perms.get(key)
        if perm is None or perm.n != n:
            perm = Permutation(n, _keys(self.seed, epoch, stream))
            self._remember(self._perms, key, perm)
        return perm

    def _order(self, epoch: int, pos: np.ndarray) -> np.ndarray:
        """Rows at epoch positions `pos` (ascending, contiguous)."""
        if self.mode == "sequential":
            return pos
        if self.mode == "global":
            return self._perm(epoch, 0, self.num_rows)(pos)
        return self._block_order(epoch, pos)

    def _remember(self, cache: dict[Any, Any], key: Any, value: Any) -> Any:
        """Stores `value` in one of the sampler's caches, dropping the oldest
        entry past `_CACHE_ENTRIES` (4x that for the small per-epoch parts)."""
        limit = _CACHE_ENTRIES * (4 if cache is self._small else 1)
        with self._lock:
            if len(cache) >= limit:
                cache.pop(next(iter(cache)))
            cache[key] = value
        return value

    def _windows(self, epoch: int) -> tuple[int, int, int]:
        """`(w_star, s_star, hole)` of an epoch's block order.

        The partial last block (`hole` rows short) sits in slot `s_star` of
        window `w_star`; without one, `w_star` is past every window.
        """
        got = self._small.get(("windows", epoch))
        if got is not None:
            return got
        n, br, w = self.num_rows, self.block_rows, self.window_blocks
        nblocks = self.num_blocks
        hole = nblocks * br - n  # rows missing from the partial last block
        if hole:
            blocks = self._perm(epoch, 1, nblocks)
            slot = int(blocks.inverse(np.array([nblocks - 1]))[0])
            w_star, s_star = divmod(slot, w)
        else:
            w_star, s_star = nblocks, 0  # no window is short
        return self._remember(self._small, ("windows", epoch), (w_star, s_star, hole))

    def _block_slots(self, epoch: int, lo: int, hi: int) -> np.ndarray:
        """The blocks in slots `lo:hi` of `epoch`'s block order.

        Evaluated `_SLOTS` slots at a time and kept: a window's handful of
        slots through the permutation cost as much numpy overhead as
        thousands (about 80 us), and every batch of a window needs them.
        """
        nblocks = self.num_blocks
        out = []
        for c in range(lo // _SLOTS, -(-hi // _SLOTS)):
            got = self._small.get(("slots", epoch, c))
            if got is None:
                a, b = c * _SLOTS, min((c + 1) * _SLOTS, nblocks)
                got = self._perm(epoch, 1, nblocks)(np.arange(a, b, dtype=np.int64))
                got.flags.writeable = False
                self._remember(self._small, ("slots", epoch, c), got)
            out.append(got[max(lo - c * _SLOTS, 0) : hi - c * _SLOTS])
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _window_at(self, p: int, w_star: int, hole: int) -> int:
        # Windows after the one holding the partial block start `hole` earlier.
        win_rows = self.window_blocks * self.block_rows
        if p >= (w_star + 1) * win_rows - hole:
            return (p + hole) // win_rows
        return p // win_rows

    def batch_blocks(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """The blocks (row `b * block_rows` on) that batches `start:stop` of
        `epoch` read under block shuffle: every block of their windows."""
        b, length = self.batch_size, self.layout.lengths[self.shard_index]
        base = self.layout.starts[self.shard_index]
        lo, hi = base + start * b, base + min(stop * b, length)
        if self.mode != "block" or hi <= lo:
            return np.zeros(0, dtype=np.int64)
        w_star, _, hole = self._windows(epoch)
        w = self.window_blocks
        first = self._window_at(lo, w_star, hole) * w
        last = min((self._window_at(hi - 1, w_star, hole) + 1) * w, self.num_blocks)
        return self._block_slots(epoch, first, last)

    def _block_order(self, epoch: int, pos: np.ndarray) -> np.ndarray:
        n, br, w = self.num_rows, self.block_rows, self.window_blocks
        nblocks = self.num_blocks
        last_len = n - (nblocks - 1) * br
        win_rows = w * br
        w_star, s_star, hole = self._windows(epoch)
        window_keys = self._small.get(("window keys", epoch))
        if window_keys is None:  # SeedSequence: ~20 us a call
            window_keys = self._remember(
                self._small, ("window keys", epoch), _keys(self.seed, epoch, 2)
            )
        # Window wi holds epoch positions [start(wi), start(wi) + length(wi)).
        # Positions are ascending and contiguous, so each window's are one run.
        rows = np.empty_like(pos)
        first = int(pos[0])
        wi = self._window_at(first, w_star, hole)
        done = 0
        while done < pos.size:
            nblk = min(w, nblocks - wi * w)
            length = nblk * br - (hole if wi == w_star else 0)
            start = wi * win_rows - (hole if wi > w_star else 0)
            q0 = first + done - start
            count = min(length - q0, pos.size - done)
            keys = _mix(window_keys, np.uint64(wi & 0xFFFFFFFFFFFFFFFF))
            qp = Permutation(length, keys)(np.arange(q0, q0 + count, dtype=np.int64))
            if wi == w_star:  # skip the slots past the partial block's end
                qp = np.where(qp < s_star * br + last_len, qp, qp + hole)
            # The window's few block slots through the block permutation, then
            # each row's slot by lookup (not the permutation per row); uint32
            # division (a window holds < 2**32 rows) is ~6x int64's.
            # In place into this thread's scratch: fresh arrays of this size
            # fault in every page.
            firsts = self._block_slots(epoch, wi * w, wi * w + nblk) * br
            out = rows[done : done + count]
            if w * br < 1 << 32:
                s, sbr = _scratch_uint32(count, 2)
                np.copyto(s, qp, casting="unsafe")
                np.floor_divide(s, np.uint32(br), out=s)
                np.multiply(s, np.uint32(br), out=sbr)
                np.subtract(qp, sbr, out=qp)  # the row within its block
            else:
                s = qp // br
                qp -= s * br
            np.take(firsts, s, out=out)
            out += qp
            done += count
            wi += 1
        return rows

    def positions(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Rows at epoch positions `start:stop`, in epoch order."""
        pos = np.arange(start, stop, dtype=np.int64)
        return pos if self.mode == "sequential" else self._order(epoch, pos)

    def _sorted_batches(self, epoch: int, c: int) -> list[np.ndarray]:
        """Batches `c*K:(c+1)*K` of this shard, each sorted (K ~ 64Ki rows)."""
        key = (epoch, c)
        got = self._cache.get(key)
        if got is not None:
            return got
        # Reader threads asking for batches of one chunk wait for one thread to
        # compute it rather than each computing it again.
        with self._compute_lock:
            got = self._cache.get(key)
            if got is None:
                got = self._compute_sorted_batches(epoch, c)
        return got

    def _compute_sorted_batches(self, epoch: int, c: int) -> list[np.ndarray]:
        key = (epoch, c)
        b = self.batch_size
        per = max(1, _CHUNK // b)
        length = self.layout.lengths[self.shard_index]
        base = self.layout.starts[self.shard_index]
        lo, hi = c * per * b, min((c + 1) * per * b, length)
        rows = self._order(epoch, np.arange(base + lo, base + hi, dtype=np.int64))
        # Sorting in uint32 runs numpy's SIMD sort; one call sorts every batch.
        small = self.num_rows <= 1 << 32
        full = (rows.size // b) * b
        head = rows[:full].reshape(-1, b)
        if small:
            (work,) = _scratch_uint32(full, 1)
            work = work.reshape(-1, b)
            np.copyto(work, head, casting="unsafe")
            work.sort(axis=1)
            head[...] = work
        else:
            head.sort(axis=1)
        batches = list(head)
        if full < rows.size:
            batches.append(np.sort(rows[full:]))
        for arr in batches:
            arr.flags.writeable = False  # shared by every caller of batch()
        return self._remember(self._cache, key, batches)

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, int]:
        """`(rows, num_real)` of batch `index` of `epoch` on this shard."""
        if not 0 <= index < self.num_batches:
            raise IndexError(
                f"batch index {index} is out of range: the dataset has "
                f"{self.num_batches} batches"
            )
        lo = index * self.batch_size
        length = self.layout.lengths[self.shard_index]
        num_real = max(0, min(self.batch_size, length - lo))
        if num_real == 0:
            return np.zeros(0, dtype=np.int64), 0
        if self.mode == "sequential":
            base = self.layout.starts[self.shard_index] + lo
            return np.arange(base, base + num_real, dtype=np.int64), num_real
        per = max(1, _CHUNK // self.batch_size)
        c, i = divmod(index, per)
        return self._sorted_batches(epoch, c)[i], num_real
