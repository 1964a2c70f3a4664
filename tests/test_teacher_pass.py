"""The Ray teacher pass: one row per sample, values equal to the teacher's own
log_softmax, resume without duplicates, refusal of a cache made with other settings."""

import json

import numpy as np
import pytest
import torch

from mmkd.common.config import InputsConfig
from mmkd.common.inputs import load_image
from mmkd.common.preprocess import collate, encode_sample
from mmkd.common.samples import read_llava
from mmkd.pipelines.config import TeacherPassConfig
from mmkd.pipelines.teacher_pass import run_teacher_pass
from mmkd.storage.manifest import Manifest
from mmkd.storage.reader import TeacherCache
from mmkd.storage.schema import CacheError
from mmkd.teacher_cache.teacher import load_teacher, weights_digest

from helpers import assert_topk_close, llava_parquet


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, object_store_memory=200 << 20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(teacher_dir, demo_dir, out, **kw):
    return TeacherPassConfig(inputs=InputsConfig(data=str(demo_dir / "train.json"), image_root=str(demo_dir)),
                             teacher=str(teacher_dir), output=str(out), k=5, batch_size=8, rows_per_shard=16, **kw)


def test_cache_has_one_row_per_sample_and_the_teachers_values(ray_local, teacher_dir, demo_dir, tmp_path):
    cfg = _cfg(teacher_dir, demo_dir, tmp_path / "cache")
    manifest = run_teacher_pass(cfg, log=lambda *_: None)
    samples = read_llava(demo_dir / "train.json")
    cache = TeacherCache(cfg.output)
    assert sorted(cache.sample_ids()) == sorted(s.id for s in samples)
    assert manifest.complete and cache.verify() == []
    assert manifest.teacher["weights_sha256"] == weights_digest(teacher_dir)
    assert manifest.k == 5 and manifest.extraction["temperature"] == 1.0

    # Recompute a few samples here with the teacher's full forward.
    model, processor = load_teacher(str(teacher_dir), "float32", "cpu")
    rows = cache.rows()
    some = [samples[i] for i in (0, 7, len(samples) - 1)]
    enc = [encode_sample(processor, s, load_image(demo_dir, s), 2048) for s in some]
    b = {k: torch.from_numpy(v) for k, v in collate(enc, processor.tokenizer.pad_token_id).items()}
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                       pixel_values=b["pixel_values"]).logits, -1)
    for i, (s, e) in enumerate(zip(some, enc)):
        row = rows[s.id]
        pos = np.nonzero(e.labels != -100)[0]
        ref_vals, ref_ids = logp[i, pos - 1].topk(5, -1)
        assert (row.response.positions == pos).all()
        assert_topk_close(row.response, ref_ids.numpy(), ref_vals.float().numpy())

    # Re-running the same command is a no-op resume: still one row per sample.
    run_teacher_pass(cfg, log=lambda *_: None)
    assert sorted(TeacherCache(cfg.output).sample_ids()) == sorted(s.id for s in samples)


def test_resume_runs_only_the_missing_samples(ray_local, teacher_dir, demo_dir, tmp_path):
    cfg = _cfg(teacher_dir, demo_dir, tmp_path / "cache")
    run_teacher_pass(cfg, log=lambda *_: None)
    full = TeacherCache(cfg.output).rows()
    # Simulate a crash after the first shard: drop the later shards from the manifest.
    m = Manifest.load(cfg.output)
    m.shards, m.complete = m.shards[:1], False
    m.save(cfg.output)
    logs = []
    run_teacher_pass(cfg, log=logs.append)
    assert any(f"{16} already in the cache" in line for line in logs)
    resumed = TeacherCache(cfg.output)
    assert resumed.manifest.complete and resumed.verify() == []
    assert sorted(resumed.sample_ids()) == sorted(full)
    for sid, row in resumed.rows().items():  # a row's top-k is a set: its stored order follows its shard's codec
        a, b = np.argsort(row.response.ids, 1), np.argsort(full[sid].response.ids, 1)
        assert (np.take_along_axis(row.response.ids, a, 1) == np.take_along_axis(full[sid].response.ids, b, 1)).all()
        assert np.array_equal(np.take_along_axis(row.response.logprobs, a, 1),
                              np.take_along_axis(full[sid].response.logprobs, b, 1))


