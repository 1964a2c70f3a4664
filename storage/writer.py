"""Crash-safe shard writing: a shard is either committed (in the manifest) or invisible.

Commit order: encode the buffered rows, write ``.train-*.tmp``, fsync, rename to
``train-NNNNN-<uuid>.parquet``, fsync the folder (storage.fs.write_atomic), then list it in
the manifest (atomic rewrite). A crash before the manifest rewrite leaves an unlisted file
that readers never see and the next writer deletes. Shard names start with the split name
"train" so that `datasets.load_dataset("parquet", data_dir=CACHE)` takes the shards (and not
manifest.json) as the data set's files; shards named ``shard-*`` by older versions read the
same (readers take names from the manifest). Closing the writer also rewrites the dataset
card (storage.card, README.md).

One writer per cache folder at a time, enforced on local disks with an OS lock on
``.writer.lock``: the lock dies with its process (kill -9 leaves no held lock, only the
file, which the next writer takes), and a writer that closes removes the file. On object
stores (s3://, gs://) there is no lock: run one teacher-pass driver per cache (it is the
only writer).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmkd.storage.card import write_card
from mmkd.storage.fs import is_local, join, open_fs, write_atomic
from mmkd.storage.manifest import MANIFEST_NAME, Manifest, ShardInfo
from mmkd.storage.schema import RAW_SCHEMA, TOKEN_KINDS, CacheError
from mmkd.storage.tables import encode_raw

LOCK_NAME = ".writer.lock"
SHARD_PREFIX = "train-"  # the split datasets' file patterns give the shards
OLD_SHARD_PREFIX = "shard-"  # shards written before 2026-12
# The teacher pass's record of quarantined samples (pipelines/quarantine.py): beside the
# shards, never a shard; readers ignore it and writers leave it (the pass replaces it).
ERRORS_NAME = "errors.jsonl"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


ROW_GROUP_ROWS = 128  # rows per Parquet row group of a shard: the unit readers fetch and the plan shuffles


def encode_parquet(table: pa.Table, compression: str, level: int, row_group_rows: int = ROW_GROUP_ROWS,
                   page_checksums: bool = True) -> bytes:
    """A shard's bytes. page_checksums=False writes pages without CRCs, as shards were
    written before 2026-12 (for tests and benchmarks of such caches)."""
    buf = io.BytesIO()
    # No dictionary encoding: the coded columns hold distinct blobs per row, where a dictionary
    # attempt only costs (reading a row group took 2.8x as long at k = 64; sizes equal within 0.1-4%).
    pq.write_table(table, buf, compression=compression, compression_level=level, row_group_size=row_group_rows,
                   use_dictionary=False, write_page_checksum=page_checksums)
    return buf.getvalue()


def footer_sha256(data: bytes) -> str:
    """sha256 of a Parquet file's footer: the metadata between the data and the trailing
    length + magic (what a reader parses before any page)."""
    if len(data) < 12 or data[-4:] != b"PAR1":
        raise CacheError("not a Parquet file (no trailing PAR1 magic)")
    n = int.from_bytes(data[-8:-4], "little")
    if n > len(data) - 12:
        raise CacheError(f"Parquet footer length {n} exceeds the file")
    return sha256_bytes(data[-8 - n:-8])


def count_targets(table: pa.Table) -> int:
    """Response + visual target positions in a STORED (or RAW) table."""
    return sum(int(pc.sum(pc.list_value_length(table.column(f"{k}_positions"))).as_py() or 0) for k in TOKEN_KINDS)


class CacheWriter:
    """Appends rows to a cache folder in committed shards.

    Open with a fresh Manifest (new cache) or the one on disk (resume: its settings must
    equal the new ones, checked by the caller). shuffle_seed: each shard's rows are written
    in a random order seeded by it and the shard's number (the teacher pass: row groups are
    what trainers shuffle as blocks); None keeps the order they were added in. ``add`` buffers RAW_SCHEMA tables (exact
    values) and commits a shard every ``rows_per_shard`` rows; ``close(complete)`` commits
    the rest. Encoding happens at commit, per shard (the id codec's vocabulary order is
    learned from the shard's own targets).
    """

    def __init__(self, cache_dir: str, manifest: Manifest, rows_per_shard: int = 512,
                 row_group_rows: int = ROW_GROUP_ROWS, shuffle_seed: int | None = None):
        self.path = str(cache_dir)
        self.fs, self.root = open_fs(cache_dir)
        self.fs.makedirs(self.root, exist_ok=True)
        self._lock = self._acquire_lock() if is_local(self.fs) else None
        self.manifest = manifest
        self.settings = manifest.target_settings()
        self.rows_per_shard, self.row_group_rows = rows_per_shard, row_group_rows
        self.shuffle_seed = shuffle_seed
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._discard_uncommitted()
        self.manifest.save(self.path)

    def _acquire_lock(self):
        """The open, flock-ed lock file; CacheError when another live writer holds it."""
        path = join(self.root, LOCK_NAME)
        while True:
            f = open(path, "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise CacheError(f"{self.path}: another process is writing this cache; wait for it or use another "
                                 "folder") from None
            try:
                if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                    return f
            except FileNotFoundError:
                pass
            f.close()  # a closing writer removed that file between our open and flock: lock the new one

    def _release_lock(self) -> None:
        if self._lock is not None:
            os.unlink(join(self.root, LOCK_NAME))  # while still held: no other writer can hold this file
            self._lock.close()
            self._lock = None

    def _discard_uncommitted(self) -> None:
        listed = {s.file for s in self.manifest.shards}
        for p in self.fs.ls(self.root, detail=False):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name in (MANIFEST_NAME, LOCK_NAME) or name in listed:
                continue
            if name.startswith((f".{SHARD_PREFIX}", SHARD_PREFIX, f".{OLD_SHARD_PREFIX}", OLD_SHARD_PREFIX,
                                f".{MANIFEST_NAME}", f".{ERRORS_NAME}")):
                self.fs.rm(p)  # left by a crash before commit: never visible to readers

    def add(self, table: pa.Table) -> None:
        if table.schema != RAW_SCHEMA:
            raise CacheError(f"rows do not match the cache's raw schema:\n{table.schema}\nexpected:\n{RAW_SCHEMA}")
        self._buffer.append(table)
        self._buffered += table.num_rows
        while self._buffered >= self.rows_per_shard:
            whole = pa.concat_tables(self._buffer)
            self._commit(whole.slice(0, self.rows_per_shard))
            rest = whole.slice(self.rows_per_shard)
            self._buffer, self._buffered = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

    def _commit(self, raw: pa.Table) -> None:
        if self.shuffle_seed is not None:  # rows in a seeded random order: each row group a mix of the shard
            import numpy as np

            perm = np.random.default_rng([self.shuffle_seed, len(self.manifest.shards)]).permutation(raw.num_rows)
            raw = raw.take(pa.array(perm))
        self.commit_stored(encode_raw(raw, self.settings))

    def commit_stored(self, table: pa.Table) -> None:
        """Commit an already encoded table (subset reuses shards' encoded rows)."""
        c = self.settings.codec
        data = encode_parquet(table, c.compression, c.compression_level, self.row_group_rows)
        self.commit_bytes(data, table.column("sample_id").to_pylist(), count_targets(table), page_checksums=True)

    def commit_bytes(self, data: bytes, sample_ids: list[str], targets: int, page_checksums: bool) -> None:
        """Commit one shard file's bytes: the file gets its final name only when complete
        (local: tmp + fsync + rename; object stores: one PUT), then the manifest lists it
        with its checksums. page_checksums: its data pages carry CRCs (what this writer
        writes; a merge copies the flag of the shard it copies)."""
        name = f"{SHARD_PREFIX}{len(self.manifest.shards):05d}-{uuid.uuid4().hex[:8]}.parquet"
        write_atomic(join(self.root, name), data, self.fs)
        self.manifest.shards.append(ShardInfo(file=name, rows=len(sample_ids), bytes=len(data),
                                              sha256=sha256_bytes(data), sample_ids=sample_ids, targets=targets,
                                              footer_sha256=footer_sha256(data), page_checksums=page_checksums))
        self.manifest.save(self.path)

    def flush(self) -> None:
        """Commit the buffered rows as a (possibly short) shard."""
        if self._buffered:
            self._commit(pa.concat_tables(self._buffer))
            self._buffer, self._buffered = [], 0

    def close(self, complete: bool) -> Manifest:
        """Flush, mark the cache complete (every input sample committed) or not, write the
        dataset card, unlock (removing the lock file)."""
        self.flush()
        self.manifest.complete = complete
        self.manifest.save(self.path)
        write_card(self.path, self.manifest)
        self._release_lock()
        return self.manifest


def open_writer(cache_dir: str, fresh: Manifest, rows_per_shard: int = 512, replace: bool = False,
                shuffle_seed: int | None = None) -> CacheWriter:
    """The resume policy of a cache folder: a writer that continues the cache already in
    `cache_dir` when it was made with the same settings as `fresh` (Manifest.settings: its
    committed samples stay, the caller skips them), or starts `fresh` there. A folder holding
    a cache of other settings, or an unreadable manifest, is refused naming what differs,
    unless `replace` (then the old shards are deleted, once the writer holds the folder's
    lock, so a live writer's shards are never touched). shuffle_seed: as CacheWriter's."""
    fs, root = open_fs(cache_dir)
    if fs.exists(join(root, MANIFEST_NAME)):
        try:
            old = Manifest.load(cache_dir)
        except CacheError:
            if not replace:
                raise
            old = None
        if old is not None and not old.settings_differ(fresh):
            return CacheWriter(cache_dir, old, rows_per_shard, shuffle_seed=shuffle_seed)
        if old is not None and not replace:
            raise CacheError(
                f"{cache_dir}: holds a cache made with other settings ({', '.join(fresh.settings_differ(old))} "
                "differ); choose another output folder or pass --new-cache to replace it"
            )
    # A fresh manifest lists no shards: the writer deletes every shard file there.
    return CacheWriter(cache_dir, fresh, rows_per_shard, shuffle_seed=shuffle_seed)


class BackgroundWriter:
    """Runs a CacheWriter's ``add`` (shard encoding, Parquet, commit) on one background
    thread, so the caller, the teacher pass's driver, keeps pulling batches meanwhile.

    The commits are the ones ``writer.add`` would make, in the same order (one thread, a
    FIFO queue), so shards, manifest and resume are unchanged and the manifest keeps one
    writer. At most ``max_pending`` tables wait (then ``add`` blocks). An error in the
    thread is raised in the caller by its next ``add`` or by ``join``; after an error the
    thread drops what is queued (those rows were never committed: a resume reruns them).
    """

    def __init__(self, writer: CacheWriter, max_pending: int = 8):
        import queue
        import threading

        self.writer = writer
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mmkd-cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            table = self._queue.get()
            if table is None:
                return
            if self._error is None:
                try:
                    self.writer.add(table)
                except BaseException as e:  # surfaced in the caller's thread
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise CacheError(f"{self.writer.path}: writing a shard failed: {self._error}") from self._error

    def add(self, table: pa.Table) -> None:
        self._raise()
        if not self._thread.is_alive():
            raise CacheError(f"{self.writer.path}: the background writer was already joined")
        self._queue.put(table)

    def join(self, raise_error: bool = True) -> CacheWriter:
        """Wait until every queued table is added, stop the thread, raise its error if it
        had one (and raise_error); returns the writer (flush and close it as usual)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if raise_error:
            self._raise()
        return self.writer
