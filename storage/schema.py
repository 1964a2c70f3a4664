"""What a cache row holds (decoded), the two Arrow schemas, and the sequence digest.

One row per sample. Positions are indices into ``input_ids`` (the teacher's sequence with
image placeholders expanded). Record kinds (a cache holds any subset; the manifest says
which):

- ``response``: targets for the supervised tokens. For the token at position t (listed in
  ``positions``) the target is the teacher's next-token distribution from the logits at
  t - 1 (shifted, like the CE label).
- ``visual``: targets AT the visual (image-token) positions: the distribution of the logits
  at t itself (unshifted, as in LLaVA-KD's MDist).
- ``relation``: R = Z Z^T over the raw final logits Z at the visual positions, normalised.
- ``preference``: the teacher's log-probabilities of a chosen and a rejected answer
  (summed and per token), the reference of DPO / KTO.

Token targets come in one of two modes (manifest ``extraction.mode``): ``topk`` (the k most
probable ids, their log-probs, and the leftover mass outside them) or ``sampled`` (ids drawn
from the teacher's distribution with replacement, with their counts: count / draws is an
unbiased estimate of the teacher's probability, the Sparse Logit Sampling estimator).

Two Arrow schemas: RAW_SCHEMA carries exact values from the teacher workers to the writer
(nothing is quantised in flight); STORED_SCHEMA is what shards hold (storage.tables encodes
one into the other with storage.codec). Log-probs are natural logs (nats).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "1.0"  # major.minor: a reader refuses a newer major version
TOKEN_KINDS = ("response", "visual")
RECORD_KINDS = ("response", "visual", "relation", "preference")
MODES = ("topk", "sampled")


class CacheError(RuntimeError):
    """A cache that cannot be read or used as asked; the message names the file and fix."""


@dataclass
class TokenTargets:
    """The teacher's targets at n positions of one segment (response or visual).

    positions int [n]; ids int [n, w] (int32 when decoded from a cache). Top-k mode: w = k, logprobs float32 [n, k],
    leftover float32 [n] (probability mass outside the k ids). Sampled mode: w = draws,
    counts int32 [n, w] (how often each id was drawn; padding entries have count 0).
    The entries of a row are a set: their order carries no meaning (sort by logprobs for
    ranks).
    """

    positions: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray | None = None
    leftover: np.ndarray | None = None
    counts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.positions)


@dataclass
class Preference:
    """Teacher log-probs of the chosen (this row's input_ids) and rejected answers."""

    chosen_logprob: float
    rejected_logprob: float
    chosen_token_logprobs: np.ndarray  # float32 [answer tokens]
    rejected_token_logprobs: np.ndarray
    rejected_token_digest: str


@dataclass
class CacheRow:
    """One sample's record, decoded. Fields of kinds the cache does not hold are None."""

    sample_id: str
    token_digest: str
    input_ids: np.ndarray
    response: TokenTargets | None = None
    visual: TokenTargets | None = None
    relation: np.ndarray | None = None  # float32 [nv, nv], R / ||R||_F
    preference: Preference | None = None


def _row_slices(lengths: np.ndarray) -> np.ndarray:
    """Start offset of each row's run in a flat array (and the end, last)."""
    return np.r_[0, np.cumsum(lengths)].astype(np.int64)


def _offsets(owner, lengths: str) -> np.ndarray:
    """_row_slices of owner.<lengths>, computed once per object (decoded row groups are
    gathered from many times)."""
    memo = owner.__dict__.setdefault("_offsets", {})
    if lengths not in memo:
        memo[lengths] = _row_slices(getattr(owner, lengths))
    return memo[lengths]


def _gather_runs(lengths: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Flat indices of the runs of rows `order` (in that order) of a flat array whose row i
    holds lengths[i] entries."""
    starts = _row_slices(lengths)[:-1][order]
    sizes = lengths[order]
    return np.repeat(starts - np.r_[0, np.cumsum(sizes)[:-1]], sizes) + np.arange(sizes.sum(), dtype=np.int64)


@dataclass
class TokenBatch:
    """One kind's targets of several rows, flat in row order: row i holds the next lengths[i]
    positions. Fields as TokenTargets, with a leading dimension of all rows' positions
    (n = lengths.sum()). Decoding fills these arrays once per batch; `row(i)` is a view."""

    lengths: np.ndarray  # int64 [rows]
    positions: np.ndarray  # [n]
    ids: np.ndarray  # int32 [n, w]
    logprobs: np.ndarray | None = None  # float32 [n, k] (topk)
    leftover: np.ndarray | None = None  # float32 [n] (topk)
    counts: np.ndarray | None = None  # int32 [n, draws] (sampled)

    def row(self, i: int) -> TokenTargets:
        a, b = _offsets(self, "lengths")[i:i + 2]
        return TokenTargets(*(None if v is None else v[a:b] for v in
                              (self.positions, self.ids, self.logprobs, self.leftover, self.counts)))

    def take(self, order: np.ndarray) -> "TokenBatch":
        """The rows `order` (indices, any order, repeats allowed), as a new batch."""
        idx = _gather_runs(self.lengths, np.asarray(order, dtype=np.int64))
        return TokenBatch(self.lengths[order], *(None if v is None else v[idx] for v in
                                                 (self.positions, self.ids, self.logprobs, self.leftover,
                                                  self.counts)))

    @staticmethod
    def concat(parts: list["TokenBatch"]) -> "TokenBatch":
        def cat(name):
            vals = [getattr(p, name) for p in parts]
            return None if vals[0] is None else np.concatenate(vals)
        return TokenBatch(*(cat(n) for n in ("lengths", "positions", "ids", "logprobs", "leftover", "counts")))


@dataclass
class RowBatch:
    """Several decoded rows, their token targets flat (TokenBatch): what a reader decodes in
    one call. Kinds the cache does not hold are None. `row(i)` / `rows()` give CacheRows
    whose arrays are views into the batch."""

    sample_ids: list[str]
    token_digests: list[str]
    input_lengths: np.ndarray  # int64 [rows]
    input_ids: np.ndarray  # int64 [sum of input_lengths], the rows' sequences one after another
    response: TokenBatch | None = None
    visual: TokenBatch | None = None
    relation: list[np.ndarray] | None = None
    preference: list["Preference"] | None = None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def row(self, i: int) -> CacheRow:
        a, b = _offsets(self, "input_lengths")[i:i + 2]
        return CacheRow(self.sample_ids[i], self.token_digests[i], self.input_ids[a:b],
                        *(None if t is None else t.row(i) for t in (self.response, self.visual)),
                        None if self.relation is None else self.relation[i],
                        None if self.preference is None else self.preference[i])

    def rows(self) -> list[CacheRow]:
        return [self.row(i) for i in range(len(self))]

    def take(self, order) -> "RowBatch":
        """The rows `order` (indices), as a new batch."""
        order = np.asarray(order, dtype=np.int64)
        pick = lambda xs: None if xs is None else [xs[i] for i in order]  # noqa: E731
        return RowBatch(pick(self.sample_ids), pick(self.token_digests), self.input_lengths[order],
                        self.input_ids[_gather_runs(self.input_lengths, order)],
                        *(None if t is None else t.take(order) for t in (self.response, self.visual)),
                        pick(self.relation), pick(self.preference))

    @staticmethod
    def gather(picks: list[tuple["RowBatch", int]]) -> "RowBatch":
        """One row from each (batch, row index) pair, in that order: a new batch built by
        concatenating the rows' runs (views), without a per-entry index."""
        def runs(owner_of, lengths, arrays_of):
            cuts = [(arrays_of(b), _offsets(owner_of(b), lengths)[i:i + 2]) for b, i in picks]
            return [np.concatenate([a[lo:hi] for a, (lo, hi) in ((arr[k], c) for arr, c in cuts)])
                    for k in range(len(cuts[0][0]))]

        first = picks[0][0]
        input_ids, = runs(lambda b: b, "input_lengths", lambda b: (b.input_ids,))
        tokens = {}
        for kind in ("response", "visual"):
            if getattr(first, kind) is None:
                tokens[kind] = None
                continue
            names = [n for n in ("positions", "ids", "logprobs", "leftover", "counts")
                     if getattr(getattr(first, kind), n) is not None]
            values = runs(lambda b: getattr(b, kind), "lengths",
                          lambda b: tuple(getattr(getattr(b, kind), n) for n in names))
            lengths = np.array([getattr(b, kind).lengths[i] for b, i in picks], dtype=np.int64)
            tokens[kind] = TokenBatch(lengths, **dict(zip(names, values)))
        pick = lambda name: None if getattr(first, name) is None else [getattr(b, name)[i] for b, i in picks]  # noqa: E731
        return RowBatch(pick("sample_ids"), pick("token_digests"),
                        np.array([b.input_lengths[i] for b, i in picks], dtype=np.int64), input_ids,
                        tokens["response"], tokens["visual"], pick("relation"), pick("preference"))

    @staticmethod
    def concat(parts: list["RowBatch"]) -> "RowBatch":
        """Rows of several batches (e.g. decoded from different shards), in that order."""
        def cat_list(name):
            vals = [getattr(p, name) for p in parts]
            return None if vals[0] is None else [x for v in vals for x in v]

        def cat_tokens(name):
            vals = [getattr(p, name) for p in parts]
            return None if vals[0] is None else TokenBatch.concat(vals)
        return RowBatch(cat_list("sample_ids"), cat_list("token_digests"),
                        np.concatenate([p.input_lengths for p in parts]), np.concatenate([p.input_ids for p in parts]),
                        cat_tokens("response"), cat_tokens("visual"), cat_list("relation"), cat_list("preference"))


def _token_fields(kind: str, raw: bool) -> list[pa.Field]:
    if raw:  # exact values, flat row-major
        return [pa.field(f"{kind}_positions", pa.list_(pa.int32())),
                pa.field(f"{kind}_ids", pa.list_(pa.int32())),
                pa.field(f"{kind}_logprobs", pa.list_(pa.float32())),
                pa.field(f"{kind}_leftover", pa.list_(pa.float32())),
                pa.field(f"{kind}_counts", pa.list_(pa.int32()))]
    return [pa.field(f"{kind}_positions", pa.list_(pa.int32())),
            *[pa.field(f"{kind}_ids_{p}", pa.binary()) for p in range(3)],
            pa.field(f"{kind}_values", pa.binary()),
            pa.field(f"{kind}_leftover", pa.binary()),
            pa.field(f"{kind}_counts", pa.binary()),
            pa.field(f"{kind}_set_sizes", pa.binary())]


_COMMON = [pa.field("sample_id", pa.string(), nullable=False),
           pa.field("token_digest", pa.string(), nullable=False),
           pa.field("input_ids", pa.list_(pa.int32()), nullable=False)]
_OTHER = [pa.field("relation", pa.binary()),
          pa.field("relation_size", pa.int32()),
          pa.field("chosen_logprob", pa.float64()),
          pa.field("rejected_logprob", pa.float64()),
          pa.field("chosen_token_logprobs", pa.list_(pa.float32())),
          pa.field("rejected_token_logprobs", pa.list_(pa.float32())),
          pa.field("rejected_token_digest", pa.string())]

RAW_SCHEMA = pa.schema(_COMMON + [f for k in TOKEN_KINDS for f in _token_fields(k, True)] + _OTHER)
STORED_SCHEMA = pa.schema(_COMMON + [f for k in TOKEN_KINDS for f in _token_fields(k, False)] + _OTHER)


def token_digest(input_ids: np.ndarray, image_token_id: int | None) -> str:
    """sha256 of the sequence with each run of image tokens collapsed to one.

    Collapsing makes the digest independent of the visual token count, so a student with
    another vision tower can still check that its text tokens are the teacher's (targets
    are aligned by order within their segment, docs/architecture.md invariant 6).
    """
    ids = collapse_image_runs(input_ids, image_token_id)
    return hashlib.sha256(ids.astype("<i4").tobytes()).hexdigest()


def collapse_image_runs(input_ids: np.ndarray, image_token_id: int | None) -> np.ndarray:
    """The sequence with each run of consecutive image tokens replaced by one."""
    ids = np.asarray(input_ids, dtype=np.int64)
    if image_token_id is None or not len(ids):
        return ids
    is_img = ids == image_token_id
    return ids[~(is_img & np.concatenate([[False], is_img[:-1]]))]
