"""Distillation losses: pure functions of tensors.

Token terms: N rows (one per target position, in the order of the cache), V the
student's vocabulary, k the cached top-k. ``student_logits`` [N, V] are the student's logits
at the rows that correspond to the cached targets: for response targets the rows that
predict the supervised tokens (shifted: logits at t-1 for the token at t); for visual
targets (MDist) the rows AT the visual positions (unshifted). The loss functions do not
care which: the caller picks the rows (student.outputs.StudentOutputs).

Sparse terms never build a second [N, V] fp32 tensor for the backward: rows are processed
in chunks with activation checkpointing, so autograd keeps one chunk's log-softmax at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LEFTOVER_MODES = ("bucket", "renormalize")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
RELATION_POOLING = ("batch", "sample")
PREFERENCE_LOSSES = ("dpo", "kto_pair")


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log q(target): the supervised (SFT) loss. targets int64 [N]."""
    return F.cross_entropy(student_logits.float(), targets)


def _divergence(t_logp: torch.Tensor, s_logp: torch.Tensor, divergence: str) -> torch.Tensor:
    """Summed divergence between row distributions given as log-probs over the same
    outcomes (last dim)."""
    p, q = t_logp.exp(), s_logp.exp()
    if divergence == "forward_kl":
        return (p * (t_logp - s_logp)).sum()
    if divergence == "reverse_kl":
        return (q * (s_logp - t_logp)).sum()
    m = torch.logaddexp(t_logp, s_logp) - math.log(2.0)  # log of the mixture (p + q) / 2
    return 0.5 * (p * (t_logp - m)).sum() + 0.5 * (q * (s_logp - m)).sum()


def _sparse_rows(logits: torch.Tensor, ids: torch.Tensor, t_logp: torch.Tensor, leftover: torch.Tensor,
                 divergence: str, mode: str) -> torch.Tensor:
    """Summed divergence of one chunk of rows (see sparse_divergence)."""
    s_all = torch.log_softmax(logits.float(), dim=-1)
    s_logp = s_all.gather(-1, ids)  # [n, k]
    t_logp = t_logp.float()
    if mode == "renormalize":
        t_logp = t_logp - torch.logsumexp(t_logp, dim=-1, keepdim=True)
        if divergence == "forward_kl":  # a cross-entropy against the full student softmax
            return (t_logp.exp() * (t_logp - s_logp)).sum()
        s_logp = s_logp - torch.logsumexp(s_logp, dim=-1, keepdim=True)
        return _divergence(t_logp, s_logp, divergence)
    # Bucket: k ids + one "rest" outcome. The cached values are quantised (storage.codec):
    # renormalise the teacher's k+1 outcomes so they form a distribution and a perfect
    # student scores 0, not +-codec error.
    log_r = torch.log(leftover.float().clamp_min(1e-30))[:, None]  # r = 0 -> log 1e-30, weight ~0
    t_all = torch.cat([t_logp, log_r], -1)
    t_all = t_all - torch.logsumexp(t_all, -1, keepdim=True)
    if ids.shape[-1] >= logits.shape[-1]:
        return _divergence(t_all[:, :-1], s_logp, divergence)  # top k = whole vocabulary: no rest
    # Student's mass outside the teacher's top k, from logsumexp over the other entries,
    # so it stays accurate (and differentiable) when it is tiny.
    s_rest = torch.logsumexp(s_all.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)
    return _divergence(t_all, torch.cat([s_logp, s_rest], -1), divergence)


