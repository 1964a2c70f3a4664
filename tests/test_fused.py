"""The fused head + loss against an independent dense float64 reference written here: the
logits built whole, each term's formula spelled out, gradients by autograd.

Tolerances, relative to the largest entry of the reference: fp32 inputs agree with the
float64 reference to 1e-5 on values and 5e-5 on gradients (float32 accumulation over V =
300 ids; the largest gradient error measured, 1.8e-5, was reverse KL's); bf16 inputs (the matmuls in bf16, as on
GPUs) to 3e-2 relative on values and 5e-2 on gradients, measured against the float64
reference computed from the same bf16-rounded inputs (bf16 keeps 8 bits of mantissa: the
logits themselves are rounded to ~0.4%).
"""

import math

import pytest
import torch

from mmkd.common.heads import Head
from mmkd.student import fused
from mmkd.student.losses import ce_rows, dense_rows, sampled_rows, topk_rows

N, D, V = 37, 16, 300


def _inputs(dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g) * 0.7).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.9).to(dtype)
    b = (torch.randn(V, generator=g) * 0.3).to(dtype) if bias else None
    t_logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 2.5
    return h, w, b, t_logits


def _teacher_topk(t_logits, k):
    logp = torch.log_softmax(t_logits, -1)
    vals, ids = logp.topk(k, -1)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))  # a cached set has no order
    vals, ids = vals[:, perm], ids[:, perm]
    return ids, vals.float(), (1 - vals.exp().sum(-1)).clamp_min(0).float()


def _div(p_logp, q_logp, divergence):
    """Per-row divergence of distributions given in float64 log-probs (last dim)."""
    p, q = p_logp.exp(), q_logp.exp()
    if divergence == "forward_kl":
        return (p * (p_logp - q_logp)).sum(-1)
    if divergence == "reverse_kl":
        return (q * (q_logp - p_logp)).sum(-1)
    m = torch.log((p + q) / 2)
    return 0.5 * (p * (p_logp - m)).sum(-1) + 0.5 * (q * (q_logp - m)).sum(-1)


def _reference(h, w, b, kind, **kw):
    """(value, grad h, grad w, grad b) in float64 from whole logits."""
    h64 = h.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    b64 = b.double().requires_grad_(True) if b is not None else None
    z = h64 @ w64.T + (b64 if b64 is not None else 0)
    logq = torch.log_softmax(z, -1)
    if kind == "ce":
        rows = -logq.gather(-1, kw["targets"][:, None])[:, 0]
    elif kind == "dense":
        rows = _div(torch.log_softmax(kw["t_logits"], -1), logq, kw["divergence"])
    elif kind == "sampled":
        p_hat = kw["counts"].double() / kw["counts"].sum(-1, keepdim=True).double()
        rows = -(p_hat * logq.gather(-1, kw["ids"])).sum(-1)
    else:
        ids, t_logp, left = kw["ids"], kw["t_logp"].double(), kw["leftover"].double()
        s = logq.gather(-1, ids)
        k = ids.shape[-1]
        if kw["mode"] == "renormalize":
            t = t_logp - torch.logsumexp(t_logp, -1, keepdim=True)
            if kw["divergence"] == "forward_kl":
                rows = (t.exp() * (t - s)).sum(-1)
            else:
                rows = _div(t, s - torch.logsumexp(s, -1, keepdim=True), kw["divergence"])
        elif k == V:
            t = torch.cat([t_logp, torch.log(left.clamp_min(1e-30))[:, None]], -1)
            t = (t - torch.logsumexp(t, -1, keepdim=True))[:, :-1]
            rows = _div(t, s, kw["divergence"])
        else:
            log_rest = torch.logsumexp(z.scatter(-1, ids, float("-inf")), -1) - torch.logsumexp(z, -1)
            t = torch.cat([t_logp, torch.log(left.clamp_min(1e-30))[:, None]], -1)
            t = t - torch.logsumexp(t, -1, keepdim=True)
            rows = _div(t, torch.cat([s, log_rest[:, None]], -1), kw["divergence"])
    value = rows.mean()
    value.backward()
    return value.detach(), h64.grad, w64.grad, None if b64 is None else b64.grad