def test_other_settings_are_refused_unless_new_cache(ray_local, teacher_dir, demo_dir, tmp_path):
    run_teacher_pass(_cfg(teacher_dir, demo_dir, tmp_path / "cache"), log=lambda *_: None)
    other = _cfg(teacher_dir, demo_dir, tmp_path / "cache")
    other.k = 3
    with pytest.raises(CacheError, match="extraction"):
        run_teacher_pass(other, log=lambda *_: None)
    other.new_cache = True
    run_teacher_pass(other, log=lambda *_: None)
    assert TeacherCache(other.output).k == 3


def test_visual_relation_and_preference_caches(ray_local, teacher_dir, demo_dir, tmp_path):
    """The pass writes every record kind asked for, one row per sample (or pair), and the
    student-side reader gets them back; visual rows equal the extraction of one batch."""
    from mmkd.common.preprocess import image_token_id
    from mmkd.common.samples import read_preference
    from mmkd.teacher_cache.extract import ExtractionSpec, extract_rows, to_device

    cfg = _cfg(teacher_dir, demo_dir, tmp_path / "vis", records="response,visual,relation")
    m = run_teacher_pass(cfg, log=lambda *_: None)
    assert m.record_kinds == ["response", "visual", "relation"] and "image tokens" in m.extraction["positions"]
    cache = TeacherCache(cfg.output)
    assert cache.verify() == []
    rows = cache.rows()
    model, processor = load_teacher(str(teacher_dir), "float32", "cpu")
    s = read_llava(demo_dir / "train.json")[3]
    enc = encode_sample(processor, s, load_image(demo_dir, s), 2048)
    batch = to_device(collate([enc], processor.tokenizer.pad_token_id), "cpu", torch.float32)
    raw = extract_rows(model, batch, [s.id], image_token_id(processor), ExtractionSpec(k=5, records=("visual",
                                                                                                     "relation")))
    assert (np.asarray(raw.column("visual_positions")[0].as_py()) == rows[s.id].visual.positions).all()
    assert rows[s.id].relation.shape == (len(rows[s.id].visual), len(rows[s.id].visual))

    pcfg = TeacherPassConfig(teacher=str(teacher_dir), inputs=InputsConfig(str(demo_dir / "preference.jsonl"),
                                                                           str(demo_dir)),
                             output=str(tmp_path / "pref"), records="preference", batch_size=4, rows_per_shard=16)
    pm = run_teacher_pass(pcfg, log=lambda *_: None)
    assert pm.record_kinds == ["preference"] and pm.complete
    prefs = TeacherCache(pcfg.output).rows()
    pairs = read_preference(demo_dir / "preference.jsonl")
    assert sorted(prefs) == sorted(p.id for p in pairs)
    r = prefs[pairs[0].id].preference
    assert np.isclose(r.chosen_logprob, r.chosen_token_logprobs.astype(np.float64).sum(), atol=1e-3)
    assert r.chosen_logprob < 0 and r.rejected_logprob < 0


def test_parquet_with_image_bytes_gives_the_rows_of_the_json(ray_local, teacher_dir, demo_dir, tmp_path):
    """The same 16 samples as LLaVA JSON (image files under the root) and as Parquet with the
    images' bytes (no image root): the workers decode the rows themselves, and the caches
    hold equal rows."""
    recs = llava_parquet(demo_dir / "train.json", tmp_path / "train.parquet", demo_dir, image="bytes", n=16)
    (tmp_path / "train.json").write_text(json.dumps(recs))
    caches = []
    for data, root in (("train.json", str(demo_dir)), ("train.parquet", "")):
        cfg = _cfg(teacher_dir, demo_dir, tmp_path / f"cache-{data}")
        cfg.inputs.data, cfg.inputs.image_root = str(tmp_path / data), root
        assert run_teacher_pass(cfg, log=lambda *_: None).complete
        caches.append(TeacherCache(cfg.output).rows())
    from_json, from_parquet = caches
    assert sorted(from_parquet) == sorted(from_json) == sorted(r["id"] for r in recs)
    for sid, a in from_json.items():
        b = from_parquet[sid]
        assert np.array_equal(a.input_ids, b.input_ids) and a.token_digest == b.token_digest
        for f in ("positions", "ids", "logprobs", "leftover"):
            assert np.array_equal(getattr(a.response, f), getattr(b.response, f)), (sid, f)


def test_records_are_checked():
    from mmkd.teacher_cache.extract import parse_records

    assert parse_records("relation, response") == ["response", "relation"]
    with pytest.raises(ValueError, match="choose from"):
        parse_records("response,logits")
    with pytest.raises(ValueError, match="separate cache"):
        parse_records("response,preference")
