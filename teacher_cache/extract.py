"""Teacher outputs -> cache rows: top-k log-probs (or sampled ids) at supervised positions
(response) and at visual positions (MDist), relation matrices at visual positions (RDist),
and answer log-probs of preference pairs.

The output head runs only on the rows that become targets: the LLM's final hidden states
are gathered at the supervised rows first, and the head plus log-softmax run in chunks of
rows in fp32. A full [B, T, V] logits tensor (5 GB for 8k tokens x 152k vocabulary in fp32)
is never built. Top-k is taken on the model's device; only [n, k] results cross to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from mmkd.common.heads import Head, head_gram, output_head, relation_matrix, supervised_rows, visual_rows
from mmkd.common.preprocess import VISION_KEYS
from mmkd.storage.schema import MODES, RECORD_KINDS, CacheRow, Preference, TokenTargets, token_digest
from mmkd.storage.tables import raw_table


def parse_records(records: str) -> list[str]:
    """'response,visual' -> ['response', 'visual'] in canonical order; checked."""
    kinds = [k.strip() for k in records.split(",") if k.strip()]
    bad = [k for k in kinds if k not in RECORD_KINDS]
    if bad or not kinds:
        raise ValueError(f"records {records!r}: choose from {', '.join(RECORD_KINDS)} (comma separated)")
    if "preference" in kinds and len(kinds) > 1:
        raise ValueError("records: 'preference' reads preference pairs and cannot be combined with "
                         f"{[k for k in kinds if k != 'preference']}; make a separate cache for the pairs")
    return [k for k in RECORD_KINDS if k in kinds]


@dataclass(frozen=True)
class ExtractionSpec:
    """What the teacher pass extracts (the manifest's `extraction`, less its bookkeeping).

    records: the record kinds (parse_records). mode: "topk" keeps the k most probable ids
    per position; "sampled" draws `draws` ids from the teacher (seeded by the caller's
    generator). temperature: the teacher's softmax temperature. vocab_size: the shared
    vocabulary (common.check.shared_vocab_size); head rows beyond it are left out (None:
    every row)."""

    records: tuple[str, ...] = ("response",)
    mode: str = "topk"
    k: int = 64
    draws: int = 32
    temperature: float = 1.0
    vocab_size: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: choose one of {MODES}")


@torch.no_grad()
def final_hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The LLM's last hidden states [B, T, d] (before the output head) for a multimodal
    batch (input_ids, attention_mask, and the family's vision inputs when there are images)."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", *VISION_KEYS) if k in batch}
    out = model.model(**kwargs, use_cache=False)
    return out.last_hidden_state


def _chunk_logits(hidden: torch.Tensor, head: Head, chunk_rows: int, temperature: float = 1.0):
    """(start row, fp32 logits [n, V] / temperature) for chunks of chunk_rows rows of hidden
    [N, d]. The head runs in fp32 whatever the model dtype: in bf16, logits near 20 would
    round to steps of 0.125."""
    weight = head.weight.float()
    bias = head.bias.float() if head.bias is not None else None
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = torch.nn.functional.linear(hidden[start:start + chunk_rows].float(), weight, bias)
        yield start, (logits / temperature if temperature != 1.0 else logits)


@torch.no_grad()
def topk_logprobs(hidden: torch.Tensor, head: Head, k: int, temperature: float = 1.0,
                  chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of log_softmax(head(hidden) / temperature) for rows hidden [N, d]; head is a
    linear output layer (weight, bias), applied in fp32 whatever the model dtype.

    Returns ids int64 [N, k], logprobs float32 [N, k] (descending), and leftover float32
    [N] = the probability mass outside the top k, computed as exp(logsumexp over the other
    entries - logsumexp over all) so it stays accurate when it is tiny (1 - sum(top-k
    probs) would cancel to 0 in float32).
    """
    ids, vals, rest = [], [], []
    for _, logits in _chunk_logits(hidden, head, chunk_rows, temperature):
        v, i = torch.topk(logits, k, dim=-1)
        # one pass over the vocabulary after top-k: the rest's logsumexp on the logits with the
        # top k masked in place, then the total from it and the k values (no second full pass)
        rest_lse = torch.logsumexp(logits.scatter_(-1, i, float("-inf")), dim=-1)
        lse = torch.logaddexp(rest_lse, torch.logsumexp(v, dim=-1))
        ids.append(i)
        vals.append(v - lse[:, None])
        rest.append(torch.exp(rest_lse - lse))
    return torch.cat(ids), torch.cat(vals), torch.cat(rest)


@torch.no_grad()
def sampled_ids(hidden: torch.Tensor, head: Head, draws: int, temperature: float = 1.0,
                generator: torch.Generator | None = None, chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `draws` ids per row from softmax(head(hidden) / temperature) with replacement
    (the Sparse Logit Sampling estimator: count / draws is unbiased for the probability).

    Returns ids int64 [N, draws] and counts int32 [N, draws]: each row's distinct ids with
    how often each was drawn, left-aligned; the remaining entries have count 0 (padding).
    """
    ids, counts = [], []
    for _, logits in _chunk_logits(hidden, head, chunk_rows, temperature):
        probs = torch.softmax(logits, dim=-1)
        drawn = torch.sort(torch.multinomial(probs, draws, replacement=True, generator=generator), dim=-1).values
        new = torch.ones_like(drawn, dtype=torch.bool)
        new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
        slot = torch.cumsum(new.long(), dim=-1) - 1  # index of each draw's distinct id in its row
        ids.append(torch.zeros_like(drawn).scatter_(1, slot, drawn))
        counts.append(torch.zeros_like(drawn, dtype=torch.int32).scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.int32)))
    return torch.cat(ids), torch.cat(counts)


@torch.no_grad()
def token_logprobs(hidden: torch.Tensor, head: Head, targets: torch.Tensor,
                   chunk_rows: int = 1024) -> torch.Tensor:
    """log softmax(head(hidden))[target] for rows hidden [N, d], targets [N]: float32 [N],
    chunked over rows, head in fp32."""
    out = []
    for start, logits in _chunk_logits(hidden, head, chunk_rows):
        out.append(torch.log_softmax(logits, -1).gather(-1, targets[start:start + chunk_rows, None])[:, 0])
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _targets(hidden_rows: torch.Tensor, head: Head, spec: ExtractionSpec, generator) -> dict:
    """Top-k or sampled targets of rows hidden_rows [n, d], as numpy arrays."""
    if spec.mode == "topk":
        ids, lps, left = (x.cpu().numpy() for x in topk_logprobs(hidden_rows, head, spec.k, spec.temperature))
        return {"ids": ids, "logprobs": lps, "leftover": left}
    ids, counts = (x.cpu().numpy() for x in sampled_ids(hidden_rows, head, spec.draws, spec.temperature, generator))
    return {"ids": ids, "counts": counts}


def _per_sample(b: torch.Tensor, t: torch.Tensor, targets: dict, n: int) -> list[TokenTargets]:
    """Split row-major targets of rows (b, t) into one TokenTargets per batch sample."""
    b, t = b.cpu().numpy(), t.cpu().numpy()
    return [TokenTargets(t[b == r], **{name: a[b == r] for name, a in targets.items()}) for r in range(n)]


@torch.no_grad()
def extract_rows(model, batch: dict[str, torch.Tensor], sample_ids: list[str], image_token_id: int | None,
                 spec: ExtractionSpec = ExtractionSpec(), generator: torch.Generator | None = None,
                 gram: torch.Tensor | None = None) -> pa.Table:
    """Run the teacher on one batch and return spec.records as a RAW_SCHEMA table
    (storage.schema), one row per sample:

    - "response": for the supervised token at t, the distribution of the logits at t-1
      (top-k log-probs + leftover, spec.mode "topk"; or sampled ids + counts, "sampled",
      drawn with `generator`);
    - "visual": the same at every image-token position t, from the logits AT t (MDist);
    - "relation": R = Z Z^T of the raw logits Z at the image-token positions, computed as
      H G H^T (gram = head_gram(head weight), pass it to compute it once per teacher).

    batch tensors are on the model's (input) device; labels mark supervised tokens
    (unshifted). The head is restricted to spec.vocab_size (its padded rows are left out).
    The LLM body runs once; the output head only on the rows that become targets.
    """
    head = output_head(model, spec.vocab_size)
    records = spec.records
    # under a device_map the last hidden states live on the head's device, not the input's
    hidden = final_hidden_states(model, batch).to(head.weight.device)
    batch = {k: v.to(head.weight.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    n = len(sample_ids)
    kinds: dict[str, list] = {}
    if "response" in records:
        b, t = supervised_rows(batch["labels"])
        kinds["response"] = _per_sample(b, t, _targets(hidden[b, t - 1], head, spec, generator), n)
    if "visual" in records or "relation" in records:
        b, t = visual_rows(batch["input_ids"], batch["attention_mask"], image_token_id)
    if "visual" in records:
        kinds["visual"] = _per_sample(b, t, _targets(hidden[b, t], head, spec, generator), n)
    if "relation" in records:
        if gram is None:
            gram = head_gram(head.weight)
        kinds["relation"] = [relation_matrix(hidden[r, t[b == r]], head.weight, head.bias, gram).cpu().numpy()
                             if (b == r).any() else np.zeros((0, 0), np.float32) for r in range(n)]
    input_ids = batch["input_ids"].cpu().numpy()
    lengths = batch["attention_mask"].sum(-1).cpu().numpy()
    rows = []
    for r, sid in enumerate(sample_ids):
        seq = input_ids[r, : lengths[r]]
        rows.append(CacheRow(sid, token_digest(seq, image_token_id), seq,
                             **{kind: values[r] for kind, values in kinds.items()}))
    return raw_table(rows)


@torch.no_grad()
def extract_preference_rows(model, batch: dict[str, torch.Tensor], pair_ids: list[str],
                            image_token_id: int | None, vocab_size: int | None = None) -> pa.Table:
    """The teacher as the reference model of preference distillation: for P pairs, batch
    holds 2P sequences, the P chosen then the P rejected (same order as pair_ids), with
    labels on the answer tokens. Returns one RAW row per pair: the chosen sequence's ids
    and the summed and per-token log-probs of both answers (shifted: the logits at t-1
    score the token at t)."""
    head = output_head(model, vocab_size)
    hidden = final_hidden_states(model, batch).to(head.weight.device)
    labels = batch["labels"].to(head.weight.device)
    b, t = supervised_rows(labels)
    lp = token_logprobs(hidden[b, t - 1], head, labels[b, t]).cpu().numpy()
    b = b.cpu().numpy()
    input_ids = batch["input_ids"].cpu().numpy()
    lengths = batch["attention_mask"].sum(-1).cpu().numpy()
    p = len(pair_ids)
    rows = []
    for r, pid in enumerate(pair_ids):
        chosen, rejected = lp[b == r], lp[b == p + r]
        seq = input_ids[r, : lengths[r]]
        pref = Preference(float(chosen.astype(np.float64).sum()), float(rejected.astype(np.float64).sum()),
                          chosen, rejected, token_digest(input_ids[p + r, : lengths[p + r]], image_token_id))
        rows.append(CacheRow(pid, token_digest(seq, image_token_id), seq, preference=pref))
    return raw_table(rows)


def to_device(batch: dict[str, np.ndarray], device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """numpy batch -> tensors on device; floating inputs (pixel_values) cast to the model dtype."""
    out = {}
    for key, v in batch.items():
        t = torch.from_numpy(v)
        out[key] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    return out
