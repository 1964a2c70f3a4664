"""Reading a cache: committed shards only, streamed and decoded a block of rows at a time.

``TeacherCache.stream`` is what trainers use: every data-parallel rank gets the same number
of samples, in a deterministic order (seeded shard order + a seeded shuffle within blocks
of ``shuffle_buffer`` rows), and can start from a recorded position. Only the row groups a
block needs are read, so memory stays at one block whatever the cache's size.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmkd.storage.fs import join, open_fs
from mmkd.storage.manifest import Manifest, ShardInfo
from mmkd.storage.schema import STORED_SCHEMA, CacheError, CacheRow
from mmkd.storage.tables import VOCAB_ORDER_KEY, decode_stored, unpack_order
from mmkd.storage.writer import sha256_bytes

REMAINDERS = ("drop", "pad")


def _plain(t: pa.DataType) -> pa.DataType:
    """A type with list element names dropped (Parquet writers name them differently)."""
    return pa.list_(_plain(t.value_type)) if pa.types.is_list(t) else t


def schema_problem(schema: pa.Schema) -> str | None:
    """What differs between a shard's schema and STORED_SCHEMA (None when they agree)."""
    for f in STORED_SCHEMA:
        if f.name not in schema.names:
            return f"column {f.name} is missing"
        got = schema.field(f.name).type
        if _plain(got) != _plain(f.type):
            return f"column {f.name} has type {got}, the format says {f.type}"
    extra = [n for n in schema.names if n not in STORED_SCHEMA.names]
    return f"unexpected columns {extra}" if extra else None


