"""The loss terms of a training stage: one table that training, logging, the global-batch
means (student.parallel) and the config checks all read. Adding a term is one entry.

A term: its logged name, the TrainConfig field of its weight ("" = weight 1, None = a
metric: logged, never in the loss), what it is a mean over (student.parallel.ROW_KINDS, or
None for a value that is not a mean over rows), the cache record kind it reads (None:
none), which objective it belongs to, and how it is computed: a token term (CE, response
KD, MDist visual KD) as a student.fused.TokenTerm that the fused head + loss evaluates at
its rows inside the student's forward; any other term as a function of the student's
outputs (student.outputs.StudentOutputs), the batch with its typed targets
(student.targets), the config and the model.

Token divergences take `divergence` between the teacher's targets and the student,
whatever their source: the cache's top-k (topk_rows with `kd_leftover`), its sampled ids
(sampled_rows, the unbiased forward-KL estimator) or the online teacher's hidden states
and head (dense_rows over the full vocabulary).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmkd.common.heads import supervised_rows
from mmkd.student.fused import TokenTerm
from mmkd.student.losses import (
    ce_rows,
    dense_rows,
    preference_loss,
    relation_loss,
    sampled_rows,
    sequence_logprobs,
    topk_rows,
)
from mmkd.student.moe import moe_aux_loss
from mmkd.student.targets import Batch, Dense, Sampled, Targets, TopK


def divergence_term(name: str, targets: Targets, cfg) -> TokenTerm:
    """The fused token term of the divergence of `divergence` between the teacher's targets
    and the student, whatever their source (coefficient 0 until the step sets it)."""
    if isinstance(targets, Dense):  # online: the full vocabulary
        return TokenTerm(name, 0.0, lambda s, t: dense_rows(s, t, cfg.divergence), teacher=(targets.hidden,
                                                                                            targets.head))
    if isinstance(targets, Sampled):  # the unbiased estimator (forward KL)
        return TokenTerm(name, 0.0, lambda s, r, c: sampled_rows(s, c), targets.ids, args=(targets.counts,))
    if isinstance(targets, TopK):
        return TokenTerm(name, 0.0, lambda s, r, t, left: topk_rows(s, r, t, left, cfg.divergence, cfg.kd_leftover),
                         targets.ids, rest=cfg.kd_leftover == "bucket", args=(targets.logprobs, targets.leftover))
    raise TypeError(f"{name}: no teacher targets of a known kind ({type(targets).__name__})")


def ce_term(targets: torch.Tensor, name: str = "ce") -> TokenTerm:
    """CE on the supervised token ids targets [N] as a fused token term."""
    return TokenTerm(name, 0.0, lambda s, r: ce_rows(s), targets[:, None])


def _preference(out: dict, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's summed answer log-probs of the P chosen and the P rejected sequences."""
    p = batch.pairs
    seq = sequence_logprobs(out["token_logprobs"], out["rows_sample"], 2 * p)
    return seq[:p], seq[p:]


def _chosen_ce(out: dict, batch: Batch, cfg, model) -> torch.Tensor:
    lp = out["token_logprobs"][out["rows_sample"] < batch.pairs]
    return -lp.mean() if lp.numel() else lp.sum()


@dataclass(frozen=True)
class Term:
    name: str
    weight: str | None  # TrainConfig field (dotted for nested); "" = weight 1; None = a metric
    rows: str | None  # ROW_KINDS: "tokens", "image_tokens", "samples"; None: not a mean over rows
    record: str | None  # the cache record kind it reads
    objective: str  # "distill" | "preference" | "any"
    # A token term is computed by the fused head + loss at the rows `at` ("response" | "visual"):
    # token(batch, supervised token ids, cfg) gives its TokenTerm. Any other term: loss(out, batch, cfg, model).
    token: Callable[[Batch, torch.Tensor, object], TokenTerm] | None = None
    at: str | None = None
    loss: Callable[[dict, Batch, object, object], torch.Tensor] | None = None


