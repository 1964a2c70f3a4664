"""Progress lines of the teacher pass: samples/s, target tokens/s, ETA and bytes written,
and the final summary with bytes per target token.

Rates and ETA in the periodic lines count from the first batch's arrival, so Ray's and the
actors' start-up (model loading) does not skew them; the summary's rates include it. The
ETA extrapolates the rate of estimated tokens (pipelines.batching.estimated_tokens), not of
samples: batches run longest first, so samples/s rises during a pass and a per-sample ETA
would start far too high.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from mmkd.common.units import format_bytes, format_duration


def eta_seconds(done: float, total: float, elapsed: float) -> float | None:
    """Seconds left if the rest of the work goes at the rate so far; None before any."""
    if done <= 0 or elapsed <= 0:
        return None
    return max(0.0, total - done) * elapsed / done


@dataclass
class Progress:
    """Counts what the driver received and committed; logs the first batch, then a line at
    most every `every_s` seconds, and the last batch.

    total: input samples; done_before: already in the cache when the pass started; work:
    estimated tokens of the samples still to run (the ETA's denominator)."""

    total: int
    done_before: int
    work: float
    log: Callable[[str], None] = print
    every_s: float = 30.0
    clock: Callable[[], float] = time.perf_counter
    samples: int = 0
    targets: int = 0
    work_done: float = 0.0
    start: float | None = None
    _first: tuple | None = field(default=None, repr=False)  # (time, samples, targets, work) at the first batch
    _last: float | None = field(default=None, repr=False)

    def __post_init__(self):
        self.start = self.clock() if self.start is None else self.start

    def update(self, samples: int, targets: int, work: float, bytes_written: int) -> None:
        """One batch received: samples rows, targets target tokens, work estimated tokens;
        bytes_written = shard bytes committed by this pass so far."""
        self.samples += samples
        self.targets += targets
        self.work_done += work
        now = self.clock()
        if self._first is None:
            self._first = (now, self.samples, self.targets, self.work_done)
            self._last = now
            self.log(self.line(now, bytes_written))
        elif self.done_before + self.samples >= self.total or now - self._last >= self.every_s:
            self._last = now
            self.log(self.line(now, bytes_written))

    def line(self, now: float, bytes_written: int) -> str:
        n = self.done_before + self.samples
        t1, s1, g1, w1 = self._first
        if now > t1:  # rates since the first batch arrived
            dt = now - t1
            rates = f"{(self.samples - s1) / dt:.2f} samples/s  {(self.targets - g1) / dt:,.0f} targets/s  "
            eta = format_duration(eta_seconds(self.work_done - w1, self.work - w1, dt))
        else:
            rates, eta = f"first batch after {format_duration(now - self.start)};  ", "?"
        # shards are committed by the background writer: early lines may come before the first one
        written = "no shard committed yet" if not bytes_written else f"written {format_bytes(bytes_written)}" + (
            f" ({bytes_written / self.targets:.1f} B/target)" if self.targets else "")
        return (f"[teacher-pass] {n}/{self.total} samples ({100 * n / max(1, self.total):.1f}%)  {rates}"
                f"ETA {eta}  {written}")

    def summary(self, rows: int, shards: int, size: int, targets: int, output: str) -> str:
        """The closing line: the whole cache's size per target token, and this run's rates
        (start-up included)."""
        elapsed, run = self.clock() - self.start, ""
        if self.samples and elapsed > 0:
            rates = f"{self.samples / elapsed:.2f} samples/s"
            if self.targets:
                rates += f", {self.targets / elapsed:,.0f} targets/s"
            run = (f"; this run: {self.samples} samples{f', {self.targets:,} targets' if self.targets else ''} in "
                   f"{format_duration(elapsed)} ({rates}, start-up included)")
        # a cache of preference log-probs only has rows but no target tokens
        per = (f"{targets:,} target tokens, {size / targets:.1f} bytes per target token" if targets
               else f"no target tokens, {format_bytes(size / max(1, rows))} per row")
        return f"[teacher-pass] done: {rows} rows in {shards} shards, {format_bytes(size)}, {per}{run} -> {output}"
