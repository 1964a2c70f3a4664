"""Rows <-> Arrow tables: CacheRow lists -> RAW tables (exact, in flight) -> STORED tables
(encoded, in shards) -> CacheRow lists again.

Encoding and decoding work on whole tables at once (flat numpy arrays and offsets), never
per token in Python. The codec settings live in the manifest (``CodecSettings``); the one
per-shard parameter, the vocabulary order that id sets are coded in, lives in the shard's
Parquet footer under ``mmkd.vocab_order``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zstandard

from mmkd.storage import codec
from mmkd.storage.schema import (
    RAW_SCHEMA,
    STORED_SCHEMA,
    TOKEN_KINDS,
    CacheError,
    CacheRow,
    Preference,
    RowBatch,
    TokenBatch,
)

VOCAB_ORDER_KEY = b"mmkd.vocab_order"


@dataclass
class CodecSettings:
    """How values are stored (recorded in the manifest; see docs/cache-format.md)."""

    logprob_levels: list[float] = field(default_factory=lambda: codec.LEVELS.tolist())
    vocab_order_top: int = 4096  # ids ranked by frequency per shard; the rest in id order
    relation: str = "triangle-f16"  # or "lowrank-f16"
    relation_rank: int = 64  # lowrank-f16 only
    compression: str = "zstd"
    compression_level: int = 6

    @property
    def levels(self) -> np.ndarray:
        return np.asarray(self.logprob_levels, dtype=np.float64)


@dataclass
class TargetSettings:
    """What decoding needs from the manifest: vocabulary, mode and its width."""

    vocab_size: int
    mode: str  # "topk" | "sampled"
    width: int  # k (topk) or draws (sampled)
    codec: CodecSettings


# ---------------------------------------------------------------- Arrow helpers

def _list_flat(col) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> (flat values as numpy, per-row lengths; null rows have length 0)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return arr.flatten().to_numpy(zero_copy_only=False), lengths


def _binary_flat(col) -> tuple[np.ndarray, np.ndarray]:
    """A binary column -> (all rows' bytes concatenated as uint8, per-row lengths)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(arr, pa.ChunkedArray):  # zero chunks
        return np.zeros(0, np.uint8), np.zeros(0, np.int64)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    flat = np.frombuffer(data, dtype=np.uint8)[offsets[0]:offsets[-1]] if data is not None else np.zeros(0, np.uint8)
    return flat, np.diff(offsets).astype(np.int64)


def _list_array(flat: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ascontiguousarray(flat), type=value_type))


def _binary_array(flat: np.ndarray, lengths: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    data = np.ascontiguousarray(flat, dtype=np.uint8)
    return pa.BinaryArray.from_buffers(pa.binary(), len(lengths), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _present(table: pa.Table, name: str) -> bool:
    if name not in table.column_names:  # not read (a reader asked for some record kinds only)
        return False
    col = table.column(name)
    nulls = col.null_count
    if 0 < nulls < table.num_rows:
        raise CacheError(f"column {name} is present for some rows and missing for others; a record kind "
                         "must be present for every row of a cache (empty where there is nothing)")
    return table.num_rows > 0 and nulls == 0


# ---------------------------------------------------------------- rows -> RAW

def raw_table(rows: list[CacheRow], relation_codec: str = "triangle-f16", relation_rank: int = 64) -> pa.Table:
    """CacheRows with exact values -> a RAW_SCHEMA table (relation matrices are encoded
    here, in the worker: they need no shard-level state)."""
    cols: dict[str, pa.Array] = {
        "sample_id": pa.array([r.sample_id for r in rows], pa.string()),
        "token_digest": pa.array([r.token_digest for r in rows], pa.string()),
        "input_ids": _list_array(_cat([r.input_ids for r in rows], np.int32), _lens([r.input_ids for r in rows]),
                                 pa.int32()),
    }
    for kind in TOKEN_KINDS:
        tts = [getattr(r, kind) for r in rows]
        for name, typ in (("positions", pa.int32()), ("ids", pa.int32()), ("logprobs", pa.float32()),
                          ("leftover", pa.float32()), ("counts", pa.int32())):
            vals = [getattr(t, name) if t is not None else None for t in tts]
            cols[f"{kind}_{name}"] = _optional_list(vals, typ)
    rel = [r.relation for r in rows]
    cols["relation"] = pa.array([codec.encode_relation(m, relation_codec, relation_rank) if m is not None else None
                                 for m in rel], pa.binary())
    cols["relation_size"] = pa.array([m.shape[0] if m is not None else None for m in rel], pa.int32())
    prefs = [r.preference for r in rows]
    for name, typ in (("chosen_logprob", pa.float64()), ("rejected_logprob", pa.float64()),
                      ("rejected_token_digest", pa.string())):
        cols[name] = pa.array([getattr(p, name) if p is not None else None for p in prefs], typ)
    for name in ("chosen_token_logprobs", "rejected_token_logprobs"):
        cols[name] = _optional_list([getattr(p, name) if p is not None else None for p in prefs], pa.float32())
    return pa.table(cols, schema=RAW_SCHEMA)


def _cat(arrays, dtype) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=dtype).ravel() for a in arrays]) if arrays else np.zeros(0, dtype)