def sparse_divergence(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                      leftover: torch.Tensor, divergence: str = "forward_kl", mode: str = "bucket",
                      chunk_rows: int = 1024) -> torch.Tensor:
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

    Rows are processed in chunks of chunk_rows with activation checkpointing, so autograd
    keeps no [N, V] fp32 log-softmax: peak extra memory is one chunk's.
    """
    if mode not in LEFTOVER_MODES:
        raise ValueError(f"leftover mode {mode!r}: choose one of {LEFTOVER_MODES}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence {divergence!r}: choose one of {DIVERGENCES}")
    return _chunked(_sparse_rows, student_logits, (topk_ids, topk_logprobs, leftover), (divergence, mode),
                    chunk_rows)


def sparse_forward_kl(student_logits, topk_ids, topk_logprobs, leftover, mode: str = "bucket",
                      chunk_rows: int = 1024) -> torch.Tensor:
    """Forward KL(teacher || student) on the cached top-k: sparse_divergence(..., "forward_kl")."""
    return sparse_divergence(student_logits, topk_ids, topk_logprobs, leftover, "forward_kl", mode, chunk_rows)


def dense_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str = "forward_kl",
                     chunk_rows: int = 1024) -> torch.Tensor:
    """Full-vocabulary divergence between teacher and student, mean over rows: what the
    online baseline (student.online, the teacher resident) trains on and what every cached
    term approximates; the honest "KL to the teacher" metric.

    student_logits, teacher_logits [N, V] at the same rows (the teacher's without grad);
    p = softmax(teacher_logits), q = softmax(student_logits); divergence as in
    sparse_divergence. Chunked and checkpointed like the sparse terms.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence {divergence!r}: choose one of {DIVERGENCES}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ: both must be [rows, shared vocabulary]")
    return _chunked(_dense_rows, student_logits, (teacher_logits,), (divergence,), chunk_rows)


def _dense_rows(logits: torch.Tensor, t_logits: torch.Tensor, divergence: str) -> torch.Tensor:
    return _divergence(torch.log_softmax(t_logits.float(), -1), torch.log_softmax(logits.float(), -1), divergence)


def sampled_kd(student_logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
               chunk_rows: int = 1024) -> torch.Tensor:
    """Distillation from sampled teacher ids (Sparse Logit Sampling), mean over rows.

    ids [N, D] were drawn from the teacher's distribution p with replacement, D times per
    row; counts [N, D] say how often (0 marks padding). p_hat_i = counts_i / D is an
    unbiased estimate of p, so
        - sum_i p_hat_i log q_i
    is an unbiased estimate of the cross-entropy H(p, q) = KL(p || q) + H(p): its gradient
    in the student's logits is, in expectation, the full-vocabulary forward KL's.
    """
    return _chunked(_sampled_rows, student_logits, (ids, counts), (), chunk_rows)


def _sampled_rows(logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    p_hat = counts.float() / counts.sum(-1, keepdim=True).clamp_min(1).float()
    return -(p_hat * torch.log_softmax(logits.float(), dim=-1).gather(-1, ids)).sum()


def _chunked(rows_fn, logits: torch.Tensor, row_args: tuple, extra: tuple, chunk_rows: int) -> torch.Tensor:
    """Mean over rows of rows_fn(logits chunk, *row_args chunks, *extra) (a per-chunk sum),
    checkpointing each chunk when a gradient is needed."""
    n = logits.shape[0]
    if n == 0:
        return logits.sum() * 0.0
    total = logits.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled() and logits.requires_grad
    for s in range(0, n, chunk_rows):
        args = (logits[s:s + chunk_rows], *(a[s:s + chunk_rows] for a in row_args), *extra)
        total = total + (checkpoint(rows_fn, *args, use_reentrant=False) if grad else rows_fn(*args))
    return total / n


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

def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, segment: torch.Tensor, num_segments: int,
                      chunk_rows: int = 1024) -> torch.Tensor:
    """Summed log q(target) per segment: the log-probability of each answer.

    logits [N, V] at the rows that predict targets [N] (shifted), segment [N] int64 the
    answer each row belongs to (0..num_segments-1). Returns float32 [num_segments].
    """
    out = logits.new_zeros(num_segments, dtype=torch.float32)
    for s in range(0, logits.shape[0], chunk_rows):
        lp = torch.log_softmax(logits[s:s + chunk_rows].float(), -1).gather(-1, targets[s:s + chunk_rows, None])[:, 0]
        out = out.index_add(0, segment[s:s + chunk_rows], lp)
    return out


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
