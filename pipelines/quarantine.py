"""Bad samples and lost batches of the teacher pass: set aside, reported, never silent.

A sample can fail in three places, each recorded in ``<output>/errors.jsonl`` (one JSON
object a line: ``{"id", "kind", "reason", "time"}``) while the pass goes on:

- ``read``: the record itself is malformed (no id, empty conversation, wrong number of
  ``<image>`` placeholders, a JSONL line that is not UTF-8 or not JSON...); found by the
  reader on the driver (common.inputs.read_inputs with an ``errors`` list). When the record
  has no id it is named by where it is: ``file:N`` for line N of a JSONL file (1-based, broken
  lines alike), ``file#i`` for the i-th record (from 0) of a JSON list or data set.
- ``encode``: the worker cannot build the sample's sequence (missing or corrupt image,
  longer than max_length, no supervised token): encode_each catches the SampleError of
  that one sample, the teacher runs on the others, and the worker returns the bad ones as
  error rows (columns ``error`` / ``error_kind``, placeholder values elsewhere) that the
  driver splits off (Quarantine.take) before the cache writer sees the table.
- ``worker-lost``: the worker process died on the batch (crash, out of memory) more often
  than Ray may retry it (TeacherPassConfig.max_retries); Ray drops that batch, and the
  driver reports every sample it sent and never got back.

A Python exception that is not a SampleError (a bug, an out-of-memory exception of the
device) fails the batch, not one sample: the worker returns the batch as ``worker-error``
rows and the driver stops the pass with the traceback (WorkerError), keeping what is
committed.

The errors file belongs to the latest run: each run replaces it (removes it when nothing
failed), and a re-run retries every sample it lists, since none of them is in the cache
(the data may have been fixed). The manifest stays ``complete: false`` while any sample is
quarantined. ``fail_fast`` stops the pass at the first bad sample instead (SampleError with
its id and reason), after committing the good rows received so far.
"""

from __future__ import annotations

import json
import os
import time
import traceback
import warnings
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from mmkd.common.samples import SampleError
from mmkd.storage.fs import join, open_fs, write_atomic
from mmkd.storage.schema import RAW_SCHEMA, CacheRow
from mmkd.storage.tables import raw_table
from mmkd.storage.writer import ERRORS_NAME

KINDS = ("read", "encode", "worker-lost", "worker-error")
ERROR_FIELDS = [pa.field("error", pa.string()), pa.field("error_kind", pa.string())]

# Test-only fault injection (tests/test_faults.py): a JSON object in this environment
# variable makes the teacher workers misbehave on one sample:
#   {"crash_on": ID, "times": N, "state": DIR}  os._exit(1) when the sample is reached, the
#       first N times over all worker processes (counted by files in DIR; N = -1: always);
#   {"raise_on": ID}  raise RuntimeError there (a bug, not a bad sample).
# The driver forwards it to the workers (worker_options); nothing else reads it.
FAULTS_ENV = "MMKD_TEST_FAULTS"


class WorkerError(RuntimeError):
    """A teacher worker failed on a whole batch with an exception that is not a bad sample."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _inject_fault(sample_id: str) -> None:
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return
    f = json.loads(spec)
    if f.get("raise_on") == sample_id:
        raise RuntimeError(f"injected failure on sample {sample_id} ({FAULTS_ENV})")
    if f.get("crash_on") == sample_id:
        state, times = f["state"], int(f.get("times", 1))
        crashes = [n for n in os.listdir(state) if n.startswith("crash-")]
        if times < 0 or len(crashes) < times:
            with open(os.path.join(state, f"crash-{len(crashes)}-{os.getpid()}"), "w"):
                pass
            os._exit(1)


def encode_each(items: list, encode) -> tuple[list, list, list[tuple[str, str]]]:
    """encode(item) for every item (a Sample or PreferencePair), one at a time.

    Returns (the items that encoded, their encodings, [(id, reason)] of those whose encode
    raised SampleError). Other exceptions propagate: they are not the sample's fault."""
    kept, encodings, bad = [], [], []
    for item in items:
        _inject_fault(item.id)
        try:
            encodings.append(encode(item))
        except SampleError as e:
            bad.append((item.id, str(e)))
            continue
        kept.append(item)
    return kept, encodings, bad