def _lens(arrays) -> np.ndarray:
    return np.array([np.asarray(a).size for a in arrays], dtype=np.int64)


def _optional_list(vals: list, typ: pa.DataType) -> pa.Array:
    if all(v is None for v in vals):
        return pa.nulls(len(vals), pa.list_(typ))
    if any(v is None for v in vals):
        raise CacheError("a record field is set for some rows and not others")
    return _list_array(_cat(vals, typ.to_pandas_dtype()), _lens(vals), typ)


# ---------------------------------------------------------------- RAW -> STORED

def encode_raw(raw: pa.Table, s: TargetSettings) -> pa.Table:
    """A RAW table -> a STORED table (one shard's rows), with the shard's vocabulary order
    in the schema metadata."""
    if raw.schema != RAW_SCHEMA:
        raise CacheError(f"rows do not match the cache's raw schema:\n{raw.schema}")
    out = {f.name: raw.column(f.name) for f in STORED_SCHEMA if f.name in RAW_SCHEMA.names
           and not f.name.endswith(("_leftover", "_counts"))}
    kinds = [k for k in TOKEN_KINDS if _present(raw, f"{k}_positions")]
    flat = {k: {n: _list_flat(raw.column(f"{k}_{n}")) for n in ("positions", "ids", "logprobs", "leftover", "counts")}
            for k in kinds}
    sets = {}
    for k in kinds:
        ids, _ = flat[k]["ids"]
        if s.mode == "topk":
            sets[k] = (ids, np.full(len(flat[k]["positions"][0]), s.width, np.int64), None)
        else:
            counts, _ = flat[k]["counts"]
            keep = counts > 0
            sets[k] = (ids[keep], keep.reshape(-1, s.width).sum(1), keep)
    order = codec.vocab_order(np.concatenate([v[0] for v in sets.values()]) if sets else np.zeros(0, np.int64),
                              s.vocab_size, s.codec.vocab_order_top)
    n = raw.num_rows
    for k in TOKEN_KINDS:
        for name in ("ids_0", "ids_1", "ids_2", "values", "leftover", "counts", "set_sizes"):
            out[f"{k}_{name}"] = pa.nulls(n, pa.binary())
    for k in kinds:
        ids, sizes, keep = sets[k]
        _, pos_lens = flat[k]["positions"]
        if len(ids) and (ids.min() < 0 or ids.max() >= s.vocab_size):
            raise CacheError(f"{k} target id {int(ids.max())} outside the vocabulary of {s.vocab_size}")
        planes, perm = codec.encode_id_sets(ids, sizes, order, s.vocab_size)
        entries_before = np.r_[0, np.cumsum(sizes)]
        row_entries = np.diff(entries_before[np.r_[0, np.cumsum(pos_lens)]])
        for p in range(3):
            out[f"{k}_ids_{p}"] = _binary_array(planes[p], row_entries)
        if s.mode == "topk":
            out[f"{k}_values"] = _binary_array(codec.encode_logprobs(flat[k]["logprobs"][0][perm], s.codec.levels),
                                               row_entries)
            with np.errstate(divide="ignore"):
                left = np.log(flat[k]["leftover"][0].astype(np.float64))
            out[f"{k}_leftover"] = _binary_array(codec.encode_logprobs(left, s.codec.levels), pos_lens)
        else:
            counts = flat[k]["counts"][0][keep][perm]
            if counts.max(initial=0) > 255:
                raise CacheError("a sampled count exceeds 255; use at most 255 draws")
            out[f"{k}_counts"] = _binary_array(counts.astype(np.uint8), row_entries)
            out[f"{k}_set_sizes"] = _binary_array(sizes.astype(np.uint8), pos_lens)
    table = pa.table({f.name: out[f.name] for f in STORED_SCHEMA}, schema=STORED_SCHEMA)
    return table.replace_schema_metadata({VOCAB_ORDER_KEY: pack_order(order)})


def pack_order(order: np.ndarray) -> bytes:
    """Vocabulary order -> footer value: base64 of zstd of int32 little-endian."""
    return base64.b64encode(zstandard.ZstdCompressor(level=19).compress(order.astype("<i4").tobytes()))


def unpack_order(value: bytes | None) -> np.ndarray:
    if value is None:
        return np.zeros(0, np.int32)
    raw = zstandard.ZstdDecompressor().decompress(base64.b64decode(value))
    return np.frombuffer(raw, dtype="<i4").astype(np.int64)


# ---------------------------------------------------------------- STORED -> rows

