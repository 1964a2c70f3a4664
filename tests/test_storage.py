"""The cache format: codecs, round trips of every record kind, crash safety, integrity
checks, bad input, merge/subset."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmkd.storage import codec
from mmkd.storage.manifest import Manifest
from mmkd.storage.ops import merge_caches, subset_cache
from mmkd.storage.reader import TeacherCache
from mmkd.storage.schema import CacheError
from mmkd.storage.tables import raw_table
from mmkd.storage.writer import LOCK_NAME, CacheWriter, footer_sha256

from helpers import assert_topk_close, manifest, rows, write

ALL_KINDS = ("response", "visual", "relation", "preference")


# ------------------------------------------------------------------ codecs

def test_logprob_levels_error_bound():
    x = -np.linspace(0, 45, 200_001)
    back = codec.decode_logprobs(codec.encode_logprobs(x))
    err = np.abs(back - x)
    assert err[x >= -3].max() <= 1 / 128 + 1e-9  # the fine region: within 0.01 nats
    inside = -x <= codec.LEVELS[-1]
    i = np.clip(np.searchsorted(codec.LEVELS, -x[inside]), 1, len(codec.LEVELS) - 1)
    interval = codec.LEVELS[i] - codec.LEVELS[i - 1]  # the two levels around each value
    assert np.all(err[inside] <= interval / 2 + 1e-5)  # (+ float32 rounding of the decoded value)
    assert len(codec.LEVELS) < codec.ZERO_CODE
    assert codec.decode_logprobs(codec.encode_logprobs(np.array([-np.inf])))[0] == -np.inf


@pytest.mark.parametrize("vocab", [50, 70_000, 1 << 20])
def test_id_sets_round_trip(vocab):
    rng = np.random.default_rng(vocab)
    sizes = rng.integers(0, 9, 300)
    sizes[:3] = 0  # empty sets first, too
    ids = np.concatenate([rng.choice(vocab, s, replace=False) for s in sizes])
    order = codec.vocab_order(ids, vocab, top=100)
    planes, perm = codec.encode_id_sets(ids, sizes, order, vocab)
    assert planes.shape == (3, len(ids)) and planes.dtype == np.uint8
    back = codec.decode_id_sets(planes, sizes, order, vocab)
    assert np.array_equal(back, ids[perm])
    # each set's members are preserved (perm only reorders within sets)
    starts = np.r_[0, np.cumsum(sizes)]
    for a, b in zip(starts[:-1], starts[1:]):
        assert sorted(back[a:b]) == sorted(ids[a:b])
    with pytest.raises(ValueError, match="repeated"):
        codec.encode_id_sets(np.array([3, 3]), np.array([2]), order, vocab)


def test_relation_codecs():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(64, 256)) + 2.0  # logits share a large common component, as real ones do
    r = z @ z.T
    for name, rank, target in (("triangle-f16", 0, 0.9999), ("lowrank-f16", 64, 0.9999), ("lowrank-f16", 8, 0.99)):
        blob = codec.encode_relation(r, name, rank)
        back = codec.decode_relation(blob, 64, name)
        assert np.allclose(back, back.T)
        cos = (back * r).sum() / np.linalg.norm(back) / np.linalg.norm(r)
        assert cos >= target, (name, rank, cos)
    assert len(codec.encode_relation(r, "triangle-f16")) == 64 * 65 // 2 * 2


def test_kl_to_decoded_is_within_one_percent_of_exact_topk():
    """KL(p || decoded top-k) vs KL(p || exact top-k) on heavy-tailed distributions, with
    the leftover spread evenly over the other ids in both (benchmarks/ measures real ones)."""
    rng = np.random.default_rng(0)
    vocab, k = 5000, 64
    zipf = -1.1 * np.log(np.arange(1, vocab + 1))  # a Zipf-like tail, plus per-row noise
    logits = np.stack([rng.permutation(zipf) for _ in range(300)]) + rng.normal(size=(300, vocab))
    logp = torch.log_softmax(torch.from_numpy(logits), -1).numpy()

    def kl_to(vals, ids, left):
        q = np.full_like(logp, np.log(np.maximum(left, 1e-300))[:, None] - np.log(vocab - k))
        np.put_along_axis(q, ids, vals, 1)
        q = q - np.log(np.exp(q).sum(1, keepdims=True))
        return (np.exp(logp) * (logp - q)).sum(1).mean()

    ids = np.argsort(-logp, 1)[:, :k]
    vals = np.take_along_axis(logp, ids, 1)
    rest = logp.copy()
    np.put_along_axis(rest, ids, -np.inf, 1)
    left = np.exp(torch.logsumexp(torch.from_numpy(rest), 1).numpy())
    exact = kl_to(vals, ids, left)
    dec = codec.decode_logprobs(codec.encode_logprobs(vals))
    dleft = np.exp(codec.decode_logprobs(codec.encode_logprobs(np.log(left))))
    assert 0.05 < exact < 2 and 0.3 < 1 - left.mean() < 0.95
    assert abs(kl_to(dec, ids, dleft) - exact) / exact < 0.01


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("where", ["local", "memory"])
def test_round_trip_every_record_kind(tmp_path, where):
    path = str(tmp_path) if where == "local" else f"memory://rt-{id(tmp_path)}"
    ids = [f"s{i}" for i in range(11)]
    written = write(path, ids, kinds=ALL_KINDS, rows_per_shard=4)
    cache = TeacherCache(path)
    m = cache.manifest
    assert m.complete and [s.rows for s in m.shards] == [4, 4, 3] and cache.sample_ids() == ids
    assert m.record_kinds == list(ALL_KINDS)
    assert sum(s.targets for s in m.shards) == sum(len(r.response) + len(r.visual) for r in written)
    got = cache.rows()
    for r in written:
        g = got[r.sample_id]
        assert g.token_digest == r.token_digest and np.array_equal(g.input_ids, r.input_ids)
        for kind in ("response", "visual"):
            a, b = getattr(r, kind), getattr(g, kind)
            assert np.array_equal(a.positions, b.positions)
            assert_topk_close(b, a.ids, a.logprobs)
            assert np.all(np.abs(np.log(b.leftover) - np.log(a.leftover)) <= np.diff(codec.LEVELS).max() / 2)
        cos = (g.relation * r.relation).sum() / np.linalg.norm(g.relation) / np.linalg.norm(r.relation)
        assert cos >= 0.9999
        assert g.preference.chosen_logprob == r.preference.chosen_logprob
        assert np.array_equal(g.preference.rejected_token_logprobs, r.preference.rejected_token_logprobs)
        assert g.preference.rejected_token_digest == r.preference.rejected_token_digest
    assert cache.verify() == []


def test_sampled_mode_round_trip_is_exact(tmp_path):
    written = write(tmp_path, [f"s{i}" for i in range(6)], mode="sampled", width=32, kinds=("response", "visual"))
    got = TeacherCache(str(tmp_path)).rows()
    for r in written:
        for kind in ("response", "visual"):
            a, b = getattr(r, kind), getattr(got[r.sample_id], kind)
            assert b.logprobs is None and b.counts.shape == a.counts.shape
            for j in range(len(a)):
                da = {int(i): int(c) for i, c in zip(a.ids[j], a.counts[j]) if c}
                db = {int(i): int(c) for i, c in zip(b.ids[j], b.counts[j]) if c}
                assert da == db and sum(db.values()) == 32


def test_other_readers_see_the_same_rows(tmp_path):
    """pyarrow.dataset, DuckDB, polars and HF datasets read the shards as ordinary Parquet."""
    import duckdb
    import polars as pl
    import pyarrow.dataset as pads
    from datasets import load_dataset

    write(tmp_path, [f"s{i}" for i in range(9)], kinds=ALL_KINDS, rows_per_shard=4)
    files = [str(tmp_path / s.file) for s in Manifest.load(str(tmp_path)).shards]
    cols = ["sample_id", "input_ids", "response_positions", "response_ids_0", "response_values", "relation"]
    ours = pa.concat_tables([pq.read_table(f, columns=cols) for f in files]).to_pylist()
    via_dataset = pads.dataset(files, format="parquet").to_table(columns=cols).to_pylist()
    via_duckdb = duckdb.sql(f"SELECT {', '.join(cols)} FROM read_parquet({files!r})").arrow().read_all().to_pylist()
    via_polars = pl.read_parquet(files, columns=cols).to_arrow().to_pylist()
    hf = load_dataset("parquet", data_files=files, split="train").select_columns(cols)
    via_hf = [hf[i] for i in range(len(hf))]
    key = lambda rs: sorted(rs, key=lambda r: r["sample_id"])  # noqa: E731
    for other in (via_dataset, via_duckdb, via_polars, via_hf):
        assert key(other) == key(ours)
    assert len(ours) == 9


def test_a_shuffling_writer_permutes_rows_within_shards_only(tmp_path):
    """shuffle_seed: each shard holds the rows it would hold anyway, in a seeded order;
    values are untouched; the same seed gives the same shards."""
    ids = [f"s{i:02d}" for i in range(20)]
    data = rows(ids, kinds=("response", "visual"))
    orders = []
    for name, seed in (("a", 5), ("b", 5), ("c", None)):
        w = CacheWriter(str(tmp_path / name), manifest(kinds=("response", "visual")), rows_per_shard=8,
                        shuffle_seed=seed)
        w.add(raw_table(data))
        w.close(complete=True)
        m = Manifest.load(str(tmp_path / name))
        orders.append([s.sample_ids for s in m.shards])
        got = TeacherCache(str(tmp_path / name)).rows()
        assert sorted(got) == ids
        for r in data:
            assert np.array_equal(got[r.sample_id].response.positions, r.response.positions)
    assert orders[0] == orders[1] and orders[0] != orders[2]
    assert [sorted(s) for s in orders[0]] == [sorted(s) for s in orders[2]]


# ------------------------------------------------------------------ streaming

def test_stream_splits_ranks_evenly_and_resumes(tmp_path):
    ids = [f"s{i:02d}" for i in range(23)]
    write(tmp_path, ids, rows_per_shard=5)  # 5 shards: 5 5 5 5 3
    cache = TeacherCache(str(tmp_path))
    for remainder, per in (("drop", 5), ("pad", 6)):
        got = [[r.sample_id for r in cache.stream(rank, 4, seed=3, shuffle_buffer=4, remainder=remainder)]
               for rank in range(4)]
        assert all(len(g) == per for g in got)
        flat = [i for g in got for i in g]
        if remainder == "drop":
            assert len(set(flat)) == 20 and set(flat) <= set(ids)
        else:
            assert set(flat) == set(ids)
    one = [r.sample_id for r in cache.stream(1, 4, seed=3, epoch=0)]
    assert one == [r.sample_id for r in cache.stream(1, 4, seed=3, epoch=0)]  # deterministic
    assert sorted(one) != sorted(r.sample_id for r in cache.stream(1, 4, seed=3, epoch=1)) or \
        one != [r.sample_id for r in cache.stream(1, 4, seed=3, epoch=1)]
    whole = [r.sample_id for r in cache.stream(0, 1, seed=7, shuffle_buffer=4)]
    assert sorted(whole) == ids and whole != ids  # shuffled
    for start in (0, 3, 4, 9, 22):  # resume mid-block and at block boundaries
        assert [r.sample_id for r in cache.stream(0, 1, seed=7, shuffle_buffer=4, start=start)] == whole[start:]
    assert [r.sample_id for r in cache.stream()] == ids  # no seed: manifest order


def test_stream_reads_only_this_ranks_shards(tmp_path, monkeypatch):
    write(tmp_path, [f"s{i:02d}" for i in range(40)], rows_per_shard=5)  # 8 shards
    cache = TeacherCache(str(tmp_path))
    touched = []
    real = cache._footer  # opens a shard
    monkeypatch.setattr(cache, "_footer", lambda s: touched.append(s) or real(s))
    list(cache.stream(rank=2, world_size=4, seed=1))
    assert len(set(touched)) == 2  # 10 samples: two whole shards of the 8


# ------------------------------------------------------------------ crash safety

def test_uncommitted_shards_are_invisible_and_cleaned(tmp_path):
    write(tmp_path, ["a", "b", "c", "d", "e"])
    (tmp_path / ".shard-00009-deadbeef.parquet.tmp").write_bytes(b"partial")
    (tmp_path / "shard-00009-deadbeef.parquet").write_bytes(b"renamed but never listed")  # an older writer's
    (tmp_path / ".train-00010-deadbeef.parquet.123.tmp").write_bytes(b"partial")
    (tmp_path / "train-00010-deadbeef.parquet").write_bytes(b"renamed but never listed")
    assert TeacherCache(str(tmp_path)).sample_ids() == ["a", "b", "c", "d", "e"]
    CacheWriter(str(tmp_path), Manifest.load(str(tmp_path))).close(complete=True)  # resume discards them
    for name in (".shard-00009-deadbeef.parquet.tmp", "shard-00009-deadbeef.parquet",
                 ".train-00010-deadbeef.parquet.123.tmp", "train-00010-deadbeef.parquet"):
        assert not (tmp_path / name).exists(), name


def test_one_writer_at_a_time_and_no_lock_file_left(tmp_path):
    write(tmp_path, ["a", "b"])
    m = Manifest.load(str(tmp_path))
    first = CacheWriter(str(tmp_path), m)
    with pytest.raises(CacheError, match="another process is writing this cache"):
        CacheWriter(str(tmp_path), m)
    first.close(complete=True)
    assert not (tmp_path / LOCK_NAME).exists()
    CacheWriter(str(tmp_path), Manifest.load(str(tmp_path))).close(complete=True)  # free again
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("train-")) == ["README.md",
                                                                                            "manifest.json"]


def test_two_writers_cannot_share_a_folder(tmp_path):
    w = CacheWriter(str(tmp_path), manifest())
    with pytest.raises(CacheError, match="another process"):
        CacheWriter(str(tmp_path), manifest())
    w.close(complete=False)
    CacheWriter(str(tmp_path), Manifest.load(str(tmp_path))).close(complete=False)  # free again


def test_raw_schema_mismatch_is_refused(tmp_path):
    w = CacheWriter(str(tmp_path), manifest())
    with pytest.raises(CacheError, match="schema"):
        w.add(raw_table(rows(["a"])).drop_columns(["response_leftover"]))


def test_new_cache_never_deletes_a_live_writers_shards(tmp_path):
    from mmkd.storage.writer import open_writer

    write(tmp_path, ["a", "b", "c", "d", "e"])
    files = sorted(p.name for p in tmp_path.glob("train-*"))
    live = CacheWriter(str(tmp_path), Manifest.load(str(tmp_path)))  # a pass still running here
    other = manifest(width=7)
    with pytest.raises(CacheError, match="another process"):
        open_writer(str(tmp_path), other, replace=True)
    assert sorted(p.name for p in tmp_path.glob("train-*")) == files
    live.close(complete=True)
    open_writer(str(tmp_path), other, replace=True).close(complete=False)  # now it may replace the cache
    assert not list(tmp_path.glob("train-*")) and Manifest.load(str(tmp_path)).k == 7
    with pytest.raises(CacheError, match="other settings.*--new-cache"):
        open_writer(str(tmp_path), manifest(width=3))


# ------------------------------------------------------------------ bad input

def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_truncated_missing_and_flipped_shards_are_named(tmp_path):
    write(tmp_path, [f"s{i}" for i in range(8)])
    shards = TeacherCache(str(tmp_path)).manifest.shards
    first, second = tmp_path / shards[0].file, tmp_path / shards[1].file
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, flipped byte
    first.write_bytes(bytes(data))
    problems = TeacherCache(str(tmp_path)).verify()
    assert any(shards[0].file in p and "sha256" in p for p in problems)
    second.write_bytes(second.read_bytes()[:-10])
    with pytest.raises(CacheError, match=shards[1].file + ".*truncated"):
        TeacherCache(str(tmp_path))
    assert any(shards[1].file in p and "truncated" in p for p in TeacherCache(str(tmp_path), check=False).verify())
    second.unlink()
    with pytest.raises(CacheError, match=shards[1].file + ".*missing"):
        TeacherCache(str(tmp_path))
    assert any(shards[1].file in p and "missing" in p for p in TeacherCache(str(tmp_path), check=False).verify())


def test_newer_major_version_and_broken_manifests_are_refused(tmp_path):
    write(tmp_path, ["a", "b"])
    good = (tmp_path / "manifest.json").read_text()
    _edit_manifest(tmp_path, lambda m: m.update(schema_version="2.0"))
    with pytest.raises(CacheError, match="schema version 2.0.*upgrade mmkd"):
        TeacherCache(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="manifest.json.*not valid JSON"):
        TeacherCache(str(tmp_path))
    for edit in (lambda m: m["extraction"].update(mode="dense"),
                 lambda m: m["shards"][0].update(rows=99),
                 lambda m: m["extraction"].pop("k")):
        (tmp_path / "manifest.json").write_text(good)
        _edit_manifest(tmp_path, edit)
        with pytest.raises(CacheError, match="manifest.json.*(edited|damaged)"):
            TeacherCache(str(tmp_path))


def test_hand_edited_k_or_sample_list_is_caught(tmp_path):
    write(tmp_path, ["a", "b", "c"])
    good = (tmp_path / "manifest.json").read_text()
    _edit_manifest(tmp_path, lambda m: m["extraction"].update(k=9))  # valid JSON, wrong width
    with pytest.raises(CacheError, match="train-00000.*stored ids.*malformed"):
        TeacherCache(str(tmp_path)).rows()
    assert TeacherCache(str(tmp_path)).verify()
    (tmp_path / "manifest.json").write_text(good)
    _edit_manifest(tmp_path, lambda m: m["shards"][0]["sample_ids"].__setitem__(0, "zz"))
    assert any("sample ids differ" in p for p in TeacherCache(str(tmp_path)).verify())


def test_wrong_column_type_is_named(tmp_path):
    write(tmp_path, ["a", "b"])
    m = Manifest.load(str(tmp_path))
    s = m.shards[0]
    t = pq.read_table(tmp_path / s.file)
    t = t.set_column(t.schema.get_field_index("input_ids"), "input_ids", t.column("input_ids").cast(pa.list_(pa.int64())))
    pq.write_table(t, tmp_path / s.file)
    data = (tmp_path / s.file).read_bytes()
    s.bytes, s.sha256 = len(data), hashlib.sha256(data).hexdigest()  # a consistent manifest, a wrong shard
    s.footer_sha256 = footer_sha256(data)
    m.save(str(tmp_path))
    with pytest.raises(CacheError, match=f"{s.file}.*input_ids has type list<[a-z]*: int64>"):
        TeacherCache(str(tmp_path)).rows()
    assert any("input_ids" in p for p in TeacherCache(str(tmp_path)).verify())


def test_duplicate_samples_are_reported(tmp_path):
    write(tmp_path, ["a", "b", "a2", "b2", "a"], rows_per_shard=4)
    assert any("sample a appears twice" in p for p in TeacherCache(str(tmp_path)).verify())


# ------------------------------------------------------------------ merge / subset

def test_merge_and_subset_keep_rows_and_manifest_consistent(tmp_path):
    a = write(tmp_path / "a", ["a1", "a2", "a3", "a4", "a5"], rows_per_shard=2)
    b = write(tmp_path / "b", ["b1", "b2", "b3"], rows_per_shard=2, seed=1)
    m = merge_caches([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    merged = TeacherCache(str(tmp_path / "m"))
    assert merged.verify() == [] and m.complete and m.num_rows == 8
    assert merged.manifest.settings() == TeacherCache(str(tmp_path / "a")).manifest.settings()
    got = merged.rows()
    for r in a + b:
        assert_topk_close(got[r.sample_id].response, r.response.ids, r.response.logprobs)

    subset_cache(str(tmp_path / "m"), str(tmp_path / "s"), ["a2", "a3", "b1"])
    sub = TeacherCache(str(tmp_path / "s"))
    assert sub.verify() == [] and sorted(sub.sample_ids()) == ["a2", "a3", "b1"]
    for sid, row in sub.rows().items():  # re-written from the encoded rows: values identical
        assert np.array_equal(row.response.logprobs, got[sid].response.logprobs)
        assert np.array_equal(row.response.ids, got[sid].response.ids)
    assert sub.manifest.inputs["subset_of"] == merged.manifest.cache_id

    with pytest.raises(CacheError, match="a2 is in both"):
        merge_caches([str(tmp_path / "a"), str(tmp_path / "s")], str(tmp_path / "x"))
    write(tmp_path / "c", ["c1"], width=4)
    with pytest.raises(CacheError, match="other settings.*extraction"):
        merge_caches([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path / "y"))
    with pytest.raises(CacheError, match="not in the cache"):
        subset_cache(str(tmp_path / "a"), str(tmp_path / "z"), ["nope"])
