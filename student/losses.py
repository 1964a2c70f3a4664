"""Distillation losses: pure functions of tensors.

Token terms: N rows (one per target position, in the order of the cache), V the
student's vocabulary, k the cached top-k. ``student_logits`` [N, V] are the student's logits
at the rows that correspond to the cached targets: for response targets the rows that
predict the supervised tokens (shifted: logits at t-1 for the token at t); for visual
targets (MDist) the rows AT the visual positions (unshifted). The loss functions do not
care which: the caller picks the rows (student.outputs.StudentOutputs).

The functions here take logits; the trainer never builds [N, V] logits: it calls the
fused head + loss of student.fused, which evaluates the same per-row functions
(topk_rows, sampled_rows, dense_rows, ce_rows) chunk by chunk from the hidden states.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LEFTOVER_MODES = ("bucket", "renormalize")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
RELATION_POOLING = ("batch", "sample")
PREFERENCE_LOSSES = ("dpo", "kto_pair")


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log q(target): the supervised (SFT) loss. targets int64 [N]."""
    return F.cross_entropy(student_logits.float(), targets)


# --- token terms as functions of the student's log-probs at a few ids -----------------------
#
# Every token term reads the student only through s = log q at some ids per row (the target
# for CE, the teacher's top-k, the sampled ids; every id for the dense divergence) and, in
# bucket mode, s_rest = log q of the rest of the vocabulary. These per-row functions are the
# one definition of each term: the fused head + loss (student.fused) evaluates them chunk by
# chunk from the hidden states, the functions below from logits already at hand.


def _rowwise(t_logp: torch.Tensor, s_logp: torch.Tensor, divergence: str) -> torch.Tensor:
    """[N]: the divergence between each row's distributions, given as log-probs over the
    same outcomes (last dim): forward KL(p || q), reverse KL(q || p), or JSD."""
    p, q = t_logp.exp(), s_logp.exp()
    if divergence == "forward_kl":
        return (p * (t_logp - s_logp)).sum(-1)
    if divergence == "reverse_kl":
        return (q * (s_logp - t_logp)).sum(-1)
    m = torch.logaddexp(t_logp, s_logp) - math.log(2.0)  # log of the mixture (p + q) / 2
    return 0.5 * (p * (t_logp - m)).sum(-1) + 0.5 * (q * (s_logp - m)).sum(-1)


def topk_rows(s: torch.Tensor, s_rest: torch.Tensor | None, t_logp: torch.Tensor, leftover: torch.Tensor,
              divergence: str = "forward_kl", mode: str = "bucket") -> torch.Tensor:
    """[N]: per row, the divergence between the teacher's cached top-k and the student (the
    modes of sparse_divergence). s [N, k] float32: the student's log q at the top-k ids;
    s_rest [N]: its log q of every other id (bucket mode; None when k = V, no rest)."""
    t_logp = t_logp.float()
    if mode == "renormalize":
        t_logp = t_logp - torch.logsumexp(t_logp, dim=-1, keepdim=True)
        if divergence == "forward_kl":  # a cross-entropy against the full student softmax
            return (t_logp.exp() * (t_logp - s)).sum(-1)
        return _rowwise(t_logp, s - torch.logsumexp(s, dim=-1, keepdim=True), divergence)
    # Bucket: k ids + one "rest" outcome. The cached values are quantised (storage.codec):
    # renormalise the teacher's k+1 outcomes so they form a distribution and a perfect
    # student scores 0, not +-codec error.
    log_r = torch.log(leftover.float().clamp_min(1e-30))[:, None]  # r = 0 -> log 1e-30, weight ~0
    t_all = torch.cat([t_logp, log_r], -1)
    t_all = t_all - torch.logsumexp(t_all, -1, keepdim=True)
    if s_rest is None:
        return _rowwise(t_all[:, :-1], s, divergence)  # top k = whole vocabulary: no rest
    return _rowwise(t_all, torch.cat([s, s_rest[:, None]], -1), divergence)


