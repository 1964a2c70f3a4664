"""The student's forward at the rows its loss terms use.

The rows are those of the teacher's extraction (common.heads: supervised_rows shifted,
visual_rows unshifted), so the i-th student row meets the i-th cached target. The output
head runs on those rows only, never on all [B, T] positions, and never builds their [N, V]
logits at once (student.fused).
"""

from __future__ import annotations

import torch

from mmkd.common.heads import head_gram, output_head, relation_matrix, supervised_rows, visual_rows
from mmkd.common.preprocess import VISION_KEYS
from mmkd.student.fused import TokenTerm, head_top1, token_losses
from mmkd.student.fused import token_logprobs as fused_token_logprobs


class StudentOutputs(torch.nn.Module):
    """Wraps a multimodal model: forward(...) -> dict of what the loss terms need. The output
    head runs only on the rows they use, chunk by chunk (student.fused): no [N, V] logits,
    over the cache's shared vocabulary (vocab_size; None = every head row).

    Rows: "response", the N rows that predict the supervised tokens (shifted, t-1 for t),
    row-major; "visual", the M image-token positions (unshifted), row-major.

    terms: {row set: [student.fused.TokenTerm]}: the token loss terms, computed with their
        coefficients by the fused head + loss. Returned: loss (their weighted sum, to
        backward), values {name: the term's mean over its rows} (detached).
    Always returned: targets [N] the supervised token ids, rows_sample [N] the batch index
        of each response row.
    relation: relations, per sample R = Z Z^T [n, n] of the raw logits at its image tokens,
        as H (W^T W) H^T (common.heads.relation_matrix; gradients reach H and W).
    token_logprobs: token_logprobs [N], log q of each supervised token (differentiable).
    argmax: argmax [N], the most probable id at each response row, and argmax_logprob [N]
        float32, its log-probability (nats).
    hidden_rows: hidden {row set: [rows, d]} and head (the online teacher's targets).
    vision: the batch's image inputs (pixel_values and the family's image_sizes /
        image_grid_thw, see common.preprocess.VISION_KEYS), or None for text-only batches.
    The head's weight is used only inside this forward: ZeRO-3 gathers it for this module's
    forward and backward (student.parallel).
    """

    def __init__(self, model, image_token_id: int, vocab_size: int | None = None):
        super().__init__()
        self.model = model
        self.image_token_id = image_token_id
        self.vocab_size = vocab_size

    def forward(self, input_ids, attention_mask, labels, vision: dict | None = None,
                terms: dict[str, list[TokenTerm]] | None = None, relation: bool = False, token_logprobs: bool = False,
                argmax: bool = False, hidden_rows: bool = False) -> dict:
        hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask, **(vision or {}),
                                  use_cache=False).last_hidden_state
        head = output_head(self.model, self.vocab_size)
        b, t = supervised_rows(labels)
        rows = {"response": hidden[b, t - 1]}
        out = {"targets": labels[b, t], "rows_sample": b, "values": {}, "loss": hidden.new_zeros(())}
        if relation or "visual" in (terms or {}) or hidden_rows:
            vb, vt = visual_rows(input_ids, attention_mask, self.image_token_id)
            rows["visual"] = hidden[vb, vt]
        for at, ts in (terms or {}).items():
            total, values = token_losses(rows[at], head, ts)
            out["loss"] = out["loss"] + total
            out["values"].update(values)
        if token_logprobs:
            out["token_logprobs"] = fused_token_logprobs(rows["response"], head, out["targets"])
        if argmax:
            out["argmax"], out["argmax_logprob"] = head_top1(rows["response"], head)
        if hidden_rows:
            out["hidden"], out["head"] = rows, head
        if relation:
            gram = head_gram(head.weight)  # once per step, shared by the batch's samples
            out["relations"] = [relation_matrix(hidden[r, vt[vb == r]], head.weight, head.bias, gram)
                                for r in range(input_ids.shape[0])]
        return out


def vision_inputs(batch: dict, dtype: torch.dtype | None = None) -> dict | None:
    """The image inputs of a collated batch (None without images); floating ones (pixel
    values) cast to the model's dtype."""
    vision = {k: batch[k] for k in VISION_KEYS if k in batch}
    if dtype is not None:
        vision = {k: v.to(dtype) if v.is_floating_point() else v for k, v in vision.items()}
    return vision or None
