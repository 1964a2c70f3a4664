"""Cache writing and reading: round trip, crash safety, integrity checks."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.manifest import Manifest
from storage.reader import TeacherCache
from storage.schema import CacheError, make_table
from storage.writer import CacheWriter


def _manifest(k=3):
    return Manifest(teacher={"path": "t", "weights_sha256": "0" * 64, "dtype": "float32"},
                    processor={"image_token_id": 4}, vocab_size=50,
                    extraction={"k": k, "temperature": 1.0, "record_kinds": ["response_topk"]})


def _rows(ids, k=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for sid in ids:
        n = int(rng.integers(1, 5))
        out.append({"sample_id": sid, "token_digest": "d" + sid, "input_ids": rng.integers(0, 50, 10),
                    "supervised_positions": np.sort(rng.choice(np.arange(1, 10), n, replace=False)),
                    "topk_ids": rng.integers(0, 50, (n, k)), "topk_logprobs": -rng.random((n, k)) * 5,
                    "leftover": rng.random(n) * 0.1})
    return out


def _write(path, ids, rows_per_shard=4):
    w = CacheWriter(path, _manifest(), rows_per_shard=rows_per_shard)
    rows = _rows(ids)
    w.add(make_table(rows[: len(rows) // 2]))
    w.add(make_table(rows[len(rows) // 2:]))
    w.close(complete=True)
    return rows


def test_round_trip(tmp_path):
    ids = [f"s{i}" for i in range(10)]
    rows = _write(tmp_path, ids)
    cache = TeacherCache(tmp_path)
    assert cache.manifest.complete and len(cache.manifest.shards) == 3  # 4 + 4 + 2
    assert cache.sample_ids() == ids
    got = cache.rows()
    for r in rows:
        g = got[r["sample_id"]]
        assert (g.topk_ids == r["topk_ids"]).all()
        assert np.allclose(g.topk_logprobs, r["topk_logprobs"], rtol=1e-3, atol=1e-3)  # float16
        assert np.allclose(g.leftover, r["leftover"])
        assert (g.supervised_positions == r["supervised_positions"]).all()
    assert cache.verify() == []
    # another reader of the same files: plain pyarrow sees the same rows
    t = pq.read_table(tmp_path / cache.manifest.shards[0].file)
    assert t.column("sample_id").to_pylist() == ids[:4]


def test_uncommitted_shards_are_invisible_and_cleaned(tmp_path):
    _write(tmp_path, ["a", "b", "c", "d", "e"])
    (tmp_path / ".shard-00009-deadbeef.parquet.tmp").write_bytes(b"partial")
    (tmp_path / "shard-00009-deadbeef.parquet").write_bytes(b"renamed but never listed")
    assert TeacherCache(tmp_path).sample_ids() == ["a", "b", "c", "d", "e"]
    CacheWriter(tmp_path, Manifest.load(tmp_path)).close(complete=True)  # resume discards them
    assert not (tmp_path / ".shard-00009-deadbeef.parquet.tmp").exists()
    assert not (tmp_path / "shard-00009-deadbeef.parquet").exists()


def test_newer_major_version_and_bad_manifest_are_refused(tmp_path):
    _write(tmp_path, ["a", "b"])
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["schema_version"] = "2.0"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="schema version 2.0"):
        TeacherCache(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="manifest.json.*not valid JSON"):
        TeacherCache(tmp_path)


def test_truncated_missing_and_flipped_shards_are_named(tmp_path):
    _write(tmp_path, [f"s{i}" for i in range(8)])
    shards = TeacherCache(tmp_path).manifest.shards
    first, second = tmp_path / shards[0].file, tmp_path / shards[1].file
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, flipped byte
    first.write_bytes(bytes(data))
    problems = TeacherCache(tmp_path).verify()
    assert any(shards[0].file in p and "sha256" in p for p in problems)
    second.write_bytes(second.read_bytes()[:-10])
    with pytest.raises(CacheError, match=shards[1].file + ".*truncated"):
        TeacherCache(tmp_path)
    second.unlink()
    with pytest.raises(CacheError, match=shards[1].file + ".*missing"):
        TeacherCache(tmp_path)


def test_duplicate_samples_are_reported(tmp_path):
    _write(tmp_path, ["a", "b", "a2", "b2", "a"], rows_per_shard=4)
    assert any("sample a appears twice" in p for p in TeacherCache(tmp_path).verify())


def test_two_writers_cannot_share_a_folder(tmp_path):
    w = CacheWriter(tmp_path, _manifest())
    with pytest.raises(CacheError, match="another process"):
        CacheWriter(tmp_path, _manifest())
    w.close(complete=False)
    CacheWriter(tmp_path, Manifest.load(tmp_path)).close(complete=False)  # free again


def test_schema_mismatch_is_refused(tmp_path):
    w = CacheWriter(tmp_path, _manifest())
    t = make_table(_rows(["a"])).drop_columns(["leftover"])
    with pytest.raises(CacheError, match="schema"):
        w.add(t)


def test_new_cache_never_deletes_a_live_writers_shards(tmp_path):
    from pipelines.teacher_pass import TeacherPassConfig, open_writer

    _write(tmp_path, ["a", "b", "c", "d", "e"])
    files = sorted(p.name for p in tmp_path.glob("shard-*"))
    live = CacheWriter(tmp_path, Manifest.load(tmp_path))  # a pass still running here
    other = _manifest(k=7)
    cfg = TeacherPassConfig(output=str(tmp_path), new_cache=True)
    with pytest.raises(CacheError, match="another process"):
        open_writer(cfg, other)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == files
    live.close(complete=True)
    open_writer(cfg, other).close(complete=False)  # now it may replace the cache
    assert not list(tmp_path.glob("shard-*")) and Manifest.load(tmp_path).k == 7
    with pytest.raises(CacheError, match="other settings.*--new-cache"):
        open_writer(TeacherPassConfig(output=str(tmp_path)), _manifest(k=3))