def with_errors(rows: pa.Table | None, bad: list[tuple[str, str]], kind: str = "encode") -> pa.Table:
    """The worker's answer: RAW_SCHEMA rows (None: none) and one placeholder row per bad
    sample, plus the columns ``error`` and ``error_kind`` (null on good rows). Every batch
    returns this schema, so Ray's blocks agree whether a batch had bad samples or not."""
    good = rows if rows is not None else raw_table([])
    placeholders = raw_table([CacheRow(sid, "", []) for sid, _ in bad])
    table = pa.concat_tables([good, placeholders])
    n = good.num_rows
    error = pa.array([None] * n + [reason for _, reason in bad], pa.string())
    kinds = pa.array([None] * n + [kind] * len(bad), pa.string())
    return table.append_column(ERROR_FIELDS[0], error).append_column(ERROR_FIELDS[1], kinds)


def batch_ids(batch: dict) -> list[str]:
    """The ids of a map_batches batch of pipelines.workers.sample_item dicts."""
    return [str(json.loads(s)["id"]) for s in batch["sample"]]


def guarded(fn, batch: dict) -> pa.Table:
    """fn(batch), or when it raises, the whole batch as ``worker-error`` rows carrying the
    traceback (the driver stops the pass on them: see the module docstring)."""
    try:
        return fn(batch)
    except Exception as e:  # noqa: BLE001 - reported to the driver with its traceback
        tb = "".join(traceback.format_exception(e)[-6:]).strip()
        return with_errors(None, [(sid, f"{type(e).__name__}: {e}\n{tb}") for sid in batch_ids(batch)],
                           "worker-error")


def worker_options(cfg) -> dict:
    """map_batches arguments for the teacher actors: Ray restarts a dead actor (max_restarts
    -1) and retries its batch at most cfg.max_retries times (max_task_retries), then gives the
    batch up (the driver reports its samples as worker-lost). Ray Data's own default retries
    forever, so a sample that always kills its worker would hang the pass. Forwards the
    test-only FAULTS_ENV to the workers."""
    # Ray 2.60's map_batches has no named parameter for these: they go in **ray_remote_args,
    # which warns that it is deprecated (removal announced for Ray 2.64). Revisit then.
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
    if cfg.max_retries < 0:
        raise ValueError(f"max_retries={cfg.max_retries}: use 0 (no retry) or more")
    opts = {"max_restarts": -1, "max_task_retries": cfg.max_retries}
    if os.environ.get(FAULTS_ENV):
        opts["runtime_env"] = {"env_vars": {FAULTS_ENV: os.environ[FAULTS_ENV]}}
    return opts