def decode_token_targets(table: pa.Table, kind: str, order: np.ndarray, s: TargetSettings,
                         codes: bool = False) -> TokenBatch | None:
    """One kind's targets of every row of a STORED table, flat (None when the kind is absent).
    codes: leave log-probs and leftover as their uint8 level codes (decode_codes turns them
    into values later: a reader keeps coded rows at 1 byte per value)."""
    if not _present(table, f"{kind}_positions"):
        return None
    positions, pos_lens = _list_flat(table.column(f"{kind}_positions"))
    planes = np.stack([_binary_flat(table.column(f"{kind}_ids_{p}"))[0] for p in range(3)])
    n = len(positions)
    if s.mode == "topk":
        sizes = np.full(n, s.width, np.int64)
    else:
        sizes = _binary_flat(table.column(f"{kind}_set_sizes"))[0].astype(np.int64)
        if len(sizes) != n:
            raise CacheError(f"{kind}: {len(sizes)} set sizes for {n} positions")
    if planes.shape[1] != sizes.sum():
        raise CacheError(f"{kind}: {planes.shape[1]} stored ids, expected {int(sizes.sum())} "
                         f"({n} positions, mode {s.mode}, width {s.width}); the shard is malformed")
    ids = codec.decode_id_sets(planes, s.width if s.mode == "topk" else sizes, order, s.vocab_size)
    if s.mode == "topk":
        values = _binary_flat(table.column(f"{kind}_values"))[0]
        left = _binary_flat(table.column(f"{kind}_leftover"))[0]
        if len(values) != len(ids) or len(left) != n:
            raise CacheError(f"{kind}: {len(values)} values / {len(left)} leftover entries for {len(ids)} ids / "
                             f"{n} positions; the shard is malformed")
        if codes:
            return TokenBatch(pos_lens, positions, ids.reshape(n, s.width), values.reshape(n, s.width), left)
        lp = codec.decode_logprobs(values, s.codec.levels).reshape(n, s.width)
        leftover = np.exp(codec.decode_logprobs(left, s.codec.levels))
        return TokenBatch(pos_lens, positions, ids.reshape(n, s.width), lp, leftover)
    counts = _binary_flat(table.column(f"{kind}_counts"))[0]
    if len(counts) != len(ids):
        raise CacheError(f"{kind}: {len(counts)} counts for {len(ids)} ids; the shard is malformed")
    row = np.repeat(np.arange(n), sizes)
    col = np.arange(len(ids)) - np.repeat(codec.set_starts(sizes), sizes)
    pid = np.zeros((n, s.width), np.int32)
    pct = np.zeros((n, s.width), np.int32)
    pid[row, col], pct[row, col] = ids, counts
    return TokenBatch(pos_lens, positions, pid, counts=pct)


def decode_codes(batch: RowBatch, s: TargetSettings) -> RowBatch:
    """A batch decoded with codes=True -> the same rows with log-prob and leftover values
    (the same values decode_batch gives directly)."""
    for kind in TOKEN_KINDS:
        tb = getattr(batch, kind)
        if tb is not None and tb.logprobs is not None and tb.logprobs.dtype == np.uint8:
            tb.logprobs = codec.decode_logprobs(tb.logprobs, s.codec.levels)
            tb.leftover = np.exp(codec.decode_logprobs(tb.leftover, s.codec.levels))
    return batch


def decode_batch(table: pa.Table, order: np.ndarray, s: TargetSettings, codes: bool = False) -> RowBatch:
    """A STORED table (one shard, or any slice of one) -> its rows decoded, flat (RowBatch):
    a handful of vectorised passes over the table, whatever its number of rows. codes: as
    in decode_token_targets."""
    ids, lens = _list_flat(table.column("input_ids"))
    batch = RowBatch(table.column("sample_id").to_pylist(), table.column("token_digest").to_pylist(), lens,
                     ids.astype(np.int64), *(decode_token_targets(table, kind, order, s, codes) for kind in TOKEN_KINDS))
    if _present(table, "relation"):
        batch.relation = [codec.decode_relation(blob, size, s.codec.relation) for blob, size in
                          zip(table.column("relation").to_pylist(), table.column("relation_size").to_pylist())]
    if _present(table, "chosen_logprob"):
        names = ("chosen_logprob", "rejected_logprob", "chosen_token_logprobs", "rejected_token_logprobs",
                 "rejected_token_digest")
        cols = {nm: table.column(nm).to_pylist() for nm in names}
        batch.preference = [Preference(
            cols["chosen_logprob"][i], cols["rejected_logprob"][i],
            np.asarray(cols["chosen_token_logprobs"][i], np.float32),
            np.asarray(cols["rejected_token_logprobs"][i], np.float32), cols["rejected_token_digest"][i])
            for i in range(table.num_rows)]
    return batch


def decode_stored(table: pa.Table, order: np.ndarray, s: TargetSettings) -> list[CacheRow]:
    """A STORED table -> its rows, decoded, one CacheRow each (views into decode_batch)."""
    return decode_batch(table, order, s).rows()