def _term(kind, **kw):
    if kind == "ce":
        return fused.TokenTerm("ce", 1.0, lambda s, r: ce_rows(s), kw["targets"][:, None])
    if kind == "dense":
        t_h, t_w = kw["teacher"]
        return fused.TokenTerm("kd", 1.0, lambda s, t: dense_rows(s, t, kw["divergence"]),
                               teacher=(t_h, Head(t_w, None)))
    if kind == "sampled":
        return fused.TokenTerm("kd", 1.0, lambda s, r, c: sampled_rows(s, c), kw["ids"], args=(kw["counts"],))
    div, mode = kw["divergence"], kw["mode"]
    return fused.TokenTerm("kd", 1.0, lambda s, r, t, left: topk_rows(s, r, t, left, div, mode), kw["ids"],
                           rest=mode == "bucket", args=(kw["t_logp"], kw["leftover"]))


def _fused(h, w, b, term, chunk_rows=8):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True) if b is not None else None
    total, values = fused.token_losses(h, Head(w, b), [term], chunk_rows)
    total.backward()
    return total.detach(), values[term.name], h.grad, w.grad, None if b is None else b.grad


def _close(got, want, rtol):
    got, want = got.double(), want.double()
    scale = want.abs().max().clamp_min(1e-12)
    assert (got - want).abs().max() <= rtol * scale, float((got - want).abs().max() / scale)


def _check(h, w, b, kind, rtol_value=1e-5, rtol_grad=5e-5, **kw):
    want = _reference(h, w, b, kind, **kw)
    total, value, *grads = _fused(h, w, b, _term(kind, **kw))
    _close(value, want[0], rtol_value)
    _close(total, want[0], rtol_value)
    for g, r in zip(grads, want[1:]):
        if r is None:
            assert g is None
        else:
            _close(g, r, rtol_grad)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [8, V])
@pytest.mark.parametrize("mode", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_terms_equal_the_dense_reference(divergence, mode, k, bias):
    h, w, b, t_logits = _inputs(bias=bias)
    ids, t_logp, left = _teacher_topk(t_logits, k)
    _check(h, w, b, "topk", ids=ids, t_logp=t_logp, leftover=left, divergence=divergence, mode=mode)


@pytest.mark.parametrize("bias", [True, False])
def test_ce_and_sampled_equal_the_dense_reference(bias):
    h, w, b, t_logits = _inputs(bias=bias, seed=2)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    _check(h, w, b, "ce", targets=targets)
    draws = torch.multinomial(torch.softmax(t_logits, -1), 12, replacement=True,
                              generator=torch.Generator().manual_seed(4))
    ids = torch.zeros(N, 12, dtype=torch.long)
    counts = torch.zeros(N, 12, dtype=torch.int32)
    for i in range(N):
        u, c = draws[i].unique(return_counts=True)
        ids[i, :len(u)], counts[i, :len(u)] = u, c.int()
    _check(h, w, b, "sampled", ids=ids, counts=counts)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_dense_term_from_the_teachers_hidden_states(divergence):
    """The online baseline's divergence: the teacher's logits built chunk by chunk from its
    own hidden states and head, against the reference on the whole teacher logits."""
    h, w, b, _ = _inputs(seed=5)
    g = torch.Generator().manual_seed(6)
    t_h, t_w = torch.randn(N, 24, generator=g), torch.randn(V, 24, generator=g)
    _check(h, w, b, "dense", teacher=(t_h, t_w), t_logits=(t_h.double() @ t_w.double().T), divergence=divergence)


@pytest.mark.parametrize("kind", ["ce", "topk"])
def test_bf16_inputs(kind):
    h, w, b, t_logits = _inputs(torch.bfloat16, seed=7)
    ids, t_logp, left = _teacher_topk(t_logits, 16)
    kw = dict(targets=ids[:, 0]) if kind == "ce" else dict(ids=ids, t_logp=t_logp, leftover=left,
                                                           divergence="forward_kl", mode="bucket")
    _check(h, w, b, kind, rtol_value=3e-2, rtol_grad=5e-2, **kw)
    _, _, gh, gw, gb = _fused(h, w, b, _term(kind, **kw))
    assert gh.dtype == gw.dtype == gb.dtype == torch.bfloat16


def test_several_terms_sum_and_chunking_does_not_matter():
    """CE + KD with coefficients in one call equals the weighted sum of the single-term
    references; the chunk size changes neither the values nor the gradients."""
    h, w, b, t_logits = _inputs(seed=8)
    ids, t_logp, left = _teacher_topk(t_logits, 8)
    targets = ids[:, 0]
    kw = dict(ids=ids, t_logp=t_logp, leftover=left, divergence="jsd", mode="bucket")
    ref_ce, ref_kd = _reference(h, w, b, "ce", targets=targets), _reference(h, w, b, "topk", **kw)
    results = []
    for chunk in (1, 8, 1000):
        hh, ww, bb = (x.clone().requires_grad_(True) for x in (h, w, b))
        ce, kd = _term("ce", targets=targets), _term("topk", **kw)
        ce.coef, kd.coef = 0.25, 2.0
        total, values = fused.token_losses(hh, Head(ww, bb), [ce, kd], chunk)
        total.backward()
        _close(values["ce"], ref_ce[0], 1e-5)
        _close(values["kd"], ref_kd[0], 1e-5)
        _close(total, 0.25 * ref_ce[0] + 2.0 * ref_kd[0], 1e-5)
        _close(hh.grad, 0.25 * ref_ce[1] + 2.0 * ref_kd[1], 1e-5)
        _close(ww.grad, 0.25 * ref_ce[2] + 2.0 * ref_kd[2], 1e-5)
        results.append((total.detach(), hh.grad, ww.grad))
    for r in results[1:]:
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(r, results[0]))


