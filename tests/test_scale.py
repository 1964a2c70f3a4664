"""Throughput and scale-out of the teacher pass: length-planned batches, the background
shard writer, progress lines, and two teacher actors giving the cache of one."""

import json

import numpy as np
import pytest

from mmkd.common.config import InputsConfig
from mmkd.common.samples import Sample
from mmkd.common.units import format_duration
from mmkd.pipelines.batching import batch_blocks, estimated_tokens, plan_batches
from mmkd.pipelines.progress import Progress, eta_seconds
from mmkd.storage.reader import TeacherCache
from mmkd.storage.schema import CacheError
from mmkd.storage.tables import raw_table
from mmkd.storage.writer import BackgroundWriter, CacheWriter

from helpers import manifest, rows


def _sample(i, chars, image="a.png"):
    return Sample(f"s{i}", image, [{"role": "user", "content": "<image>\nq"},
                                   {"role": "assistant", "content": "x" * chars}])


def test_batches_group_similar_lengths_longest_first_and_are_deterministic(processor):
    lengths = [40, 400, 44, 396, 120, 400, 8, 200, 124]
    items = [_sample(i, c) for i, c in enumerate(lengths)]
    items.append(_sample(9, 400, image=None))  # no image: its 16 visual tokens do not count
    est = estimated_tokens(items, image_tokens=16)  # characters / 4 without a tokenizer
    # per message: ceil(chars / 4) + 4 for the template; + 16 with an image
    assert est == [37, 127, 38, 126, 57, 127, 29, 77, 58, 111]
    batches = plan_batches(items, 2, image_tokens=16)
    assert [[s.id for s in b] for b in batches] == [["s1", "s5"], ["s3", "s9"], ["s7", "s8"], ["s4", "s2"],
                                                    ["s0", "s6"]]  # s1 and s5 tie: input order
    assert plan_batches(items, 2, lengths=est) == batches
    # with the teacher's tokenizer, tokens count, not characters (the demo tokenizer: one token a word)
    words = [_sample(0, 0, image=None), _sample(1, 0, image=None)]
    words[0].messages[1]["content"] = "a b c d e f g h"
    words[1].messages[1]["content"] = "extraordinarily"
    assert estimated_tokens(words)[0] == estimated_tokens(words)[1]
    by_tokens = estimated_tokens(words, processor.tokenizer)
    assert by_tokens[0] == by_tokens[1] + 7
    # Ray blocks of whole batches: one batch a block, or several when there are many
    strs = [[s.id for s in b] for b in batches]
    assert [t.num_rows for t in batch_blocks(strs, 2, num_workers=1)] == [2, 2, 2, 2, 2]
    blocks = batch_blocks(strs, 2, num_workers=1, blocks_per_worker=2)
    assert [t.column("sample").to_pylist() for t in blocks] == [["s1", "s5", "s3", "s9"],
                                                               ["s7", "s8", "s4", "s2"], ["s0", "s6"]]
    with pytest.raises(ValueError, match="last batch"):
        batch_blocks([["a"], ["b", "c"]], 2, num_workers=1)


def test_shuffled_batches_keep_the_longest_first_and_a_short_last():
    """The teacher pass's order: the longest batch first (a batch size too large fails at
    once), the short last batch last (Ray blocks hold whole batches), the others in a
    seeded random order (shards then mix lengths); the same batches as longest first."""
    items = [_sample(i, 10 * i) for i in range(23)]
    plain = plan_batches(items, 2)
    mixed = plan_batches(items, 2, shuffle_seed=3)
    ids = lambda bs: [[s.id for s in b] for b in bs]  # noqa: E731
    assert ids(mixed)[0] == ids(plain)[0] and ids(mixed)[-1] == ids(plain)[-1] and len(mixed[-1]) == 1
    assert sorted(ids(mixed)) == sorted(ids(plain)) and ids(mixed) != ids(plain)
    assert ids(plan_batches(items, 2, shuffle_seed=3)) == ids(mixed) != ids(plan_batches(items, 2, shuffle_seed=4))
    batch_blocks(ids(mixed), 2, num_workers=1)  # Ray's blocks accept it


def test_progress_rates_eta_and_summary():
    assert eta_seconds(0, 100, 5.0) is None and eta_seconds(25, 100, 10.0) == 30.0
    assert [format_duration(s) for s in (None, 7, 73, 7300)] == ["?", "7s", "1m13s", "2h01m"]
    now = [0.0]
    lines = []
    p = Progress(total=100, done_before=20, work=1000.0, log=lines.append, every_s=30, clock=lambda: now[0])
    now[0] = 10.0
    p.update(10, 500, 250.0, 50_000)  # the first batch is always logged; start-up is not a rate
    now[0] = 20.0
    p.update(10, 500, 250.0, 50_000)  # 10 s later: quiet
    now[0] = 40.0
    p.update(10, 500, 250.0, 150_000)
    now[0] = 50.0
    p.update(50, 2500, 250.0, 400_000)  # the last batch is always logged
    assert len(lines) == 3
    assert lines[0] == ("[teacher-pass] 30/100 samples (30.0%)  first batch after 10s;  ETA ?  "
                        "written 50.0 KB (100.0 B/target)")
    # since the first batch: 20 samples, 1000 targets, 500 of the other 750 estimated tokens in 30 s
    assert "50/100 samples (50.0%)  0.67 samples/s  33 targets/s  ETA 15s  written 150.0 KB (100.0 B/target)" \
        in lines[1]
    assert "100/100 samples (100.0%)" in lines[2] and "ETA 0s" in lines[2]
    s = p.summary(rows=100, shards=4, size=400_000, targets=4000, output="out")
    assert "100 rows in 4 shards, 400.0 KB, 4,000 target tokens, 100.0 bytes per target token" in s
    assert "this run: 80 samples, 4,000 targets in 50s (1.60 samples/s, 80 targets/s, start-up included) -> out" in s
    # a preference cache: rows but no target tokens; the first lines come before any shard is committed
    lines.clear()
    q = Progress(total=10, done_before=0, work=10.0, log=lines.append, clock=lambda: now[0], start=0.0)
    q.update(10, 0, 10.0, 0)
    assert lines[0].endswith("ETA ?  no shard committed yet") and "B/target" not in lines[0]
    s = q.summary(rows=10, shards=1, size=5000, targets=0, output="out")
    assert "no target tokens, 500 B per row" in s and "bytes per target token" not in s and "targets/s" not in s


