"""Data parallelism for the training recipe: loss terms as means over the GLOBAL batch,
the DeepSpeed config (ZeRO stage, bf16, accumulation), and what ZeRO-3 needs.

The global batch of one optimizer step is every rank's grad_accum micro-batches:
batch_size x grad_accum x world samples. DeepSpeed turns the micro-losses into a gradient as

    grad = 1/W sum_r 1/G sum_m d loss[r, m]       (W ranks, G = grad_accum micro-batches)

(its backward divides each micro-loss by G, its all-reduce averages over the W ranks). A
term that is a mean over its rows (CE and response KD over supervised tokens, visual KD
over image tokens, per-sample RDist over samples) has mean[r, m] = S[r, m] / n[r, m] with a
row count n that differs between micro-batches, so the mean of those means is not the mean
over the global batch. StepMeans counts each term's rows in the step's micro-batches,
all-reduces the counts (one small tensor per step) to N = sum_{r,m} n[r, m], and makes the
micro-loss

    loss[r, m] = mean[r, m] * n[r, m] * W * G / N

so that grad = d (sum_{r,m} S[r, m]) / N: the gradient of the global mean, the same for
any split of the global batch over ranks and micro-batches (tested: 2 ranks x batch B and
1 rank x B x grad_accum 2 give 1 rank x 2B's loss curve).

Terms that are not a sum over rows keep their per-micro-batch mean (factor 1), so they are
the mean over the W x G micro-batches: RDist with relation_pooling "batch" (one cosine over
the micro-batch), the MoE load-balancing loss (per-batch routing statistics), and the
preference losses (a mean over pairs, which every micro-batch has equally many of; exact
for DPO, while KTO-pair's KL baselines are micro-batch means).

ZeRO-3 keeps 1/W of each parameter on each rank and gathers a module's parameters for its
forward and backward. StudentOutputs applies the output head's weight itself (F.linear on
the rows the losses use, W^T W for the relations) rather than calling the head module;
DeepSpeed (0.19.8) registers a parameter read inside a module's forward as an "external
parameter" of that module (its parameter-dict getter), so the head is gathered for the
wrapper's forward and backward without code here (tested: stage 3 with every parameter
partitioned gives stage 0's loss curve and weights). Saving gathers the whole model
(full_parameters).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from mmkd.common.heads import DTYPES
from mmkd.common.preprocess import IGNORE_INDEX

ROW_KINDS = ("tokens", "image_tokens", "samples")
ZERO_STAGES = (0, 1, 2, 3)
# the model dtypes training runs in: fp32, or DeepSpeed's bf16 mode (fp16 would need loss scaling)
TRAIN_DTYPES = tuple(d for d in DTYPES if d != "float16")


def row_counts(batch, image_token_id: int | None) -> torch.Tensor:
    """float64 [len(ROW_KINDS)]: one micro-batch's (student.targets.Batch) supervised tokens
    (of the chosen answers for preference batches, which the CE term covers), image tokens
    (none for text-only models, image_token_id None), and samples."""
    labels = batch.labels[: batch.pairs] if batch.pairs else batch.labels  # the P chosen sequences come first
    images = 0 if image_token_id is None else \
        int(((batch.input_ids == image_token_id) & batch.attention_mask.bool()).sum())
    return torch.tensor([int((labels != IGNORE_INDEX).sum()), images, batch.input_ids.shape[0]], dtype=torch.float64)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _world() > 1:
        dist.all_reduce(t)
    return t


class StepMeans:
    """One optimizer step's loss terms as means over the global batch (module docstring).

    counts: row_counts() of this rank's G micro-batches of the step (all-reduced here, a
    collective: every rank constructs one per step). rows: the row kind of each term that
    is a mean over rows (student.terms.row_kind). weights: the loss weight of each term;
    terms without a weight are logged only (metrics).
    """

    def __init__(self, counts: list[torch.Tensor], rows: dict[str, str], weights: dict[str, float],
                 device: str | torch.device):
        self.k = _world() * len(counts)  # DeepSpeed averages this many micro-losses
        local = torch.stack(counts).to(device)  # [G, len(ROW_KINDS)]
        total = _all_reduce_sum(local.sum(0)).clamp_min(1)  # no rows anywhere: the term is 0 anyway
        self.scales = [dict(zip(ROW_KINDS, (c * self.k / total).tolist())) for c in local]
        self.rows, self.weights = rows, weights
        self.sums: dict[str, torch.Tensor] = {}  # this rank's share of each global value

    def coefficients(self, i: int) -> dict[str, float]:
        """Each weighted term's coefficient in micro-batch i's loss: weight x its global-batch
        scale (terms that are not a mean over rows: weight x 1)."""
        return {name: w * (self.scales[i][self.rows[name]] if name in self.rows else 1.0)
                for name, w in self.weights.items()}

    def record(self, i: int, values: dict[str, torch.Tensor]) -> None:
        """Remember micro-batch i's term values (each the mean over its rows) as their
        shares of the step's logged global values."""
        for name, value in values.items():
            scale = self.scales[i][self.rows[name]] if name in self.rows else 1.0
            share = value.detach().double() * (scale / self.k)
            self.sums[name] = self.sums[name] + share if name in self.sums else share

    def logged(self) -> dict[str, float]:
        """The step's global term values (every rank gets the same; a collective) and
        "loss", their weighted sum: the function whose gradient the step applied."""
        names = list(self.sums)
        values = _all_reduce_sum(torch.stack([self.sums[n] for n in names])).tolist()
        out = dict(zip(names, values))
        return {"loss": sum(self.weights[n] * v for n, v in out.items() if n in self.weights), **out}


