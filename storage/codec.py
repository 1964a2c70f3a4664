"""Codecs for cache targets: id sets, quantised log-probs, relation matrices.

Everything here is vectorised numpy over flat arrays (no per-token Python), because the
reader must decode over a million cached tokens per second per core.

Id sets. The ids of one position's targets (its top-k, or its sampled ids) are stored as a
SET: the rank order is recoverable from the values, so it need not be stored. Each id is
first mapped through the shard's vocabulary order (the ids that occur most often in the
shard's targets first, the rest in id order), the set is sorted, and stored as deltas (the
first element absolute). Deltas are small for frequent ids; each delta is split into three
byte planes (bits 0-7, 8-15, 16-23), which zstd compresses far better than int32 values.

Log-probs. One byte per value: a code into a table of log-prob levels (``LEVELS``, written
into the manifest so a reader needs no formula). The table is fine (1/64 nat) for
log-probs >= -3 (probabilities >= 5%), then its step grows with the distance into the tail
(the KL contribution of an entry's error scales with its probability). Code 255 means
probability 0.

Relation matrices. R is symmetric: stored normalised (R / ||R||_F; the RDist loss is a
cosine and ignores scale) as its upper triangle in float16, or as a float16 low-rank factor
F with R ~= F F^T.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

ZERO_CODE = 255  # probability 0 (log-prob -inf), e.g. the leftover when k = V
MAX_VOCAB = 1 << 24  # three byte planes per id delta


def level_table(fine_until: float = 3.0, fine_step: float = 1 / 64, tail_step: float = 0.15,
                growth: float = 0.5, max_step: float = 2.0, max_nats: float = 40.0) -> np.ndarray:
    """Levels x = -log p (nats, ascending) for the one-byte log-prob code.

    Step fine_step below fine_until; beyond, tail_step * exp(growth * (x - fine_until))
    capped at max_step, up to max_nats. Rounding to the nearest level makes the error at
    most half the local step: 1/128 nat above log p = -3.
    """
    xs = list(np.arange(0.0, fine_until, fine_step))
    x = fine_until
    while x <= max_nats:
        xs.append(x)
        x += min(max_step, tail_step * np.exp(growth * (x - fine_until)))
    if len(xs) > ZERO_CODE:
        raise ValueError(f"{len(xs)} levels do not fit a byte code; widen the steps")
    return np.asarray(xs, dtype=np.float64)


LEVELS = level_table()


def encode_logprobs(logprobs: np.ndarray, levels: np.ndarray = LEVELS) -> np.ndarray:
    """log-probs (any shape, <= 0, -inf allowed) -> uint8 codes (nearest level)."""
    x = -np.asarray(logprobs, dtype=np.float64)
    mids = (levels[1:] + levels[:-1]) / 2
    codes = np.searchsorted(mids, np.clip(x, 0.0, None)).astype(np.uint8)
    codes[~np.isfinite(x)] = ZERO_CODE
    return codes


def decode_logprobs(codes: np.ndarray, levels: np.ndarray = LEVELS) -> np.ndarray:
    """uint8 codes -> float32 log-probs (code 255 -> -inf)."""
    table = np.full(256, -np.inf, dtype=np.float32)
    table[: len(levels)] = -levels
    return table[codes]


def vocab_order(ids: np.ndarray, vocab_size: int, top: int = 4096) -> np.ndarray:
    """The `top` most frequent ids in `ids` (most frequent first, ties by id): the ranks
    that id sets are coded in. int32 [<= top]."""
    counts = np.bincount(np.asarray(ids, dtype=np.int64).ravel(), minlength=vocab_size)
    order = np.argsort(-counts, kind="stable")
    return order[: min(top, int((counts > 0).sum()))].astype(np.int32)


def _rank_table(order: np.ndarray, vocab_size: int) -> np.ndarray:
    """id -> rank: ids in `order` first, then every other id in increasing id order."""
    rank = np.full(vocab_size, -1, dtype=np.int64)
    rank[order] = np.arange(len(order))
    rest = rank < 0
    rank[rest] = len(order) + np.arange(int(rest.sum()))
    return rank


def set_starts(set_sizes: np.ndarray) -> np.ndarray:
    """Flat index of the first entry of each set, int64 [n]."""
    starts = np.zeros(len(set_sizes), dtype=np.int64)
    np.cumsum(set_sizes[:-1], out=starts[1:])
    return starts


def encode_id_sets(ids: np.ndarray, set_sizes: np.ndarray, order: np.ndarray,
                   vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids of consecutive sets (sizes set_sizes) -> (uint8 planes [3, m], perm).

    perm is the permutation that puts the entries in stored order (sets sorted by rank):
    apply it to any per-entry values (``values[perm]``) so they stay matched to their ids.
    Every set must hold distinct ids.
    """
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"vocabulary of {vocab_size} ids exceeds the codec's {MAX_VOCAB}")
    ids = np.asarray(ids, dtype=np.int64)
    sizes = np.asarray(set_sizes, dtype=np.int64)
    r = _rank_table(order, vocab_size)[ids]
    owner = np.repeat(np.arange(len(sizes)), sizes)
    perm = np.lexsort((r, owner))
    r = r[perm]
    delta = np.diff(r, prepend=0)
    starts = set_starts(sizes)[sizes > 0]
    delta[starts] = r[starts]
    if (delta < 0).any() or (np.delete(delta, starts) == 0).any():
        raise ValueError("an id set holds a repeated id")
    planes = np.stack([(delta >> s) & 0xFF for s in (0, 8, 16)]).astype(np.uint8)
    return planes, perm


