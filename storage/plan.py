"""The epoch order: which rows each data-parallel rank reads, in which order, per epoch.

One plan serves every reader that streams rows (a cache's shards, or an input data set cut
into pieces): `TeacherCache.stream` and the student trainer. It is a pure function of
(the rows, seed, epoch, streams, window), computed in O(N) small integers, so every rank
derives the same plan without talking to the others, and a position in it (how many rows
or micro-batches a rank has consumed) is all a checkpoint needs to resume exactly.

    1. The shards are shuffled (seed, epoch). Their rows, in that shard order, are cut into
       `streams` contiguous streams of equal length L = N // streams (remainder "drop": the
       last N mod streams rows of this epoch's order are left out, and which ones changes
       with the shuffle; "pad": L = ceil(N / streams), the order wraps around).
    2. Inside each stream, its blocks (the rows of one shard's block of `block_rows`, i.e.
       one Parquet row group of a cache shard) are shuffled (seed, epoch, stream), then the
       rows are permuted within consecutive windows of `window` rows (seed, epoch, stream,
       window index). A row moves at most `window` places; a window's rows come from about
       window / block_rows + 1 blocks, which is what a reader holds in memory per stream.
    3. A rank of W reads the streams r * S/W .. (r + 1) * S/W - 1 (S = streams, a multiple
       of W): since streams are contiguous ranges of shards, a rank opens about 1/W of the
       shards and reads 1/W of the rows. Micro-batch m of a rank takes, from each of its
       streams in order, rows m*b .. (m+1)*b - 1 with b = batch_size * W / S. Every rank
       gets the same number of micro-batches, L // b (collectives never hang), and the
       global batch of a step is the same set of rows for any W that divides S: changing the
       number of ranks (with batch_size * W fixed) does not change what is trained on.

With seed None nothing is shuffled: streams are contiguous ranges of the rows in order.
Widen the shuffle with a larger window (more rows per stream in memory) or more, smaller
shards (a finer first-level shuffle).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

REMAINDERS = ("drop", "pad")


class EpochPlan:
    """The plan over shards of rows (module docstring).

    shard_rows: per shard, its row count, or the array of its row indices to use (rows not
    listed are left out, e.g. samples outside a training subset). Items, the plan's unit,
    number the used rows in shard order: locate() maps them back to (shard, row).
    """

    def __init__(self, shard_rows: Sequence[int | np.ndarray], streams: int = 1, seed: int | None = 0,
                 window: int = 1024, block_rows: int = 128, remainder: str = "drop"):
        if remainder not in REMAINDERS:
            raise ValueError(f"remainder {remainder!r}: choose one of {REMAINDERS}")
        if streams < 1 or window < 1 or block_rows < 1:
            raise ValueError(f"streams {streams}, window {window} and block_rows {block_rows} must be at least 1")
        rows = [np.arange(r, dtype=np.int64) if np.isscalar(r) else np.asarray(r, dtype=np.int64)
                for r in shard_rows]
        self.shard_of = np.repeat(np.arange(len(rows), dtype=np.int64), [len(r) for r in rows])
        self.row_of = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self.starts = np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int64)  # first item of each shard
        self.streams, self.seed, self.window, self.block_rows, self.remainder = streams, seed, window, block_rows, \
            remainder

    def __len__(self) -> int:
        """Items (used rows) in all shards."""
        return len(self.row_of)

    @property
    def stream_length(self) -> int:
        n = len(self)
        return n // self.streams if self.remainder == "drop" else -(-n // self.streams)

    def locate(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row in the shard) of each item."""
        items = np.asarray(items, dtype=np.int64)
        return self.shard_of[items], self.row_of[items]

    def stream(self, j: int, epoch: int = 0) -> np.ndarray:
        """The items of stream j in this epoch's order (steps 1 and 2)."""
        if not 0 <= j < self.streams:
            raise ValueError(f"stream {j} outside 0..{self.streams - 1}")
        n, length = len(self), self.stream_length
        if length == 0:
            return np.zeros(0, np.int64)
        shards = list(range(len(self.starts) - 1))
        if self.seed is not None:
            random.Random(f"{self.seed}-{epoch}").shuffle(shards)
        order = np.concatenate([np.arange(self.starts[s], self.starts[s + 1]) for s in shards]) if shards else \
            np.zeros(0, np.int64)
        items = order[np.arange(j * length, (j + 1) * length) % n]
        if self.seed is None:
            return items
        # blocks: runs of one shard's block of block_rows rows; shuffled as wholes
        key = self.shard_of[items] * (1 + self.row_of.max(initial=0) // self.block_rows) \
            + self.row_of[items] // self.block_rows
        cut = np.flatnonzero(np.diff(key)) + 1
        blocks = np.split(items, cut)
        rng = np.random.default_rng([self.seed, epoch, j])
        items = np.concatenate([blocks[b] for b in rng.permutation(len(blocks))])
        for w in range(0, length, self.window):
            part = items[w:w + self.window]
            items[w:w + self.window] = part[np.random.default_rng([self.seed, epoch, j, w]).permutation(len(part))]
        return items

    def rank_streams(self, rank: int, world: int) -> range:
        """The streams rank `rank` of `world` reads (step 3)."""
        if world < 1 or self.streams % world:
            raise ValueError(f"{self.streams} streams cannot be split over {world} ranks: use a multiple of the "
                             "number of ranks")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        per = self.streams // world
        return range(rank * per, (rank + 1) * per)

    def _per_stream(self, world: int, batch_size: int) -> int:
        """b: the rows each stream gives a micro-batch."""
        if (batch_size * world) % self.streams:
            raise ValueError(f"a global micro-batch of {batch_size} x {world} ranks cannot take the same number of "
                             f"rows from each of {self.streams} streams: use a batch size whose product with the "
                             "number of ranks is a multiple of the streams")
        return batch_size * world // self.streams

    def num_micro_batches(self, world: int, batch_size: int) -> int:
        """Micro-batches per rank and epoch (the same on every rank)."""
        return self.stream_length // self._per_stream(world, batch_size)

    def micro_batches(self, rank: int, world: int, batch_size: int, epoch: int = 0) -> list[np.ndarray]:
        """This rank's micro-batches of `batch_size` items for one epoch (step 3)."""
        mine = self.rank_streams(rank, world)
        b = self._per_stream(world, batch_size)
        streams = [self.stream(j, epoch) for j in mine]
        return [np.concatenate([s[m * b:(m + 1) * b] for s in streams]) for m in range(self.stream_length // b)]
