"""Fault tolerance of the teacher pass (issue 6), each checked against an independent
reference, an uninterrupted pass over clean data:

- bad samples (malformed records, missing / corrupt images, over-long sequences) are
  quarantined to <output>/errors.jsonl with their id and reason, the pass goes on, the
  other rows equal the reference, and a re-run retries them; --fail-fast stops instead;
- a worker process that dies on a batch is retried; past max_retries the batch's samples
  are reported as worker-lost and the others committed; an exception that is not a bad
  sample stops the pass;
- kill -9 of the driver (and of a worker) at random moments, then re-running the same
  command, gives the reference cache: every sample exactly once, the same values.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from mmkd.common.config import InputsConfig
from mmkd.common.samples import SampleError, read_llava, read_preference
from mmkd.pipelines.config import TeacherPassConfig
from mmkd.pipelines.quarantine import FAULTS_ENV, WorkerError
from mmkd.pipelines.teacher_pass import run_teacher_pass
from mmkd.pipelines.workers import TeacherWorker, sample_item
from mmkd.storage.manifest import Manifest
from mmkd.storage.reader import TeacherCache
from mmkd.storage.schema import CacheError
from mmkd.storage.writer import ERRORS_NAME, LOCK_NAME

REPO = Path(__file__).resolve().parent.parent
QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, object_store_memory=200 << 20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(teacher_dir, data, image_root, out, **kw):
    kw = {"k": 5, "batch_size": 4, "rows_per_shard": 8, **kw}
    return TeacherPassConfig(inputs=InputsConfig(data=str(data), image_root=str(image_root)), teacher=str(teacher_dir),
                             output=str(out), **kw)


@pytest.fixture(scope="module")
def reference_cache(ray_local, teacher_dir, demo_dir, tmp_path_factory):
    """An uninterrupted pass over the clean demo train split (40 samples): its folder."""
    cfg = _cfg(teacher_dir, demo_dir / "train.json", demo_dir, tmp_path_factory.mktemp("reference") / "cache")
    assert run_teacher_pass(cfg, **QUIET).complete
    return Path(cfg.output)


@pytest.fixture(scope="module")
def reference(reference_cache):
    """The reference pass's rows, by sample id."""
    return TeacherCache(str(reference_cache)).rows()


def _planned_around(cfg, manifest, sid):
    """The sample ids of the batches the pass plans before sample `sid`'s batch (longest
    first, then shuffled: pipelines/batching.py), and of that batch itself."""
    from mmkd.common.inputs import read_inputs
    from mmkd.pipelines.batching import plan_batches, teacher_tokenizer

    plan = [{x.id for x in b} for b in plan_batches(read_inputs(cfg.inputs.data, image_root=cfg.inputs.image_root),
                                                    cfg.batch_size,
                                                     manifest.processor.get("num_visual_tokens") or 0,
                                                     teacher_tokenizer(cfg.teacher), shuffle_seed=cfg.seed)]
    at = next(i for i, b in enumerate(plan) if sid in b)
    return set().union(*plan[:at]), plan[at]


def _by_id(t):
    """A position's top-k entries are a set (their stored order depends on the shard's id
    codec): sort each row by id, values along."""
    o = np.argsort(t.ids, 1)
    return np.take_along_axis(t.ids, o, 1), np.take_along_axis(t.logprobs, o, 1)


def assert_rows_equal(got, want, ids=None):
    """Decoded rows equal exactly (the CPU forward is deterministic and a sample's values do
    not depend on its batch-mates). ids: {got id: want id} when they differ."""
    for sid, row in got.items():
        ref = want[(ids or {}).get(sid, sid)]
        assert np.array_equal(row.input_ids, ref.input_ids) and row.token_digest == ref.token_digest, sid
        a, b = row.response, ref.response
        assert np.array_equal(a.positions, b.positions) and np.array_equal(a.leftover, b.leftover), sid
        for x, y in zip(_by_id(a), _by_id(b)):
            assert np.array_equal(x, y), sid


def errors_of(out) -> dict[str, dict]:
    path = Path(out) / ERRORS_NAME
    if not path.exists():
        return {}
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert all(set(r) == {"id", "kind", "reason", "time"} for r in lines)
    by_id = {r["id"]: r for r in lines}
    assert len(by_id) == len(lines), "a sample is listed twice"
    return by_id


