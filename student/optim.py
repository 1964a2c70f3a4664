"""The optimizer and the learning-rate schedule of a training stage, from its config.

`optimizer`: "adamw" (decoupled weight decay, the seed recipes') or "adam" (weight decay
added to the gradient, L2), both torch's with `adam_beta1`, `adam_beta2`, `adam_epsilon`
(torch optimizers: DeepSpeed compiles nothing for them).

`lr_schedule`: the learning rate of optimizer step s (0-based) of `total` is lr * f(s):
linear warmup over the first w = max(1, int(warmup_ratio * total)) steps,
f(s) = (s + 1) / w, then with p = (s - w) / (total - w):
    cosine    f = (1 + cos(pi * p)) / 2     (the seed recipes' schedule)
    linear    f = 1 - p
    constant  f = 1
so the first step trains (f > 0) and the decay reaches 0 at step `total`, one after the last.
"""

from __future__ import annotations

import math
from functools import partial

import torch

OPTIMIZERS = ("adamw", "adam")
LR_SCHEDULES = ("cosine", "linear", "constant")


def build_optimizer(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """The torch optimizer of cfg.optimizer over the parameter groups (lr and weight decay
    from cfg unless a group sets its own)."""
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2),
                  eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, **kwargs)
    raise ValueError(f"optimizer {cfg.optimizer!r}: choose one of {OPTIMIZERS}")


def warmup_steps(total: int, warmup_ratio: float) -> int:
    return max(1, int(warmup_ratio * total))


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine") -> float:
    """f(step), the multiple of the base learning rate at optimizer step `step` (0-based);
    see the module docstring."""
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * p))
    if schedule == "linear":
        return 1.0 - p
    if schedule == "constant":
        return 1.0
    raise ValueError(f"lr_schedule {schedule!r}: choose one of {LR_SCHEDULES}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """cfg.lr_schedule with cfg.warmup_ratio over total_steps optimizer steps (DeepSpeed
    steps it once per optimizer step, after the step)."""
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule {cfg.lr_schedule!r}: choose one of {LR_SCHEDULES}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, total=total_steps, warmup=warmup_steps(total_steps, cfg.warmup_ratio), schedule=cfg.lr_schedule))
