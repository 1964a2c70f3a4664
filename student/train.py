"""The training recipe: one stage of supervised (CE), distillation and preference training
from a teacher cache.

Reads top to bottom: config -> distributed setup -> data -> model (load / upcycle to MoE,
freeze per stage) -> DeepSpeed engine -> loop (forward, loss terms, backward, step) -> save.
The same recipe trains the demo's teacher (no cache, CE only) and every student stage of
LLaVA-KD and LLaVA-MoD (pipelines/recipe.py chains stages).

objective="distill", loss per step (each term averaged over its rows):
    ce_weight * CE                                  supervised tokens
  + kd_weight * D(teacher || student)               response targets (shifted), top-k or sampled
  + visual_weight * D(teacher || student)           visual targets AT the image tokens (MDist)
  + relation_weight * (1 - cos(R_teacher, R_student))   relations of the image tokens (RDist)
  + moe.aux_weight * load-balancing loss            MoE students
where D is the divergence of `divergence` (forward KL by default) on the cached top-k.
objective="preference": DPO or KTO-pair with the teacher's cached answer log-probs as the
reference (+ ce_weight * CE on the chosen answers, + the MoE aux loss).

The teacher's weights are never opened: its targets come from the cache rows (storage/).
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
import torch.nn.functional as F

from pipelines.inputs import read_config_inputs
from pipelines.preprocess import IGNORE_INDEX, VISION_KEYS, image_token_id
from storage.reader import TeacherCache
from student import checkpoint
from student.data import (
    DistillDataset,
    PreferenceDataset,
    check_student_vocab,
    collate_items,
    collate_pairs,
    rank_batches,
)
from student.losses import (
    DIVERGENCES,
    LEFTOVER_MODES,
    PREFERENCE_LOSSES,
    RELATION_POOLING,
    cross_entropy,
    preference_loss,
    relation_loss,
    relation_matrix,
    sampled_kd,
    sequence_logprobs,
    sparse_divergence,
)
from student.model import TRAINABLE, LlavaArch, build_llava, load_model, output_head, set_trainable
from student.moe import MoEConfig, moe_aux_loss, moe_param_groups, save_moe, upcycle


@dataclass
class TrainConfig:
    data: str = ""  # LLaVA JSON/JSONL (objective distill) or preference pairs; or a save_to_disk folder / Parquet
    image_root: str = ""  # folder the samples' image paths are relative to (not needed for embedded images)
    data_split: str | None = None  # split of a DatasetDict / of the Parquet files (train-*.parquet)
    image_column: str = "image"  # column (JSON key) of the image: path, bytes or HF Image; "" = no images
    id_column: str = "id"  # column (JSON key) of each sample's unique id (RLAIF-V: idx)
    processor: str = ""  # processor folder (tokenizer, chat template, image processor)
    output_dir: str = ""  # where the trained model (HF folder) and logs go
    cache: str | None = None  # teacher cache folder; None trains with CE only
    init_from: str | None = None  # start from this saved model instead of random weights
    arch: LlavaArch = field(default_factory=LlavaArch)  # sizes when building from scratch
    subset: int = 0  # train on the first N samples after a seeded shuffle; 0 = all
    objective: str = "distill"  # "distill" (CE + KD terms) or "preference" (DPO / KTO-pair)
    trainable: str = "all"  # all | projector | llm+projector | moe (see student.model.set_trainable)
    ce_weight: float = 1.0
    kd_weight: float = 1.0  # response targets; used only with a cache
    visual_weight: float = 0.0  # MDist visual term (needs a cache with visual records)
    relation_weight: float = 0.0  # RDist (needs a cache with relation records)
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd, see student.losses
    kd_leftover: str = "bucket"  # "bucket" or "renormalize", see student.losses
    relation_pooling: str = "sample"  # "sample" (mean of per-sample cosines) or "batch" (one pooled cosine; see docs/methods.md)
    preference_loss: str = "dpo"  # dpo | kto_pair (objective preference)
    beta: float = 0.1  # preference loss temperature
    upcycle: bool = False  # turn the (dense) initial model into an MoE student first
    moe: MoEConfig = field(default_factory=MoEConfig)  # experts, top-k, capacity, aux_weight
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
    save_every: int = 200  # optimizer steps between checkpoints (output_dir/checkpoints); 0 = none
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    resume: bool = True  # continue from output_dir's latest checkpoint (false: start over, deleting them)


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


class StudentOutputs(torch.nn.Module):
    """Wraps a multimodal model: forward(...) -> dict of what the loss terms need; the output
    head runs only on the rows they use (never on all [B, T] positions), over the cache's
    shared vocabulary (vocab_size; None = every head row).

    logits [N, V]: at the rows that predict the N supervised tokens (shifted, t-1 for t),
        row-major; targets [N] their token ids; rows_sample [N] the batch index of each.
    visual_logits [M, V] (visual=True): AT the M image-token positions (unshifted), row-major.
    relations (relation=True): per sample, R = Z Z^T [n, n] of the raw logits at its image
        tokens, as H (W^T W) H^T (student.losses.relation_matrix; gradients reach H and W).
    vision: the batch's image inputs (pixel_values and the family's image_sizes /
        image_grid_thw, see pipelines.preprocess.VISION_KEYS), or None for text-only batches.
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
        b, t = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
        out = {"logits": F.linear(hidden[b, t - 1], *head), "targets": labels[b, t], "rows_sample": b}
        if visual or relation:
            vb, vt = torch.nonzero((input_ids == self.image_token_id) & attention_mask.bool(), as_tuple=True)
        if visual:
            out["visual_logits"] = F.linear(hidden[vb, vt], *head)
        if relation:
            w = head.weight.float()
            gram = w.T @ w  # once per step, shared by the batch's samples
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


