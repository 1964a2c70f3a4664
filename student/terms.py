"""The loss terms of a training stage: one table that training, logging, the global-batch
means (student.parallel) and the config checks all read. Adding a term is one entry.

A term: its logged name, the TrainConfig field of its weight ("" = weight 1, None = a
metric: logged, never in the loss), what it is a mean over (student.parallel.ROW_KINDS, or
None for a value that is not a mean over rows), the cache record kind it reads (None:
none), which objective it belongs to, and its loss: a function of the student's outputs at
the target rows (student.outputs.StudentOutputs), the batch with its typed targets
(student.targets), the config and the model.

Token terms take the divergence of `divergence` between the teacher's targets and the
student, whatever their source: the cache's top-k (sparse_divergence with `kd_leftover`),
its sampled ids (sampled_kd, the unbiased forward-KL estimator) or the online teacher's
dense logits (dense_divergence).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmkd.student.losses import (
    cross_entropy,
    dense_divergence,
    preference_loss,
    relation_loss,
    sampled_kd,
    sequence_logprobs,
    sparse_divergence,
)
from mmkd.student.moe import moe_aux_loss
from mmkd.student.targets import Batch, Dense, Sampled, Targets


def token_divergence(logits: torch.Tensor, targets: Targets, cfg) -> torch.Tensor:
    """Mean over the N rows of the divergence between the teacher's targets and the
    student's logits [N, V] at the same rows."""
    if isinstance(targets, Dense):  # online: the full vocabulary
        return dense_divergence(logits, targets.logits, cfg.divergence)
    if isinstance(targets, Sampled):  # the unbiased estimator (forward KL)
        return sampled_kd(logits, targets.ids, targets.counts)
    return sparse_divergence(logits, targets.ids, targets.logprobs, targets.leftover, cfg.divergence, cfg.kd_leftover)


def _preference(out: dict, batch: Batch, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's summed answer log-probs of the P chosen and the P rejected sequences."""
    p = batch.pairs
    seq = sequence_logprobs(out["logits"], out["targets"], out["rows_sample"], 2 * p)
    return seq[:p], seq[p:]


def _chosen_ce(out: dict, batch: Batch, cfg, model) -> torch.Tensor:
    chosen = out["rows_sample"] < batch.pairs
    return cross_entropy(out["logits"][chosen], out["targets"][chosen])


@dataclass(frozen=True)
class Term:
    name: str
    weight: str | None  # TrainConfig field (dotted for nested); "" = weight 1; None = a metric
    rows: str | None  # ROW_KINDS: "tokens", "image_tokens", "samples"; None: not a mean over rows
    record: str | None  # the cache record kind it reads
    objective: str  # "distill" | "preference" | "any"
    loss: Callable[[dict, Batch, object, object], torch.Tensor]


TERMS = (
    Term("ce", "ce_weight", "tokens", None, "distill",
         lambda out, batch, cfg, model: cross_entropy(out["logits"], out["targets"])),
    Term("kd", "kd_weight", "tokens", "response", "distill",
         lambda out, batch, cfg, model: token_divergence(out["logits"], batch.response, cfg)),
    Term("visual_kd", "visual_weight", "image_tokens", "visual", "distill",
         lambda out, batch, cfg, model: token_divergence(out["visual_logits"], batch.visual, cfg)),
    Term("relation", "relation_weight", "samples", "relation", "distill",
         lambda out, batch, cfg, model: relation_loss(out["relations"], batch.relation, cfg.relation_pooling)),
    Term("dpo", "", None, "preference", "preference",
         lambda out, batch, cfg, model: preference_loss(*_preference(out, batch, cfg), batch.ref_chosen,
                                                        batch.ref_rejected, "dpo", cfg.beta)),
    Term("kto_pair", "", None, "preference", "preference",
         lambda out, batch, cfg, model: preference_loss(*_preference(out, batch, cfg), batch.ref_chosen,
                                                        batch.ref_rejected, "kto_pair", cfg.beta)),
    Term("margin", None, None, "preference", "preference",  # mean log-prob margin chosen - rejected
         lambda out, batch, cfg, model: (lambda c, r: (c - r).mean().detach())(*_preference(out, batch, cfg))),
    Term("ce", "ce_weight", "tokens", None, "preference", _chosen_ce),  # on the chosen answers
    Term("moe_aux", "moe.aux_weight", None, None, "any", lambda out, batch, cfg, model: moe_aux_loss(model)),
)


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
