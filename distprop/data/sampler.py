"""Which samples each rank reads, and in what order: pure functions, no I/O.

The epoch's sample sequence
---------------------------
`EpochOrder` is a permutation S of all rows, the same on every rank for the same
(seed, epoch). A uniform permutation would make every mini-batch touch almost every
row group, so the whole dataset would have to be decoded and held at once. S is
*structured* instead:

1. the blocks (row groups) are permuted with (seed, epoch);
2. consecutive blocks of that order are grouped into windows of `window` blocks;
3. the rows of each window are permuted uniformly.

A rank that walks S holds about one window of decoded blocks at a time (plus
read-ahead), and every batch mixes rows from `window` random places of the dataset.
The trade-off, against a uniform permutation: rows of one block always fall into
the same window, so they share batches more often than chance, every epoch (the
other blocks of a window change from epoch to epoch). When the files are written
in random order, as distprop's converters write them, each batch is still a
uniform sample of the dataset; for files sorted by class, raise `window` (memory
grows as window x row-group size) or rewrite the files shuffled.

Sharding and equal step counts
------------------------------
S is cut into `world_size` contiguous equal parts, one per rank, so each rank
reads about 1/world_size of the blocks. Every rank gets the same share, by
construction, like torch's DistributedSampler:

* ``drop_last=True``: share = floor(N / (world_size * batch_size)) * batch_size,
  all batches full; the tail of S (fewer than world_size * batch_size samples, a
  different set every epoch) is skipped.
* ``drop_last=False``: share = ceil(N / world_size); the parts are cut from S
  continued by its own start, so the last rank's part (or the last few ranks',
  when shares are smaller than world_size) repeats fewer than world_size samples
  from the start of S. Batches are
  full except the last one of the epoch, which is partial and has the *same*
  size on every rank (so a gradient average over ranks weighs samples equally).

Resuming and re-sharding
------------------------
An epoch may run in *stages*: when a run stops mid-epoch and resumes on another
world size or batch size, the samples of S that no rank has consumed yet (the
"remaining" positions, in S order) are split again by the same rules. A stage is
(world_size, batch_size, batches consumed); `remaining_positions` replays the
arithmetic of earlier stages, never the data. Consumed and remaining samples then
partition S exactly, except for the rules above: with drop_last=True the final
stage skips fewer than world_size * batch_size samples; with drop_last=False a
stage repeats fewer than world_size samples (a sample whose padded copy was
consumed counts as consumed).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

# Half-open intervals [lo, hi) of positions in S, in the order they are visited.
Ranges = tuple[tuple[int, int], ...]


class EpochOrder:
    """The epoch's sample sequence S (see module docstring); `rows(lo, hi)` gives
    S[lo:hi] as global row ids, computing only the windows it needs."""

    _CACHED_WINDOWS = 4

    def __init__(self, block_rows, seed: int, epoch: int, shuffle: bool = True, window: int = 4):
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0 (got seed={seed}, epoch={epoch})")
        if window < 1:
            raise ValueError(f"window must be >= 1 (got {window})")
        self.block_rows = np.asarray(block_rows, dtype=np.int64)
        self.block_starts = np.concatenate([[0], np.cumsum(self.block_rows)[:-1]]).astype(np.int64)
        self.seed, self.epoch, self.shuffle = int(seed), int(epoch), bool(shuffle)
        self.num_rows = int(self.block_rows.sum())
        self.window = int(window)
        if self.shuffle:
            # Distinct entropy tags keep the block stream and each window's stream independent.
            self.block_order = np.random.default_rng([self.seed, self.epoch, 0]).permutation(len(self.block_rows))
        else:
            self.block_order = np.arange(len(self.block_rows))
        window_rows = np.add.reduceat(self.block_rows[self.block_order],
                                      np.arange(0, len(self.block_order), self.window)) \
            if len(self.block_order) else np.zeros(0, np.int64)
        self.window_starts = np.concatenate([[0], np.cumsum(window_rows)]).astype(np.int64)
        self._windows: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self.num_rows

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Global row ids at positions lo..hi-1 of S."""
        if not 0 <= lo <= hi <= self.num_rows:
            raise IndexError(f"positions [{lo}, {hi}) outside S of length {self.num_rows}")
        if not self.shuffle:
            return np.arange(lo, hi, dtype=np.int64)
        parts = []
        w = int(np.searchsorted(self.window_starts, lo, side="right")) - 1
        while lo < hi:
            start, stop = self.window_starts[w], self.window_starts[w + 1]
            take_to = min(hi, stop)
            parts.append(self._window(w)[lo - start:take_to - start])
            lo, w = take_to, w + 1
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _window(self, w: int) -> np.ndarray:
        if w in self._windows:
            self._windows.move_to_end(w)
            return self._windows[w]
        blocks = self.block_order[w * self.window:(w + 1) * self.window]
        rows = np.concatenate([np.arange(self.block_starts[b], self.block_starts[b] + self.block_rows[b])
                               for b in blocks])
        np.random.default_rng([self.seed, self.epoch, 1, w]).shuffle(rows)
        self._windows[w] = rows
        if len(self._windows) > self._CACHED_WINDOWS:
            self._windows.popitem(last=False)
        return rows


