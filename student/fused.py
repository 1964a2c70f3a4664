"""The fused output head + loss: from the hidden states at the target rows and the output
head straight to the token loss terms and their gradients, chunk by chunk of rows.

    for each chunk of n rows (n such that one [n, V] fp32 tensor is about CHUNK_BYTES):
        z = h_c W^T + b                 [n, V] (matmul in the inputs' dtype, used in fp32)
        log q = z - logsumexp(z)
        each term's per-row loss (student.losses: topk_rows, sampled_rows, dense_rows,
        ce_rows) of s = log q at its ids and, in bucket mode, s_rest = log q of all other
        ids: its value, and by autograd on those few [n, m] entries g = d loss / d s, g_rest
        dz = the chain rule back through s (below), summed over the terms
        grad_h[c] = dz W,  grad_W += dz^T h_c,  grad_b += sum over rows of dz
    then the chunk's logits and gradient are dropped.

The chain rule, for any loss of s (s_i = z_i - lse for the ids i in K) and s_rest (=
lse_rest - lse, lse_rest the logsumexp of z outside K):

    d/dz_j = [j in K] g_j - q_j (sum_i g_i + g_rest) + [j not in K] g_rest u_j

with q = softmax(z) and u = the softmax of z over the ids outside K (u_j = q_j / q_rest,
computed in the log domain so that a tiny rest mass neither underflows nor overflows).
One pass over [n, V] for q times a per-row coefficient and a scatter at the k ids: where
the rest holds at least TINY_REST of the mass, q_rest = sum(q) - sum_K(q) and u = q / q_rest
fold into q's coefficient; for the few rows below, u and q_rest are recomputed in the log
domain. A dense term (the online teacher's logits, computed chunk by chunk
from its hidden states and head) reads every id: d/dz = g - q sum(g).

No [N, V] logits and no [N, V] gradient ever exist: the forward computes the gradients
(as fused linear cross-entropy kernels do), the backward scales them by the upstream
gradient. Memory: a few [n, V] fp32 tensors of one chunk, grad_W [V, d] fp32 and grad_h
[N, d]. Under ZeRO-3 the head weight is whole inside the student wrapper's forward, where
this runs (student.outputs). Plain PyTorch: the same code on CPUs and GPUs; bf16 inputs
multiply in bf16 and accumulate the head's gradient in fp32.

token_logprobs (the preference objective's answer log-probs, whose loss is not a sum over
rows) recomputes each chunk in its backward instead; head_top1 predicts without logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmkd.common.heads import Head

CHUNK_BYTES = 1 << 27  # 128 MiB: one [rows, V] fp32 temporary of a chunk


def rows_per_chunk(vocab: int, chunk_rows: int | None = None) -> int:
    """Rows per chunk: chunk_rows if given, else as many as fit CHUNK_BYTES in fp32 (at least 16)."""
    return chunk_rows or max(16, CHUNK_BYTES // (4 * max(1, vocab)))


@dataclass
class TokenTerm:
    """One token term of a fused call; the call's total is sum over terms of coef x (mean
    over the call's N rows of the term's per-row loss).

    rows: the per-row loss [n] (student.losses), of s [n, m] (the student's log q at `ids`),
        s_rest [n] or None, and the chunk's slices of `args`; for a dense term (`teacher`
        set), of s [n, V] (the student's log-softmax) and the teacher's logits [n, V].
    ids: int64 [N, m], the ids the term reads (ignored by dense terms).
    rest: whether it reads s_rest (bucket mode; dropped when m covers the vocabulary).
    args: per-row tensors [N, ...] the loss reads (teacher log-probs, leftover, counts).
    teacher: (teacher hidden states [N, d_t] at the same rows, its Head): a dense term.
    """

    name: str
    coef: float
    rows: Callable[..., torch.Tensor]
    ids: torch.Tensor | None = None
    rest: bool = False
    args: tuple = ()
    teacher: tuple[torch.Tensor, Head] | None = None


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(h, weight, bias).float()


TINY_REST = 1e-3  # a student rest mass below this is recomputed in the log domain (1 - sum would cancel)


def _rest(z, lse, q, ids):
    """(log q_rest [n, 1], tiny [n] bool, u or None): the student's log-prob of every id
    outside `ids`. From q's sums where the rest holds at least TINY_REST of the mass;
    where it holds less, from the logsumexp of z outside the ids, with u [t, V] = the
    softmax of z over those ids for the tiny rows (0 at the ids), for the gradient."""
    q_rest = q.sum(-1, keepdim=True) - q.gather(-1, ids).sum(-1, keepdim=True)
    tiny = q_rest[:, 0] < TINY_REST
    log_rest = torch.log(q_rest.clamp_min(TINY_REST))
    u = None
    if tiny.any():
        masked = z[tiny].scatter(-1, ids[tiny], float("-inf"))
        lse_rest = torch.logsumexp(masked, -1, keepdim=True)
        log_rest[tiny] = lse_rest - lse[tiny]
        u = masked.sub_(lse_rest).exp_()
    return log_rest, tiny, u


def _chunk(z: torch.Tensor, terms: list[TokenTerm], a: int, b: int, n_total: int, grad: bool):
    """One chunk of logits z [n, V] fp32: (the terms' loss sums [len(terms)] float64, dz
    [n, V] fp32, or None without grad). Two [n, V] tensors live at a time, z and q (which
    becomes dz), plus a dense term's own and the few rows of a tiny rest mass."""
    sums = torch.zeros(len(terms), dtype=torch.float64, device=z.device)
    if grad or any(t.rest and t.teacher is None for t in terms):
        # one softmax pass; lse from it at each row's largest logit, whose q >= 1 / V never underflows
        top, at = z.max(-1, keepdim=True)
        q = torch.softmax(z, -1)
        lse = top - torch.log(q.gather(-1, at))
    else:
        q, lse = None, torch.logsumexp(z, -1, keepdim=True)
    row_coef = torch.zeros(z.shape[0], 1, device=z.device)  # multiplies q in dz
    scatters, adds = [], []  # (ids, values) added into dz at the ids; (row index or None, [., V]) added whole
    for i, t in enumerate(terms):
        wants = grad and t.coef != 0
        if t.teacher is not None:
            th, thead = t.teacher
            s = (z - lse).requires_grad_(wants)
            with torch.enable_grad():
                rows = t.rows(s, _logits(th[a:b], thead.weight, thead.bias))
                scaled = rows.sum() * (t.coef / n_total)
            sums[i] = rows.detach().double().sum()
            if wants:
                g, = torch.autograd.grad(scaled, [s])
                row_coef -= g.sum(-1, keepdim=True)
                adds.append((None, g))
            continue
        ids = t.ids[a:b]
        rest = t.rest and ids.shape[-1] < z.shape[-1]
        s = (z.gather(-1, ids) - lse).requires_grad_(wants)
        s_rest = None
        if rest:
            log_rest, tiny, u = _rest(z, lse, q, ids)
            s_rest = log_rest[:, 0].requires_grad_(wants)
        with torch.enable_grad():
            rows = t.rows(s, s_rest, *(x[a:b] for x in t.args))
            scaled = rows.sum() * (t.coef / n_total)
        sums[i] = rows.detach().double().sum()
        if not wants:
            continue
        grads = torch.autograd.grad(scaled, [s, s_rest] if rest else [s], allow_unused=True)
        g = grads[0] if grads[0] is not None else torch.zeros_like(s)
        row_coef -= g.sum(-1, keepdim=True)
        if rest and grads[1] is not None:
            g_rest = grads[1][:, None]
            row_coef -= g_rest
            # the rest's share, g_rest q_j / q_rest for j outside the ids: on q's coefficient where the rest
            # mass is not tiny (then taken back at the ids), from u (log domain) on the tiny rows
            per = torch.where(tiny[:, None], 0.0, g_rest / log_rest.exp())
            row_coef += per
            g = g - per * q.gather(-1, ids)
            if u is not None:
                adds.append((tiny, u.mul_(g_rest[tiny])))
        scatters.append((ids, g))
    if not grad:
        return sums, None
    dz = q.mul_(row_coef)
    for rows_at, v in adds:
        if rows_at is None:
            dz += v
        else:
            dz[rows_at] += v
    for ids, v in scatters:
        dz.scatter_add_(-1, ids, v)
    return sums, dz


def _accumulate(dz, h, weight, grad_h, grad_w, grad_b, a: int, b: int) -> None:
    """grad_h[a:b] = dz W, grad_w += dz^T h, grad_b += the rows' sum of dz (those given),
    the matmuls in the weight's dtype, the head's gradient accumulated in fp32."""
    dzc = dz.to(weight.dtype)
    if grad_h is not None:
        torch.mm(dzc, weight, out=grad_h[a:b]) if grad_h.dtype == weight.dtype else grad_h[a:b].copy_(dzc @ weight)
    if grad_w is not None:
        if dzc.dtype == grad_w.dtype:
            grad_w.addmm_(dzc.T, h)
        else:
            grad_w += (dzc.T @ h.to(weight.dtype)).float()
    if grad_b is not None:
        grad_b += dz.sum(0)


class _FusedTokenLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, terms, chunk_rows):
        n, v = hidden.shape[0], weight.shape[0]
        grad = any(ctx.needs_input_grad[:3])
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] \
            else None
        grad_b = torch.zeros(v, dtype=torch.float32, device=weight.device) if bias is not None and \
            ctx.needs_input_grad[2] else None
        sums = torch.zeros(len(terms), dtype=torch.float64, device=hidden.device)
        step = rows_per_chunk(v, chunk_rows)
        for a in range(0, n, step):
            b = min(n, a + step)
            h = hidden[a:b]
            chunk_sums, dz = _chunk(_logits(h, weight, bias), terms, a, b, n, grad)
            sums += chunk_sums
            if dz is None:
                continue
            _accumulate(dz, h, weight, grad_h, grad_w, grad_b, a, b)
        values = (sums / max(n, 1)).float()
        coefs = torch.tensor([t.coef for t in terms], dtype=torch.float32, device=values.device)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(values)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return (values * coefs).sum(), values

    @staticmethod
    def backward(ctx, g_total, _g_values):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        # in place: the saved gradients are used once (no second [V, d] buffer for the head)
        return (None if grad_h is None else grad_h.mul_(g_total.to(grad_h.dtype)),
                None if grad_w is None else grad_w.mul_(g_total).to(w_dtype),
                None if grad_b is None else grad_b.mul_(g_total).to(b_dtype), None, None)