TERMS = (
    Term("ce", "ce_weight", "tokens", None, "distill", at="response",
         token=lambda batch, targets, cfg: ce_term(targets)),
    Term("kd", "kd_weight", "tokens", "response", "distill", at="response",
         token=lambda batch, targets, cfg: divergence_term("kd", batch.response, cfg)),
    Term("visual_kd", "visual_weight", "image_tokens", "visual", "distill", at="visual",
         token=lambda batch, targets, cfg: divergence_term("visual_kd", batch.visual, cfg)),
    Term("relation", "relation_weight", "samples", "relation", "distill",
         loss=lambda out, batch, cfg, model: relation_loss(out["relations"], batch.relation, cfg.relation_pooling)),
    Term("dpo", "", None, "preference", "preference",
         loss=lambda out, batch, cfg, model: preference_loss(*_preference(out, batch), batch.ref_chosen,
                                                             batch.ref_rejected, "dpo", cfg.beta)),
    Term("kto_pair", "", None, "preference", "preference",
         loss=lambda out, batch, cfg, model: preference_loss(*_preference(out, batch), batch.ref_chosen,
                                                             batch.ref_rejected, "kto_pair", cfg.beta)),
    Term("margin", None, None, "preference", "preference",  # mean log-prob margin chosen - rejected
         loss=lambda out, batch, cfg, model: (lambda c, r: (c - r).mean().detach())(*_preference(out, batch))),
    Term("ce", "ce_weight", "tokens", None, "preference", loss=_chosen_ce),  # on the chosen answers
    Term("moe_aux", "moe.aux_weight", None, None, "any", loss=lambda out, batch, cfg, model: moe_aux_loss(model)),
)


def token_terms(stage: list[Term], batch: Batch, cfg, coefs: dict[str, float]) -> dict[str, list[TokenTerm]]:
    """The stage's token terms of this batch, by row set, with their coefficients in the
    step's loss (student.parallel.StepMeans.coefficients; 0 for metrics)."""
    targets = batch.labels[supervised_rows(batch.labels)]
    out: dict[str, list[TokenTerm]] = {}
    for t in stage:
        if t.token is not None:
            term = t.token(batch, targets, cfg)
            term.coef = coefs.get(t.name, 0.0)
            out.setdefault(t.at, []).append(term)
    return out


def outputs_needed(stage: list[Term]) -> dict[str, bool]:
    """What the student's forward must return besides the token terms (StudentOutputs)."""
    return {"relation": any(t.name == "relation" for t in stage),
            "token_logprobs": any(t.objective == "preference" for t in stage)}


def weight_of(term: Term, cfg) -> float | None:
    """The term's weight in the loss (None for a metric)."""
    if term.weight is None:
        return None
    if term.weight == "":
        return 1.0
    value = cfg
    for part in term.weight.split("."):
        value = getattr(value, part)
    return float(value)


def stage_terms(cfg, teacher: bool, moe: bool) -> list[Term]:
    """The terms a stage computes, in the table's order: its objective's terms whose weight is
    positive (CE always: it is logged even at weight 0), the teacher's terms only with a
    teacher source (teacher: a cache or the online teacher), the preference loss chosen by
    preference_loss, the MoE load-balancing loss only for MoE students."""
    out = []
    for t in TERMS:
        if t.objective not in (cfg.objective, "any"):
            continue
        if t.name in ("dpo", "kto_pair") and t.name != cfg.preference_loss:
            continue
        if t.name == "moe_aux" and not moe:
            continue
        w = weight_of(t, cfg)
        if t.name == "ce" and cfg.objective == "distill":
            out.append(t)  # logged even when it does not train
            continue
        if w is not None and w <= 0:
            continue
        if t.record is not None and not teacher:
            continue
        out.append(t)
    return out


def row_kind(term: Term, cfg) -> str | None:
    """What the term is a mean over in this config (RDist pooled over the batch is one
    cosine, not a mean over samples)."""
    if term.name == "relation" and cfg.relation_pooling == "batch":
        return None
    return term.rows


def record_kinds(cfg) -> tuple[str, ...]:
    """The cache record kinds a stage reads: "response" for every distillation stage (the
    rows are checked against it), plus those of its weighted terms."""
    if cfg.objective == "preference":
        return ("preference",)
    kinds = ["response"] + [t.record for t in TERMS if t.objective == "distill" and t.record not in (None, "response")
                            and (weight_of(t, cfg) or 0) > 0]
    return tuple(dict.fromkeys(kinds))


def describe(terms: list[Term], cfg, source: str | None) -> str:
    """A one-line account of the stage's loss for the log."""
    if cfg.objective == "preference":
        return f"{cfg.preference_loss} (beta {cfg.beta}) against the teacher from {source}"
    weighted = [(t.name, weight_of(t, cfg)) for t in terms if (weight_of(t, cfg) or 0) > 0]
    if source is None:
        return "CE only"
    return " + ".join(f"{w:g}*{name}" for name, w in weighted) + f" ({cfg.divergence}) from {source}"