def _token_kd(logits: torch.Tensor, batch: dict, prefix: str, cfg: "TrainConfig") -> torch.Tensor:
    """The sparse divergence of one token record kind (prefix "target" = response, "visual")."""
    if f"{prefix}_counts" in batch:  # a sampled-mode cache: the unbiased estimator (forward KL)
        return sampled_kd(logits, batch[f"{prefix}_ids"], batch[f"{prefix}_counts"])
    return sparse_divergence(logits, batch[f"{prefix}_ids"], batch[f"{prefix}_logprobs"],
                             batch[f"{prefix}_leftover"], cfg.divergence, cfg.kd_leftover)


def distill_terms(out: dict, batch: dict, cfg: "TrainConfig") -> tuple[torch.Tensor, dict]:
    """CE + the weighted KD terms the config turns on; (loss, {term: value})."""
    ce = cross_entropy(out["logits"], out["targets"])
    loss, terms = cfg.ce_weight * ce, {"ce": ce.item()}
    if "target_ids" in batch and cfg.kd_weight > 0:
        kd = _token_kd(out["logits"], batch, "target", cfg)
        loss, terms["kd"] = loss + cfg.kd_weight * kd, kd.item()
    if cfg.visual_weight > 0:
        vkd = _token_kd(out["visual_logits"], batch, "visual", cfg)
        loss, terms["visual_kd"] = loss + cfg.visual_weight * vkd, vkd.item()
    if cfg.relation_weight > 0:
        rel = relation_loss(out["relations"], list(batch["relation"]), cfg.relation_pooling)
        loss, terms["relation"] = loss + cfg.relation_weight * rel, rel.item()
    return loss, terms


def preference_terms(out: dict, batch: dict, cfg: "TrainConfig") -> tuple[torch.Tensor, dict]:
    """DPO / KTO-pair on the summed answer log-probs (2P sequences: chosen, then rejected)
    with the teacher's cached log-probs as the reference; + ce_weight * CE on the chosen."""
    p = batch["ref_chosen"].shape[0]
    seq = sequence_logprobs(out["logits"], out["targets"], out["rows_sample"], 2 * p)
    loss = preference_loss(seq[:p], seq[p:], batch["ref_chosen"], batch["ref_rejected"], cfg.preference_loss,
                           cfg.beta)
    terms = {cfg.preference_loss: loss.item(), "margin": (seq[:p] - seq[p:]).mean().item()}
    if cfg.ce_weight > 0:
        chosen = out["rows_sample"] < p
        ce = cross_entropy(out["logits"][chosen], out["targets"][chosen])
        loss, terms["ce"] = loss + cfg.ce_weight * ce, ce.item()
    return loss, terms


