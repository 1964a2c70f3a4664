"""Reading a cache: committed shards only, decoded to numpy without copies where possible."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.manifest import Manifest
from storage.schema import ROW_SCHEMA, CacheError
from storage.writer import file_sha256


@dataclass
class CacheRow:
    """One sample's teacher targets, decoded. n = number of supervised tokens.

    topk_ids int64 [n, k], topk_logprobs float32 [n, k] (descending), leftover float32 [n];
    supervised_positions int64 [n] index into input_ids (see storage.schema).
    """

    sample_id: str
    token_digest: str
    input_ids: np.ndarray
    supervised_positions: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    leftover: np.ndarray


class TeacherCache:
    """A cache folder opened for reading: its manifest and its committed shards."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)
        self.manifest = Manifest.load(self.dir)
        for s in self.manifest.shards:
            p = self.dir / s.file
            if not p.exists():
                raise CacheError(f"{p}: listed in the manifest but missing; restore it or re-run the teacher pass")
            if p.stat().st_size != s.bytes:
                raise CacheError(
                    f"{p}: {p.stat().st_size} bytes on disk, {s.bytes} in the manifest; the shard is "
                    "truncated or replaced (run `mmkd cache verify`)"
                )

    @property
    def k(self) -> int:
        return self.manifest.k

    def sample_ids(self) -> list[str]:
        return [i for s in self.manifest.shards for i in s.sample_ids]

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """All committed rows as one Arrow table (in shard order)."""
        tables = []
        for s in self.manifest.shards:
            path = self.dir / s.file
            try:
                t = pq.read_table(path, columns=columns)
            except (OSError, pa.ArrowException) as e:
                raise CacheError(f"{path}: unreadable Parquet ({e}); run `mmkd cache verify`") from e
            expected = ROW_SCHEMA if columns is None else pa.schema([ROW_SCHEMA.field(c) for c in columns])
            if t.schema != expected:
                raise CacheError(f"{path}: columns do not match cache schema {self.manifest.schema_version}:\n{t.schema}")
            if t.num_rows != s.rows:
                raise CacheError(f"{path}: {t.num_rows} rows, manifest says {s.rows}")
            tables.append(t)
        if not tables:
            return ROW_SCHEMA.empty_table() if columns is None else pa.schema(
                [ROW_SCHEMA.field(c) for c in columns]).empty_table()
        return pa.concat_tables(tables)

    def rows(self) -> dict[str, CacheRow]:
        """Every row decoded, keyed by sample id."""
        return {r.sample_id: r for r in decode_rows(self.read_table(), self.k)}

    def verify(self) -> list[str]:
        """Problems found (empty when the cache is sound): checksums, schema, row counts,
        duplicate sample ids."""
        problems = []
        seen: dict[str, str] = {}
        for s in self.manifest.shards:
            path = self.dir / s.file
            if file_sha256(path) != s.sha256:
                problems.append(f"{path}: sha256 does not match the manifest (corrupted or replaced)")
                continue
            try:
                t = pq.read_table(path)
            except (OSError, pa.ArrowException) as e:
                problems.append(f"{path}: unreadable Parquet ({e})")
                continue
            if t.schema != ROW_SCHEMA:
                problems.append(f"{path}: schema differs from the cache schema")
            if t.num_rows != s.rows:
                problems.append(f"{path}: {t.num_rows} rows, manifest says {s.rows}")
            if t.column("sample_id").to_pylist() != s.sample_ids:
                problems.append(f"{path}: sample ids differ from the manifest's list")
            for sid in s.sample_ids:
                if sid in seen:
                    problems.append(f"sample {sid} appears twice ({seen[sid]} and {s.file})")
                seen[sid] = s.file
        return problems


def _list_values(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy()
    return arr.values.to_numpy(zero_copy_only=False), offsets


def decode_rows(table: pa.Table, k: int) -> list[CacheRow]:
    cols = {name: _list_values(table.column(name)) for name in
            ("input_ids", "supervised_positions", "topk_ids", "topk_logprobs", "leftover")}
    ids = table.column("sample_id").to_pylist()
    digests = table.column("token_digest").to_pylist()
    out = []
    for r, sid in enumerate(ids):
        def get(name):
            v, o = cols[name]
            return v[o[r]:o[r + 1]]
        n = len(get("supervised_positions"))
        if len(get("topk_ids")) != n * k or len(get("topk_logprobs")) != n * k or len(get("leftover")) != n:
            raise CacheError(f"sample {sid}: {n} supervised positions but {len(get('topk_ids'))} top-k ids, "
                             f"{len(get('leftover'))} leftover values (k={k} in the manifest); the row is malformed")
        out.append(CacheRow(
            sample_id=sid,
            token_digest=digests[r],
            input_ids=get("input_ids").astype(np.int64),
            supervised_positions=get("supervised_positions").astype(np.int64),
            topk_ids=get("topk_ids").astype(np.int64).reshape(n, k),
            topk_logprobs=get("topk_logprobs").astype(np.float32).reshape(n, k),
            leftover=get("leftover").astype(np.float32),
        ))
    return out