def test_a_metric_term_is_valued_but_not_trained_and_no_rows_give_zero():
    h, w, b, t_logits = _inputs(seed=9)
    targets = torch.randint(0, V, (N,))
    ce = _term("ce", targets=targets)
    ce.coef = 0.0
    hh = h.clone().requires_grad_(True)
    total, values = fused.token_losses(hh, Head(w, b), [ce])
    total.backward()
    assert values["ce"] > 0 and total == 0 and (hh.grad == 0).all()
    empty = torch.zeros(0, D, requires_grad=True)
    total, values = fused.token_losses(empty, Head(w, b), [_term("ce", targets=torch.zeros(0, dtype=torch.long))])
    total.backward()
    assert values["ce"] == 0 and empty.grad.shape == (0, D)


def test_a_tiny_rest_mass_stays_finite_and_exact():
    """A student whose top ids hold all but ~e-60 of its mass: the rest's log-prob and its
    gradient come from the log domain (no 1 - sum cancellation, no overflow)."""
    h, w, b, t_logits = _inputs(seed=10)
    ids, t_logp, left = _teacher_topk(t_logits, 4)
    w = w.clone()
    w[ids[0]] *= 1.0
    hh = torch.zeros(N, D)
    bias = torch.full((V,), -60.0)
    bias[ids[0]] = 60.0  # every row: the first row's 4 ids hold the mass
    kw = dict(ids=ids[:1].expand(N, -1).contiguous(), t_logp=t_logp, leftover=left, divergence="forward_kl",
              mode="bucket")
    total, value, gh, gw, gb = _fused(hh, w, bias, _term("topk", **kw))
    assert torch.isfinite(value) and torch.isfinite(gb).all() and value > 10  # the rest: log q ~ -120 nats
    # the rest outcome's gradient: the teacher's rest mass p_r, spread over the rest by u
    p_r = torch.exp(torch.log(left.double().clamp_min(1e-30)) - torch.logsumexp(
        torch.cat([t_logp.double(), torch.log(left.double().clamp_min(1e-30))[:, None]], -1), -1))
    rest = torch.ones(V, dtype=torch.bool)
    rest[ids[0]] = False
    assert torch.allclose(gb[rest].double().sum(), -p_r.mean(), rtol=1e-4)