def _bad_data(demo_dir, root: Path, n_good=12):
    """A JSONL of the first n_good demo samples with bad records of every kind between them,
    and its image root (a copy of the demo's, plus a corrupt PNG). Returns (path, good ids,
    {bad id: (kind, reason pattern)}); a record without an id is named file:line."""
    shutil.copytree(demo_dir / "images", root / "images")
    (root / "images" / "corrupt.png").write_bytes((demo_dir / "images" / "train-000000.png").read_bytes()[:60])
    good = json.loads((demo_dir / "train.json").read_text())[:n_good]
    img, turns = good[0]["image"], good[0]["conversations"]
    long_answer = {"from": "gpt", "value": " ".join(["left"] * 600)}
    path = root / "data.jsonl"
    bad = [  # (line, id in the errors file, kind, reason pattern)
        (json.dumps({"id": "empty", "image": img, "conversations": []}), "empty", "read", "empty or missing"),
        (json.dumps({"id": "two-images", "image": img,
                     "conversations": [{"from": "human", "value": "<image>\n<image>\nq"}, turns[1]]}),
         "two-images", "read", "2 '<image>' placeholders"),
        (json.dumps({"image": img, "conversations": turns}), f"{path}:6", "read", "no 'id' field"),
        ('{"id": "latin1", "image": "' + img + '", "conversations": "caf\udce9"}', f"{path}:8", "read", "not UTF-8"),
        # these two copy the conversations of samples 1 and 2 (the test then fixes their images)
        (json.dumps(dict(good[1], id="missing-image", image="images/nope.png")), "missing-image", "encode",
         "cannot read image"),
        (json.dumps(dict(good[2], id="corrupt-image", image="images/corrupt.png")), "corrupt-image", "encode",
         "cannot read image"),
        (json.dumps({"id": "too-long", "image": img, "conversations": [turns[0], long_answer]}), "too-long",
         "encode", "longer than max_length=512"),
    ]
    lines = [json.dumps(r) for r in good]
    for i, (line, *_) in enumerate(bad):  # a bad record every other line: record 2i + 1, line 2i + 2
        lines.insert(1 + 2 * i, line)
    path.write_bytes(b"".join(x.encode("utf-8", "surrogateescape") + b"\n" for x in lines))
    return path, [r["id"] for r in good], {key: (kind, why) for _, key, kind, why in bad}


def test_worker_returns_bad_samples_as_error_rows(teacher_dir, demo_dir, tmp_path):
    """The actor itself (no Ray): each sample is encoded on its own; the good ones' rows equal
    a batch of only them, the bad ones come back as error rows naming the sample."""
    path, good_ids, bad = _bad_data(demo_dir, tmp_path)
    cfg = _cfg(teacher_dir, path, tmp_path, tmp_path / "unused", max_length=512)
    worker = TeacherWorker(cfg)
    errors = []
    samples = read_llava(path, errors=errors)
    table = worker({"sample": [sample_item(s)["sample"] for s in samples]})
    clean = worker({"sample": [sample_item(s)["sample"] for s in samples if s.id in good_ids]})
    got = {r["sample_id"]: r for r in table.to_pylist()}
    for sid in good_ids:
        assert got[sid]["error"] is None
    for r in clean.to_pylist():
        assert {k: v for k, v in got[r["sample_id"]].items()} == r
    encode_bad = {k: why for k, (kind, why) in bad.items() if kind == "encode"}
    assert {sid for sid, r in got.items() if r["error"]} == set(encode_bad)
    for sid, why in encode_bad.items():
        assert got[sid]["error_kind"] == "encode" and why in got[sid]["error"] and sid in got[sid]["error"]
    only_bad = worker({"sample": [sample_item(s)["sample"] for s in samples if s.id in encode_bad]})  # no forward at all
    assert only_bad.column("sample_id").to_pylist() == [s.id for s in samples if s.id in encode_bad]
    assert only_bad.column("error_kind").to_pylist() == ["encode"] * len(encode_bad)

    # preference pairs: a pair is bad when either of its sequences cannot be built
    pairs = read_preference(demo_dir / "preference.jsonl")[:3]
    pairs[1].image = "images/nope.png"
    pcfg = _cfg(teacher_dir, demo_dir / "preference.jsonl", demo_dir, tmp_path / "unused", records="preference")
    table = TeacherWorker(pcfg)({"sample": [sample_item(p)["sample"] for p in pairs]})
    assert table.column("sample_id").to_pylist() == [pairs[0].id, pairs[2].id, pairs[1].id]
    assert table.column("error_kind").to_pylist() == [None, None, "encode"]
    assert table.column("chosen_logprob")[0].as_py() < 0


