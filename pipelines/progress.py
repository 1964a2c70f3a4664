"""Progress lines of the teacher pass: samples/s, target tokens/s, ETA and bytes written,
and the final summary with bytes per target token.

The ETA extrapolates the rate of estimated tokens (pipelines.batching.estimated_tokens),
not of samples: batches run longest first, so samples/s rises during a pass and a
per-sample ETA would start far too high.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


def eta_seconds(done: float, total: float, elapsed: float) -> float | None:
    """Seconds left if the rest of the work goes at the rate so far; None before any."""
    if done <= 0 or elapsed <= 0:
        return None
    return max(0.0, total - done) * elapsed / done


def format_duration(seconds: float | None) -> str:
    """73 -> '1m13s', 7300 -> '2h01m', None -> '?'."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


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
    start: float = field(default=None)
    _last: float = field(default=None)

    def __post_init__(self):
        self.start = self.clock() if self.start is None else self.start

    def update(self, samples: int, targets: int, work: float, bytes_written: int) -> None:
        """One batch received: samples rows, targets target tokens, work estimated tokens;
        bytes_written = shard bytes committed by this pass so far."""
        self.samples += samples
        self.targets += targets
        self.work_done += work
        now = self.clock()
        first, last = self._last is None, self.done_before + self.samples >= self.total
        if first or last or now - self._last >= self.every_s:
            self._last = now
            self.log(self.line(now, bytes_written, first))

    def line(self, now: float, bytes_written: int, first: bool = False) -> str:
        elapsed = now - self.start
        n = self.done_before + self.samples
        eta = eta_seconds(self.work_done, self.work, elapsed)
        per_target = f" ({bytes_written / self.targets:.1f} B/target)" if bytes_written and self.targets else ""
        head = f"first batch after {format_duration(elapsed)}; " if first else ""
        return (f"[teacher-pass] {head}{n}/{self.total} samples ({100 * n / max(1, self.total):.1f}%)  "
                f"{self.samples / elapsed:.2f} samples/s  {self.targets / elapsed:,.0f} targets/s  "
                f"ETA {format_duration(eta)}  written {format_bytes(bytes_written)}{per_target}")

    def summary(self, rows: int, shards: int, size: int, targets: int, output: str) -> str:
        """The closing line: the whole cache's size per target token, and this run's rates."""
        elapsed = self.clock() - self.start
        run = (f"; this run: {self.samples} samples, {self.targets:,} targets in {format_duration(elapsed)} "
               f"({self.samples / elapsed:.2f} samples/s, {self.targets / elapsed:,.0f} targets/s)"
               if self.samples and elapsed > 0 else "")
        return (f"[teacher-pass] done: {rows} rows in {shards} shards, {format_bytes(size)}, {targets:,} target "
                f"tokens, {size / max(1, targets):.1f} bytes per target token{run} -> {output}")
