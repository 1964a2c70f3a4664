"""Teacher-side extraction against the model's own full log_softmax."""

import numpy as np
import torch

from mmkd.common.inputs import load_image
from mmkd.common.preprocess import collate, encode_sample, image_token_id
from mmkd.common.samples import read_llava
from mmkd.storage.codec import LEVELS
from mmkd.storage.schema import token_digest
from mmkd.storage.tables import CodecSettings, TargetSettings, decode_stored, encode_raw
from mmkd.teacher_cache.extract import ExtractionSpec, extract_rows, sampled_ids, to_device, topk_logprobs
from mmkd.teacher_cache.teacher import load_teacher


def test_topk_logprobs_and_leftover_match_dense():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    h = torch.randn(50, 16) * 3
    ids, vals, left = topk_logprobs(h, head, k=7, chunk_rows=8)
    logp = torch.log_softmax(head(h).double(), -1)
    ref_vals, ref_ids = logp.topk(7, -1)
    assert (ids == ref_ids).all()
    assert torch.allclose(vals.double(), ref_vals, atol=1e-5)
    assert torch.allclose(left.double(), 1 - ref_vals.exp().sum(-1), atol=1e-6)
    # temperature divides the logits before the softmax
    _, vals_t, _ = topk_logprobs(h, head, k=7, temperature=2.0)
    assert torch.allclose(vals_t.double(), torch.log_softmax(head(h).double() / 2, -1).topk(7, -1).values, atol=1e-5)


def test_leftover_stays_accurate_when_tiny():
    head = torch.nn.Linear(2, 5, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[30.0, 0], [0, 0], [0, 0], [0, 0], [0, 0]]))
    _, _, left = topk_logprobs(torch.tensor([[1.0, 0.0]]), head, k=1)
    ref = 4 * np.exp(-30.0) / (np.exp(0.0) * 4 * np.exp(-30.0) + 1)  # 4 e^0 / (e^30 + 4)
    assert abs(left.item() - ref) / ref < 1e-4  # 1 - p_top would round to 0 in float32


def test_extract_rows_match_the_teachers_log_softmax(teacher_dir, demo_dir):
    model, processor = load_teacher(str(teacher_dir), "float32", "cpu")
    samples = read_llava(demo_dir / "train.json")[:5]
    enc = [encode_sample(processor, s, load_image(demo_dir, s), 128) for s in samples]
    batch = to_device(collate(enc, processor.tokenizer.pad_token_id), "cpu", torch.float32)
    k = 6
    raw = extract_rows(model, batch, [s.id for s in samples], image_token_id(processor), ExtractionSpec(k=k))
    settings = TargetSettings(model.config.get_text_config().vocab_size, "topk", k, CodecSettings())
    stored = encode_raw(raw, settings)
    rows = decode_stored(stored, _order(stored), settings)
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       pixel_values=batch["pixel_values"]).logits.double(), -1)
    for i, (row, e) in enumerate(zip(rows, enc)):
        assert row.sample_id == samples[i].id
        assert (row.input_ids == e.input_ids).all()
        assert row.token_digest == token_digest(e.input_ids, image_token_id(processor))
        pos = np.nonzero(e.labels != -100)[0]
        t = row.response
        assert (t.positions == pos).all()
        ref = full[i, pos - 1]  # shifted: logits at t-1 predict the token at t
        ref_vals, ref_ids = ref.topk(k, -1)
        # stored as a set: compare in id order; values within half a level step
        o = np.argsort(t.ids, 1)
        ro = np.argsort(ref_ids.numpy(), 1)
        assert (np.take_along_axis(t.ids, o, 1) == np.take_along_axis(ref_ids.numpy(), ro, 1)).all()
        got = np.take_along_axis(t.logprobs, o, 1)
        want = np.take_along_axis(ref_vals.numpy(), ro, 1)
        step = np.diff(LEVELS).max()
        assert np.all(np.abs(got - want)[want > -3] <= 1 / 128 + 1e-6)
        assert np.all(np.abs(got - want) <= step / 2 + 1e-6)
        left = 1 - ref_vals.exp().sum(-1).numpy()
        assert np.all(np.abs(np.log(t.leftover) - np.log(left)) <= step / 2 + 1e-6)


def _order(stored):
    from mmkd.storage.tables import VOCAB_ORDER_KEY, unpack_order
    return unpack_order(stored.schema.metadata[VOCAB_ORDER_KEY])


