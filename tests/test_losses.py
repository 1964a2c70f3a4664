"""Every loss against an independent dense reference computed here with plain torch
(float64, explicit loops where that is clearer than vectorised code)."""

import math

import pytest
import torch

from mmkd.common.heads import relation_matrix
from mmkd.student.losses import (
    DIVERGENCES,
    LEFTOVER_MODES,
    cross_entropy,
    dense_divergence,
    preference_loss,
    relation_loss,
    sampled_kd,
    sequence_logprobs,
    sparse_divergence,
    sparse_forward_kl,
    student_logprobs,
)


def _teacher_topk(t_logits, k):
    logp = torch.log_softmax(t_logits.double(), -1)
    vals, ids = logp.topk(k, -1)
    leftover = 1 - vals.exp().sum(-1)
    return ids, vals.float(), leftover.float().clamp_min(0)


def _dense_kl(t_logits, s_logits):
    p = torch.softmax(t_logits.double(), -1)
    return (p * (torch.log_softmax(t_logits.double(), -1) - torch.log_softmax(s_logits.double(), -1))).sum(-1).mean()


@pytest.mark.parametrize("mode", ["bucket", "renormalize"])
def test_full_vocabulary_equals_dense_kl(mode):
    torch.manual_seed(0)
    N, V = 37, 23
    t, s = torch.randn(N, V) * 2, torch.randn(N, V, requires_grad=True)
    ids, vals, left = _teacher_topk(t, V)
    got = sparse_forward_kl(s, ids, vals, left, mode=mode)
    ref = _dense_kl(t, s)
    assert torch.allclose(got.double(), ref, atol=1e-5)
    g_got, = torch.autograd.grad(got, s)
    s2 = s.detach().clone().requires_grad_(True)
    g_ref, = torch.autograd.grad(_dense_kl(t, s2), s2)
    assert torch.allclose(g_got.double(), g_ref.double(), atol=1e-6)


def test_bucket_mode_is_the_kl_of_the_coarsened_distributions():
    """k < V: KL between the teacher and student distributions with every id outside the
    teacher's top-k merged into one "rest" outcome."""
    torch.manual_seed(1)
    N, V, k = 29, 50, 5
    t, s = torch.randn(N, V) * 3, torch.randn(N, V)
    ids, vals, left = _teacher_topk(t, k)
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    ref = 0.0
    for n in range(N):
        top = set(ids[n].tolist())
        rest = [i for i in range(V) if i not in top]
        pc = torch.cat([p[n, ids[n]], p[n, rest].sum()[None]])
        qc = torch.cat([q[n, ids[n]], q[n, rest].sum()[None]])
        ref += (pc * (pc.log() - qc.log())).sum()
    got = sparse_forward_kl(s, ids, vals, left, mode="bucket")
    assert torch.allclose(got.double(), ref / N, atol=1e-5)
    # a lower bound of the full-vocabulary KL (coarsening never increases KL)
    assert got <= _dense_kl(t, s) + 1e-6


def test_renormalize_mode_formula_and_zero_at_the_teacher():
    torch.manual_seed(2)
    N, V, k = 11, 40, 6
    t = torch.randn(N, V) * 2
    ids, vals, left = _teacher_topk(t, k)
    s = torch.randn(N, V)
    pt = torch.softmax(vals.double(), -1)  # renormalised top-k
    ref = (pt * (pt.log() - torch.log_softmax(s.double(), -1).gather(-1, ids))).sum(-1).mean()
    assert torch.allclose(sparse_forward_kl(s, ids, vals, left, mode="renormalize").double(), ref, atol=1e-5)
    # Bucket KL of the teacher against itself is 0; renormalised KL of the teacher against
    # itself is -log(top-k mass) > 0: it pushes the student to put all mass on the top k.
    assert sparse_forward_kl(t, ids, vals, left, mode="bucket").abs() < 1e-5
    assert torch.allclose(sparse_forward_kl(t, ids, vals, left, mode="renormalize").double(),
                          -torch.log(1 - left.double()).mean(), atol=1e-5)


