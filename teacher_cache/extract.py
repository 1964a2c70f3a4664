"""Teacher outputs -> cache rows: top-k log-probs at supervised positions.

The output head runs only on the rows that become targets: the LLM's final hidden states
are gathered at the supervised rows first, and the head plus log-softmax run in chunks of
rows in fp32. A full [B, T, V] logits tensor (5 GB for 8k tokens x 152k vocabulary in fp32)
is never built. Top-k is taken on the model's device; only [n, k] results cross to the host.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from storage.schema import make_table, token_digest

IGNORE_INDEX = -100


@torch.no_grad()
def final_hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The LLM's last hidden states [B, T, d] (before the output head) for a multimodal
    batch (input_ids, attention_mask, optional pixel_values)."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
    out = model.model(**kwargs, use_cache=False)
    return out.last_hidden_state


@torch.no_grad()
def topk_logprobs(hidden: torch.Tensor, head: torch.nn.Module, k: int, temperature: float = 1.0,
                  chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of log_softmax(head(hidden) / temperature) for rows hidden [N, d]; head is a
    linear output layer, applied in fp32 whatever the model dtype.

    Returns ids int64 [N, k], logprobs float32 [N, k] (descending), and leftover float32
    [N] = the probability mass outside the top k, computed as exp(logsumexp over the other
    entries - logsumexp over all) so it stays accurate when it is tiny (1 - sum(top-k
    probs) would cancel to 0 in float32).
    """
    ids, vals, rest = [], [], []
    # The head itself runs in fp32: in bf16, logits near 20 would round to steps of 0.125.
    weight = head.weight.float()
    bias = head.bias.float() if getattr(head, "bias", None) is not None else None
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = torch.nn.functional.linear(hidden[start:start + chunk_rows].float(), weight, bias)
        if temperature != 1.0:
            logits = logits / temperature
        lse = torch.logsumexp(logits, dim=-1)
        v, i = torch.topk(logits, k, dim=-1)
        rest_lse = torch.logsumexp(logits.scatter(-1, i, float("-inf")), dim=-1)
        ids.append(i)
        vals.append(v - lse[:, None])
        rest.append(torch.exp(rest_lse - lse))
    return torch.cat(ids), torch.cat(vals), torch.cat(rest)


def supervised_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, position) of every supervised token (labels != -100), row-major."""
    b, t = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
    if (t == 0).any():
        raise ValueError("a supervised token at position 0 has no preceding logits")
    return b, t


@torch.no_grad()
def extract_rows(model, batch: dict[str, torch.Tensor], sample_ids: list[str], k: int,
                 temperature: float, image_token_id: int | None) -> pa.Table:
    """Run the teacher on one batch and return its cache rows (storage.schema.ROW_SCHEMA).

    batch tensors are on the model's device; labels mark supervised tokens (unshifted).
    The target of the supervised token at t is the distribution from the logits at t-1.
    """
    hidden = final_hidden_states(model, batch)
    b, t = supervised_rows(batch["labels"])
    ids, lps, left = topk_logprobs(hidden[b, t - 1], model.get_output_embeddings(), k, temperature)
    ids, lps, left = ids.cpu().numpy(), lps.cpu().numpy(), left.cpu().numpy()
    b, t = b.cpu().numpy(), t.cpu().numpy()
    input_ids = batch["input_ids"].cpu().numpy()
    lengths = batch["attention_mask"].sum(-1).cpu().numpy()
    rows = []
    for r, sid in enumerate(sample_ids):
        sel = b == r
        seq = input_ids[r, : lengths[r]]
        rows.append({
            "sample_id": sid,
            "token_digest": token_digest(seq, image_token_id),
            "input_ids": seq,
            "supervised_positions": t[sel],
            "topk_ids": ids[sel],
            "topk_logprobs": lps[sel],
            "leftover": left[sel],
        })
    return make_table(rows)


def to_device(batch: dict[str, np.ndarray], device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """numpy batch -> tensors on device; floating inputs (pixel_values) cast to the model dtype."""
    out = {}
    for key, v in batch.items():
        t = torch.from_numpy(v)
        out[key] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    return out