def test_bad_samples_are_quarantined_and_retried_when_fixed(reference, processor, teacher_dir, demo_dir, tmp_path):
    path, good_ids, bad = _bad_data(demo_dir, tmp_path)
    cfg = _cfg(teacher_dir, path, tmp_path, tmp_path / "cache", max_length=512)
    logs = []
    m = run_teacher_pass(cfg, log=logs.append)
    cache = TeacherCache(cfg.output)
    assert sorted(cache.sample_ids()) == sorted(good_ids) and cache.verify() == []
    assert_rows_equal(cache.rows(), reference)
    assert not m.complete  # samples are missing: the cache says so
    errors = errors_of(cfg.output)
    assert {k: r["kind"] for k, r in errors.items()} == {k: kind for k, (kind, _) in bad.items()}
    for key, (_, why) in bad.items():
        assert why in errors[key]["reason"], errors[key]
    assert any(f"{len(bad)} sample(s) quarantined (4 read, 3 encode)" in x and ERRORS_NAME in x for x in logs), logs
    # a student on the data with the quarantined samples refuses, pointing at the errors file
    from mmkd.common.inputs import SampleList
    from mmkd.student.data import StudentData

    with pytest.raises(CacheError, match=f"3 of {len(good_ids) + 3} samples have no cached targets.*set aside.*"
                                         f"{ERRORS_NAME}"):
        StudentData(SampleList(read_llava(path, errors=[])), processor, str(tmp_path), 512, cache)

    # Fix the two images, re-run: only the quarantined samples run again; the fixed ones get
    # the values of the reference samples they copy, the errors file lists what still fails.
    shutil.copy(demo_dir / "images" / "train-000001.png", tmp_path / "images" / "nope.png")
    shutil.copy(demo_dir / "images" / "train-000002.png", tmp_path / "images" / "corrupt.png")
    logs = []
    run_teacher_pass(cfg, log=logs.append)
    assert any(f"{len(good_ids)} already in the cache" in x for x in logs)
    fixed = {"missing-image": good_ids[1], "corrupt-image": good_ids[2]}
    rows = TeacherCache(cfg.output).rows()
    assert sorted(rows) == sorted(good_ids + list(fixed))
    assert_rows_equal(rows, reference, fixed)
    assert set(errors_of(cfg.output)) == set(bad) - set(fixed)
    # drop the other bad records: the cache is complete and the errors file is gone
    keep = []
    for line in path.read_bytes().splitlines():
        try:
            if json.loads(line.decode()).get("id") in rows:
                keep.append(line + b"\n")
        except ValueError:  # the undecodable and the cut lines
            pass
    path.write_bytes(b"".join(keep))
    m = run_teacher_pass(cfg, **QUIET)
    assert m.complete and not (Path(cfg.output) / ERRORS_NAME).exists()
    assert TeacherCache(cfg.output).verify() == [] and sorted(TeacherCache(cfg.output).sample_ids()) == sorted(rows)


def test_fail_fast_stops_at_the_first_bad_sample(ray_local, teacher_dir, demo_dir, tmp_path):
    from mmkd.pipelines.cli import main as mmkd

    records = json.loads((demo_dir / "train.json").read_text())[:16]
    records[9] = dict(records[9], image="images/nope.png")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    cfg = _cfg(teacher_dir, data, demo_dir, tmp_path / "cache", rows_per_shard=4, fail_fast=True)
    with pytest.raises(SampleError, match=f"--fail-fast stopped the pass at sample {records[9]['id']}: .*cannot read "
                                          "image .*nope.png"):
        run_teacher_pass(cfg, **QUIET)
    m = Manifest.load(cfg.output)
    committed = [i for s in m.shards for i in s.sample_ids]
    assert not m.complete and records[9]["id"] not in committed
    before, own = _planned_around(cfg, m, records[9]["id"])
    assert before <= set(committed) <= before | own
    assert set(errors_of(cfg.output)) == {records[9]["id"]}
    # without --fail-fast the same command quarantines it and finishes the rest
    cfg.fail_fast = False
    assert not run_teacher_pass(cfg, **QUIET).complete
    assert sorted(TeacherCache(cfg.output).sample_ids()) == sorted(r["id"] for i, r in enumerate(records) if i != 9)
    # a malformed record stops the read itself, before anything runs (exit status 2, id and reason)
    records[3] = dict(records[3], conversations=[])
    data.write_text(json.dumps(records))
    args = ["teacher-pass", "--teacher", str(teacher_dir), "--data", str(data), "--image-root", str(demo_dir),
            "--output", str(tmp_path / "cache2"), "--fail-fast"]
    assert mmkd(args) == 2
    assert not (tmp_path / "cache2").exists()
    with pytest.raises(SampleError, match=f"sample {records[3]['id']} .*data.json#3.*empty or missing"):
        run_teacher_pass(_cfg(teacher_dir, data, demo_dir, tmp_path / "cache2", fail_fast=True), **QUIET)


