"""The training recipe: one stage of supervised (CE), distillation and preference training
from a teacher cache.

Reads top to bottom: config -> distributed setup -> data -> model (load / upcycle to MoE,
freeze per stage) -> DeepSpeed engine -> loop (forward, loss terms, backward, step) -> save.
The same recipe trains the demo's teacher (no cache, CE only) and every student stage of
LLaVA-KD and LLaVA-MoD (pipelines/recipe.py chains stages).

objective="distill", loss per step (each term averaged over its rows in the global batch of
the step, all ranks and accumulation micro-batches: student.parallel):
    ce_weight * CE                                  supervised tokens
  + kd_weight * D(teacher || student)               response targets (shifted), top-k or sampled
  + visual_weight * D(teacher || student)           visual targets AT the image tokens (MDist)
  + relation_weight * (1 - cos(R_teacher, R_student))   relations of the image tokens (RDist)
  + moe.aux_weight * load-balancing loss            MoE students
where D is the divergence of `divergence` (forward KL by default) on the cached top-k.
For comparison only, `online_teacher` keeps the teacher resident and takes D over the full
vocabulary at every step instead (the seed papers' way; student/online.py).
objective="preference": DPO or KTO-pair with the teacher's cached answer log-probs as the
reference (+ ce_weight * CE on the chosen answers, + the MoE aux loss).

The teacher's weights are never opened (but by the online_teacher baseline): its targets
come from the cache rows (storage/).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from mmkd.common.config import InputsConfig, inline, to_dict
from mmkd.common.heads import DTYPES
from mmkd.common.inputs import read_config_inputs
from mmkd.common.preprocess import image_token_id
from mmkd.storage.fs import write_atomic
from mmkd.storage.reader import TeacherCache
from mmkd.student import checkpoint
from mmkd.student.data import (
    DistillDataset,
    PreferenceDataset,
    check_student_vocab,
    collate_items,
    collate_pairs,
    rank_batches,
)
from mmkd.student.losses import (
    DIVERGENCES,
    LEFTOVER_MODES,
    PREFERENCE_LOSSES,
    RELATION_POOLING,
    cross_entropy,
    dense_divergence,
    preference_loss,
    relation_loss,
    sampled_kd,
    sequence_logprobs,
    sparse_divergence,
)
from mmkd.student.model import TRAINABLE, LlavaArch, build_llava, load_model, set_trainable
from mmkd.student.moe import MoEConfig, moe_aux_loss, moe_param_groups, save_moe, upcycle
from mmkd.student.optim import LR_SCHEDULES, OPTIMIZERS, build_optimizer, build_scheduler
from mmkd.student.outputs import StudentOutputs, vision_inputs
from mmkd.student.parallel import (
    TRAIN_DTYPES,
    ZERO_STAGES,
    StepMeans,
    check_zero_stage,
    deepspeed_config,
    full_parameters,
    micro_batch_groups,
    per_rank,
    row_counts,
    term_rows,
)
from mmkd.student.run_log import RunLog, StepClock


@dataclass
class TrainConfig:
    inputs: InputsConfig = inline(InputsConfig)  # data, image_root, data_split, image_column, id_column
    processor: str = ""  # processor folder (tokenizer, chat template, image processor)
    output_dir: str = ""  # where the trained model (HF folder) and logs go
    cache: str | None = None  # teacher cache folder; None trains with CE only
    online_teacher: str | None = None  # comparison only: this teacher resident, full-vocabulary KD (no cache)
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
    batch_size: int = 32  # per rank, per micro-step; global batch = batch_size x grad_accum x ranks
    grad_accum: int = 1
    optimizer: str = "adamw"  # adamw | adam (student.optim)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # cosine | linear | constant, after a linear warmup (student.optim)
    warmup_ratio: float = 0.03  # warmup steps = max(1, int(warmup_ratio x optimizer steps))
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    zero_stage: int = 0  # DeepSpeed ZeRO stage (0-3; MoE students 0-2)
    dtype: str = "float32"  # or "bfloat16"
    max_length: int = 256
    num_workers: int = 1  # data loader processes encoding samples while the step runs
    keep_encoded: bool = False  # keep encoded samples in memory (small data, many epochs; needs num_workers=0)
    seed: int = 0
    log_every: int = 50  # a log line every N optimizer steps when no progress bar is shown (stdout not a terminal)
    tensorboard: bool = True  # also write the train_log.jsonl scalars for TensorBoard to output_dir/tensorboard
    save_every: int = 200  # optimizer steps between checkpoints (output_dir/checkpoints); 0 = none
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    resume: bool = True  # continue from output_dir's latest checkpoint (false: start over, deleting them)


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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

    if not cuda:
        # DeepSpeed compiles a shared-memory all-reduce op for CPU ranks on first use (~60 s).
        # Only its inference all-reduce uses it; training communicates through
        # torch.distributed (gloo) either way, so mark the op unavailable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        # Tear the process group down before the interpreter exits: left to C++ static
        # destruction, a rank can abort ("terminate called without an active exception",
        # seen with 2 gloo ranks under torchrun) after training has finished.
        atexit.register(_destroy_process_group)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def _token_kd(logits: torch.Tensor, batch: dict, prefix: str, cfg: "TrainConfig") -> torch.Tensor:
    """The divergence of one token record kind (prefix "target" = response, "visual") from the
    teacher's logits (online baseline), its sampled ids, or its cached top-k."""
    if f"{prefix}_teacher_logits" in batch:  # online: the full vocabulary
        return dense_divergence(logits, batch[f"{prefix}_teacher_logits"], cfg.divergence)
    if f"{prefix}_counts" in batch:  # a sampled-mode cache: the unbiased estimator (forward KL)
        return sampled_kd(logits, batch[f"{prefix}_ids"], batch[f"{prefix}_counts"])
    return sparse_divergence(logits, batch[f"{prefix}_ids"], batch[f"{prefix}_logprobs"],
                             batch[f"{prefix}_leftover"], cfg.divergence, cfg.kd_leftover)


