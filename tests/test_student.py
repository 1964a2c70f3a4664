"""The student side: alignment checks, per-rank batches, the DeepSpeed recipe, evaluation."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from mmkd.common.config import InputsConfig
from mmkd.common.inputs import SampleList, load_image
from mmkd.common.preprocess import collate, encode_sample
from mmkd.common.samples import read_llava
from mmkd.storage.manifest import Manifest
from mmkd.storage.plan import EpochPlan
from mmkd.storage.reader import TeacherCache
from mmkd.student.config import TrainConfig
from mmkd.student.data import AlignmentError, StudentData
from mmkd.student.evaluate import evaluate
from mmkd.student.targets import TopK
from mmkd.student.train import train
from mmkd.teacher_cache.teacher import load_teacher

from tests.conftest import TINY


def _data(samples, processor, root, cache=None, **kw):
    return StudentData(SampleList(samples), processor, str(root), 256, cache, **kw)


def test_items_carry_aligned_targets(small_cache, demo_dir, processor):
    ds = _data(read_llava(demo_dir / "train.json"), processor, demo_dir, TeacherCache(small_cache))
    b = ds.batch([4, 0, 9])  # any items, in any order
    n = int((b.labels != -100).sum())
    assert isinstance(b.response, TopK) and b.response.ids.shape == (n, 4) and b.response.leftover.shape == (n,)
    # Row r of the targets belongs to the r-th (sample, position) with a label, and that
    # position is the one the teacher recorded for it.
    rows = TeacherCache(small_cache).rows()
    ids = [s.id for s in b.samples]
    bi, ti = torch.nonzero(b.labels != -100, as_tuple=True)
    expected_pos = np.concatenate([rows[i].response.positions for i in ids])
    expected_ids = np.concatenate([rows[i].response.ids for i in ids])
    assert (ti.numpy() == expected_pos).all()
    assert [ids[j] for j in bi.tolist()] == [i for i in ids for _ in rows[i].response.positions]
    assert (b.response.ids.numpy() == expected_ids).all()
    # the cached top-1 at each supervised row is a valid token id and probabilities are sane
    total = b.response.logprobs.exp().sum(-1) + b.response.leftover
    assert (b.response.logprobs <= 0).all() and (total - 1).abs().max() < 2e-2


def test_student_refuses_a_cache_of_another_sequence(small_cache, demo_dir, processor, tmp_path):
    # (1) the sample changed after the cache was made
    rows = json.loads((demo_dir / "train.json").read_text())
    rows[2]["conversations"][0]["value"] = "<image>\nis there a red circle?"
    rows[2]["conversations"][1]["value"] = "yes"
    changed = tmp_path / "train.json"
    changed.write_text(json.dumps(rows))
    ds = _data(read_llava(changed), processor, demo_dir, TeacherCache(small_cache))
    ds[1]  # untouched samples are fine
    with pytest.raises(AlignmentError, match=rf"sample {rows[2]['id']}: the student's token sequence differs"):
        ds[2]
    # (2) the student's chat template differs from the teacher's
    other = tmp_path / "proc"
    processor.save_pretrained(other)
    for name in ("chat_template.jinja", "chat_template.json"):
        p = other / name
        if p.exists():
            p.write_text(p.read_text().replace("USER: ", "HUMAN: "))
    proc2 = AutoProcessor.from_pretrained(other)
    assert "HUMAN" in (proc2.chat_template or "")
    ds2 = _data(read_llava(demo_dir / "train.json"), proc2, demo_dir, TeacherCache(small_cache))
    with pytest.raises(AlignmentError, match="differs from the teacher's in the cache at text token 1 "):
        ds2[0]


def test_missing_samples_are_listed(small_cache, demo_dir, processor):
    with pytest.raises(Exception, match="no cached targets.*first"):
        _data(read_llava(demo_dir / "test.json"), processor, demo_dir, TeacherCache(small_cache))


@pytest.mark.parametrize("n,bs,world", [(103, 8, 1), (103, 8, 2), (64, 4, 4), (17, 2, 3)])
def test_every_rank_gets_the_same_number_of_batches(n, bs, world):
    plan = EpochPlan([10] * (n // 10) + [n % 10], streams=world, seed=5, window=7, block_rows=4)
    per_rank = [plan.micro_batches(r, world, bs, epoch=1) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == n // world // bs
    flat = [int(i) for b in per_rank for batch in b for i in batch]
    assert len(flat) == len(set(flat)) == len(per_rank[0]) * bs * world
    assert all(len(batch) == bs for b in per_rank for batch in b)
    again = plan.micro_batches(0, world, bs, epoch=1)
    assert all((a == b).all() for a, b in zip(again, per_rank[0]))  # deterministic
    assert any((a != b).any() for a, b in zip(plan.micro_batches(0, world, bs, epoch=2), per_rank[0]))  # reshuffled


def test_the_global_batch_does_not_depend_on_the_rank_count():
    """With the streams fixed, 1 rank x batch 8 and 2 or 4 ranks x (8 / ranks) train on the
    same rows at every step; each rank reads its own streams, i.e. its own shards."""
    plan = EpochPlan([16] * 6 + [5], streams=4, seed=1, window=8, block_rows=4)
    one = plan.micro_batches(0, 1, 8)
    for world in (2, 4):
        ranks = [plan.micro_batches(r, world, 8 // world) for r in range(world)]
        assert all(len(b) == len(one) for b in ranks)
        for m, whole in enumerate(one):
            assert sorted(np.concatenate([b[m] for b in ranks]).tolist()) == sorted(whole.tolist())
        shards = [set(plan.locate(np.concatenate(b))[0].tolist()) for b in ranks]
        assert sum(len(s) for s in shards) <= len(set().union(*shards)) + world - 1  # only boundary shards shared


def test_recipe_trains_and_saves_a_loadable_model(small_cache, demo_dir, processor_dir, tmp_path):
    out = tmp_path / "student"
    cfg = TrainConfig(inputs=InputsConfig(str(demo_dir / "train.json"), str(demo_dir)), processor=str(processor_dir),
                      output_dir=str(out), cache=str(small_cache), arch=TINY, epochs=6, batch_size=8, lr=3e-3,
                      log_every=1000, ce_weight=0.0, kd_weight=1.0)
    summary = train(cfg, log=lambda *_: None)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == summary["steps"] == 6 * (40 // 8)
    assert "kd" in log[0] and "ce" in log[0]
    # KD alone drives the student towards the (random) teacher: the cached KL goes down
    kd = [r["kd"] for r in log]
    assert np.mean(kd[-5:]) < 0.5 * np.mean(kd[:5])
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == summary["params"]


def test_exact_match_equals_greedy_generation(teacher_dir, demo_dir, tmp_path):
    """evaluate()'s teacher-forced exact match against transformers' generate()."""
    model, processor = load_teacher(str(teacher_dir), "float32", "cpu")
    samples = read_llava(demo_dir / "val.json")
    enc = [encode_sample(processor, s, load_image(demo_dir, s), 256) for s in samples]
    batch = {k: torch.from_numpy(v) for k, v in collate(enc, processor.tokenizer.pad_token_id).items()}
    # Fit the random model to part of the answers so that some, not all, come out right.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        loss = model(**{k: v[:5] for k, v in batch.items()}).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    right = 0
    for e in enc:
        sup = np.nonzero(e.labels != -100)[0]
        ids = torch.from_numpy(e.input_ids[None, :sup[0]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             pixel_values=torch.from_numpy(e.vision["pixel_values"]), max_new_tokens=len(sup))
        right += out[0, sup[0]:].tolist() == e.input_ids[sup].tolist()
    metrics = evaluate(str(tmp_path / "m"), InputsConfig(str(demo_dir / "val.json"), str(demo_dir)))
    assert right > 0
    assert metrics["accuracy"] == pytest.approx(right / len(samples))


def test_kept_encodings_equal_fresh_ones(demo_dir, processor):
    samples = read_llava(demo_dir / "train.json")[:3]
    kept = _data(samples, processor, demo_dir, keep_encoded=True)
    fresh = _data(samples, processor, demo_dir)
    a = kept[1]
    first = kept._encoded[1]
    b = kept[1]
    assert kept._encoded[1] is first  # encoded once, then reused
    assert (a.input_ids == b.input_ids).all() and (a.input_ids == fresh[1].input_ids).all()
    assert torch.equal(a.vision["pixel_values"], fresh[1].vision["pixel_values"])


def test_temperature_and_vocabulary_the_student_cannot_honour(small_cache, demo_dir, processor, tmp_path):
    from mmkd.storage.schema import CacheError
    from mmkd.student.data import check_student_vocab

    hot = tmp_path / "hot"
    shutil.copytree(small_cache, hot)
    m = Manifest.load(hot)
    m.extraction["temperature"] = 2.0
    m.save(hot)
    with pytest.raises(CacheError, match="temperature 2.0"):
        _data(read_llava(demo_dir / "train.json"), processor, demo_dir, TeacherCache(hot))
    cache = TeacherCache(small_cache)
    vocab = cache.manifest.vocab_size
    narrow = torch.nn.Module()
    narrow.get_output_embeddings = lambda: torch.nn.Linear(4, vocab - 1)  # one row too few
    with pytest.raises(CacheError, match=f"{vocab} ids but the student's output head only {vocab - 1} rows"):
        check_student_vocab(cache, narrow)
    padded = torch.nn.Module()
    padded.get_output_embeddings = lambda: torch.nn.Linear(4, vocab + 64)  # a padded head is fine
    check_student_vocab(cache, padded, max_target_id=vocab - 1)
    with pytest.raises(CacheError, match=f"target id {vocab}, outside its own vocabulary"):
        check_student_vocab(cache, padded, max_target_id=vocab)