def test_background_writer_commits_what_the_writer_would(tmp_path):
    rs = rows([f"s{i}" for i in range(23)])
    tables = [raw_table(rs[i:i + 5]) for i in range(0, 23, 5)]
    sync = CacheWriter(str(tmp_path / "sync"), manifest(), rows_per_shard=8)
    for t in tables:
        sync.add(t)
    bg = BackgroundWriter(CacheWriter(str(tmp_path / "bg"), manifest(), rows_per_shard=8), max_pending=2)
    for t in tables:
        bg.add(t)
    a, b = sync.close(complete=True), bg.join().close(complete=True)
    assert [(s.sample_ids, s.sha256) for s in a.shards] == [(s.sample_ids, s.sha256) for s in b.shards]
    assert [s.rows for s in b.shards] == [8, 8, 7] and TeacherCache(str(tmp_path / "bg")).verify() == []


def test_background_writer_raises_the_threads_error(tmp_path):
    bg = BackgroundWriter(CacheWriter(str(tmp_path), manifest(), rows_per_shard=4))
    bg.add(raw_table(rows(["a", "b"])))
    bad = raw_table(rows(["c"])).drop_columns(["token_digest"])  # not the raw schema
    bg.add(bad)
    with pytest.raises(CacheError, match="writing a shard failed"):
        bg.join()
    with pytest.raises(CacheError, match="writing a shard failed"):
        bg.add(raw_table(rows(["d"])))


@pytest.fixture(scope="module")
def ray_three_cpus():
    import ray

    ray.init(num_cpus=3, object_store_memory=200 << 20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_actors_write_the_cache_of_one(ray_three_cpus, teacher_dir, demo_dir, tmp_path, monkeypatch):
    """Same data with 1 and 2 teacher actors (these with a prefetch thread each, so batches
    also overlap within an actor): the same shards (boundaries, bytes) and the same decoded
    rows. Batches are planned by the driver and Ray keeps their order, so how many actors
    and threads ran them changes nothing in the cache."""
    import os

    import mmkd.pipelines.teacher_pass as tp

    class CountingWorker(tp.TeacherWorker):  # defined here, so Ray ships it by value; notes its process per batch
        calls_dir = str(tmp_path / "calls")

        def __call__(self, batch):
            first = json.loads(batch["sample"][0])["id"]
            open(os.path.join(self.calls_dir, f"{self.cfg.num_workers}-{os.getpid()}-{first}"), "w").close()
            return super().__call__(batch)

    os.makedirs(CountingWorker.calls_dir)
    monkeypatch.setattr(tp, "TeacherWorker", CountingWorker)
    caches = []
    for workers in (1, 2):
        cfg = tp.TeacherPassConfig(teacher=str(teacher_dir), inputs=InputsConfig(str(demo_dir / "train.json"),
                                                                                 str(demo_dir)),
                                   output=str(tmp_path / f"w{workers}"), k=5, batch_size=4, rows_per_shard=12,
                                   num_workers=workers, records="response,visual", prefetch_batches=workers - 1)
        m = tp.run_teacher_pass(cfg, log=lambda *_: None)
        assert m.complete and m.num_rows == 40
        caches.append(TeacherCache(cfg.output))
    calls = [name.split("-", 2) for name in os.listdir(CountingWorker.calls_dir)]
    for workers in ("1", "2"):  # 10 batches each; the 2-actor pass really ran on two processes
        assert len([c for c in calls if c[0] == workers]) == 10
        assert len({pid for w, pid, _ in calls if w == workers}) == int(workers)
    one, two = caches
    assert [(s.sample_ids, s.rows, s.bytes, s.sha256) for s in one.manifest.shards] == \
           [(s.sample_ids, s.rows, s.bytes, s.sha256) for s in two.manifest.shards]
    assert [s.rows for s in one.manifest.shards] == [12, 12, 12, 4]
    a, b = one.rows(), two.rows()
    assert sorted(a) == sorted(b) and len(a) == 40
    for sid, r in a.items():
        for kind in ("response", "visual"):
            x, y = getattr(r, kind), getattr(b[sid], kind)
            for f in ("positions", "ids", "logprobs", "leftover"):
                assert np.array_equal(getattr(x, f), getattr(y, f)), (sid, kind, f)
