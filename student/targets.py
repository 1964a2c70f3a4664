"""The teacher's targets as typed values, and the batch that carries them to the step.

A source produces them: the cache (student.data decodes rows into TopK or Sampled, in the
loader's workers) or the online baseline (student.online runs the teacher on the batch and
gives Dense targets, its hidden states and head, on the step's device). The loss terms (student.terms) read them by
type, whatever the source, so the step never asks where a target came from.

Rows: the targets of a token kind are in the order of the student's rows for that kind
(common.heads): "response" one row per supervised token (labels != -100, row-major),
"visual" one per image token (row-major), the order the cache stores them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class TopK:
    """The teacher's k most probable ids per row: ids int64 [N, k] (a set, any order),
    logprobs float32 [N, k] (nats), leftover float32 [N] (its probability mass outside them)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    leftover: torch.Tensor


@dataclass
class Sampled:
    """Ids drawn from the teacher with replacement: ids int64 [N, D], counts int32 [N, D]
    (how often each was drawn; 0 marks padding). counts / D estimates the teacher's p."""

    ids: torch.Tensor
    counts: torch.Tensor


@dataclass
class Dense:
    """The teacher's whole distribution, as its final hidden states at the N rows [N, d_t]
    and its output head (common.heads.Head over the shared vocabulary): the fused loss
    builds its logits chunk by chunk, never [N, V] at once (online baseline)."""

    hidden: torch.Tensor
    head: object  # common.heads.Head

    def logits(self) -> torch.Tensor:
        """[N, V] float32: the whole logits (small batches and tests only)."""
        return torch.nn.functional.linear(self.hidden, *self.head).float()


Targets = TopK | Sampled | Dense


def _to(value, device, float_dtype):
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=float_dtype) if float_dtype and value.is_floating_point() \
            else value.to(device)
    if isinstance(value, (TopK, Sampled, Dense)):
        return type(value)(*(_to(getattr(value, f.name), device, None) for f in fields(value)))
    if isinstance(value, list):
        return [_to(v, device, None) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device, float_dtype) for k, v in value.items()}
    return value


@dataclass
class Batch:
    """One micro-batch: the student's inputs and, where a source gave them, the teacher's
    targets.

    input_ids, attention_mask, labels: int64 [B, T] (labels unshifted, -100 off the
    supervised tokens); vision: the image inputs of common.preprocess.VISION_KEYS present
    in the batch (empty without images). Distillation: response / visual targets (None when
    not used) and relation, one teacher relation matrix [n, n] per sample. Preference: B = 2P
    sequences (the P chosen, then the P rejected) and ref_chosen / ref_rejected float64 [P],
    the teacher's summed answer log-probs. samples: the batch's Sample / PreferencePair
    objects (evaluation reads their task and answer).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    vision: dict[str, torch.Tensor] = field(default_factory=dict)
    response: Targets | None = None
    visual: Targets | None = None
    relation: list[torch.Tensor] | None = None
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    samples: list = field(default_factory=list)

    def to(self, device, vision_dtype: torch.dtype | None = None) -> "Batch":
        """The batch on `device`; floating image inputs (pixel values) cast to vision_dtype
        (the model's, e.g. bf16) when given."""
        return replace(self, **{f.name: _to(getattr(self, f.name), device, vision_dtype if f.name == "vision" else None)
                                for f in fields(self) if f.name != "samples"})

    @property
    def pairs(self) -> int:
        """P, the preference pairs of a preference batch (0 otherwise)."""
        return 0 if self.ref_chosen is None else int(self.ref_chosen.shape[0])