def micro_batch_groups(loader, grad_accum: int):
    """The loader's batches in lists of grad_accum (one optimizer step each); an incomplete
    last group is dropped, so a step never spans two epochs."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []


def per_rank(value: int, device: str | torch.device) -> list[int]:
    """value from every rank, in rank order (a collective)."""
    if _world() == 1:
        return [value]
    mine = torch.tensor([value], device=device)
    out = [torch.zeros_like(mine) for _ in range(_world())]
    dist.all_gather(out, mine)
    return [int(t) for t in out]


# the keys mmkd sets from its own flags: a user's DeepSpeed JSON may repeat them only with
# the same value; (path in the JSON, flag)
MMKD_KEYS = ((("train_micro_batch_size_per_gpu",), "batch_size"), (("gradient_accumulation_steps",), "grad_accum"),
             (("gradient_clipping",), "grad_clip"), (("zero_optimization", "stage"), "zero_stage"),
             (("bf16", "enabled"), "dtype"))
REFUSED_KEYS = ("optimizer", "scheduler", "train_batch_size", "fp16")  # mmkd's own optimizer, schedule and dtype


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg) -> dict:
    """The DeepSpeed config of a TrainConfig: micro-batch per rank, accumulation, clipping,
    ZeRO stage, bf16 (the optimizer and schedule are torch objects, student.optim), merged
    over cfg.deepspeed (a user's JSON file: offload, bucket sizes, ... are kept). The JSON
    may repeat a key mmkd sets only with the same value, and may not set the optimizer,
    scheduler, train_batch_size or fp16: ConfigError naming the key and the flag."""
    import json

    from mmkd.common.config import ConfigError

    ours = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "steps_per_print": 1 << 30,
    }
    if not getattr(cfg, "deepspeed", None):
        return ours
    try:
        with open(cfg.deepspeed) as f:
            user = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--deepspeed {cfg.deepspeed!r}: cannot read it as JSON ({e})") from e
    if not isinstance(user, dict):
        raise ConfigError(f"--deepspeed {cfg.deepspeed!r}: expected a JSON object of DeepSpeed settings")
    for key in REFUSED_KEYS:
        if key in user:
            raise ConfigError(f"--deepspeed {cfg.deepspeed!r} sets {key!r}: mmkd builds the optimizer and LR schedule "
                              "itself (--optimizer, --lr, --lr-schedule), the global batch from --batch-size x "
                              "--grad-accum x ranks and the dtype from --dtype; remove it from the JSON")
    for path, flag in MMKD_KEYS:
        node, want = user, ours
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
            want = want[k]
        if node is not None and node != want and node != "auto":
            raise ConfigError(f"--deepspeed {cfg.deepspeed!r} sets {'.'.join(path)} = {node!r} but "
                              f"--{flag.replace('_', '-')} gives {want!r}: set it with the flag (or drop it from "
                              "the JSON)")
    merged = _merge(user, ours)
    for path, _ in MMKD_KEYS:  # "auto" in the JSON means: mmkd's value
        node = merged
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = _dig(ours, path)
    return merged


def _dig(d: dict, path: tuple) -> object:
    for k in path:
        d = d[k]
    return d


def check_zero_stage(zero_stage: int, is_moe: bool) -> None:
    """Refuse what DeepSpeed cannot train: its MoE layer under ZeRO-3."""
    if is_moe and zero_stage == 3:
        raise ValueError("zero_stage 3 cannot train an MoE student: DeepSpeed's MoE layer (deepspeed.moe.layer.MoE) "
                         "is not supported with ZeRO stage 3. Use zero_stage 1 or 2 (they shard the optimizer "
                         "state and gradients, the experts' included)")


def full_parameters(model, zero_stage: int):
    """A context in which the model's parameters are whole on every rank (ZeRO-3 keeps a
    1/W slice of each), e.g. to save it. Under ZeRO-3 a collective: every rank enters."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