def test_leftover_zero_and_tiny_are_handled():
    N, V, k = 4, 10, 3
    t = torch.full((N, V), -60.0)
    t[:, :3] = torch.tensor([5.0, 4.0, 3.0])  # the rest has mass ~1e-28
    ids, vals, left = _teacher_topk(t, k)
    left[0] = 0.0
    s = torch.randn(N, V, requires_grad=True)
    loss = sparse_forward_kl(s, ids, vals, left)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_bad_mode_and_empty_rows():
    with pytest.raises(ValueError, match="bucket"):
        sparse_forward_kl(torch.zeros(1, 3), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1),
                          torch.zeros(1), mode="nope")
    assert sparse_forward_kl(torch.zeros(0, 3), torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1),
                             torch.zeros(0)) == 0


def test_cross_entropy_matches_negative_log_likelihood():
    torch.manual_seed(4)
    s, y = torch.randn(9, 13), torch.randint(0, 13, (9,))
    ref = -torch.log_softmax(s, -1)[torch.arange(9), y].mean()
    assert torch.allclose(cross_entropy(s, y), ref)


def _dense_divergence(p, q, divergence):
    """Summed-over-outcomes divergence of two probability vectors (float64)."""
    if divergence == "forward_kl":
        return (p * (p.log() - q.log())).sum()
    if divergence == "reverse_kl":
        return (q * (q.log() - p.log())).sum()
    m = (p + q) / 2
    return 0.5 * (p * (p.log() - m.log())).sum() + 0.5 * (q * (q.log() - m.log())).sum()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mode", ["bucket", "renormalize"])
def test_every_divergence_at_full_vocabulary_is_the_dense_one(divergence, mode):
    torch.manual_seed(5)
    N, V = 13, 17
    t, s = torch.randn(N, V) * 2, torch.randn(N, V, requires_grad=True)
    ids, vals, left = _teacher_topk(t, V)
    got = sparse_divergence(s, ids, vals, left, divergence, mode)
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    ref = sum(_dense_divergence(p[n], q[n], divergence) for n in range(N)) / N
    assert torch.allclose(got.double(), ref, atol=1e-5)
    g, = torch.autograd.grad(got, s)
    s2 = s.detach().double().requires_grad_(True)
    q2 = torch.softmax(s2, -1)
    g_ref, = torch.autograd.grad(sum(_dense_divergence(p[n], q2[n], divergence) for n in range(N)) / N, s2)
    assert torch.allclose(g.double(), g_ref, atol=1e-5)


def _case(seed, N, V, k, scale):
    """Random teacher/student logits, the teacher's top-k, and both dense distributions."""
    torch.manual_seed(seed)
    t, s = torch.randn(N, V) * scale, torch.randn(N, V)
    ids, vals, left = _teacher_topk(t, k)
    return t, s, ids, vals, left, torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bucket_divergences_on_the_coarsened_distributions(divergence):
    N, V = 9, 40
    t, s, ids, vals, left, p, q = _case(6, N, V, k=4, scale=3)
    ref = 0.0
    for n in range(N):
        rest = [i for i in range(V) if i not in set(ids[n].tolist())]
        pc = torch.cat([p[n, ids[n]], p[n, rest].sum()[None]])
        qc = torch.cat([q[n, ids[n]], q[n, rest].sum()[None]])
        ref += _dense_divergence(pc, qc, divergence)
    got = sparse_divergence(s, ids, vals, left, divergence, "bucket")
    assert torch.allclose(got.double(), ref / N, atol=1e-5)
    assert sparse_divergence(t, ids, vals, left, divergence, "bucket").abs() < 1e-5  # teacher vs itself


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_renormalize_reverse_and_jsd_use_both_top_k_renormalised(divergence):
    N = 8
    t, s, ids, vals, left, p, q = _case(7, N, V=30, k=5, scale=2)
    ref = 0.0
    for n in range(N):
        pk, qk = p[n, ids[n]], q[n, ids[n]]
        ref += _dense_divergence(pk / pk.sum(), qk / qk.sum(), divergence)
    got = sparse_divergence(s, ids, vals, left, divergence, "renormalize")
    assert torch.allclose(got.double(), ref / N, atol=1e-5)