def decode_id_sets(planes: np.ndarray, set_sizes: np.ndarray | int, order: np.ndarray,
                   vocab_size: int) -> np.ndarray:
    """Inverse of encode_id_sets: uint8 planes [3, m] -> flat int32 ids (stored order).

    set_sizes: per-set sizes, or one int when every set has that size (top-k: faster).
    """
    # Interleave the planes and view them as little-endian integers (one pass, no shifts);
    # vocabularies up to 2^16 leave the third plane zero.
    wide = vocab_size > 1 << 16
    packed = np.zeros((planes.shape[1], 4 if wide else 2), dtype=np.uint8)
    for p in range(3 if wide else 2):  # column by column: far faster than one transposed copy
        packed[:, p] = planes[p]
    delta = packed.view("<u4" if wide else "<u2").ravel()
    if np.isscalar(set_sizes):
        width = int(set_sizes)
        ranks = np.cumsum(delta.reshape(-1, width), axis=1, dtype=np.int32).ravel() if width else delta
    else:
        sizes = np.asarray(set_sizes, dtype=np.int64)
        # a cumulative sum restarted at each set: subtract the running total before the set
        delta = delta.astype(np.int64)
        total = np.cumsum(delta)
        before = (total - delta)[np.minimum(set_starts(sizes), max(len(total) - 1, 0))] if len(total) else sizes * 0
        ranks = (total - np.repeat(before, sizes)).astype(np.int32)
    if len(ranks) and ranks.max() >= vocab_size:  # (deltas are unsigned: ranks are never negative)
        raise ValueError("decoded id outside the vocabulary")
    inverse = np.empty(vocab_size, dtype=np.int32)
    inverse[_rank_table(order, vocab_size)] = np.arange(vocab_size, dtype=np.int32)
    return inverse[ranks]


RELATION_CODECS = ("triangle-f16", "lowrank-f16")


def encode_relation(r: np.ndarray, codec: str = "triangle-f16", rank: int = 64) -> bytes:
    """Symmetric [n, n] matrix -> bytes of its normalised form (see module docstring).

    triangle-f16: the upper triangle (diagonal included) row by row, float16 little-endian,
    n (n + 1) / 2 values. lowrank-f16: F [n, min(rank, n)] float16 row-major, from the
    leading eigenpairs (R is PSD: F = V_r sqrt(max(lambda_r, 0))).
    """
    r = np.asarray(r, dtype=np.float64)
    norm = np.linalg.norm(r)
    r = r / norm if norm > 0 else r
    if codec == "triangle-f16":
        iu = np.triu_indices(r.shape[0])
        return r[iu].astype("<f2").tobytes()
    if codec == "lowrank-f16":
        w, v = np.linalg.eigh(r)
        top = np.argsort(w)[::-1][: min(rank, len(w))]
        f = v[:, top] * np.sqrt(np.clip(w[top], 0, None))
        return f.astype("<f2").tobytes()
    raise ValueError(f"relation codec {codec!r}: choose one of {RELATION_CODECS}")


@lru_cache(maxsize=64)
def _triangle(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n)


def decode_relation(blob: bytes, n: int, codec: str = "triangle-f16") -> np.ndarray:
    """bytes -> the normalised [n, n] float32 matrix."""
    vals = np.frombuffer(blob, dtype="<f2").astype(np.float32)
    if codec == "triangle-f16":
        if len(vals) != n * (n + 1) // 2:
            raise ValueError(f"relation blob holds {len(vals)} values, expected {n * (n + 1) // 2} for n={n}")
        rows, cols = _triangle(n)
        out = np.empty((n, n), dtype=np.float32)
        out[rows, cols] = vals
        out[cols, rows] = vals
        return out
    if codec == "lowrank-f16":
        if n == 0 or len(vals) % n:
            raise ValueError(f"relation blob of {len(vals)} values is not a factor with {n} rows")
        f = vals.reshape(n, -1)
        return f @ f.T
    raise ValueError(f"relation codec {codec!r}: choose one of {RELATION_CODECS}")
