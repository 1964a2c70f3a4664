"""`mmkd cache inspect`: what a cache holds, where its bytes go, what its teacher looked like."""

from __future__ import annotations

from collections import Counter

import numpy as np

from mmkd.storage.reader import TeacherCache
from mmkd.storage.schema import TOKEN_KINDS


def _pct(a: np.ndarray) -> dict:
    return {f"p{q}": round(float(np.percentile(a, q)), 4) for q in (1, 10, 50, 90, 99)} if len(a) else {}


def column_bytes(cache: TeacherCache) -> dict[str, int]:
    """Compressed bytes per column over all shards (from the Parquet footers)."""
    out: Counter = Counter()
    for s in cache.manifest.shards:
        meta = cache._parquet(s).metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                out[rg.column(c).path_in_schema.split(".")[0]] += rg.column(c).total_compressed_size
    return dict(out)


def inspect_cache(path: str, max_targets: int = 200_000) -> dict:
    """Manifest summary, sizes, bytes per target token (all-in and per record kind), and the
    distribution of the teacher's top-k mass and top-k entropy (or, for a sampled cache,
    distinct ids per position) over up to max_targets positions."""
    cache = TeacherCache(path)
    m = cache.manifest
    size = sum(s.bytes for s in m.shards)
    targets = sum(s.targets for s in m.shards)
    cols = column_bytes(cache)
    by_kind = {k: sum(v for c, v in cols.items() if c.startswith(k + "_")) for k in TOKEN_KINDS}
    out = {
        "path": cache.path,
        "cache_id": m.cache_id,
        "schema_version": m.schema_version,
        "complete": m.complete,
        "teacher": m.teacher.get("path"),
        "teacher_weights_sha256": str(m.teacher.get("weights_sha256", ""))[:16] + "...",
        "teacher_dtype": m.teacher.get("dtype"),
        "vocab_size": m.vocab_size,
        "mode": m.mode,
        "k" if m.mode == "topk" else "draws": m.k if m.mode == "topk" else m.extraction["draws"],
        "temperature": m.extraction["temperature"],
        "record_kinds": m.record_kinds,
        "samples": m.num_rows,
        "target_tokens": targets,
        "shards": len(m.shards),
        "bytes": size,
        "bytes_per_target_token": round(size / max(1, targets), 1),
        "bytes_per_sample": round(size / max(1, m.num_rows), 1),
        "bytes_by_column": dict(sorted(cols.items(), key=lambda kv: -kv[1])),
        "bytes_per_target_token_by_kind": {k: round(v / max(1, targets), 1) for k, v in by_kind.items() if v},
    }
    stats = {k: {"mass": [], "entropy": [], "distinct": []} for k in TOKEN_KINDS}
    seen = 0
    for row in cache.iter_rows():
        for k in TOKEN_KINDS:
            t = getattr(row, k)
            if t is None or not len(t):
                continue
            if t.logprobs is not None:
                p = np.exp(t.logprobs.astype(np.float64))
                stats[k]["mass"].append(1.0 - t.leftover)
                stats[k]["entropy"].append(-(p * np.where(p > 0, np.log(np.clip(p, 1e-300, None)), 0)).sum(-1))
            else:
                stats[k]["distinct"].append((t.counts > 0).sum(-1))
            seen += len(t)
        if seen >= max_targets:
            break
    for k, st in stats.items():
        for name, label in (("mass", "topk_mass"), ("entropy", "topk_entropy_nats"), ("distinct", "distinct_ids")):
            if st[name]:
                a = np.concatenate(st[name])
                out[f"{k}_{label}_mean"] = round(float(a.mean()), 4)
                out[f"{k}_{label}_percentiles"] = _pct(a)
    out["statistics_over_targets"] = seen
    return out