def test_a_worker_crash_is_retried(reference, teacher_dir, demo_dir, tmp_path, monkeypatch):
    """The worker process exits (os._exit) on one sample, the first time only: Ray restarts it
    and retries the batch; the cache equals the reference."""
    state = tmp_path / "faults"
    state.mkdir()
    victim = sorted(reference)[13]
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"crash_on": victim, "times": 1, "state": str(state)}))
    cfg = _cfg(teacher_dir, demo_dir / "train.json", demo_dir, tmp_path / "cache", max_retries=2)
    assert run_teacher_pass(cfg, **QUIET).complete
    assert len(list(state.iterdir())) == 1  # it did crash once
    cache = TeacherCache(cfg.output)
    assert cache.verify() == [] and sorted(cache.sample_ids()) == sorted(reference)
    assert_rows_equal(cache.rows(), reference)
    assert errors_of(cfg.output) == {}


def test_a_batch_that_always_kills_its_worker_is_reported(reference, teacher_dir, demo_dir, tmp_path, monkeypatch):
    """Past max_retries the batch is given up: its samples are reported as worker-lost, every
    other sample is committed with the reference values, and a re-run retries the batch."""
    state = tmp_path / "faults"
    state.mkdir()
    victim = sorted(reference)[13]
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"crash_on": victim, "times": -1, "state": str(state)}))
    cfg = _cfg(teacher_dir, demo_dir / "train.json", demo_dir, tmp_path / "cache", max_retries=1)
    logs = []
    assert not run_teacher_pass(cfg, log=logs.append).complete
    assert len(list(state.iterdir())) == 2  # the first attempt and one retry
    errors = errors_of(cfg.output)
    lost = set(errors)
    # a CPU actor preprocesses no batch ahead by default (prefetch_batches -1 -> 0), so the
    # crash takes down its own batch alone
    assert victim in lost and len(lost) <= cfg.batch_size
    assert all(r["kind"] == "worker-lost" and "max_retries=1" in r["reason"] for r in errors.values())
    cache = TeacherCache(cfg.output)
    assert cache.verify() == [] and sorted(cache.sample_ids()) == sorted(set(reference) - lost)
    assert_rows_equal(cache.rows(), reference)
    assert any(f"{len(lost)} worker-lost" in x for x in logs)
    # the worker no longer crashes (e.g. more memory): the same command completes the cache
    monkeypatch.delenv(FAULTS_ENV)
    assert run_teacher_pass(cfg, **QUIET).complete
    assert sorted(TeacherCache(cfg.output).sample_ids()) == sorted(reference)
    assert errors_of(cfg.output) == {}


def test_an_exception_in_the_worker_stops_the_pass(ray_local, teacher_dir, demo_dir, tmp_path, monkeypatch):
    """An exception that is not a bad sample (a bug, a device error) is not quarantined: the
    pass stops naming the batch and the error; what was committed stays."""
    samples = read_llava(demo_dir / "train.json")
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"raise_on": samples[10].id}))
    cfg = _cfg(teacher_dir, demo_dir / "train.json", demo_dir, tmp_path / "cache", rows_per_shard=4)
    with pytest.raises(WorkerError, match=f"(?s){samples[10].id}.*not a bad sample.*RuntimeError: injected failure"):
        run_teacher_pass(cfg, **QUIET)
    m = Manifest.load(cfg.output)
    before, own = _planned_around(cfg, m, samples[10].id)
    assert not m.complete and before <= {i for s in m.shards for i in s.sample_ids}
    assert errors_of(cfg.output)[samples[10].id]["kind"] == "worker-error"


def test_a_cache_of_other_settings_is_refused(reference_cache, processor, teacher_dir, demo_dir, tmp_path):
    """Resuming into a folder that holds a cache made with another teacher (weights), k, record
    kinds or mode is refused before anything runs, naming what differs and --new-cache, and
    the cache is left as it was; the same settings resume (nothing to do)."""
    from conftest import TINY

    from mmkd.student.model import build_llava

    other_teacher = tmp_path / "other-teacher"
    build_llava(TINY, processor, seed=2).save_pretrained(other_teacher)
    processor.save_pretrained(other_teacher)
    out = tmp_path / "cache"
    shutil.copytree(reference_cache, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_NAME}
    base = {"data": demo_dir / "train.json", "image_root": demo_dir, "out": out}
    for change, differs in ((dict(teacher_dir=other_teacher), "teacher"), (dict(k=6), "extraction"),
                            (dict(records="response,visual"), "extraction"), (dict(mode="sampled"), "extraction"),
                            (dict(dtype="bfloat16"), "teacher")):
        cfg = _cfg(**{"teacher_dir": teacher_dir, **base, **change})
        with pytest.raises(CacheError, match=rf"holds a cache made with other settings \({differs} differ\).*"
                                             "--new-cache"):
            run_teacher_pass(cfg, **QUIET)
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_NAME} == before, change
    logs = []
    assert run_teacher_pass(_cfg(teacher_dir, **base), log=logs.append).complete  # same settings: nothing to run
    assert any("40 already in the cache, 0 to run" in x for x in logs)


