"""Reading a cache: committed shards only, read and decoded a batch of rows at a time.

Trainers read the rows of their epoch plan (storage.plan: every data-parallel rank gets the
same number of rows in a deterministic order, from about 1/W of the shards, and can start
from a recorded position): ``read_items`` decodes the rows of a batch of plan items,
reading only the Parquet row groups they live in and keeping the last few row groups read,
so memory stays at a few row groups whatever the cache's size. ``stream`` yields a rank's
rows one by one for readers outside mmkd's trainer.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmkd.storage.fs import join, open_fs
from mmkd.storage.manifest import Manifest, ShardInfo, unreachable
from mmkd.storage.plan import EpochPlan
from mmkd.storage.schema import STORED_SCHEMA, TOKEN_KINDS, CacheError, CacheRow, RowBatch
from mmkd.storage.tables import VOCAB_ORDER_KEY, decode_batch, decode_codes, unpack_order
from mmkd.storage.writer import ROW_GROUP_ROWS, sha256_bytes


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

    def __init__(self, path: str, check: bool = True, keep_row_groups: int = 16):
        self.path = str(path)
        self.keep_row_groups = keep_row_groups  # row groups kept decoded for read_items (most recent)
        self.read_kinds: tuple[str, ...] | None = None  # the record kinds read_items decodes (None: all)
        self._noted = False  # the one-time note about shards without checksums
        self._footers: dict[int, pq.ParquetFile] = {}
        self._orders: dict[int, np.ndarray] = {}
        self._groups: dict[tuple[int, int], RowBatch] = {}
        self._starts: dict[int, np.ndarray] = {}
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
        try:
            listing = self.fs.ls(self.root, detail=True)
        except Exception as e:  # noqa: BLE001 - any fsspec backend's network or auth error
            raise unreachable(self.path, e) from e
        sizes = {p["name"].rstrip("/").rsplit("/", 1)[-1]: p["size"] for p in listing}
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

    def damaged(self, s: ShardInfo, what: str) -> CacheError:
        """The error for a shard found damaged on read: which shard, what failed, the fixes."""
        return CacheError(f"{self.shard_path(s)}: {what}; the shard is damaged or was replaced. Nothing of it was "
                          "used: run `mmkd cache verify` to list the damaged shards, then restore them from a copy "
                          "of the cache, or write a cache without them (`mmkd cache subset`) and re-run the teacher "
                          "pass on their samples")

    def _footer_bytes(self, s: ShardInfo, data: bytes | None) -> bytes:
        if data is not None:
            tail = data[-8:]
            n = int.from_bytes(tail[:4], "little")
            return data[-8 - n:-8]
        with self.fs.open(self.shard_path(s), "rb") as f:
            f.seek(-8, 2)
            n = int.from_bytes(f.read(4), "little")
            if n > s.bytes - 12:
                raise self.damaged(s, f"the footer length ({n} bytes) exceeds the file")
            f.seek(-8 - n, 2)
            return f.read(n)

    def _parquet(self, s: ShardInfo, data: bytes | None = None) -> pq.ParquetFile:
        """The shard opened for reading, its footer checked against the manifest's sha256 and
        its pages set to be checked against their CRCs as they are read (shards written with
        them; older shards: only verify() can check them)."""
        path = self.shard_path(s)
        if s.footer_sha256 is not None:
            try:
                footer = self._footer_bytes(s, data)
            except OSError as e:
                raise self.damaged(s, f"cannot read its footer ({e})") from e
            if sha256_bytes(footer) != s.footer_sha256:
                raise self.damaged(s, "its Parquet footer (schema, offsets, vocabulary order) does not match the "
                                      "manifest's checksum")
        elif not self._noted:
            self._noted = True
            warnings.warn(f"{self.path}: written before shards carried checksums; reading does not check its "
                          "contents: run `mmkd cache verify` on it (whole-file sha256)", stacklevel=3)
        try:
            src = pa.BufferReader(data) if data is not None else self.fs.open(path, "rb")
            f = pq.ParquetFile(src, page_checksum_verification=s.page_checksums)
        except (OSError, pa.ArrowException) as e:
            raise self.damaged(s, f"unreadable Parquet ({e})") from e
        problem = schema_problem(f.schema_arrow)
        if problem:
            raise CacheError(f"{path}: {problem} (cache schema {self.manifest.schema_version}); the shard was not "
                             "written by this format version or was modified")
        if f.metadata.num_rows != s.rows:
            raise self.damaged(s, f"{f.metadata.num_rows} rows, the manifest says {s.rows}")
        return f

    def vocab_order(self, f: pq.ParquetFile, s: ShardInfo | None = None) -> np.ndarray:
        meta = f.schema_arrow.metadata or {}
        try:
            return unpack_order(meta.get(VOCAB_ORDER_KEY))
        except Exception as e:  # noqa: BLE001 - base64 / zstd / length errors of a damaged footer value
            raise (self.damaged(s, f"its vocabulary order does not decode ({e})") if s is not None
                   else CacheError(f"vocabulary order does not decode ({e})")) from e

    def read_shard(self, s: ShardInfo, columns: list[str] | None = None) -> pa.Table:
        """One shard's stored (encoded) rows (pages checked against their CRCs)."""
        f = self._parquet(s)
        try:
            return f.read(columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise self.damaged(s, f"unreadable Parquet ({e})") from e

    def read_verified(self, s: ShardInfo) -> bytes:
        """The shard's bytes, checked against the manifest's sha256 (merge and subset copy
        shards as they are)."""
        data = self.fs.cat_file(self.shard_path(s))
        if sha256_bytes(data) != s.sha256:
            raise self.damaged(s, "its sha256 does not match the manifest")
        return data

    def decode(self, table: pa.Table, order: np.ndarray, where: str = "") -> list[CacheRow]:
        return self.decode_batch(table, order, where).rows()

    def decode_batch(self, table: pa.Table, order: np.ndarray, where: str = "") -> RowBatch:
        try:
            return decode_batch(table, order, self.settings)
        except (CacheError, ValueError, IndexError, TypeError, OverflowError) as e:
            raise CacheError(f"{where}: {e}; run `mmkd cache verify`") from e

    def iter_rows(self) -> Iterator[CacheRow]:
        """Every row, shard by shard in manifest order (one shard in memory at a time)."""
        for s in self.manifest.shards:
            yield from self.decode_shard(s)

    def decode_shard(self, s: ShardInfo) -> list[CacheRow]:
        """One shard's rows, decoded, in stored order."""
        f = self._parquet(s)
        try:
            table = f.read()
        except (OSError, pa.ArrowException) as e:
            raise self.damaged(s, f"unreadable Parquet ({e})") from e
        return self.decode(table, self.vocab_order(f, s), self.shard_path(s))

    def rows(self) -> dict[str, CacheRow]:
        """Every row decoded, keyed by sample id (small caches: tests and tools; trainers
        read rows where the plan needs them, read_rows / stream)."""
        return {r.sample_id: r for r in self.iter_rows()}

    # ------------------------------------------------------------ streaming for training

    def epoch_plan(self, streams: int = 1, seed: int | None = 0, window: int = 1024,
                   shard_rows: list | None = None, remainder: str = "drop") -> EpochPlan:
        """The epoch plan over this cache's shards (storage.plan), in blocks of its Parquet row
        groups. shard_rows: per shard, the rows to use (default all)."""
        rows = shard_rows if shard_rows is not None else [s.rows for s in self.manifest.shards]
        return EpochPlan(rows, streams, seed, window, ROW_GROUP_ROWS, remainder)

    def stream(self, rank: int = 0, world_size: int = 1, seed: int | None = None, epoch: int = 0,
               start: int = 0, shuffle_buffer: int = 1024, remainder: str = "drop") -> Iterator[CacheRow]:
        """Yield this rank's rows of one epoch in plan order (storage.plan with one stream per
        rank and window shuffle_buffer), from position `start` (the number of rows this rank
        already consumed this epoch: record it to resume exactly). Every rank gets the same
        number of rows; each reads about 1/world_size of the shards."""
        plan = self.epoch_plan(world_size, seed, shuffle_buffer, remainder=remainder)
        items = plan.stream(rank, epoch)[start:]
        for b in range(0, len(items), shuffle_buffer):
            yield from self.read_items(plan, items[b:b + shuffle_buffer]).rows()

    def read_items(self, plan: EpochPlan, items: np.ndarray) -> RowBatch:
        """The rows of plan items `items`, decoded, in that order."""
        shard, row = plan.locate(items)
        return self._gather(shard, row)

    def read_rows(self, shard: int, rows: np.ndarray) -> RowBatch:
        """Decoded rows `rows` (row indices) of one shard, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return self._gather(np.full(len(rows), shard), rows)

    def _gather(self, shard: np.ndarray, row: np.ndarray) -> RowBatch:
        """Rows (shard[i], row[i]) from their row groups, decoded once per row group (with
        their log-prob codes; values are decoded for the rows gathered) and kept while the
        plan's windows use them: the last keep_row_groups row groups read stay decoded."""
        picks = []
        for s, r in zip(shard.tolist(), row.tolist()):
            starts = self._group_starts(s)
            g = int(np.searchsorted(starts, r, side="right")) - 1
            picks.append((self._row_group(s, g), r - int(starts[g])))
        return decode_codes(RowBatch.gather(picks), self.settings)

    def _group_starts(self, shard: int) -> np.ndarray:
        """First row of each Parquet row group of a shard."""
        starts = self._starts.get(shard)
        if starts is None:
            f = self._footer(shard)
            rows = [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)]
            starts = self._starts[shard] = np.r_[0, np.cumsum(rows)[:-1]].astype(np.int64)
        return starts

    def _footer(self, shard: int) -> pq.ParquetFile:
        """The open shard (footer parsed, vocabulary order unpacked), the last few kept."""
        f = self._footers.pop(shard, None)
        if f is None:
            f = self._parquet(self.manifest.shards[shard])
            self._orders[shard] = self.vocab_order(f, self.manifest.shards[shard])
        self._footers[shard] = f  # most recently used last
        while len(self._footers) > 64:
            old = next(iter(self._footers))
            self._footers.pop(old)
            self._orders.pop(old, None)
        return f

    def _columns(self) -> list[str] | None:
        """The stored columns read_items reads: all, or those of read_kinds."""
        if self.read_kinds is None:
            return None
        cols = ["sample_id", "token_digest", "input_ids"]
        for kind in self.read_kinds:
            if kind in TOKEN_KINDS:
                cols += [f.name for f in STORED_SCHEMA if f.name.startswith(f"{kind}_")]
            elif kind == "relation":
                cols += ["relation", "relation_size"]
            elif kind == "preference":
                cols += ["chosen_logprob", "rejected_logprob", "chosen_token_logprobs", "rejected_token_logprobs",
                         "rejected_token_digest"]
        return cols

    def __getstate__(self) -> dict:
        # what goes to a loader worker: the open files and the row groups read stay behind
        return {**self.__dict__, "_footers": {}, "_orders": {}, "_groups": {}, "_starts": {}}

    def _row_group(self, shard: int, group: int) -> RowBatch:
        """One row group's rows, decoded with codes (decode_batch codes=True)."""
        key = (shard, group)
        if key in self._groups:
            self._groups[key] = self._groups.pop(key)  # most recently used last
            return self._groups[key]
        info = self.manifest.shards[shard]
        try:
            table = self._footer(shard).read_row_group(group, columns=self._columns())
        except (OSError, pa.ArrowException) as e:
            raise self.damaged(info, f"unreadable Parquet ({e})") from e
        try:
            rows = decode_batch(table, self._orders[shard], self.settings, codes=True)
        except (CacheError, ValueError, IndexError, TypeError, OverflowError) as e:
            raise self.damaged(info, f"row group {group} does not decode ({e})") from e
        self._groups[key] = rows
        while len(self._groups) > self.keep_row_groups:
            self._groups.pop(next(iter(self._groups)))
        return rows

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
                self.decode(table, self.vocab_order(f, s), path)
            except CacheError as e:
                problems.append(str(e))
                continue
            for sid in s.sample_ids:
                if sid in seen:
                    problems.append(f"sample {sid} appears twice ({seen[sid]} and {s.file})")
                seen[sid] = s.file
        return problems