def sampled_rows(s: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[N]: -sum_i p_hat_i log q_i with p_hat = counts / draws (Sparse Logit Sampling; see
    sampled_kd). s [N, D]: the student's log q at the drawn ids."""
    p_hat = counts.float() / counts.sum(-1, keepdim=True).clamp_min(1).float()
    return -(p_hat * s).sum(-1)


def dense_rows(s: torch.Tensor, teacher_logits: torch.Tensor, divergence: str = "forward_kl") -> torch.Tensor:
    """[N]: the full-vocabulary divergence; s [N, V]: the student's log-softmax."""
    return _rowwise(torch.log_softmax(teacher_logits.float(), -1), s, divergence)


def ce_rows(s: torch.Tensor) -> torch.Tensor:
    """[N]: -log q(target); s [N, 1]: the student's log q at the target."""
    return -s[:, 0]


def student_logprobs(logits: torch.Tensor, ids: torch.Tensor, rest: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(s [N, m] = log q at ids [N, m], s_rest [N] = log q of every other id, or None) from
    the student's logits [N, V], in fp32. The rest is a logsumexp over the other entries, so
    it stays accurate (and differentiable) when it is tiny."""
    z = logits.float()
    lse = torch.logsumexp(z, -1)
    s = z.gather(-1, ids) - lse[:, None]
    if not rest:
        return s, None
    return s, torch.logsumexp(z.scatter(-1, ids, float("-inf")), -1) - lse


def _check(divergence: str, mode: str | None = None) -> None:
    if mode is not None and mode not in LEFTOVER_MODES:
        raise ValueError(f"leftover mode {mode!r}: choose one of {LEFTOVER_MODES}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence {divergence!r}: choose one of {DIVERGENCES}")


def _mean(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return rows.mean() if rows.numel() else like.sum() * 0.0


def sparse_divergence(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                      leftover: torch.Tensor, divergence: str = "forward_kl", mode: str = "bucket") -> torch.Tensor:
    """Divergence between the teacher's cached top-k and the student, mean over rows.

    p_i = exp(topk_logprobs[:, i]) are the teacher's top-k probabilities of ids topk_ids
    [N, k] (int64), r = leftover [N] its mass outside them; q = softmax(student_logits).

    divergence: "forward_kl" KL(p || q) (the seed methods' term), "reverse_kl" KL(q || p),
    or "jsd" = (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2.

    mode (how the mass outside the top k is handled):
    - "bucket": both distributions coarsened to k+1 outcomes, the k ids and one "rest of
      vocabulary" bucket (teacher: r, its k+1 values renormalised to sum to 1, which undoes
      the cache's quantisation drift; student: q_rest = 1 - sum_i q_i, exact). For the KL
      terms a lower bound of the full-vocabulary divergence; equal to it when k = V.
    - "renormalize": the teacher's top-k renormalised, p~_i = p_i / sum_j p_j. Forward KL
      uses the student's full-vocabulary log q_i (sum_i p~_i (log p~_i - log q_i), the
      DistillKit convention; it also pulls the student's mass into the top k). Reverse KL
      and JSD need two distributions on one support, so the student is renormalised over
      the same k ids, q~_i = q_i / sum_j q_j.
    Every combination equals the dense full-vocabulary divergence when k = V.

    From logits at hand; the trainer never builds them (student.fused computes the same
    topk_rows from the hidden states, chunk by chunk).
    """
    _check(divergence, mode)
    rest = mode == "bucket" and topk_ids.shape[-1] < student_logits.shape[-1]
    s, s_rest = student_logprobs(student_logits, topk_ids, rest)
    return _mean(topk_rows(s, s_rest, topk_logprobs, leftover, divergence, mode), student_logits)


def sparse_forward_kl(student_logits, topk_ids, topk_logprobs, leftover, mode: str = "bucket") -> torch.Tensor:
    """Forward KL(teacher || student) on the cached top-k: sparse_divergence(..., "forward_kl")."""
    return sparse_divergence(student_logits, topk_ids, topk_logprobs, leftover, "forward_kl", mode)


def dense_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     divergence: str = "forward_kl") -> torch.Tensor:
    """Full-vocabulary divergence between teacher and student, mean over rows: what the
    online baseline (student.online, the teacher resident) trains on and what every cached
    term approximates; the honest "KL to the teacher" metric.

    student_logits, teacher_logits [N, V] at the same rows (the teacher's without grad);
    p = softmax(teacher_logits), q = softmax(student_logits); divergence as in
    sparse_divergence.
    """
    _check(divergence)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ: both must be [rows, shared vocabulary]")
    s = torch.log_softmax(student_logits.float(), -1)
    return _mean(dense_rows(s, teacher_logits, divergence), student_logits)


def sampled_kd(student_logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Distillation from sampled teacher ids (Sparse Logit Sampling), mean over rows.

    ids [N, D] were drawn from the teacher's distribution p with replacement, D times per
    row; counts [N, D] say how often (0 marks padding). p_hat_i = counts_i / D is an
    unbiased estimate of p, so
        - sum_i p_hat_i log q_i
    is an unbiased estimate of the cross-entropy H(p, q) = KL(p || q) + H(p): its gradient
    in the student's logits is, in expectation, the full-vocabulary forward KL's.
    """
    s, _ = student_logprobs(student_logits, ids, rest=False)
    return _mean(sampled_rows(s, counts), student_logits)


# --- RDist: relations between visual tokens ------------------------------------------------

def relation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], pooling: str = "sample") -> torch.Tensor:
    """RDist: 1 - cosine between the student's and the teacher's relation matrices.

    student, teacher: one [n, n] matrix per sample (n may differ between samples, must
    match within a pair). pooling="batch": ONE cosine over all samples' entries flattened
    together (the reference implementation); "sample": the mean of per-sample cosines.
    The cache stores each teacher matrix divided by its Frobenius norm (cosine ignores
    scale), so with pooling="batch" every sample's teacher matrix has weight 1 in the
    pooled vector, where the reference weighs samples by ||R_teacher|| (see docs).
    """
    if pooling not in RELATION_POOLING:
        raise ValueError(f"relation pooling {pooling!r}: choose one of {RELATION_POOLING}")
    if not student:
        return torch.zeros(())
    for s, t in zip(student, teacher, strict=True):
        if s.shape != t.shape:
            raise ValueError(f"relation matrices differ in shape: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
    if pooling == "batch":
        s = torch.cat([m.float().flatten() for m in student])
        t = torch.cat([m.float().flatten() for m in teacher]).to(s.device)
        return 1 - F.cosine_similarity(s, t, dim=0)
    cos = [F.cosine_similarity(s.float().flatten(), t.float().flatten().to(s.device), dim=0)
           for s, t in zip(student, teacher)]
    return 1 - torch.stack(cos).mean()


# --- preference distillation (teacher = reference model) -----------------------------------

def sequence_logprobs(token_logprobs: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Summed log q(target) per segment: the log-probability of each answer.

    token_logprobs [N]: log q of the target at each of the N answer rows (student.fused.
    token_logprobs from the hidden states, or student_logprobs from logits); segment [N]
    int64 the answer each row belongs to (0..num_segments-1). Returns float32
    [num_segments]."""
    return token_logprobs.new_zeros(num_segments, dtype=torch.float32).index_add(0, segment, token_logprobs.float())


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, loss: str = "dpo", beta: float = 0.1) -> torch.Tensor:
    """Preference distillation with the teacher as the reference model, mean over pairs.

    All inputs [P]: summed log-probs of the chosen / rejected answers under the student
    (policy) and the teacher (reference, from the cache).
    - "dpo":  -log sigmoid(beta * ((pc - rc) - (pr - rr)))
    - "kto_pair" (LLaVA-MoD's released script): with KL_c = mean(pc - rc) and
      KL_r = mean(pr - rr) clamped at 0 (batch means),
          [1 - sigmoid(beta * ((pc - rc) - KL_r))]  and  [1 - sigmoid(beta * (KL_c - (pr - rr)))]
      averaged over the 2P terms.
    """
    chosen = policy_chosen.float() - ref_chosen.float().to(policy_chosen.device)
    rejected = policy_rejected.float() - ref_rejected.float().to(policy_rejected.device)
    if loss == "dpo":
        return -F.logsigmoid(beta * (chosen - rejected)).mean()
    if loss == "kto_pair":
        kl_c, kl_r = chosen.mean().clamp_min(0), rejected.mean().clamp_min(0)
        return torch.cat([1 - torch.sigmoid(beta * (chosen - kl_r)), 1 - torch.sigmoid(beta * (kl_c - rejected))]).mean()
    raise ValueError(f"preference loss {loss!r}: choose one of {PREFERENCE_LOSSES}")