def used_record_kinds(cfg: "TrainConfig") -> tuple[str, ...]:
    """The cache record kinds this stage's loss terms read."""
    if cfg.objective == "preference":
        return ("preference",)
    kinds = ["response"]
    if cfg.visual_weight > 0:
        kinds.append("visual")
    if cfg.relation_weight > 0:
        kinds.append("relation")
    return tuple(kinds)


def check_config(cfg: "TrainConfig") -> None:
    """Refuse option values and combinations the recipe cannot honour, before any work."""
    for name, allowed in (("objective", ("distill", "preference")), ("trainable", TRAINABLE),
                          ("divergence", DIVERGENCES), ("kd_leftover", LEFTOVER_MODES),
                          ("relation_pooling", RELATION_POOLING), ("preference_loss", PREFERENCE_LOSSES)):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} {getattr(cfg, name)!r}: choose one of {allowed}")
    if (cfg.visual_weight > 0 or cfg.relation_weight > 0 or cfg.objective == "preference") and not cfg.cache:
        raise ValueError("visual_weight, relation_weight and objective=preference read teacher targets: "
                         "set cache to a teacher cache folder")
    if cfg.objective == "preference" and cfg.keep_encoded:
        raise ValueError("keep_encoded applies to objective=distill only")
    if cfg.keep_encoded and cfg.num_workers:
        raise ValueError("keep_encoded needs num_workers=0: worker processes cannot hand encodings back")
    if cfg.upcycle and not cfg.init_from:
        raise ValueError("upcycle starts from a trained dense model: set init_from")
    if cfg.save_every < 0 or cfg.keep_checkpoints < 1:
        raise ValueError(f"save_every {cfg.save_every} must be >= 0 (0 = no checkpoints) and keep_checkpoints "
                         f"{cfg.keep_checkpoints} >= 1")


def describe_terms(cfg: "TrainConfig") -> str:
    if cfg.objective == "preference":
        return f"{cfg.preference_loss} (beta {cfg.beta}) against the teacher from {cfg.cache}"
    if not cfg.cache:
        return "CE only"
    w = {"ce": cfg.ce_weight, "kd": cfg.kd_weight, "visual": cfg.visual_weight, "relation": cfg.relation_weight}
    return " + ".join(f"{v:g}*{k}" for k, v in w.items() if v > 0) + f" ({cfg.divergence}) from {cfg.cache}"


