"""The training recipe: supervised (CE) and mimic distillation from a teacher cache.

Reads top to bottom: config -> distributed setup -> data -> model -> DeepSpeed engine ->
loop (forward at supervised rows, CE + sparse KL, backward, step) -> save. The same recipe
trains the demo's teacher (no cache, CE only) and the students.

Loss per step:  ce_weight * CE  +  kd_weight * KL(teacher || student) on the cached top-k,
both averaged over the batch's supervised tokens. The teacher's weights are never opened:
its targets come from the cache rows (storage/) alone.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from pipelines.preprocess import IGNORE_INDEX
from pipelines.samples import read_llava
from storage.reader import TeacherCache
from student.data import DistillDataset, check_student_vocab, collate_items, rank_batches
from student.losses import LEFTOVER_MODES, cross_entropy, sampled_kd, sparse_forward_kl
from student.model import LlavaArch, build_llava


@dataclass
class TrainConfig:
    data: str = ""  # LLaVA conversation JSON/JSONL of training samples
    image_root: str = ""  # folder the samples' image paths are relative to
    processor: str = ""  # processor folder (tokenizer, chat template, image processor)
    output_dir: str = ""  # where the trained model (HF folder) and logs go
    cache: str | None = None  # teacher cache folder; None trains with CE only
    init_from: str | None = None  # start from this saved model instead of random weights
    arch: LlavaArch = field(default_factory=LlavaArch)  # sizes when building from scratch
    subset: int = 0  # train on the first N samples after a seeded shuffle; 0 = all
    ce_weight: float = 1.0
    kd_weight: float = 1.0  # used only with a cache
    kd_leftover: str = "bucket"  # "bucket" or "renormalize", see student.losses
    epochs: int = 1
    max_steps: int = 0  # stop after this many optimizer steps; 0 = run all epochs
    batch_size: int = 32  # per rank, per micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    zero_stage: int = 0  # DeepSpeed ZeRO stage (0-2)
    dtype: str = "float32"  # or "bfloat16"
    max_length: int = 256
    num_workers: int = 1  # data loader processes encoding samples while the step runs
    keep_encoded: bool = False  # keep encoded samples in memory (small data, many epochs; needs num_workers=0)
    seed: int = 0
    log_every: int = 50


def setup_distributed() -> tuple[int, int, str]:
    """(rank, world size, device) after initialising torch.distributed through DeepSpeed.

    Under a plain `python` process the single-rank environment is filled in, so DeepSpeed
    does not go looking for MPI; the `deepspeed` launcher and torchrun set it themselves.
    """
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    import deepspeed

    if not cuda and os.environ.get("WORLD_SIZE") == "1":
        # DeepSpeed compiles a shared-memory all-reduce op for CPU ranks on first use
        # (~60 s). A single rank never communicates, so mark the op unavailable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


class SupervisedRows(torch.nn.Module):
    """Wraps a LLaVA model: forward(batch) -> (logits [N, V] at the rows that predict the N
    supervised tokens, their target ids [N]). The output head runs on those rows only."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, pixel_values=None):
        hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask,
                                  pixel_values=pixel_values, use_cache=False).last_hidden_state
        b, t = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
        logits = self.model.get_output_embeddings()(hidden[b, t - 1])
        return logits, labels[b, t]


def lr_lambda(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0 (the seed recipes' schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train(cfg: TrainConfig, log=print) -> dict:
    """Run the recipe; returns a summary (steps, final loss terms, wall time)."""
    if cfg.kd_leftover not in LEFTOVER_MODES:
        raise ValueError(f"kd_leftover {cfg.kd_leftover!r}: choose one of {LEFTOVER_MODES}")
    rank, world, device = setup_distributed()
    import deepspeed
    from transformers import AutoProcessor

    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Data: the samples re-encoded by the student's processor, joined with cached targets.
    processor = AutoProcessor.from_pretrained(cfg.processor)
    samples = read_llava(cfg.data)
    if cfg.subset:
        import random

        random.Random(cfg.seed).shuffle(samples)
        samples = samples[: cfg.subset]
    cache = TeacherCache(cfg.cache) if cfg.cache else None
    if cfg.keep_encoded and cfg.num_workers:
        raise ValueError("keep_encoded needs num_workers=0: worker processes cannot hand encodings back")
    dataset = DistillDataset(samples, processor, cfg.image_root, cfg.max_length, cache, cfg.keep_encoded)
    steps_per_epoch = len(rank_batches(len(dataset), cfg.batch_size, rank, world, cfg.seed, 0)) // cfg.grad_accum
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    # Model and engine.
    if cfg.init_from:
        from student.model import load_model

        model = load_model(cfg.init_from)
    else:
        model = build_llava(cfg.arch, processor, seed=cfg.seed)
    check_student_vocab(dataset, model)
    n_params = sum(p.numel() for p in model.parameters())
    wrapped = SupervisedRows(model)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_lambda, total=total_steps, warmup=warmup))
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "steps_per_print": 1 << 30,
    }
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    log(f"[train] {n_params / 1e6:.2f}M params, {len(dataset)} samples, world {world}, "
        f"{total_steps} steps, {'KD from ' + cfg.cache if cache else 'CE only'}")

    # Loop.
    log_path = out_dir / "train_log.jsonl"
    log_file = open(log_path, "w") if rank == 0 else None
    step, t0, tokens, last = 0, time.time(), 0, {}
    use_kd = cache is not None and cfg.kd_weight > 0
    for epoch in range(cfg.epochs):
        batches = rank_batches(len(dataset), cfg.batch_size, rank, world, cfg.seed, epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                             prefetch_factor=4 if cfg.num_workers else None,
                                             collate_fn=partial(collate_items, pad_id=processor.tokenizer.pad_token_id))
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            pix = batch.get("pixel_values")
            if pix is not None and cfg.dtype == "bfloat16":
                pix = pix.to(torch.bfloat16)
            logits, targets = engine(batch["input_ids"], batch["attention_mask"], batch["labels"], pix)
            ce = cross_entropy(logits, targets)
            loss = cfg.ce_weight * ce
            terms = {"ce": ce.item()}
            if use_kd:
                if "target_counts" in batch:  # a sampled-mode cache
                    kd = sampled_kd(logits, batch["target_ids"], batch["target_counts"])
                else:
                    kd = sparse_forward_kl(logits, batch["target_ids"], batch["target_logprobs"],
                                           batch["target_leftover"], mode=cfg.kd_leftover)
                loss = loss + cfg.kd_weight * kd
                terms["kd"] = kd.item()
            engine.backward(loss)
            engine.step()
            tokens += int(targets.numel())
            if not engine.is_gradient_accumulation_boundary():
                continue
            step += 1
            last = {"step": step, "epoch": epoch, "loss": loss.item(), **terms,
                    "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / (time.time() - t0)}
            if log_file:
                log_file.write(json.dumps(last) + "\n")
            if rank == 0 and (step % cfg.log_every == 0 or step == total_steps):
                parts = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
                log(f"[train] step {step}/{total_steps} loss {loss.item():.4f} ({parts}) "
                    f"lr {last['lr']:.2e} {last['tokens_per_s']:.0f} sup-tok/s "
                    f"elapsed {time.time() - t0:.0f}s")
            if step >= total_steps:
                break
        if step >= total_steps:
            break

    # Save an ordinary Hugging Face model folder (loadable with from_pretrained).
    summary = {"steps": step, "wall_s": round(time.time() - t0, 1), "final": last, "params": n_params,
               "config": asdict(cfg)}
    if rank == 0:
        log_file.close()
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
