"""Sparse KL on cached top-k against dense references computed here with plain torch."""

import pytest
import torch

from student.losses import cross_entropy, sparse_forward_kl


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
    got = sparse_forward_kl(s, ids, vals, left, mode=mode, chunk_rows=8)
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
    got = sparse_forward_kl(s, ids, vals, left, mode="bucket", chunk_rows=7)
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


def test_chunking_does_not_change_the_result():
    torch.manual_seed(3)
    s = torch.randn(100, 30, requires_grad=True)
    ids, vals, left = _teacher_topk(torch.randn(100, 30), 4)
    a = sparse_forward_kl(s, ids, vals, left, chunk_rows=1000)
    b = sparse_forward_kl(s, ids, vals, left, chunk_rows=7)
    assert torch.allclose(a, b, atol=1e-6)


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