def distill_terms(out: dict, batch: dict, cfg: "TrainConfig") -> dict[str, torch.Tensor]:
    """CE and the KD terms the config turns on, each the mean over its rows in this batch."""
    terms = {"ce": cross_entropy(out["logits"], out["targets"])}
    if cfg.kd_weight > 0 and ("target_ids" in batch or "target_teacher_logits" in batch):
        terms["kd"] = _token_kd(out["logits"], batch, "target", cfg)
    if cfg.visual_weight > 0:
        terms["visual_kd"] = _token_kd(out["visual_logits"], batch, "visual", cfg)
    if cfg.relation_weight > 0:
        terms["relation"] = relation_loss(out["relations"], list(batch["relation"]), cfg.relation_pooling)
    return terms


def preference_terms(out: dict, batch: dict, cfg: "TrainConfig") -> dict[str, torch.Tensor]:
    """DPO / KTO-pair on the summed answer log-probs (2P sequences: chosen, then rejected)
    with the teacher's cached log-probs as the reference, the mean log-prob margin (a
    metric), and CE on the chosen answers if ce_weight > 0."""
    p = batch["ref_chosen"].shape[0]
    seq = sequence_logprobs(out["logits"], out["targets"], out["rows_sample"], 2 * p)
    terms = {cfg.preference_loss: preference_loss(seq[:p], seq[p:], batch["ref_chosen"], batch["ref_rejected"],
                                                  cfg.preference_loss, cfg.beta),
             "margin": (seq[:p] - seq[p:]).mean().detach()}
    if cfg.ce_weight > 0:
        chosen = out["rows_sample"] < p
        terms["ce"] = cross_entropy(out["logits"][chosen], out["targets"][chosen])
    return terms