class TeacherCache:
    """A cache folder (local path or fsspec URL) opened for reading.

    On open, every listed shard must exist with its listed size (a truncated or missing
    shard is caught here; ``verify`` checks contents). check=False skips that (verify).
    """

    def __init__(self, path: str, check: bool = True):
        self.path = str(path)
        self.fs, self.root = open_fs(path)
        self.manifest = Manifest.load(self.path)
        self.settings = self.manifest.target_settings()
        if check:
            for problem in self.file_problems():
                raise CacheError(problem)

    @property
    def k(self) -> int:
        return self.manifest.k

    def shard_path(self, s: ShardInfo) -> str:
        return join(self.root, s.file)

    def file_problems(self) -> list[str]:
        """Listed shards that are missing or whose size differs from the manifest."""
        sizes = {p["name"].rstrip("/").rsplit("/", 1)[-1]: p["size"] for p in self.fs.ls(self.root, detail=True)}
        out = []
        for s in self.manifest.shards:
            p = self.shard_path(s)
            if s.file not in sizes:
                out.append(f"{p}: listed in the manifest but missing; restore it from a copy of the cache, or "
                           "remove it with `mmkd cache subset` and re-run the teacher pass to redo its samples")
            elif sizes[s.file] != s.bytes:
                out.append(f"{p}: {sizes[s.file]} bytes on disk, {s.bytes} in the manifest; the shard is truncated "
                           "or replaced (run `mmkd cache verify`)")
        return out

    def sample_ids(self) -> list[str]:
        return [i for s in self.manifest.shards for i in s.sample_ids]

    # ------------------------------------------------------------ shard access

    def _parquet(self, s: ShardInfo, data: bytes | None = None) -> pq.ParquetFile:
        path = self.shard_path(s)
        try:
            src = pa.BufferReader(data) if data is not None else self.fs.open(path, "rb")
            f = pq.ParquetFile(src)
        except (OSError, pa.ArrowException) as e:
            raise CacheError(f"{path}: unreadable Parquet ({e}); run `mmkd cache verify`") from e
        problem = schema_problem(f.schema_arrow)
        if problem:
            raise CacheError(f"{path}: {problem} (cache schema {self.manifest.schema_version}); the shard was not "
                             "written by this format version or was modified")
        if f.metadata.num_rows != s.rows:
            raise CacheError(f"{path}: {f.metadata.num_rows} rows, the manifest says {s.rows}")
        return f

    def vocab_order(self, f: pq.ParquetFile) -> np.ndarray:
        meta = f.schema_arrow.metadata or {}
        return unpack_order(meta.get(VOCAB_ORDER_KEY))

    def read_shard(self, s: ShardInfo, columns: list[str] | None = None) -> pa.Table:
        """One shard's stored (encoded) rows."""
        f = self._parquet(s)
        try:
            return f.read(columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise CacheError(f"{self.shard_path(s)}: unreadable Parquet ({e}); run `mmkd cache verify`") from e

    def decode(self, table: pa.Table, order: np.ndarray, where: str = "") -> list[CacheRow]:
        try:
            return decode_stored(table, order, self.settings)
        except (CacheError, ValueError, IndexError) as e:
            raise CacheError(f"{where}: {e}; run `mmkd cache verify`") from e

    def iter_rows(self) -> Iterator[CacheRow]:
        """Every row, shard by shard in manifest order (one shard in memory at a time)."""
        for s in self.manifest.shards:
            f = self._parquet(s)
            yield from self.decode(f.read(), self.vocab_order(f), self.shard_path(s))

    def rows(self) -> dict[str, CacheRow]:
        """Every row decoded, keyed by sample id (small caches; stream large ones)."""
        return {r.sample_id: r for r in self.iter_rows()}

    # ------------------------------------------------------------ streaming for training

    def plan(self, rank: int = 0, world_size: int = 1, seed: int | None = None, epoch: int = 0,
             shuffle_buffer: int = 1024, remainder: str = "drop") -> tuple[np.ndarray, np.ndarray]:
        """This rank's sample order for one epoch: (shard index, row in shard) arrays.

        Global order: shards in manifest order, or shuffled with (seed, epoch). Rank r takes
        the r-th contiguous slice of it, so it reads about 1/world_size of the shards. All
        ranks get n = N // world_size samples (remainder="drop": the last N % world_size
        are left out this epoch, and which ones changes with the shuffle) or ceil(N /
        world_size) (remainder="pad": the order wraps around to fill the last slice). With a
        seed, each block of shuffle_buffer samples is shuffled (seed, epoch, rank, block).
        """
        if remainder not in REMAINDERS:
            raise ValueError(f"remainder {remainder!r}: choose one of {REMAINDERS}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        shards = list(range(len(self.manifest.shards)))
        if seed is not None:
            random.Random(f"{seed}-{epoch}").shuffle(shards)
        rows = np.array([self.manifest.shards[i].rows for i in shards], dtype=np.int64)
        shard_of = np.repeat(np.array(shards, dtype=np.int64), rows)
        row_of = np.arange(len(shard_of)) - np.repeat(np.r_[0, np.cumsum(rows)[:-1]], rows)
        total = len(shard_of)
        per = total // world_size if remainder == "drop" else -(-total // world_size)
        if per == 0:
            raise CacheError(f"{self.path}: {total} samples cannot give each of {world_size} ranks one")
        idx = np.arange(rank * per, (rank + 1) * per) % total
        shard_of, row_of = shard_of[idx], row_of[idx]
        if seed is not None:
            for b in range(0, per, shuffle_buffer):
                perm = np.random.default_rng([seed, epoch, rank, b]).permutation(min(shuffle_buffer, per - b))
                shard_of[b:b + len(perm)] = shard_of[b:b + len(perm)][perm]
                row_of[b:b + len(perm)] = row_of[b:b + len(perm)][perm]
        return shard_of, row_of

    def stream(self, rank: int = 0, world_size: int = 1, seed: int | None = None, epoch: int = 0,
               start: int = 0, shuffle_buffer: int = 1024, remainder: str = "drop") -> Iterator[CacheRow]:
        """Yield this rank's rows in plan order, from position `start` (the number of rows
        this rank already consumed this epoch: record it to resume exactly)."""
        shard_of, row_of = self.plan(rank, world_size, seed, epoch, shuffle_buffer, remainder)
        block = max(1, shuffle_buffer)
        for b in range(start - start % block, len(shard_of), block):
            sh, rw = shard_of[b:b + block], row_of[b:b + block]
            decoded: dict[tuple[int, int], CacheRow] = {}
            for s in np.unique(sh):
                wanted = np.unique(rw[sh == s])
                for r, row in zip(wanted, self._read_rows(int(s), wanted)):
                    decoded[(int(s), int(r))] = row
            first = start - b if b <= start else 0
            for s, r in zip(sh[first:], rw[first:]):
                yield decoded[(int(s), int(r))]

    def _read_rows(self, shard: int, rows: np.ndarray) -> list[CacheRow]:
        """Decoded rows (sorted row indices) of one shard, reading only their row groups."""
        info = self.manifest.shards[shard]
        f = self._parquet(info)
        group_rows = np.array([f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)], dtype=np.int64)
        group_start = np.r_[0, np.cumsum(group_rows)[:-1]]
        groups = np.unique(np.searchsorted(group_start, rows, side="right") - 1)
        try:
            table = f.read_row_groups([int(g) for g in groups])
        except (OSError, pa.ArrowException) as e:
            raise CacheError(f"{self.shard_path(info)}: unreadable Parquet ({e}); run `mmkd cache verify`") from e
        read = np.concatenate([np.arange(group_start[g], group_start[g] + group_rows[g]) for g in groups])
        local = np.searchsorted(read, rows)  # rows are sorted and unique, as is `read`
        return self.decode(table.take(pa.array(local)), self.vocab_order(f), self.shard_path(info))

    # ------------------------------------------------------------ integrity

    def verify(self) -> list[str]:
        """Problems found (empty when the cache is sound): missing or resized shards,
        checksums, schema, row counts, sample ids against the manifest, rows that do not
        decode, samples that appear twice."""
        problems = self.file_problems()
        broken = {p.split(":")[0] for p in problems}
        seen: dict[str, str] = {}
        for s in self.manifest.shards:
            path = self.shard_path(s)
            if path in broken:
                continue
            data = self.fs.cat_file(path)
            if sha256_bytes(data) != s.sha256:
                problems.append(f"{path}: sha256 does not match the manifest (corrupted or replaced); restore the "
                                "shard from a copy, or drop it with `mmkd cache subset` and re-run the teacher pass")
                continue
            try:
                f = self._parquet(s, data)
                table = f.read()
                if table.column("sample_id").to_pylist() != s.sample_ids:
                    problems.append(f"{path}: sample ids differ from the manifest's list")
                self.decode(table, self.vocab_order(f), path)
            except CacheError as e:
                problems.append(str(e))
                continue
            for sid in s.sample_ids:
                if sid in seen:
                    problems.append(f"sample {sid} appears twice ({seen[sid]} and {s.file})")
                seen[sid] = s.file
        return problems

