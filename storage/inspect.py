"""`mmkd cache inspect`: what a cache holds and what its teacher looked like."""

from __future__ import annotations

import numpy as np

from storage.reader import TeacherCache


def inspect_cache(path: str) -> dict:
    """Manifest summary, sizes, bytes per target token, and the distribution of the
    teacher's top-k mass and (top-k part of the) entropy over target positions."""
    cache = TeacherCache(path)
    m = cache.manifest
    t = cache.read_table(["topk_logprobs", "leftover"])
    lp = t.column("topk_logprobs").combine_chunks().values.to_numpy(zero_copy_only=False).astype(np.float32)
    left = t.column("leftover").combine_chunks().values.to_numpy(zero_copy_only=False)
    n_tokens = len(left)
    size = sum(s.bytes for s in m.shards)
    p = np.exp(lp.reshape(n_tokens, m.k)) if n_tokens else np.zeros((0, m.k))
    mass = 1.0 - left
    entropy = -(p * np.log(np.clip(p, 1e-30, None))).sum(-1)
    pct = lambda a: {q: round(float(np.percentile(a, q)), 4) for q in (1, 50, 99)} if len(a) else {}  # noqa: E731
    return {
        "cache_id": m.cache_id,
        "schema_version": m.schema_version,
        "complete": m.complete,
        "teacher": m.teacher["path"],
        "teacher_weights_sha256": m.teacher["weights_sha256"][:16] + "...",
        "vocab_size": m.vocab_size,
        "k": m.k,
        "temperature": m.extraction["temperature"],
        "record_kinds": m.extraction["record_kinds"],
        "samples": m.num_rows,
        "target_tokens": n_tokens,
        "shards": len(m.shards),
        "bytes": size,
        "bytes_per_target_token": round(size / max(1, n_tokens), 1),
        "topk_mass_mean": round(float(mass.mean()), 4) if n_tokens else None,
        "topk_mass_percentiles": pct(mass),
        "topk_entropy_nats_percentiles": pct(entropy),
    }