def test_token_logprobs_and_argmax():
    h, w, b, _ = _inputs(seed=11)
    targets = torch.randint(0, V, (N,))
    seg_w = torch.randn(N, dtype=torch.float64)  # any downstream loss: a weighted sum per row
    hh, ww, bb = (x.clone().requires_grad_(True) for x in (h, w, b))
    lp = fused.token_logprobs(hh, Head(ww, bb), targets, chunk_rows=5)
    (lp.double() * seg_w).sum().backward()
    h64, w64, b64 = (x.double().requires_grad_(True) for x in (h, w, b))
    ref = torch.log_softmax(h64 @ w64.T + b64, -1).gather(-1, targets[:, None])[:, 0]
    (ref * seg_w).sum().backward()
    _close(lp, ref.detach(), 1e-5)
    for g, r in ((hh.grad, h64.grad), (ww.grad, w64.grad), (bb.grad, b64.grad)):
        _close(g, r, 1e-5)
    ids, top_lp = fused.head_top1(h, Head(w, b), chunk_rows=4)
    dense = torch.log_softmax((h @ w.T + b).double(), -1)
    assert torch.equal(ids, dense.argmax(-1))
    _close(top_lp, dense.max(-1).values, 1e-5)
    assert math.isclose(fused.rows_per_chunk(151_936), fused.CHUNK_BYTES // (4 * 151_936))


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_rows_with_tiny_and_ordinary_rest_masses_together(divergence):
    """Every other row puts all but ~e-40 of the student's mass on the teacher's top ids
    (the log-domain path), the others keep an ordinary rest: both against the reference."""
    h, w, _, t_logits = _inputs(seed=12)
    ids, t_logp, left = _teacher_topk(t_logits, 6)
    ids[0::2] = ids[0]
    h[0::2] = 0
    h[0::2, 0] = 1.0
    w[:, 0] = 0
    w[ids[0], 0] = 40.0  # rows with h = e_0: logit 40 at those 6 ids, ~0 elsewhere
    _check(h, w * 0.1 + w * 0.9 * (w == 40), None, "topk", ids=ids, t_logp=t_logp, leftover=left,
           divergence=divergence, mode="bucket")


def test_tied_embeddings_get_both_gradients_through_the_students_forward():
    """A causal LM whose head is its input embedding (tie_word_embeddings): CE + KD through
    StudentOutputs' fused terms gives the embedding the gradient of the dense loss on the
    model's own logits (both uses of the matrix)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmkd.student.outputs import StudentOutputs
    from mmkd.student.targets import Batch, TopK
    from mmkd.student.terms import ce_term, divergence_term

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.randint(0, 97, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    n = int((labels != -100).sum())
    t_ids, t_logp, left = _teacher_topk(torch.randn(n, 97, dtype=torch.float64) * 2, 8)
    batch = Batch(ids, torch.ones_like(ids), labels, response=TopK(t_ids, t_logp, left))
    cfg = type("Cfg", (), {"divergence": "forward_kl", "kd_leftover": "bucket"})()
    b, t = torch.nonzero(labels != -100, as_tuple=True)
    ce, kd = ce_term(labels[b, t]), divergence_term("kd", batch.response, cfg)
    ce.coef, kd.coef = 1.0, 0.5
    out = StudentOutputs(model, image_token_id=-1)(ids, batch.attention_mask, labels, terms={"response": [ce, kd]})
    out["loss"].backward()
    got = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=ids).logits[b, t - 1].double()
    logq = torch.log_softmax(logits, -1)
    s = logq.gather(-1, t_ids)
    rest = torch.logsumexp(logits.scatter(-1, t_ids, float("-inf")), -1) - torch.logsumexp(logits, -1)
    tt = torch.cat([t_logp.double(), torch.log(left.double())[:, None]], -1)
    tt = tt - torch.logsumexp(tt, -1, keepdim=True)
    kl = (tt.exp() * (tt - torch.cat([s, rest[:, None]], -1))).sum(-1).mean()
    (-logq.gather(-1, labels[b, t][:, None]).mean() + 0.5 * kl).backward()
    _close(got, model.get_input_embeddings().weight.grad, 1e-4)