def test_sampled_ids_are_an_unbiased_estimate_of_the_teacher():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20, bias=False)
    h = torch.randn(3, 8)
    gen = torch.Generator().manual_seed(1)
    draws, reps = 32, 400
    p = torch.softmax(head(h).double(), -1)
    est = torch.zeros_like(p)
    for _ in range(reps):
        ids, counts = sampled_ids(h, head, draws, generator=gen)
        assert (counts.sum(-1) == draws).all()
        nz = counts > 0
        # distinct ids left-aligned, padding after
        assert all(len(set(ids[r][nz[r]].tolist())) == int(nz[r].sum()) for r in range(3))
        assert (nz[:, :-1] >= nz[:, 1:]).all()
        est.scatter_add_(1, ids, counts.double() / draws)
    est /= reps
    se = (p * (1 - p) / (draws * reps)).sqrt()
    assert ((est - p).abs() <= 5 * se + 1e-9).all()


def _batch(processor, demo_dir, n=4, split="train.json"):
    samples = read_llava(demo_dir / split)[:n]
    enc = [encode_sample(processor, s, load_image(demo_dir, s), 128) for s in samples]
    return samples, enc, to_device(collate(enc, processor.tokenizer.pad_token_id), "cpu", torch.float32)


def _full_logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits.double()


def test_visual_targets_and_relations_match_the_full_logits(teacher_dir, demo_dir):
    """MDist targets are the distributions AT the image positions (unshifted); RDist's R,
    computed as H (W^T W) H^T, equals the naive Z Z^T of the materialised logits."""
    model, processor = load_teacher(str(teacher_dir), "float32", "cpu")
    samples, enc, batch = _batch(processor, demo_dir)
    img = image_token_id(processor)
    k = 5
    raw = extract_rows(model, batch, [s.id for s in samples], img, ExtractionSpec(k=k, records=("response", "visual",
                                                                                                "relation")))
    settings = TargetSettings(model.config.get_text_config().vocab_size, "topk", k, CodecSettings())
    stored = encode_raw(raw, settings)
    rows = decode_stored(stored, _order(stored), settings)
    logits = _full_logits(model, batch)
    for i, (row, e) in enumerate(zip(rows, enc)):
        pos = np.nonzero(e.input_ids == img)[0]
        assert len(pos) > 0 and (row.visual.positions == pos).all()
        ref_vals, ref_ids = torch.log_softmax(logits[i, pos], -1).topk(k, -1)  # unshifted
        assert (np.sort(row.visual.ids, 1) == np.sort(ref_ids.numpy(), 1)).all()
        got = np.take_along_axis(row.visual.logprobs, np.argsort(row.visual.ids, 1), 1)
        want = np.take_along_axis(ref_vals.numpy(), np.argsort(ref_ids.numpy(), 1), 1)
        assert np.all(np.abs(got - want) <= np.diff(LEVELS).max() / 2 + 1e-6)
        z = logits[i, pos]  # raw logits at the visual positions
        r = (z @ z.T).numpy()
        r /= np.linalg.norm(r)
        assert row.relation.shape == (len(pos), len(pos))
        assert np.abs(row.relation - r).max() < 2e-3  # fp16 storage of the normalised matrix
        cos = (row.relation * r).sum() / np.linalg.norm(row.relation)
        assert cos > 0.99999


def test_preference_rows_are_the_teachers_answer_logprobs(teacher_dir, demo_dir):
    from mmkd.common.samples import read_preference

    model, processor = load_teacher(str(teacher_dir), "float32", "cpu")
    pairs = read_preference(demo_dir / "preference.jsonl")[:3]
    enc = [encode_sample(processor, p.sample(w), load_image(demo_dir, p.sample(w)), 128)
           for w in ("chosen", "rejected") for p in pairs]
    batch = to_device(collate(enc, processor.tokenizer.pad_token_id), "cpu", torch.float32)
    img = image_token_id(processor)
    from mmkd.teacher_cache.extract import extract_preference_rows

    raw = extract_preference_rows(model, batch, [p.id for p in pairs], img)
    logp = torch.log_softmax(_full_logits(model, batch), -1)
    for i, p in enumerate(pairs):
        ref = []
        for j in (i, len(pairs) + i):
            pos = np.nonzero(enc[j].labels != -100)[0]
            ref.append(logp[j, pos - 1, torch.as_tensor(enc[j].labels[pos])].numpy())
        assert raw.column("sample_id")[i].as_py() == p.id
        assert abs(raw.column("chosen_logprob")[i].as_py() - ref[0].sum()) < 1e-4
        assert abs(raw.column("rejected_logprob")[i].as_py() - ref[1].sum()) < 1e-4
        assert np.allclose(raw.column("chosen_token_logprobs")[i].as_py(), ref[0], atol=1e-5)
        assert np.allclose(raw.column("rejected_token_logprobs")[i].as_py(), ref[1], atol=1e-5)
        assert raw.column("rejected_token_digest")[i].as_py() == token_digest(enc[len(pairs) + i].input_ids, img)
        assert ref[0].sum() != ref[1].sum()