def token_losses(hidden: torch.Tensor, head: Head, terms: list[TokenTerm],
                 chunk_rows: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, {name: value}) of token terms at N rows, from hidden [N, d] and the head
    (weight [V, d], bias [V] or None): value = the term's mean over the rows (detached),
    total = sum of coef x value, differentiable in hidden, weight and bias (module
    docstring). With no rows every value is 0."""
    if not terms:
        return hidden.sum() * 0.0, {}
    total, values = _FusedTokenLosses.apply(hidden, head.weight, head.bias, terms, chunk_rows)
    return total, dict(zip([t.name for t in terms], values.unbind()))


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
        step = rows_per_chunk(weight.shape[0], chunk_rows)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for a in range(0, hidden.shape[0], step):
            z = _logits(hidden[a:a + step], weight, bias)
            out[a:a + step] = z.gather(-1, targets[a:a + step, None])[:, 0] - torch.logsumexp(z, -1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.step = step
        return out

    @staticmethod
    def backward(ctx, g):
        hidden, weight, bias, targets = ctx.saved_tensors
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] \
            else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if bias is not None and ctx.needs_input_grad[2] else None
        for a in range(0, hidden.shape[0], ctx.step):
            h = hidden[a:a + ctx.step]
            gc = g[a:a + ctx.step, None].float()
            dz = torch.softmax(_logits(h, weight, bias), -1).mul_(-gc)  # d log q_t / dz = onehot(t) - q
            dz.scatter_add_(-1, targets[a:a + ctx.step, None], gc)
            _accumulate(dz, h, weight, grad_h, grad_w, grad_b, a, a + ctx.step)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)


def token_logprobs(hidden: torch.Tensor, head: Head, targets: torch.Tensor,
                   chunk_rows: int | None = None) -> torch.Tensor:
    """float32 [N]: log q(targets[i]) at each of N rows, differentiable; chunks of rows are
    recomputed in the backward (whose upstream gradient is per row), never [N, V] at once."""
    return _TokenLogprobs.apply(hidden, head.weight, head.bias, targets, chunk_rows)


@torch.no_grad()
def head_top1(hidden: torch.Tensor, head: Head, chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 [N], logprobs float32 [N]): the most probable id at each row and its
    log-probability (nats; the confidence of calibration metrics), chunk by chunk."""
    step = rows_per_chunk(head.weight.shape[0], chunk_rows)
    ids, logprobs = [], []
    for a in range(0, hidden.shape[0], step):
        z = _logits(hidden[a:a + step], head.weight, head.bias)
        top, at = z.max(-1)
        ids.append(at)
        logprobs.append(top - torch.logsumexp(z, -1))
    if not ids:
        return torch.zeros(0, dtype=torch.long, device=hidden.device), hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(ids), torch.cat(logprobs)
