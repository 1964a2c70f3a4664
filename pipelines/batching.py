"""Batches of the teacher pass: samples of similar length together, so little of each
forward is padding, in an order that depends on the samples alone (the same input gives
the same batches, the same shards and the same cache, however many actors run them).

A sample's length is estimated on the driver from its text alone: the tokens of its
messages (the teacher's tokenizer, batched; no chat template, no image processing), a few
tokens per message for the template, and the visual-token count when it has an image.
Characters / CHARS_PER_TOKEN stand in when no tokenizer is given, but they order real text
poorly (3.3-4.7 characters per token across the docstrings of bench_teacher_pass.py: 11%
padding at batch 8 where token counts give 1.4%). The longest batch runs first, so a batch
size too large for the device fails on the first batch, not hours into the pass; the others
follow in a seeded random order, so that the cache's shards, which take the rows in the
order they arrive, hold a mix of lengths (and of whatever correlates with length, such as
the task): a trainer streams shards and row groups in blocks (storage/plan.py), and
length-sorted blocks trained measurably worse (docs/benchmarks.md, the shuffle study).

The batches become Ray blocks of whole batches (``batch_blocks``): Ray Data slices a
``map_batches`` input per block, so a block that held part of two batches would give the
actor a short batch (a block of 5 rows with batch size 16 becomes calls of 16 and 4).
"""

from __future__ import annotations

import math
import random

import pyarrow as pa

from mmkd.common.samples import PreferencePair, Sample

CHARS_PER_TOKEN = 4  # English BPE text, without a tokenizer
TEMPLATE_TOKENS_PER_MESSAGE = 4  # role markers and separators of a chat template, roughly


def teacher_tokenizer(path: str, trust_remote_code: bool = False):
    """The teacher's tokenizer alone (no image processor, no weights)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _sequences(item: Sample | PreferencePair) -> list[list[str]]:
    """The texts of each sequence an item becomes (a pair: chosen and rejected)."""
    if isinstance(item, PreferencePair):
        return [[item.question, item.chosen], [item.question, item.rejected]]
    return [[m["content"] for m in item.messages]]


def estimated_tokens(items: list, tokenizer=None, image_tokens: int = 0, chunk: int = 8192) -> list[int]:
    """Estimated token count of each item (of the longer sequence of a preference pair)."""
    seqs = [_sequences(x) for x in items]
    texts = [t for s in seqs for seq in s for t in seq]
    if tokenizer is None:
        counts = [math.ceil(len(t) / CHARS_PER_TOKEN) for t in texts]
    else:
        counts = []
        for i in range(0, len(texts), chunk):
            ids = tokenizer(texts[i:i + chunk], add_special_tokens=False, return_attention_mask=False)["input_ids"]
            counts += [len(x) for x in ids]
    out, at = [], 0
    for x, s in zip(items, seqs):
        longest = 0
        for seq in s:
            longest = max(longest, sum(counts[at:at + len(seq)]) + TEMPLATE_TOKENS_PER_MESSAGE * len(seq))
            at += len(seq)
        out.append(longest + (image_tokens if x.image is not None else 0))
    return out


def plan_batches(items: list, batch_size: int, image_tokens: int = 0, tokenizer=None,
                 lengths: list[int] | None = None, shuffle_seed: int | None = None) -> list[list]:
    """items in batches of batch_size (the last may be shorter) of similar length, longest
    first by estimated_tokens(items, tokenizer, image_tokens), or by `lengths` when given
    (the same estimates, computed once by the caller); equal lengths keep their input
    order, so the plan is deterministic. shuffle_seed: the longest batch stays first, the
    others are shuffled with this seed (the teacher pass; None keeps them longest first).
    The teacher pass plans with the teacher's tokenizer."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use 1 or more")
    if lengths is None:
        lengths = estimated_tokens(items, tokenizer, image_tokens)
    order = sorted(range(len(items)), key=lambda i: (-lengths[i], i))
    ordered = [items[i] for i in order]
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    if shuffle_seed is not None and len(batches) > 2:
        short = batches[-1:] if len(batches[-1]) < batch_size else []  # stays last: Ray blocks hold whole batches
        rest = batches[1:len(batches) - len(short)]
        random.Random(f"batches-{shuffle_seed}").shuffle(rest)
        batches = batches[:1] + rest + short
    return batches


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