def term_weights(cfg: "TrainConfig") -> dict[str, float]:
    """The weight of each loss term in the training loss (terms not listed are metrics)."""
    objective = {cfg.preference_loss: 1.0} if cfg.objective == "preference" else {
        "kd": cfg.kd_weight, "visual_kd": cfg.visual_weight, "relation": cfg.relation_weight}
    return {"ce": cfg.ce_weight, **objective, "moe_aux": cfg.moe.aux_weight}


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
                          ("relation_pooling", RELATION_POOLING), ("preference_loss", PREFERENCE_LOSSES),
                          ("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES), ("zero_stage", ZERO_STAGES),
                          ("dtype", TRAIN_DTYPES)):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} {getattr(cfg, name)!r}: choose one of {allowed}")
    if cfg.online_teacher and cfg.cache:
        raise ValueError("online_teacher and cache are two sources of teacher targets: set one (cache: the "
                         "offline cache; online_teacher: the resident-teacher baseline, for comparison)")
    if cfg.online_teacher and cfg.objective != "distill":
        raise ValueError("online_teacher supports objective=distill only; preference training reads a cache")
    if (cfg.visual_weight > 0 or cfg.relation_weight > 0 or cfg.objective == "preference") and not (
            cfg.cache or cfg.online_teacher):
        raise ValueError("visual_weight, relation_weight and objective=preference read teacher targets: "
                         "set cache to a teacher cache folder")
    if cfg.objective == "preference" and cfg.keep_encoded:
        raise ValueError("keep_encoded applies to objective=distill only")
    if cfg.keep_encoded and cfg.num_workers:
        raise ValueError("keep_encoded needs num_workers=0: worker processes cannot hand encodings back")
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError(f"batch_size {cfg.batch_size} and grad_accum {cfg.grad_accum} must be at least 1")
    if cfg.upcycle and not cfg.init_from:
        raise ValueError("upcycle starts from a trained dense model: set init_from")
    if cfg.save_every < 0 or cfg.keep_checkpoints < 1:
        raise ValueError(f"save_every {cfg.save_every} must be >= 0 (0 = no checkpoints) and keep_checkpoints "
                         f"{cfg.keep_checkpoints} >= 1")