def test_bad_divergence_is_refused():
    with pytest.raises(ValueError, match="forward_kl"):
        sparse_divergence(torch.zeros(1, 3), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1),
                          torch.zeros(1), divergence="kl")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_online_dense_loss_is_the_reference_and_equals_offline_at_full_vocabulary(divergence):
    """The online baseline's loss (dense_divergence on the teacher's logits) against the
    float64 reference, and equal in value and gradient to the offline top-k loss with
    k = V and exact (unquantised) log-probs, in both leftover modes: with nothing truncated
    or rounded, the offline loss IS the online one."""
    N, V = 11, 19
    t, s, ids, vals, left, p, _ = _case(9, N, V, k=V, scale=2)
    s.requires_grad_(True)
    online = dense_divergence(s, t, divergence)
    s64 = s.detach().double().requires_grad_(True)
    q64 = torch.softmax(s64, -1)
    ref = sum(_dense_divergence(p[n], q64[n], divergence) for n in range(N)) / N
    g_online, = torch.autograd.grad(online, s)
    g_ref, = torch.autograd.grad(ref, s64)
    assert torch.allclose(online.double(), ref, atol=1e-5)
    assert torch.allclose(g_online.double(), g_ref, atol=1e-6)
    for mode in LEFTOVER_MODES:
        offline = sparse_divergence(s, ids, vals, left, divergence, mode)
        g_offline, = torch.autograd.grad(offline, s)
        assert torch.allclose(offline, online, atol=1e-6), mode
        assert torch.allclose(g_offline, g_online, atol=1e-6), mode
    assert dense_divergence(t, t, divergence).abs() < 1e-6
    with pytest.raises(ValueError, match="shared vocabulary"):
        dense_divergence(s, t[:, :-1], divergence)


def test_sampled_estimator_is_unbiased_for_the_dense_kl_and_top_k_is_not():
    """Sparse Logit Sampling: over many independent draws, the sampled loss averages to the
    cross-entropy H(p, q) = KL(p || q) + H(p), and its gradient to the dense forward KL's
    (the online baseline's). A top-k cache of the same width keeps a gradient bias that no
    averaging removes, many times the sampled estimate's error."""
    torch.manual_seed(10)
    N, V, D, R = 5, 24, 12, 4000  # rows, vocabulary, draws per row, independent repetitions
    t, s = torch.randn(N, V) * 2, torch.randn(N, V)
    p = torch.softmax(t.double(), -1)
    drawn = torch.multinomial(p.float().repeat(R, 1), D, replacement=True)  # [R * N, D]
    counts = torch.zeros(R * N, V, dtype=torch.int32).scatter_add_(1, drawn, torch.ones_like(drawn, dtype=torch.int32))
    ids = torch.arange(V).expand(R * N, V)  # every id; count 0 = not drawn
    s_rep = s.repeat(R, 1).requires_grad_(True)
    est = sampled_kd(s_rep, ids, counts)  # mean over all R * N rows
    g_est = torch.autograd.grad(est, s_rep)[0].double().view(R, N, V).sum(0)  # d(mean over R*N)/d(s), per row n
    s1 = s.clone().requires_grad_(True)
    dense = dense_divergence(s1, t)
    g_dense = torch.autograd.grad(dense, s1)[0].double()
    # gradient: (q - mean p_hat) / N vs (q - p) / N; p_hat's standard error per entry
    se = (p * (1 - p) / (D * R)).sqrt() / N
    err = (g_est - g_dense).abs()
    assert (err <= 5 * se + 1e-9).all()
    # value: E[-sum p_hat log q] = KL + H(p), within 5 standard errors of the mean over repetitions
    per_rep = -(counts.double() / D * torch.log_softmax(s.double(), -1).repeat(R, 1)).sum(-1).view(R, N).mean(1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert abs(est.item() - (dense.item() + entropy.item())) <= 5 * per_rep.std().item() / R ** 0.5
    # Top-k with as many ids as the sampled rows hold on average (the same storage), bucket
    # mode: its gradient is off at the ids outside the top k, and no averaging removes
    # that, so it fails the very check the sampled estimate passes, by a wide margin.
    k = round((counts > 0).sum(-1).double().mean().item())
    ids_k, vals_k, left_k = _teacher_topk(t, k)
    s2 = s.clone().requires_grad_(True)
    g_topk = torch.autograd.grad(sparse_divergence(s2, ids_k, vals_k, left_k), s2)[0].double()
    assert ((g_topk - g_dense).abs() / (5 * se + 1e-9)).max() > 10


def test_relation_matrix_via_gram_equals_naive_z_zt():
    torch.manual_seed(8)
    n, d, V = 12, 16, 300
    h, w = torch.randn(n, d), torch.randn(V, d) / 4
    z = (h.double() @ w.double().T)  # the raw logits, materialised
    ref = z @ z.T
    got = relation_matrix(h, w)
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-3)
    gram = w.T @ w
    assert torch.allclose(relation_matrix(h, w, gram=gram), got)
    b = torch.randn(V)
    zb = z + b.double()
    assert torch.allclose(relation_matrix(h, w, head_bias=b).double(), zb @ zb.T, rtol=1e-4, atol=1e-3)
    # bf16 hidden states are computed in fp32
    assert relation_matrix(h.bfloat16(), w).dtype == torch.float32


