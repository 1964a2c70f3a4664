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
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from mmkd.common.config import (
    ConfigError,
    flat_dict,
    need_at_least,
    need_between,
    need_choice,
    need_model,
    need_path,
    need_positive,
    refuse,
    to_dict,
)
from mmkd.common.heads import DTYPES
from mmkd.common.inputs import SampleTable
from mmkd.common.models import is_text_only, length_limit, load_processor
from mmkd.common.preprocess import image_token_id
from mmkd.storage.fs import write_atomic
from mmkd.storage.plan import EpochPlan
from mmkd.storage.reader import TeacherCache
from mmkd.storage.writer import ROW_GROUP_ROWS
from mmkd.student import checkpoint, terms
from mmkd.student.config import LlavaArch, TrainConfig
from mmkd.student.data import StudentData, check_student_vocab
from mmkd.student.losses import DIVERGENCES, LEFTOVER_MODES, PREFERENCE_LOSSES, RELATION_POOLING
from mmkd.student.model import (
    TRAINABLE,
    build_student,
    compose_llava,
    composition_problem,
    load_model,
    set_trainable,
)
from mmkd.student.moe import moe_param_groups, save_moe, upcycle
from mmkd.student.optim import LR_SCHEDULES, OPTIMIZERS, build_optimizer, build_scheduler
from mmkd.student.outputs import StudentOutputs
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
)
from mmkd.student.run_log import RunLog, StepClock, parse_report_to


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


