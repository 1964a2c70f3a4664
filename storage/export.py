"""`mmkd cache export`: the cache's targets as plain columns, for readers without mmkd.

Shards store targets compactly (byte-plane id columns in a per-shard vocabulary order,
uint8 log-prob codes; docs/cache-format.md). An export decodes them once into columns any
Parquet or JSON reader understands (pyarrow, `datasets`, DuckDB, polars, pandas), one row
per sample, one output file per cache shard (`train-NNNNN.parquet` or `.jsonl`, so
`datasets.load_dataset("parquet", data_dir=OUT)` reads them), and `export.json` saying
what they hold. Export format EXPORT_FORMAT, version EXPORT_VERSION:

    sample_id             string
    input_ids             list<int32>          the teacher's token sequence
    {kind}_positions      list<int32>          kind = response | visual: indices into input_ids
    {kind}_ids            list<list<int32>>    per position, the ids by decreasing probability
    {kind}_logprobs       list<list<float32>>  top-k: their log-probs (nats), same order
    {kind}_leftover       list<float32>        top-k: probability mass outside the listed ids
    {kind}_counts         list<list<int32>>    sampled: times each id was drawn (of `draws`)
    relation              list<list<float32>>  R = Z Z^T / ||.||_F over the visual positions
    chosen_logprob, rejected_logprob           float64   preference: summed log-probs
    chosen_token_logprobs, rejected_token_logprobs   list<float32>   per answer token

Columns of record kinds the cache lacks are absent; a sample without a kind (no image:
no visual targets) has null there. A response target at position t is the
teacher's next-token distribution from the logits at t - 1 (the token input_ids[t] is what
it predicts); a visual target is the distribution at t itself. Values are the cache's
(decoded from its codes), not the teacher's exact floats.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmkd.storage.fs import join, open_fs, write_atomic
from mmkd.storage.reader import TeacherCache
from mmkd.storage.schema import TOKEN_KINDS, CacheError, CacheRow

EXPORT_FORMAT = "mmkd-plain-export"
EXPORT_VERSION = "1"
FORMATS = ("parquet", "jsonl")
EXPORT_INFO = "export.json"


@dataclass
class ExportInfo:
    """What an export folder holds (export.json)."""

    format: str
    version: str
    file_format: str
    source_cache_id: str
    vocab_size: int
    mode: str
    width: int  # k (topk) or draws (sampled)
    record_kinds: list[str]
    files: list[str]
    rows: int


def _ranked(ids: np.ndarray, score: np.ndarray, keep: np.ndarray | None = None) -> tuple[list, list]:
    """Per position, ids and scores by decreasing score (entries where keep is False dropped)."""
    order = np.argsort(-score, axis=1, kind="stable")
    ids, score = np.take_along_axis(ids, order, 1), np.take_along_axis(score, order, 1)
    if keep is None:
        return ids.tolist(), score.tolist()
    keep = np.take_along_axis(keep, order, 1)
    return [i[k].tolist() for i, k in zip(ids, keep)], [s[k].tolist() for s, k in zip(score, keep)]


def plain_record(row: CacheRow, mode: str) -> dict:
    """One decoded cache row as plain Python values (the export's columns)."""
    out = {"sample_id": row.sample_id, "input_ids": row.input_ids.astype(np.int32).tolist()}
    for kind in TOKEN_KINDS:
        t = getattr(row, kind)
        if t is None:
            continue
        out[f"{kind}_positions"] = np.asarray(t.positions, dtype=np.int32).tolist()
        if mode == "topk":
            out[f"{kind}_ids"], out[f"{kind}_logprobs"] = _ranked(t.ids, t.logprobs.astype(np.float32))
            out[f"{kind}_leftover"] = t.leftover.astype(np.float32).tolist()
        else:
            out[f"{kind}_ids"], out[f"{kind}_counts"] = _ranked(t.ids, t.counts.astype(np.int32), t.counts > 0)
    if row.relation is not None:
        out["relation"] = row.relation.astype(np.float32).tolist()
    if row.preference is not None:
        p = row.preference
        out.update(chosen_logprob=float(p.chosen_logprob), rejected_logprob=float(p.rejected_logprob),
                   chosen_token_logprobs=p.chosen_token_logprobs.astype(np.float32).tolist(),
                   rejected_token_logprobs=p.rejected_token_logprobs.astype(np.float32).tolist())
    return out


def _schema(records: list[dict]) -> pa.Schema:
    types = {"sample_id": pa.string(), "input_ids": pa.list_(pa.int32()), "relation": pa.list_(pa.list_(pa.float32())),
             "chosen_logprob": pa.float64(), "rejected_logprob": pa.float64(),
             "chosen_token_logprobs": pa.list_(pa.float32()), "rejected_token_logprobs": pa.list_(pa.float32())}
    for kind in TOKEN_KINDS:
        types |= {f"{kind}_positions": pa.list_(pa.int32()), f"{kind}_ids": pa.list_(pa.list_(pa.int32())),
                  f"{kind}_logprobs": pa.list_(pa.list_(pa.float32())), f"{kind}_leftover": pa.list_(pa.float32()),
                  f"{kind}_counts": pa.list_(pa.list_(pa.int32()))}
    names = dict.fromkeys(k for r in records for k in r)  # a sample without an image has no visual columns
    return pa.schema([(name, types[name]) for name in names])


def export_cache(cache_path: str, out: str, file_format: str = "parquet", log=print) -> ExportInfo:
    """Write the cache at cache_path as plain files into the folder `out` (any fsspec URL),
    one per shard, then export.json; returns what export.json says."""
    if file_format not in FORMATS:
        raise CacheError(f"--format {file_format!r}: choose one of {', '.join(FORMATS)}")
    cache = TeacherCache(cache_path)
    m = cache.manifest
    fs, root = open_fs(out)
    if fs.exists(join(root, EXPORT_INFO)) or (fs.exists(root) and fs.ls(root)):
        raise CacheError(f"{out}: not empty; export into a new folder")
    fs.makedirs(root, exist_ok=True)
    files = []
    for n, shard in enumerate(m.shards):
        records = [plain_record(r, m.mode) for r in cache.decode_shard(shard)]
        name = f"train-{n:05d}.{file_format}"
        if file_format == "parquet":
            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist(records, schema=_schema(records)), sink, compression="zstd")
            data = sink.getvalue().to_pybytes()
        else:
            data = "".join(json.dumps(r) + "\n" for r in records).encode()
        write_atomic(join(root, name), data, fs)
        files.append(name)
        log(f"[export] {name}: {len(records)} samples ({n + 1}/{len(m.shards)} shards)")
    width = m.k if m.mode == "topk" else int(m.extraction["draws"])
    info = ExportInfo(EXPORT_FORMAT, EXPORT_VERSION, file_format, m.cache_id, m.vocab_size, m.mode, width,
                      m.record_kinds, files, m.num_rows)
    write_atomic(join(root, EXPORT_INFO), json.dumps(asdict(info), indent=1), fs)
    return info
