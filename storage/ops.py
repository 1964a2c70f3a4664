"""Whole-cache operations: merge caches made with identical settings, write a subset.

Both go through CacheWriter, so the output is an ordinary cache (atomic commits, a
consistent manifest, checksums). Shards are copied byte for byte where possible (merge,
and subset shards that keep every row); otherwise the kept rows are re-written from their
encoded form (no decoding, so values are not quantised twice).
"""

from __future__ import annotations

import shlex
import uuid
from datetime import datetime, timezone

import pyarrow as pa

from mmkd.storage.manifest import Manifest, mmkd_version
from mmkd.storage.reader import TeacherCache
from mmkd.storage.schema import CacheError
from mmkd.storage.writer import CacheWriter


def _fresh_copy(m: Manifest, inputs: dict, command: list[str]) -> Manifest:
    return Manifest(teacher=dict(m.teacher), processor=dict(m.processor), vocab_size=m.vocab_size,
                    extraction=dict(m.extraction), codec=dict(m.codec), inputs=inputs, shards=[],
                    cache_id=uuid.uuid4().hex, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    mmkd_version=mmkd_version(), command=shlex.join(["mmkd", "cache", *command]))


def merge_caches(inputs: list[str], output: str) -> Manifest:
    """One cache holding every row of `inputs` (which must share their settings and have no
    sample in common)."""
    if not inputs:
        raise CacheError("merge needs at least one input cache")
    caches = [TeacherCache(p) for p in inputs]
    for c in caches[1:]:
        diff = caches[0].manifest.settings_differ(c.manifest)
        if diff:
            raise CacheError(f"{c.path}: made with other settings than {caches[0].path} ({', '.join(diff)} differ); "
                             "only caches of the same teacher, processor and extraction settings can be merged")
    owner: dict[str, str] = {}
    for c in caches:
        for sid in c.sample_ids():
            if sid in owner:
                raise CacheError(f"sample {sid} is in both {owner[sid]} and {c.path}; remove it from one "
                                 "(`mmkd cache subset`) before merging")
            owner[sid] = c.path
    out = _fresh_copy(caches[0].manifest, {"merged_from": [c.manifest.cache_id for c in caches],
                                           "num_samples": len(owner)}, ["merge", *inputs, output])
    writer = CacheWriter(output, out)
    for c in caches:
        for s in c.manifest.shards:
            writer.commit_bytes(c.read_verified(s), list(s.sample_ids), s.targets, s.page_checksums)
    return writer.close(complete=all(c.manifest.complete for c in caches))


def subset_cache(source: str, output: str, sample_ids: list[str], ids_file: str = "IDS") -> Manifest:
    """A cache holding exactly the rows of `sample_ids` (all must be in `source`; ids_file:
    the file they came from, for the manifest's command)."""
    cache = TeacherCache(source)
    wanted = set(sample_ids)
    missing = wanted - set(cache.sample_ids())
    if missing:
        raise CacheError(f"{source}: {len(missing)} requested samples are not in the cache "
                         f"(first: {sorted(missing)[:5]})")
    out = _fresh_copy(cache.manifest, {"subset_of": cache.manifest.cache_id, "num_samples": len(wanted)},
                      ["subset", source, output, "--ids", ids_file])
    writer = CacheWriter(output, out)
    for s in cache.manifest.shards:
        keep = [i for i, sid in enumerate(s.sample_ids) if sid in wanted]
        if len(keep) == s.rows:
            writer.commit_bytes(cache.read_verified(s), list(s.sample_ids), s.targets, s.page_checksums)
        elif keep:
            table = cache.read_shard(s)  # the footer's vocabulary order stays with the rows
            part = table.take(pa.array(keep))
            writer.commit_stored(part)
    return writer.close(complete=True)