def describe_terms(cfg: "TrainConfig") -> str:
    if cfg.objective == "preference":
        return f"{cfg.preference_loss} (beta {cfg.beta}) against the teacher from {cfg.cache}"
    if not (cfg.cache or cfg.online_teacher):
        return "CE only"
    w = {"ce": cfg.ce_weight, "kd": cfg.kd_weight, "visual": cfg.visual_weight, "relation": cfg.relation_weight}
    source = cfg.cache or f"the resident teacher {cfg.online_teacher} (online, full vocabulary)"
    return " + ".join(f"{v:g}*{k}" for k, v in w.items() if v > 0) + f" ({cfg.divergence}) from {source}"


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
    samples = read_config_inputs(cfg.inputs, pairs=preference)
    if cfg.subset:
        import random

        random.Random(cfg.seed).shuffle(samples)
        samples = samples[: cfg.subset]
    cache = TeacherCache(cfg.cache) if cfg.cache else None
    kinds = used_record_kinds(cfg)
    if preference:
        dataset = PreferenceDataset(samples, processor, cfg.inputs.image_root, cfg.max_length, cache)
        collate_fn = partial(collate_pairs, pad_id=processor.tokenizer.pad_token_id)
    else:
        dataset = DistillDataset(samples, processor, cfg.inputs.image_root, cfg.max_length, cache, cfg.keep_encoded,
                                 kinds)
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
    check_zero_stage(cfg.zero_stage, is_moe)
    if cache is not None:
        check_student_vocab(cache, model, getattr(dataset, "max_target_id", None))
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = set_trainable(model, cfg.trainable)
    teacher = None
    if cfg.online_teacher:  # the comparison baseline (student/online.py)
        from mmkd.student.online import OnlineTeacher

        teacher = OnlineTeacher(cfg.online_teacher, processor, model, DTYPES[cfg.dtype], device)
    vocab = cache.manifest.vocab_size if cache else teacher.vocab_size if teacher else None
    wrapped = StudentOutputs(model, image_token_id(processor), vocab).train()
    groups = (moe_param_groups(model, cfg.lr, cfg.weight_decay) if is_moe
              else [{"params": [p for p in model.parameters() if p.requires_grad]}])
    optimizer = build_optimizer(groups, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg))
    if rank == 0:
        log(f"[train] {n_params / 1e6:.2f}M params ({n_trainable / 1e6:.2f}M trainable: {cfg.trainable}"
            f"{', MoE' if is_moe else ''}), {len(dataset)} {'pairs' if preference else 'samples'}, world {world}, "
            f"{total_steps} steps, {describe_terms(cfg)}")

    # Loop, from the checkpoint's position when resuming: an optimizer step takes grad_accum
    # micro-batches per rank; every loss term is a mean over the step's global batch
    # (student.parallel.StepMeans), logged as such.
    pos = checkpoint.restore(engine, resume_from, out_dir, rank, log)
    run_log = RunLog(out_dir, total_steps, cfg.log_every, cfg.tensorboard, log, resume_step=pos.step) \
        if rank == 0 else None
    clock = StepClock()
    terms_of = preference_terms if preference else distill_terms
    rows, weights, img = term_rows(cfg.relation_pooling), term_weights(cfg), image_token_id(processor)
    step, micro_batches, t0, last = pos.step, 0, time.time() - pos.wall_s, {}
    for epoch in range(pos.epoch, cfg.epochs):
        batches = rank_batches(len(dataset), cfg.batch_size, rank, world, cfg.seed, epoch)
        consumed = pos.batch if epoch == pos.epoch else 0  # micro-batches of this epoch done before the checkpoint
        # The loader draws its workers' base seed from its own generator, not the global RNG,
        # so the global stream (MoE gate sampling, dropout) is the same after a resume.
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[consumed:], num_workers=cfg.num_workers,
                                             prefetch_factor=4 if cfg.num_workers else None, collate_fn=collate_fn,
                                             generator=torch.Generator().manual_seed(cfg.seed))
        for group in micro_batch_groups(clock.batches(loader), cfg.grad_accum):
            means = StepMeans([row_counts(b, img, preference) for b in group], rows, weights, device)
            lr = scheduler.get_last_lr()[0]  # this step's: DeepSpeed advances the schedule after the step
            tokens = 0
            for i, batch in enumerate(group):
                batch = {k: v.to(device) for k, v in batch.items()}
                vision = vision_inputs(batch, torch.bfloat16 if cfg.dtype == "bfloat16" else None)
                if teacher is not None:
                    batch.update(teacher.targets(batch, vision, cfg.visual_weight > 0, cfg.relation_weight > 0))
                out = engine(batch["input_ids"], batch["attention_mask"], batch["labels"], vision,
                             visual=cfg.visual_weight > 0, relation=cfg.relation_weight > 0)
                terms = terms_of(out, batch, cfg)
                if is_moe and cfg.moe.aux_weight > 0:
                    terms["moe_aux"] = moe_aux_loss(model)
                engine.backward(means.loss(i, terms))
                engine.step()
                tokens += int(out["targets"].numel())
            micro_batches += len(group)
            consumed += len(group)
            step += 1
            last = {"step": step, "epoch": epoch, **means.logged(), "lr": lr,
                    **clock.lap(samples=cfg.batch_size * cfg.grad_accum, tokens=tokens)}
            if run_log:
                run_log.step(last)
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                checkpoint.save(engine, cfg, checkpoint.Position(step, epoch, consumed, time.time() - t0), rank, world)
            if step >= total_steps:
                break
        if step >= total_steps:
            break
    per_rank_batches = per_rank(micro_batches, device)  # the same on every rank (invariant 7)
    if rank == 0:
        log(f"[train] micro-batches per rank: {per_rank_batches}")

    # Save an ordinary Hugging Face model folder (loadable with from_pretrained).
    summary = {"steps": step, "wall_s": round(time.time() - t0, 1), "final": last, "params": n_params,
               "micro_batches_per_rank": per_rank_batches, "config": to_dict(cfg)}
    with full_parameters(model, cfg.zero_stage):  # ZeRO-3: every rank takes part in the gather
        if rank == 0:
            run_log.close()
            save_moe(model, out_dir) if is_moe else model.save_pretrained(out_dir)
            processor.save_pretrained(out_dir)
            write_atomic(out_dir / checkpoint.SUMMARY, json.dumps(summary, indent=1))
            checkpoint.remove_checkpoints(out_dir)
    return summary
