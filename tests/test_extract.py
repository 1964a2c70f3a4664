"""Teacher-side extraction against the model's own full log_softmax."""

import numpy as np
import torch

from pipelines.preprocess import collate, encode_sample, image_token_id
from pipelines.samples import load_image, read_llava
from storage.reader import decode_rows
from storage.schema import token_digest
from teacher_cache.extract import extract_rows, to_device, topk_logprobs
from teacher_cache.teacher import load_teacher


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
    rows = decode_rows(extract_rows(model, batch, [s.id for s in samples], k, 1.0, image_token_id(processor)), k)
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       pixel_values=batch["pixel_values"]).logits.double(), -1)
    for i, (row, e) in enumerate(zip(rows, enc)):
        assert row.sample_id == samples[i].id
        assert (row.input_ids == e.input_ids).all()
        assert row.token_digest == token_digest(e.input_ids, image_token_id(processor))
        pos = np.nonzero(e.labels != -100)[0]
        assert (row.supervised_positions == pos).all()
        ref = full[i, pos - 1]  # shifted: logits at t-1 predict the token at t
        ref_vals, ref_ids = ref.topk(k, -1)
        assert (row.topk_ids == ref_ids.numpy()).all()
        # values are stored as float16: relative error <= 2^-11
        assert np.allclose(row.topk_logprobs, ref_vals.numpy(), rtol=2 ** -10, atol=1e-4)
        assert np.allclose(row.leftover, 1 - ref_vals.exp().sum(-1).numpy(), atol=1e-5)
