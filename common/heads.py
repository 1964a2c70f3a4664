"""The output head's math that the teacher's extraction and the student's losses share.

Both sides must score the same ids at the same rows, so each piece is defined once here:
the head restricted to the shared vocabulary (`output_head`), the rows that become targets
(`supervised_rows`, shifted; `visual_rows`, unshifted), and the relation matrix of RDist
(`relation_matrix`, with `head_gram`). Also the model dtypes every config names.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mmkd.common.preprocess import IGNORE_INDEX

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Head(NamedTuple):
    """An output head restricted to the shared vocabulary: weight [V, d], bias [V] or None
    (views of the model's head, no copy; apply with torch.nn.functional.linear)."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def output_head(model, vocab_size: int | None = None) -> Head:
    """The model's output head over ids < vocab_size (the cache's shared vocabulary; None =
    every row). Teacher and student heads may be padded to different sizes (152,064 vs
    151,936): both sides score the same ids, so the padded rows never enter a softmax."""
    head = model.get_output_embeddings()
    rows = head.weight.shape[0]
    if vocab_size is not None and vocab_size > rows:
        raise ValueError(f"the output head has {rows} rows, fewer than the shared vocabulary ({vocab_size} ids)")
    v = rows if vocab_size is None else vocab_size
    bias = getattr(head, "bias", None)
    return Head(head.weight[:v], None if bias is None else bias[:v])


def supervised_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, position) of every supervised token (labels != IGNORE_INDEX) of labels
    [B, T], row-major: the order of the cache's response targets. The logits that predict
    the token at t are those at t - 1."""
    b, t = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
    if (t == 0).any():
        raise ValueError("a supervised token at position 0 has no preceding logits")
    return b, t


def visual_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, position) of every visual (image) token of [B, T], row-major: the order
    of the cache's visual targets (unshifted: the logits AT t)."""
    if image_token_id is None:
        return torch.nonzero(torch.zeros_like(input_ids, dtype=torch.bool), as_tuple=True)
    return torch.nonzero((input_ids == image_token_id) & attention_mask.bool(), as_tuple=True)


def head_gram(weight: torch.Tensor) -> torch.Tensor:
    """G = W^T W [d, d] in fp32 of an output head's weight W [V, d]: computed once (per
    teacher, or per student step), it turns every relation matrix into H G H^T."""
    w = weight.float()
    return w.T @ w


def relation_matrix(hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor | None = None,
                    gram: torch.Tensor | None = None) -> torch.Tensor:
    """R = Z Z^T for Z = hidden @ W^T (+ b), the raw logits at n positions. The one
    definition of R, used by the teacher pass (teacher_cache.extract) and by RDist.

    hidden [n, d], head_weight W [V, d], head_bias b [V] or None. Computed as
    H G H^T with the Gram matrix G = W^T W [d, d] (pass it in to reuse it across samples;
    head_gram), plus, with a bias, a 1^T + 1 a^T + b.b with a = H W^T b:
    O(V d^2) once, then O(n d^2 + n^2 d) per sample, and no [n, V] tensor. fp32 whatever
    the inputs' dtype. Returns [n, n].
    """
    h = hidden.float()
    if gram is None:
        gram = head_gram(head_weight)
    r = h @ gram @ h.T
    if head_bias is not None:
        b = head_bias.float()
        a = h @ (head_weight.float().T @ b)
        r = r + a[:, None] + a[None, :] + b @ b
    return r
