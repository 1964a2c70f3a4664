"""The student's forward at the rows its loss terms use.

The rows are those of the teacher's extraction (common.heads: supervised_rows shifted,
visual_rows unshifted), so the i-th student row meets the i-th cached target. The output
head runs on those rows only, never on all [B, T] positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkd.common.heads import head_gram, output_head, relation_matrix, supervised_rows, visual_rows
from mmkd.common.preprocess import VISION_KEYS


class StudentOutputs(torch.nn.Module):
    """Wraps a multimodal model: forward(...) -> dict of what the loss terms need; the output
    head runs only on the rows they use (never on all [B, T] positions), over the cache's
    shared vocabulary (vocab_size; None = every head row).

    logits [N, V]: at the rows that predict the N supervised tokens (shifted, t-1 for t),
        row-major; targets [N] their token ids; rows_sample [N] the batch index of each.
    visual_logits [M, V] (visual=True): AT the M image-token positions (unshifted), row-major.
    relations (relation=True): per sample, R = Z Z^T [n, n] of the raw logits at its image
        tokens, as H (W^T W) H^T (common.heads.relation_matrix; gradients reach H and W).
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

    def forward(self, input_ids, attention_mask, labels, vision: dict | None = None, visual: bool = False,
                relation: bool = False) -> dict:
        hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask, **(vision or {}),
                                  use_cache=False).last_hidden_state
        head = output_head(self.model, self.vocab_size)
        b, t = supervised_rows(labels)
        out = {"logits": F.linear(hidden[b, t - 1], *head), "targets": labels[b, t], "rows_sample": b}
        if visual or relation:
            vb, vt = visual_rows(input_ids, attention_mask, self.image_token_id)
        if visual:
            out["visual_logits"] = F.linear(hidden[vb, vt], *head)
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