def test_relation_loss_pooled_and_per_sample():
    torch.manual_seed(9)
    zs = [torch.randn(n, 20, dtype=torch.float64) for n in (5, 7)]
    zt = [z + 0.5 * torch.randn_like(z) for z in zs]
    rs = [z @ z.T for z in zs]
    rt = [z @ z.T for z in zt]
    flat = lambda ms: torch.cat([m.flatten() for m in ms])  # noqa: E731
    a, b = flat(rs), flat(rt)
    ref_batch = 1 - (a @ b) / (a.norm() * b.norm())
    assert torch.allclose(relation_loss(rs, rt, "batch").double(), ref_batch, atol=1e-6)
    ref_sample = 1 - sum((x.flatten() @ y.flatten()) / (x.norm() * y.norm()) for x, y in zip(rs, rt)) / 2
    assert torch.allclose(relation_loss(rs, rt, "sample").double(), ref_sample, atol=1e-6)
    # the stored teacher matrices are normalised: per-sample cosine ignores that, pooled does not
    rt_norm = [m / m.norm() for m in rt]
    assert torch.allclose(relation_loss(rs, rt_norm, "sample"), relation_loss(rs, rt, "sample"), atol=1e-6)
    assert relation_loss(rs, rs, "batch").abs() < 1e-6
    with pytest.raises(ValueError, match="shape"):
        relation_loss(rs, rt[::-1])
    with pytest.raises(ValueError, match="pooling"):
        relation_loss(rs, rt, "mean")


def test_sequence_logprobs_sum_per_answer():
    torch.manual_seed(10)
    N, V = 11, 9
    logits, y = torch.randn(N, V), torch.randint(0, V, (N,))
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
    got = sequence_logprobs(student_logprobs(logits, y[:, None], rest=False)[0][:, 0], seg, 4)
    lp = torch.log_softmax(logits.double(), -1)
    ref = [sum(lp[i, y[i]] for i in range(N) if seg[i] == j) for j in range(4)]
    assert torch.allclose(got.double(), torch.stack(ref), atol=1e-5)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_and_kto_pair_against_scalar_formulas():
    torch.manual_seed(11)
    pc, pr, rc, rr = (torch.randn(6) * 5 - 20 for _ in range(4))
    beta = 0.1
    ref = sum(-math.log(_sigmoid(beta * ((a - c) - (b - d)))) for a, b, c, d in
              zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())) / 6
    assert abs(preference_loss(pc, pr, rc, rr, "dpo", beta).item() - ref) < 1e-6
    # KTO-pair: the KL terms are batch means of policy - reference, clamped at 0
    cr, rj = (pc - rc).tolist(), (pr - rr).tolist()
    kl_c, kl_r = max(0.0, sum(cr) / 6), max(0.0, sum(rj) / 6)
    terms = [1 - _sigmoid(beta * (x - kl_r)) for x in cr] + [1 - _sigmoid(beta * (kl_c - x)) for x in rj]
    assert abs(preference_loss(pc, pr, rc, rr, "kto_pair", beta).item() - sum(terms) / 12) < 1e-6
    # beta matters, and the chosen answer gaining probability lowers both losses
    assert preference_loss(pc, pr, rc, rr, "dpo", 0.5) != preference_loss(pc, pr, rc, rr, "dpo", 0.1)
    for loss in ("dpo", "kto_pair"):
        assert preference_loss(pc + 1, pr, rc, rr, loss) < preference_loss(pc, pr, rc, rr, loss)
    with pytest.raises(ValueError, match="dpo"):
        preference_loss(pc, pr, rc, rr, "ipo")
