"""Crash-safe shard writing: a shard is either committed (in the manifest) or invisible.

Commit order: write ``.shard-*.tmp``, fsync, rename to ``shard-*.parquet``, then list it in
the manifest (atomic rewrite). A crash before the manifest rewrite leaves an unlisted file
that readers never see and the next writer deletes. One writer per cache folder at a time,
enforced with an OS lock that dies with its process (so kill -9 leaves no stale lock).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.manifest import MANIFEST_NAME, Manifest, ShardInfo
from storage.schema import ROW_SCHEMA, CacheError

LOCK_NAME = ".writer.lock"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CacheWriter:
    """Appends rows to a cache folder in committed shards.

    Open with a fresh Manifest (new cache) or the one on disk (resume: its settings must
    equal the new ones, checked by the caller). ``add`` buffers Arrow tables of ROW_SCHEMA
    and commits a shard every ``rows_per_shard`` rows; ``close(complete)`` commits the rest.
    """

    def __init__(self, cache_dir: str | Path, manifest: Manifest, rows_per_shard: int = 1024,
                 compression_level: int = 3):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / LOCK_NAME, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise CacheError(f"{self.dir}: another process is writing this cache; wait for it or use another folder")
        self.manifest = manifest
        self.rows_per_shard = rows_per_shard
        self.compression_level = compression_level
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._discard_uncommitted()
        self.manifest.save(self.dir)

    def _discard_uncommitted(self) -> None:
        listed = {s.file for s in self.manifest.shards}
        for p in self.dir.iterdir():
            if p.name in (MANIFEST_NAME, LOCK_NAME) or p.name in listed:
                continue
            if p.name.startswith(".shard-") or p.name.startswith("shard-") or p.name.startswith(f".{MANIFEST_NAME}"):
                p.unlink()  # left by a crash before commit: never visible to readers

    def add(self, table: pa.Table) -> None:
        if table.schema != ROW_SCHEMA:
            raise CacheError(f"rows do not match the cache schema:\n{table.schema}\nexpected:\n{ROW_SCHEMA}")
        self._buffer.append(table)
        self._buffered += table.num_rows
        while self._buffered >= self.rows_per_shard:
            whole = pa.concat_tables(self._buffer)
            self._commit(whole.slice(0, self.rows_per_shard))
            rest = whole.slice(self.rows_per_shard)
            self._buffer, self._buffered = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

    def _commit(self, table: pa.Table) -> None:
        name = f"shard-{len(self.manifest.shards):05d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.dir / f".{name}.tmp"
        pq.write_table(table, tmp, compression="zstd", compression_level=self.compression_level)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        info = ShardInfo(
            file=name,
            rows=table.num_rows,
            bytes=tmp.stat().st_size,
            sha256=file_sha256(tmp),
            sample_ids=table.column("sample_id").to_pylist(),
        )
        os.replace(tmp, self.dir / name)
        self.manifest.shards.append(info)
        self.manifest.save(self.dir)

    def flush(self) -> None:
        """Commit the buffered rows as a (possibly short) shard."""
        if self._buffered:
            self._commit(pa.concat_tables(self._buffer))
            self._buffer, self._buffered = [], 0

    def close(self, complete: bool) -> Manifest:
        """Flush, mark the cache complete (every input sample committed) or not, unlock."""
        self.flush()
        self.manifest.complete = complete
        self.manifest.save(self.dir)
        self._lock.close()
        return self.manifest
