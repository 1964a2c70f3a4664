"""Teacher outputs -> cache rows: top-k log-probs (or sampled ids) at supervised positions.

The output head runs only on the rows that become targets: the LLM's final hidden states
are gathered at the supervised rows first, and the head plus log-softmax run in chunks of
rows in fp32. A full [B, T, V] logits tensor (5 GB for 8k tokens x 152k vocabulary in fp32)
is never built. Top-k is taken on the model's device; only [n, k] results cross to the host.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from storage.schema import CacheRow, TokenTargets, token_digest
from storage.tables import raw_table

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


@torch.no_grad()
def sampled_ids(hidden: torch.Tensor, head: torch.nn.Module, draws: int, temperature: float = 1.0,
                generator: torch.Generator | None = None, chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `draws` ids per row from softmax(head(hidden) / temperature) with replacement
    (the Sparse Logit Sampling estimator: count / draws is unbiased for the probability).

    Returns ids int64 [N, draws] and counts int32 [N, draws]: each row's distinct ids with
    how often each was drawn, left-aligned; the remaining entries have count 0 (padding).
    """
    weight = head.weight.float()
    bias = head.bias.float() if getattr(head, "bias", None) is not None else None
    ids, counts = [], []
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = torch.nn.functional.linear(hidden[start:start + chunk_rows].float(), weight, bias)
        probs = torch.softmax(logits / temperature, dim=-1)
        drawn = torch.sort(torch.multinomial(probs, draws, replacement=True, generator=generator), dim=-1).values
        new = torch.ones_like(drawn, dtype=torch.bool)
        new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
        slot = torch.cumsum(new.long(), dim=-1) - 1  # index of each draw's distinct id in its row
        ids.append(torch.zeros_like(drawn).scatter_(1, slot, drawn))
        counts.append(torch.zeros_like(drawn, dtype=torch.int32).scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.int32)))
    return torch.cat(ids), torch.cat(counts)


def supervised_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, position) of every supervised token (labels != -100), row-major."""
    b, t = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
    if (t == 0).any():
        raise ValueError("a supervised token at position 0 has no preceding logits")
    return b, t


@torch.no_grad()
def extract_rows(model, batch: dict[str, torch.Tensor], sample_ids: list[str], image_token_id: int | None,
                 mode: str = "topk", k: int = 64, draws: int = 32, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> pa.Table:
    """Run the teacher on one batch and return its response targets as a RAW_SCHEMA table
    (storage.schema): top-k log-probs + leftover (mode="topk") or sampled ids + counts
    (mode="sampled").

    batch tensors are on the model's device; labels mark supervised tokens (unshifted).
    The target of the supervised token at t is the distribution from the logits at t-1.
    """
    hidden = final_hidden_states(model, batch)
    b, t = supervised_rows(batch["labels"])
    head = model.get_output_embeddings()
    if mode == "topk":
        ids, lps, left = (x.cpu().numpy() for x in topk_logprobs(hidden[b, t - 1], head, k, temperature))
        counts = None
    elif mode == "sampled":
        ids, counts = (x.cpu().numpy() for x in sampled_ids(hidden[b, t - 1], head, draws, temperature, generator))
        lps = left = None
    else:
        raise ValueError(f"mode {mode!r}: choose topk or sampled")
    b, t = b.cpu().numpy(), t.cpu().numpy()
    input_ids = batch["input_ids"].cpu().numpy()
    lengths = batch["attention_mask"].sum(-1).cpu().numpy()
    rows = []
    for r, sid in enumerate(sample_ids):
        sel = b == r
        seq = input_ids[r, : lengths[r]]
        pick = (lambda a: a[sel] if a is not None else None)  # noqa: E731
        rows.append(CacheRow(sid, token_digest(seq, image_token_id), seq,
                             response=TokenTargets(t[sel], ids[sel], pick(lps), pick(left), pick(counts))))
    return raw_table(rows)


def to_device(batch: dict[str, np.ndarray], device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """numpy batch -> tensors on device; floating inputs (pixel_values) cast to the model dtype."""
    out = {}
    for key, v in batch.items():
        t = torch.from_numpy(v)
        out[key] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    return out
