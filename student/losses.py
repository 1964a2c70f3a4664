"""Distillation losses: pure functions of tensors.

Shapes: N rows (one per supervised token, in the order of the cache), V the student's
vocabulary, k the cached top-k. ``student_logits`` [N, V] are the student's logits at the
rows that predict those tokens (shifted: the logits at t-1 for the token at t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LEFTOVER_MODES = ("bucket", "renormalize")


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log q(target): the supervised (SFT) loss. targets int64 [N]."""
    return F.cross_entropy(student_logits.float(), targets)


def _kl_rows(logits: torch.Tensor, ids: torch.Tensor, t_logp: torch.Tensor, leftover: torch.Tensor,
             mode: str) -> torch.Tensor:
    """Summed KL of one chunk of rows (see sparse_forward_kl)."""
    s_logp_all = torch.log_softmax(logits.float(), dim=-1)
    s_logp = s_logp_all.gather(-1, ids)  # [n, k]
    t_logp = t_logp.float()
    if mode == "renormalize":
        t_logp = t_logp - torch.logsumexp(t_logp, dim=-1, keepdim=True)
        return (t_logp.exp() * (t_logp - s_logp)).sum()
    # The cached values are quantised (storage.codec): renormalise the k+1 outcomes so the
    # teacher side is a distribution and the KL of a perfect student is 0, not +-codec error.
    log_z = torch.logsumexp(torch.cat([t_logp, torch.log(leftover.float().clamp_min(1e-30))[:, None]], -1), -1)
    t_logp = t_logp - log_z[:, None]
    leftover = leftover.float() * torch.exp(-log_z)
    p = t_logp.exp()
    head = (p * (t_logp - s_logp)).sum()
    if ids.shape[-1] >= logits.shape[-1]:
        return head  # the top k is the whole vocabulary: there is no rest bucket
    # Student's mass outside the teacher's top k, from logsumexp over the other entries,
    # so it stays accurate (and differentiable) when it is tiny.
    s_rest = torch.logsumexp(s_logp_all.scatter(-1, ids, float("-inf")), dim=-1)
    r = leftover.float()
    tail = torch.where(r > 0, r * (torch.log(r.clamp_min(1e-30)) - s_rest), torch.zeros_like(r)).sum()
    return head + tail


def sparse_forward_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                      leftover: torch.Tensor, mode: str = "bucket", chunk_rows: int = 1024) -> torch.Tensor:
    """Forward KL(teacher || student) from the teacher's cached top-k, mean over rows.

    p_i = exp(topk_logprobs[:, i]) are the teacher's top-k probabilities of ids topk_ids,
    r = leftover the teacher's mass outside them; q = softmax(student_logits).

    - mode="bucket": KL between the two distributions coarsened to k+1 outcomes (the k
      ids and one "rest of vocabulary" bucket; the teacher's k+1 values are renormalised
      to sum to 1, which undoes the cache's quantisation drift):
          sum_i p_i (log p_i - log q_i) + r (log r - log q_rest),  q_rest = 1 - sum_i q_i.
      A lower bound of the full-vocabulary KL; equal to it when k = V (r = 0).
    - mode="renormalize": the teacher's top-k renormalised, p~_i = p_i / sum_j p_j:
          sum_i p~_i (log p~_i - log q_i)
      (the DistillKit convention; ignores r). Also equal to the full KL when k = V.

    Rows are processed in chunks of chunk_rows with activation checkpointing, so autograd
    keeps no [N, V] fp32 log-softmax: peak extra memory is one chunk's.
    """
    if mode not in LEFTOVER_MODES:
        raise ValueError(f"leftover mode {mode!r}: choose one of {LEFTOVER_MODES}")
    n = student_logits.shape[0]
    if n == 0:
        return student_logits.sum() * 0.0
    total = student_logits.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk_rows):
        args = (student_logits[s:s + chunk_rows], topk_ids[s:s + chunk_rows],
                topk_logprobs[s:s + chunk_rows], leftover[s:s + chunk_rows])
        if torch.is_grad_enabled() and student_logits.requires_grad:
            total = total + checkpoint(_kl_rows, *args, mode, use_reentrant=False)
        else:
            total = total + _kl_rows(*args, mode)
    return total / n


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
    n = student_logits.shape[0]
    if n == 0:
        return student_logits.sum() * 0.0
    total = student_logits.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk_rows):
        args = (student_logits[s:s + chunk_rows], ids[s:s + chunk_rows], counts[s:s + chunk_rows])
        if torch.is_grad_enabled() and student_logits.requires_grad:
            total = total + checkpoint(_sampled_rows, *args, use_reentrant=False)
        else:
            total = total + _sampled_rows(*args)
    return total / n


def _sampled_rows(logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    p_hat = counts.float() / counts.sum(-1, keepdim=True).clamp_min(1).float()
    return -(p_hat * torch.log_softmax(logits.float(), dim=-1).gather(-1, ids)).sum()