@dataclass(frozen=True)
class Stage:
    """A finished stretch of an epoch: this many batches taken by each of world_size ranks."""

    world_size: int
    batch_size: int
    batches_consumed: int


def rank_share(num_samples: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """Samples each rank takes from `num_samples` (identical on every rank)."""
    if drop_last:
        return num_samples // (world_size * batch_size) * batch_size
    return -(-num_samples // world_size)


def batch_count(share: int, batch_size: int, drop_last: bool) -> int:
    """Batches a rank yields for a share of samples."""
    return share // batch_size if drop_last else -(-share // batch_size)


def ranges_length(ranges: Ranges) -> int:
    return sum(hi - lo for lo, hi in ranges)


def slice_ranges(ranges: Ranges, start: int, stop: int) -> Ranges:
    """Positions start..stop-1 of the concatenation of `ranges`, wrapping around to its
    beginning past its end (that wrap is how padding repeats samples)."""
    total = ranges_length(ranges)
    if stop <= start:
        return ()
    if total == 0:
        raise ValueError("cannot take positions from an empty sequence")
    out: list[tuple[int, int]] = []
    while start < stop:
        offset = start % total
        length = min(stop - start, total - offset)
        out.extend(_slice_once(ranges, offset, offset + length))
        start += length
    return _merge_adjacent(out)


def _slice_once(ranges: Ranges, start: int, stop: int) -> list[tuple[int, int]]:
    out, base = [], 0
    for lo, hi in ranges:
        a, b = max(start, base), min(stop, base + hi - lo)
        if a < b:
            out.append((lo + a - base, lo + b - base))
        base += hi - lo
        if base >= stop:
            break
    return out


def _merge_adjacent(ranges) -> Ranges:
    merged: list[list[int]] = []
    for lo, hi in ranges:
        if merged and merged[-1][1] == lo:
            merged[-1][1] = hi
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def remaining_positions(num_samples: int, history: tuple[Stage, ...], drop_last: bool) -> Ranges:
    """The positions of S no rank has consumed after the stages in `history`, in S order."""
    remaining: Ranges = ((0, num_samples),) if num_samples else ()
    for stage in history:
        total = ranges_length(remaining)
        share = rank_share(total, stage.world_size, stage.batch_size, drop_last)
        taken = min(stage.batches_consumed * stage.batch_size, share)
        consumed = []
        for rank in range(stage.world_size):
            lo, hi = rank * share, rank * share + taken
            # Padding positions (>= total) stand for the samples they repeat.
            while lo < hi:
                offset = lo % total
                length = min(hi - lo, total - offset)
                consumed.append((offset, offset + length))
                lo += length
        kept = _complement(consumed, total)
        remaining = _merge_adjacent([r for lo, hi in kept for r in slice_ranges(remaining, lo, hi)])
    return remaining


def _complement(intervals: list[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    gaps, cursor = [], 0
    for lo, hi in sorted(intervals):
        if lo > cursor:
            gaps.append((cursor, lo))
        cursor = max(cursor, hi)
    if cursor < total:
        gaps.append((cursor, total))
    return gaps


@dataclass(frozen=True)
class RankPlan:
    """One rank's part of an epoch stage: its positions in S and how they batch up."""

    positions: Ranges
    batch_size: int
    num_batches: int

    def batch_positions(self, batch: int) -> Ranges:
        """Positions in S of batch number `batch` of this stage."""
        if not 0 <= batch < self.num_batches:
            raise IndexError(f"batch {batch} outside 0..{self.num_batches - 1}")
        end = min((batch + 1) * self.batch_size, ranges_length(self.positions))
        return slice_ranges(self.positions, batch * self.batch_size, end)


def plan_rank(num_samples: int, world_size: int, rank: int, batch_size: int, drop_last: bool,
              history: tuple[Stage, ...] = ()) -> RankPlan:
    """Rank `rank`'s positions and batches for the current stage of an epoch: the
    samples left after `history`, split evenly over `world_size` ranks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    remaining = remaining_positions(num_samples, history, drop_last)
    share = rank_share(ranges_length(remaining), world_size, batch_size, drop_last)
    positions = slice_ranges(remaining, rank * share, (rank + 1) * share)
    return RankPlan(positions, batch_size, batch_count(share, batch_size, drop_last))