def check_config(cfg: "TrainConfig") -> None:
    """Refuse option values and combinations the recipe cannot honour, before any work (no
    file is read: check_paths does that). One ConfigError naming the flag and what is
    allowed."""
    for name, allowed in (("objective", ("distill", "preference")), ("trainable", TRAINABLE),
                          ("divergence", DIVERGENCES), ("kd_leftover", LEFTOVER_MODES),
                          ("relation_pooling", RELATION_POOLING), ("preference_loss", PREFERENCE_LOSSES),
                          ("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES), ("zero_stage", ZERO_STAGES),
                          ("dtype", TRAIN_DTYPES)):
        need_choice(cfg, name, allowed)
    need_at_least(cfg, 1, "epochs", "batch_size", "grad_accum", "shuffle_window", "keep_checkpoints", "log_every",
                  *(f"arch.{f.name}" for f in fields(LlavaArch)))
    need_at_least(cfg, 0, "max_length")
    need_at_least(cfg, 0, "max_steps", "subset", "num_workers", "save_every", "data_streams", "seed", "ce_weight",
                  "kd_weight", "visual_weight", "relation_weight", "weight_decay", "grad_clip", "moe.aux_weight")
    need_positive(cfg, "lr", "beta", "adam_epsilon")
    need_between(cfg, "adam_beta1", 0, 1, hi_open=True)
    need_between(cfg, "adam_beta2", 0, 1, hi_open=True)
    need_between(cfg, "warmup_ratio", 0, 1)
    if cfg.online_teacher and cfg.cache:
        raise ConfigError("--online-teacher and --cache are two sources of teacher targets: set one (cache: the "
                          "offline cache; online_teacher: the resident-teacher baseline, for comparison)")
    if cfg.online_teacher and cfg.objective != "distill":
        raise ConfigError("--online-teacher supports --objective distill only; preference training reads a cache")
    needs = [t for t in terms.stage_terms(cfg, teacher=True, moe=False) if t.record not in (None, "response")]
    if needs and not (cfg.cache or cfg.online_teacher):
        raise ConfigError(f"the terms {', '.join(dict.fromkeys(t.name for t in needs))} read teacher targets "
                          f"({', '.join(dict.fromkeys(t.record for t in needs))} records): set --cache to a teacher "
                          "cache folder")
    if cfg.objective == "preference" and cfg.keep_encoded:
        raise ConfigError("--keep-encoded applies to --objective distill only")
    if cfg.keep_encoded and cfg.num_workers:
        raise ConfigError("--keep-encoded needs --num-workers 0: worker processes cannot hand encodings back")
    if cfg.upcycle and not cfg.init_from:
        raise ConfigError("--upcycle starts from a trained dense model: set --init-from")
    if bool(cfg.student_llm) != bool(cfg.vision_from):
        given, other = ("student_llm", "vision_from") if cfg.student_llm else ("vision_from", "student_llm")
        raise refuse(given, getattr(cfg, given), f"set --{other.replace('_', '-')} too: a composed student takes its "
                                                 "LLM from --student-llm and its vision tower from --vision-from "
                                                 "(a text-only student: --init-from the LLM)")
    if cfg.student_llm and cfg.init_from:
        raise ConfigError("--init-from and --student-llm/--vision-from are two starting points: set one")
    from transformers.activations import ACT2FN

    need_choice(cfg, "projector_act", tuple(ACT2FN))
    try:
        parse_report_to(cfg.report_to)
    except ValueError as e:
        raise refuse("report_to", cfg.report_to, str(e)) from None
    if cfg.attn_implementation:
        need_choice(cfg, "attn_implementation", ("eager", "sdpa", "flash_attention_2", "flash_attention_3",
                                                  "flex_attention"))


def check_paths(cfg: "TrainConfig") -> None:
    """The folders and files the config names exist (before any output is written)."""
    need_model(cfg, "processor", "processor")
    need_path(cfg, "inputs.data", "data file or folder")
    need_path(cfg, "inputs.image_root", "image root folder", required=False)
    for name in ("init_from", "online_teacher", "student_llm", "vision_from"):
        if getattr(cfg, name):
            need_model(cfg, name, "model", hub=False)
    if cfg.cache:
        need_path(cfg, "cache", "teacher cache folder")
    need_path(cfg, "deepspeed", "DeepSpeed JSON file", required=False)
    if cfg.deepspeed:
        deepspeed_config(cfg)  # the file parses and agrees with the flags
    if not cfg.output_dir:
        raise refuse("output_dir", cfg.output_dir, "set the folder the model and logs go to")


def check_model_settings(cfg: "TrainConfig", processor) -> None:
    """What the processor (and the model folders' configs) decide: a text-only student (its
    processor has no image token) has no image tokens for the visual terms and no projector
    to train alone; a composed student needs an LLM, a vision tower's model and its
    processor that fit together."""
    if cfg.student_llm:
        problem = composition_problem(cfg.student_llm, cfg.vision_from, processor)
        if problem:
            raise refuse(problem[0], getattr(cfg, problem[0]), problem[1])
    if not is_text_only(processor):
        return
    for name in ("visual_weight", "relation_weight"):
        if getattr(cfg, name):
            raise refuse(name, getattr(cfg, name), f"0: the student is text-only ({cfg.processor} has no image "
                                                   "processor), so there are no image tokens to distil at")
    if cfg.trainable == "projector":
        raise refuse("trainable", cfg.trainable, "all: a text-only student has no projector")


def max_length_of(cfg: TrainConfig, processor) -> int:
    """cfg.max_length, or when 0 the student's own limit (common.models.length_limit): of
    the model it starts from (init_from, student_llm) or of the one built from `arch`."""
    if cfg.max_length:
        return cfg.max_length
    source = cfg.init_from or cfg.student_llm
    if source:
        from transformers import AutoConfig

        limit = length_limit(AutoConfig.from_pretrained(source), processor)
    else:
        limit = length_limit(cfg.arch.max_positions, processor)  # the model build_student makes
    if limit is None:
        raise refuse("max_length", 0, f"{source} states no position limit: set --max-length")
    return limit


@dataclass
class Data:
    """setup_data's result: the stage's items and how this rank reads them."""

    dataset: StudentData
    cache: TeacherCache | None
    plan: EpochPlan
    steps_per_epoch: int  # optimizer steps


def setup_data(cfg: TrainConfig, processor, rank: int, world: int) -> Data:
    """The samples (memory-mapped), the cache, the items they make and the epoch plan."""
    samples = SampleTable(cfg.inputs, pairs=cfg.objective == "preference")
    subset = None
    if cfg.subset:  # the first N of a seeded shuffle of the input's samples
        import random

        order = list(range(len(samples)))
        random.Random(cfg.seed).shuffle(order)
        subset = np.array(order[: cfg.subset], dtype=np.int64)
    cache = TeacherCache(cfg.cache) if cfg.cache else None
    dataset = StudentData(samples, processor, cfg.inputs.image_root, cfg.max_length, cache, terms.record_kinds(cfg),
                          subset, cfg.keep_encoded)
    streams = cfg.data_streams or world
    plan = EpochPlan(dataset.shard_rows, streams, cfg.seed, cfg.shuffle_window, ROW_GROUP_ROWS)
    mine = len(plan.rank_streams(rank, world))  # refuses streams that do not split over the ranks
    if cache is not None:  # the row groups of one shuffle window per stream stay in the reader (storage/plan.py)
        groups = sum(-(-s.rows // ROW_GROUP_ROWS) for s in cache.manifest.shards)
        per_group = max(1.0, len(dataset) / max(1, groups))  # rows used per row group (fewer with a subset)
        cache.keep_row_groups = min(groups, max(cache.keep_row_groups,
                                                mine * (int(cfg.shuffle_window / per_group) + 2)))
    micro = plan.num_micro_batches(world, cfg.batch_size)
    if micro < cfg.grad_accum:
        raise ValueError(f"{len(dataset)} items give {micro} micro-batches of {cfg.batch_size} per rank, fewer than "
                         f"one optimizer step ({cfg.grad_accum}); lower batch_size or grad_accum")
    return Data(dataset, cache, plan, micro // cfg.grad_accum)


def setup_model(cfg: TrainConfig, processor, data: Data, device: str):
    """The student (loaded or built, upcycled to MoE, frozen per stage), its wrapper that
    runs the head at the target rows, and the online teacher when that is the source."""
    if cfg.init_from:
        model = load_model(cfg.init_from)
    elif cfg.student_llm:
        model = compose_llava(cfg.student_llm, cfg.vision_from, processor, cfg.projector_act, seed=cfg.seed)
    else:
        model = build_student(cfg.arch, processor, seed=cfg.seed)
    if cfg.attn_implementation:
        model.set_attn_implementation(cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.upcycle:
        model = upcycle(model, cfg.moe)
    is_moe = getattr(model.config, "mmkd_moe", None) is not None
    check_zero_stage(cfg.zero_stage, is_moe)
    if data.cache is not None:
        check_student_vocab(data.cache, model)
    teacher = None
    if cfg.online_teacher:  # the comparison baseline (student/online.py)
        from mmkd.student.online import OnlineTeacher

        teacher = OnlineTeacher(cfg.online_teacher, processor, model, DTYPES[cfg.dtype], device)
    vocab = data.cache.manifest.vocab_size if data.cache else teacher.vocab_size if teacher else None
    wrapped = StudentOutputs(model, image_token_id(processor), vocab).train()
    return model, wrapped, teacher, is_moe


def setup_engine(cfg: TrainConfig, model, wrapped, is_moe: bool, total_steps: int):
    """The DeepSpeed engine (ZeRO stage, bf16, accumulation) with a torch optimizer and LR
    schedule (student.optim)."""
    import deepspeed

    groups = (moe_param_groups(model, cfg.lr, cfg.weight_decay) if is_moe
              else [{"params": [p for p in model.parameters() if p.requires_grad]}])
    optimizer = build_optimizer(groups, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg))
    return engine, scheduler


def save_composed(model, processor, folder: Path, cfg: TrainConfig, log) -> None:
    """Save a composed student before training (an ordinary HF folder with its processor),
    so that it can be inspected and checked against the teacher (`mmkd check`)."""
    import shutil

    if (folder / "config.json").exists():
        return  # a resumed run: saved by the first
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    os.replace(tmp, folder)
    log(f"[train] composed the student: LLM {cfg.student_llm}, vision tower of {cfg.vision_from}, a new projector "
        f"-> {folder} (check it: mmkd check {cfg.vision_from} {folder})")


def loader(cfg: TrainConfig, data: Data, rank: int, world: int, epoch: int, consumed: int):
    """This rank's micro-batches of one epoch, from micro-batch `consumed` on, decoded by
    cfg.num_workers worker processes ahead of the step."""
    batches = data.plan.micro_batches(rank, world, cfg.batch_size, epoch)[consumed:]
    # The loader draws its workers' base seed from its own generator, not the global RNG,
    # so the global stream (MoE gate sampling, dropout) is the same after a resume.
    return torch.utils.data.DataLoader(data.dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                       prefetch_factor=4 if cfg.num_workers else None, collate_fn=_as_is,
                                       generator=torch.Generator().manual_seed(cfg.seed))


def _as_is(batch):
    return batch  # StudentData.__getitems__ collates in the worker


def train(cfg: TrainConfig, log=print) -> dict:
    """Run the recipe; returns a summary (steps, final loss terms, wall time)."""
    check_config(cfg)
    check_paths(cfg)
    processor = load_processor(cfg.processor)
    check_model_settings(cfg, processor)
    cfg = replace(cfg, max_length=max_length_of(cfg, processor))
    rank, world, device = setup_distributed()
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    finished, resume_from = checkpoint.find_resume(cfg, world, rank, log)
    if finished is not None:
        return finished

    data = setup_data(cfg, processor, rank, world)
    total_steps = data.steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    model, wrapped, teacher, is_moe = setup_model(cfg, processor, data, device)
    if cfg.student_llm and rank == 0:
        save_composed(model, processor, out_dir / "init", cfg, log)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = set_trainable(model, cfg.trainable)
    engine, scheduler = setup_engine(cfg, model, wrapped, is_moe, total_steps)
    stage = terms.stage_terms(cfg, teacher=bool(cfg.cache or cfg.online_teacher), moe=is_moe)
    source = cfg.cache or (f"the resident teacher {cfg.online_teacher} (online, full vocabulary)"
                           if cfg.online_teacher else None)
    if rank == 0:
        log(f"[train] {n_params / 1e6:.2f}M params ({n_trainable / 1e6:.2f}M trainable: {cfg.trainable}"
            f"{', MoE' if is_moe else ''}), {len(data.dataset)} {'pairs' if cfg.objective == 'preference' else 'samples'}"
            f", world {world}, {total_steps} steps, {terms.describe(stage, cfg, source)}")

    # Loop, from the checkpoint's position when resuming: an optimizer step takes grad_accum
    # micro-batches per rank; every loss term is a mean over the step's global batch
    # (student.parallel.StepMeans), logged as such.
    pos = checkpoint.restore(engine, resume_from, out_dir, rank, log)
    run_log = RunLog(out_dir, total_steps, cfg.log_every, parse_report_to(cfg.report_to), log, resume_step=pos.step,
                     project=cfg.tracker_project, run_name=cfg.run_name, config=flat_dict(cfg)) if rank == 0 else None
    clock = StepClock()
    rows = {t.name: terms.row_kind(t, cfg) for t in stage if terms.row_kind(t, cfg)}
    weights = {t.name: terms.weight_of(t, cfg) for t in stage if terms.weight_of(t, cfg) is not None}
    img = image_token_id(processor)
    visual = any(t.record == "visual" for t in stage)  # the online teacher's targets
    needs = terms.outputs_needed(stage)
    # micro-batches this rank ran, those before a resume included (every step takes grad_accum of them)
    step, micro_batches, t0, last = pos.step, pos.step * cfg.grad_accum, time.time() - pos.wall_s, {}
    for epoch in range(pos.epoch, cfg.epochs):
        consumed = pos.batch if epoch == pos.epoch else 0  # micro-batches of this epoch done before the checkpoint
        for group in micro_batch_groups(clock.batches(loader(cfg, data, rank, world, epoch, consumed)),
                                        cfg.grad_accum):
            means = StepMeans([row_counts(b, img) for b in group], rows, weights, device)
            lr = scheduler.get_last_lr()[0]  # this step's: DeepSpeed advances the schedule after the step
            tokens = 0
            for i, batch in enumerate(group):
                batch = batch.to(device, torch.bfloat16 if cfg.dtype == "bfloat16" else None)
                if teacher is not None:
                    teacher.fill(batch, visual, needs["relation"])
                coefs = means.coefficients(i)
                # the token terms run in the fused head + loss inside the forward (ZeRO-3: the head is whole there)
                out = engine(batch.input_ids, batch.attention_mask, batch.labels, batch.vision or None,
                             terms=terms.token_terms(stage, batch, cfg, coefs), **needs)
                others = {t.name: t.loss(out, batch, cfg, model) for t in stage if t.loss is not None}
                means.record(i, {**out["values"], **others})
                engine.backward(out["loss"] + sum(coefs[n] * v for n, v in others.items() if n in coefs))
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