def lr_lambda(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0 (the seed recipes' schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train(cfg: TrainConfig, log=print) -> dict:
    """Run the recipe; returns a summary (steps, final loss terms, wall time)."""
    check_config(cfg)
    rank, world, device = setup_distributed()
    import deepspeed
    from transformers import AutoProcessor

    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    finished, resume_from = checkpoint.find_resume(cfg, world, rank, log)
    if finished is not None:
        return finished

    # Data: the samples re-encoded by the student's processor, joined with cached targets.
    processor = AutoProcessor.from_pretrained(cfg.processor)
    preference = cfg.objective == "preference"
    samples = read_config_inputs(cfg, pairs=preference)
    if cfg.subset:
        import random

        random.Random(cfg.seed).shuffle(samples)
        samples = samples[: cfg.subset]
    cache = TeacherCache(cfg.cache) if cfg.cache else None
    kinds = used_record_kinds(cfg)
    if preference:
        dataset = PreferenceDataset(samples, processor, cfg.image_root, cfg.max_length, cache)
        collate_fn = partial(collate_pairs, pad_id=processor.tokenizer.pad_token_id)
    else:
        dataset = DistillDataset(samples, processor, cfg.image_root, cfg.max_length, cache, cfg.keep_encoded, kinds)
        collate_fn = partial(collate_items, pad_id=processor.tokenizer.pad_token_id)
    steps_per_epoch = len(rank_batches(len(dataset), cfg.batch_size, rank, world, cfg.seed, 0)) // cfg.grad_accum
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    # Model: load or build, upcycle to MoE, freeze what this stage does not train.
    model = load_model(cfg.init_from) if cfg.init_from else build_llava(cfg.arch, processor, seed=cfg.seed)
    if cfg.upcycle:
        model = upcycle(model, cfg.moe)
    is_moe = getattr(model.config, "mmkd_moe", None) is not None
    if cache is not None:
        check_student_vocab(cache, model, getattr(dataset, "max_target_id", None))
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = set_trainable(model, cfg.trainable)
    wrapped = StudentOutputs(model, image_token_id(processor), cache.manifest.vocab_size if cache else None).train()
    groups = (moe_param_groups(model, cfg.lr, cfg.weight_decay) if is_moe
              else [{"params": [p for p in model.parameters() if p.requires_grad]}])
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
    log(f"[train] {n_params / 1e6:.2f}M params ({n_trainable / 1e6:.2f}M trainable: {cfg.trainable}"
        f"{', MoE' if is_moe else ''}), {len(dataset)} {'pairs' if preference else 'samples'}, world {world}, "
        f"{total_steps} steps, {describe_terms(cfg)}")

    # Loop (from the checkpoint's position when resuming).
    pos = checkpoint.restore(engine, resume_from, out_dir, rank, log)
    log_path = out_dir / checkpoint.LOG
    log_file = open(log_path, "a", buffering=1) if rank == 0 else None  # line-buffered: on disk before a checkpoint
    step, t0, tokens, last = pos.step, time.time() - pos.wall_s, pos.tokens, {}
    for epoch in range(pos.epoch, cfg.epochs):
        batches = rank_batches(len(dataset), cfg.batch_size, rank, world, cfg.seed, epoch)
        skip = pos.batch if epoch == pos.epoch else 0  # micro-batches consumed before the checkpoint
        # The loader draws its workers' base seed from its own generator, not the global RNG,
        # so the global stream (MoE gate sampling, dropout) is the same after a resume.
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[skip:], num_workers=cfg.num_workers,
                                             prefetch_factor=4 if cfg.num_workers else None, collate_fn=collate_fn,
                                             generator=torch.Generator().manual_seed(cfg.seed))
        for consumed, batch in enumerate(loader, start=skip + 1):
            batch = {k: v.to(device) for k, v in batch.items()}
            vision = vision_inputs(batch, torch.bfloat16 if cfg.dtype == "bfloat16" else None)
            out = engine(batch["input_ids"], batch["attention_mask"], batch["labels"], vision,
                         visual=cfg.visual_weight > 0, relation=cfg.relation_weight > 0)
            loss, terms = (preference_terms if preference else distill_terms)(out, batch, cfg)
            if is_moe and cfg.moe.aux_weight > 0:
                aux = moe_aux_loss(model)
                loss = loss + cfg.moe.aux_weight * aux
                terms["moe_aux"] = aux.item()
            targets = out["targets"]
            # asked before step(): afterwards DeepSpeed answers for the next micro-batch
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(loss)
            engine.step()
            tokens += int(targets.numel())
            if not boundary:
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
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                checkpoint.save(engine, cfg, checkpoint.Position(step, epoch, consumed, tokens, time.time() - t0),
                                rank, world)
            if step >= total_steps:
                break
        if step >= total_steps:
            break

    # Save an ordinary Hugging Face model folder (loadable with from_pretrained).
    summary = {"steps": step, "wall_s": round(time.time() - t0, 1), "final": last, "params": n_params,
               "config": asdict(cfg)}
    if rank == 0:
        log_file.close()
        save_moe(model, out_dir) if is_moe else model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        checkpoint.write_atomic(out_dir / checkpoint.SUMMARY, json.dumps(summary, indent=1))
        checkpoint.remove_checkpoints(out_dir)
    return summary