class Quarantine:
    """The driver's side: collects quarantined samples, keeps them out of the cache, and
    writes ``errors.jsonl`` beside it (through storage.fs, so fsspec URLs work).

    Construct it once the writer holds the output folder: the previous run's errors file is
    removed (this run retries its samples) and the read-time errors are written."""

    def __init__(self, output: str, writer, read_errors: list[tuple[str, str]] = (), fail_fast: bool = False,
                 max_retries: int = 0, log=print):
        self.fs, root = open_fs(output)
        self.path = join(root, ERRORS_NAME)
        self.where = join(str(output).rstrip("/"), ERRORS_NAME)
        self.writer, self.fail_fast, self.max_retries, self.log = writer, fail_fast, max_retries, log
        self._held: pa.Table | None = None  # good rows of the batch that stopped the pass (see stop)
        self.records: list[dict] = []
        self.returned: set[str] = set()  # ids a worker answered for (rows or errors)
        self._written, self._last_write = 0, 0.0
        if self.fs.exists(self.path):
            self.fs.rm(self.path)
        for sid, reason in read_errors:
            self.add(sid, reason, "read")
        if self.records:
            log(f"[teacher-pass] {len(self.records)} malformed record(s) set aside, e.g. {self.records[0]['reason']} "
                f"(all in {self.where})")
        self.write()

    def add(self, sample_id: str, reason: str, kind: str) -> None:
        assert kind in KINDS, kind
        self.records.append({"id": sample_id, "kind": kind, "reason": reason, "time": _now()})

    def counts(self) -> dict[str, int]:
        return {k: n for k in KINDS if (n := sum(r["kind"] == k for r in self.records))}

    def write(self, force: bool = True) -> None:
        """Replace the errors file with every record so far (atomic; at most every 5 s
        unless forced). Nothing is written while nothing failed."""
        if len(self.records) == self._written or (not force and time.time() - self._last_write < 5):
            return
        data = "".join(json.dumps(r) + "\n" for r in self.records).encode()
        write_atomic(self.path, data, self.fs)
        self._written, self._last_write = len(self.records), time.time()

    def take(self, table: pa.Table) -> pa.Table:
        """A worker's table -> its good rows; the error rows are recorded. Stops the pass
        (after committing the good rows) on a worker-error, or on any bad sample with
        fail_fast."""
        self.returned.update(table.column("sample_id").to_pylist())
        if "error" not in table.column_names:
            return table
        failed = pc.is_valid(table.column("error"))
        bad = table.filter(failed)
        good = table.filter(pc.invert(failed)).drop_columns([f.name for f in ERROR_FIELDS])
        if not bad.num_rows:
            return good
        rows = bad.select(["sample_id", "error", "error_kind"]).to_pylist()
        for r in rows:
            self.add(r["sample_id"], r["error"], r["error_kind"])
        broken = [r for r in rows if r["error_kind"] == "worker-error"]
        if broken:
            self._held = good
            ids = [r["sample_id"] for r in broken]
            raise WorkerError(f"a teacher worker failed on the batch of samples {ids} with an error that is not a bad "
                              f"sample; the pass stopped (committed samples are kept, re-run to resume):\n"
                              f"{broken[0]['error']}")
        if self.fail_fast:
            self._held = good
            first = rows[0]
            raise SampleError(f"--fail-fast stopped the pass at sample {first['sample_id']}: {first['error']} "
                              f"({self.writer.manifest.num_rows} samples committed, errors in {self.where}); fix or "
                              "drop the sample and re-run to resume, or run without --fail-fast to quarantine it")
        self.write(force=False)
        return good

    def stop(self) -> None:
        """The pass is stopping on an exception, after the driver drained its background
        writer. When take() stopped it (--fail-fast, a worker error): commit the good rows
        of the stopping batch, close the writer (complete=False) and write the errors file.
        Any other exception propagates as it is (committed shards are kept either way)."""
        if self._held is None:
            return
        if self._held.num_rows:
            self.writer.add(self._held.select(RAW_SCHEMA.names).cast(RAW_SCHEMA))
        self._held = None
        self.writer.close(complete=False)
        self.write()

    def finish(self, pending: list) -> None:
        """After the last batch: the samples sent to the workers that never came back
        (their batch killed its worker more than max_retries + 1 times) become worker-lost."""
        lost = [s.id for s in pending if s.id not in self.returned]
        for sid in lost:
            self.add(sid, f"the teacher worker died (crash or out of memory) on the batch holding sample {sid}, "
                          f"{self.max_retries + 1} time(s) (max_retries={self.max_retries}); re-run to retry it, with "
                          "--batch-size 1 to find which sample of the batch kills the worker", "worker-lost")
        self.write()

    def summary(self) -> str:
        """One line for the log ('' when nothing was quarantined)."""
        if not self.records:
            return ""
        counts = ", ".join(f"{n} {k}" for k, n in self.counts().items())
        return (f"[teacher-pass] {len(self.records)} sample(s) quarantined ({counts}): see {self.where}; the cache "
                "is marked incomplete, fix them and re-run the same command to add them")
