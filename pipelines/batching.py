"""Batches of the teacher pass: samples of similar length together, so little of each
forward is padding, in an order that depends on the samples alone (the same input gives
the same batches, the same shards and the same cache, however many actors run them).

A sample's length is estimated without tokenizing (the driver may hold millions of
samples): its text's characters / CHARS_PER_TOKEN, plus the visual-token count when it has
an image. Only the order matters, and the estimate orders real samples well. Batches run
longest first, so a batch size too large for the device fails on the first batch, not
hours into the pass.

The batches become Ray blocks of whole batches (``batch_blocks``): Ray Data slices a
``map_batches`` input per block, so a block that held part of two batches would give the
actor a short batch (a block of 5 rows with batch size 16 becomes calls of 16 and 4).
"""

from __future__ import annotations

import math

import pyarrow as pa

from pipelines.samples import PreferencePair, Sample

CHARS_PER_TOKEN = 4  # English BPE text; the order, not the value, is what counts


def estimated_tokens(item: Sample | PreferencePair, image_tokens: int = 0) -> int:
    """Rough token count of a sample (or of the longer sequence of a preference pair)."""
    if isinstance(item, PreferencePair):
        chars = len(item.question) + max(len(item.chosen), len(item.rejected))
    else:
        chars = sum(len(m["content"]) for m in item.messages)
    return math.ceil(chars / CHARS_PER_TOKEN) + (image_tokens if item.image is not None else 0)


def plan_batches(items: list, batch_size: int, image_tokens: int = 0) -> list[list]:
    """items in batches of batch_size (the last may be shorter), longest first; items of
    equal estimated length keep their input order, so the plan is deterministic."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use 1 or more")
    order = sorted(range(len(items)), key=lambda i: (-estimated_tokens(items[i], image_tokens), i))
    ordered = [items[i] for i in order]
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def batch_blocks(rows: list[list[str]], batch_size: int, num_workers: int, blocks_per_worker: int = 200
                 ) -> list[pa.Table]:
    """Group planned batches (each a list of `sample` strings) into Arrow blocks of whole
    batches: one batch a block, or several when there are many (at most about
    blocks_per_worker blocks per actor, to keep Ray's per-block overhead small)."""
    if any(len(b) != batch_size for b in rows[:-1]):
        raise ValueError("only the last batch may be short: Ray slices each block into batch_size rows")
    per_block = max(1, len(rows) // max(1, blocks_per_worker * num_workers))
    return [pa.table({"sample": pa.array([s for b in rows[i:i + per_block] for s in b], pa.string())})
            for i in range(0, len(rows), per_block)]