# ------------------------------------------------------------------ kill -9 and resume


def _marked(token: str) -> list[int]:
    """Pids of the processes started by a killable run (they inherit MMKD_KILL_TEST=token).
    Ray puts its workers in their own sessions, so a process group does not reach them."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if f"MMKD_KILL_TEST={token}".encode() in (p / "environ").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_all(token: str, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while (pids := _marked(token)) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    assert not _marked(token), f"processes left: {[_cmdline(p) for p in _marked(token)]}"


def _shards(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_cache(reference, teacher_dir, demo_dir,
                                                                            tmp_path):
    """`python -m mmkd.pipelines.cli teacher-pass` in a subprocess, SIGKILLed at seeded random
    moments (while starting, and a random delay after the k-th shard is committed, which
    lands before, during or after the next commit); run 1 also SIGKILLs the teacher actor's
    process first and checks that shards keep coming. Then the same command runs to the end:
    the cache equals the uninterrupted reference, each sample exactly once, no debris."""
    out = tmp_path / "cache"
    args = [sys.executable, "-m", "mmkd.pipelines.cli", "teacher-pass", "--teacher", str(teacher_dir),
            "--data", str(demo_dir / "train.json"), "--image-root", str(demo_dir), "--output", str(out),
            "--k", "5", "--batch-size", "4", "--rows-per-shard", "2"]  # 20 shards, two commits per batch
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", FAULTS_ENV)}
    env.update(OMP_NUM_THREADS="2", RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    rng = random.Random(6)
    # (when, k, x): "worker": after k new shards kill the actor, then the driver x shards later;
    # "shard": kill the driver x seconds after the k-th new shard; "start": k seconds after start
    plans = [("worker", 2, 4), ("shard", rng.randint(1, 4), rng.uniform(0, 0.1)), ("start", rng.uniform(2, 5), 0),
             ("shard", rng.randint(1, 3), rng.uniform(0, 0.1)), ("end", 0, 0)]
    history = []
    for i, (when, k, x) in enumerate(plans):
        token = uuid.uuid4().hex
        before = max(0, _shards(out))
        log = open(tmp_path / f"run{i}.log", "wb")
        proc = subprocess.Popen(args, cwd=REPO, env=dict(env, MMKD_KILL_TEST=token), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 120

            def wait_for(n):
                while _shards(out) < n and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.005)

            if when == "end":
                assert proc.wait(timeout=120) == 0, (tmp_path / f"run{i}.log").read_text()[-3000:]
            else:
                if when == "start":
                    time.sleep(k)
                else:
                    wait_for(before + k)
                    time.sleep(x if when == "shard" else 0)
                if when == "worker":  # SIGKILL the teacher actor: Ray restarts it, the pass goes on
                    actors = [p for p in _marked(token) if "TeacherWorker" in _cmdline(p)]
                    assert len(actors) == 1, [_cmdline(p) for p in _marked(token)]
                    at = _shards(out)
                    os.kill(actors[0], signal.SIGKILL)
                    wait_for(at + x)
                    assert _shards(out) >= at + x, f"no progress after the worker was killed: {history}"
                assert proc.poll() is None, f"run {i} ended before it was killed"
                os.kill(proc.pid, signal.SIGKILL)  # the driver only: what a crash or kill -9 does
                proc.wait()
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _kill_all(token)  # Ray's workers live in their own sessions
            log.close()
        history.append((when, before, _shards(out)))
    print(f"\n[kill test] (kill, shards before, shards after) per run: {history}")
    assert history[-1][2] == 20 and sum(0 < b < 20 for _, b, _ in history) >= 3, history  # resumed mid-cache

    cache = TeacherCache(str(out))
    ids = cache.sample_ids()
    assert len(ids) == len(set(ids)) == len(reference) and set(ids) == set(reference), history
    assert cache.manifest.complete and cache.verify() == []
    assert_rows_equal(cache.rows(), reference)
    listed = {s.file for s in cache.manifest.shards}
    assert {p.name for p in out.iterdir()} == listed | {"manifest.json", "README.md"}  # no debris, errors or lock file
