"""The teacher pass: a Ray Data pipeline that runs the teacher once over every sample and
writes its targets to a cache.

    samples (LLaVA JSON) -> batches planned by length (pipelines/batching.py) -> ray.data.from_arrow
        -> map_batches(TeacherWorker or VllmTeacherWorker,
                       actor pool: pipelines/workers.py) -> iter_batches on the driver
        -> storage.BackgroundWriter -> CacheWriter (committed shards + manifest)

Workers preprocess (chat template, images, labels), run the teacher and return compact
Arrow rows; the driver alone writes, so the manifest has one writer. Re-running the same
command resumes: samples already committed are skipped (docs/architecture.md, invariant 3).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from mmkd.common.config import (
    ConfigError,
    command_line,
    need_at_least,
    need_between,
    need_choice,
    need_model,
    need_path,
    need_positive,
    refuse,
)
from mmkd.common.heads import DTYPES
from mmkd.common.inputs import input_identity, read_config_inputs
from mmkd.common.preprocess import image_token_count
from mmkd.pipelines.batching import batch_blocks, estimated_tokens, plan_batches, teacher_tokenizer
from mmkd.pipelines.config import TeacherPassConfig
from mmkd.pipelines.progress import Progress
from mmkd.pipelines.quarantine import Quarantine, worker_options
from mmkd.pipelines.workers import TeacherWorker, VllmTeacherWorker, sample_item
from mmkd.storage.manifest import Manifest, mmkd_version
from mmkd.storage.schema import MODES, RAW_SCHEMA
from mmkd.storage.writer import BackgroundWriter, count_targets, open_writer
from mmkd.teacher_cache.extract import parse_records
from mmkd.teacher_cache.vllm_backend import check_backend, check_settings

if TYPE_CHECKING:
    from mmkd.teacher_cache.teacher import TeacherSource


_POSITIONS = {
    "response": "supervised tokens, shifted (logits at t-1 for the token at t)",
    "visual": "image tokens, unshifted (logits at t)",
    "relation": "image tokens: R = Z Z^T of the raw logits, normalised",
    "preference": "answer tokens of the chosen and rejected sequences, shifted",
}


def read_inputs(cfg: TeacherPassConfig, errors: list | None = None) -> list:
    """The samples (or preference pairs) of cfg.data in any input format; each has a unique .id.
    errors: a list receiving (id, reason) per malformed record, left out (None: refuse the input)."""
    return read_config_inputs(cfg.inputs, pairs=parse_records(cfg.records) == ["preference"], errors=errors)


def build_manifest(cfg: TeacherPassConfig, num_samples: int, source: TeacherSource | None = None,
                   command: str | None = None) -> Manifest:
    """The manifest of the pass cfg describes (cfg.teacher: a local folder; source: where it
    came from, when resolved from a Hub id; inputs: the data's portable identity; command:
    the mmkd command line of the pass, default the one cfg gives)."""
    from transformers import AutoConfig

    from mmkd.common.check import shared_vocab_size
    from mmkd.common.models import is_text_only, load_processor
    from mmkd.teacher_cache.teacher import processor_description, resolve_teacher, teacher_description

    processor = load_processor(cfg.teacher, cfg.trust_remote_code)
    head_size = AutoConfig.from_pretrained(cfg.teacher, trust_remote_code=cfg.trust_remote_code
                                           ).get_text_config().vocab_size
    vocab = shared_vocab_size(processor, head_size)
    kinds = parse_records(cfg.records)
    visual = [k for k in kinds if k in ("visual", "relation")]
    if visual and is_text_only(processor):
        raise refuse("records", cfg.records, f"a text-only teacher has no image tokens for {' and '.join(visual)} "
                                             "records: use response and/or preference")
    check_backend(cfg.backend)
    if cfg.backend == "vllm":  # refuse what vLLM cannot give before any actor starts
        check_settings(cfg.mode, kinds, cfg.temperature)
    if cfg.mode == "topk" and cfg.k > vocab and kinds != ["preference"]:
        raise refuse("k", cfg.k, f"at most the teacher's vocabulary ({vocab} ids)")
    if cfg.mode == "sampled" and not 1 <= cfg.draws <= 255:
        raise refuse("draws", cfg.draws, "use 1 to 255 draws per position")
    width = {"k": cfg.k} if cfg.mode == "topk" else {"draws": cfg.draws, "seed": cfg.seed}
    return Manifest(
        teacher=teacher_description(source or resolve_teacher(cfg.teacher), cfg.dtype, head_size),
        processor=processor_description(processor, image_token_count(processor)),
        vocab_size=vocab,
        extraction={"mode": cfg.mode, **width, "temperature": cfg.temperature, "record_kinds": kinds,
                    "positions": "; ".join(f"{k}: {_POSITIONS[k]}" for k in kinds), "max_length": cfg.max_length,
                    "backend": cfg.backend},
        inputs=input_identity(cfg.inputs, num_samples),
        mmkd_version=mmkd_version(),
        command=command or command_line("teacher-pass", cfg),
    )


def check_config(cfg: TeacherPassConfig) -> None:
    """Refuse, before Ray starts or anything is written, every setting the pass cannot
    honour: one ConfigError naming the flag, the value and what is allowed. (k against the
    teacher's vocabulary is checked by build_manifest, which reads the teacher's config.)"""
    need_model(cfg, "teacher", "teacher model")
    need_path(cfg, "inputs.data", "data file or folder")
    need_path(cfg, "inputs.image_root", "image root folder", required=False)
    if not cfg.output:
        raise refuse("output", cfg.output, "set the cache folder (or fsspec URL) to write")
    checks = [("records", lambda: parse_records(cfg.records)), ("backend", lambda: check_backend(cfg.backend))]
    if cfg.backend == "vllm":
        checks.append(("backend", lambda: check_settings(cfg.mode, parse_records(cfg.records), cfg.temperature)))
    for name, call in checks:
        try:
            call()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"--{name} {getattr(cfg, name)!r}: {e}") from e
    need_choice(cfg, "mode", MODES)
    need_choice(cfg, "dtype", tuple(DTYPES))
    need_at_least(cfg, 1, "k", "batch_size", "num_workers", "rows_per_shard", "tensor_parallel_size")
    need_at_least(cfg, 2, "max_length")
    need_at_least(cfg, 0, "max_retries", "seed")
    need_at_least(cfg, -1, "prefetch_batches", "num_gpus_per_worker")
    need_between(cfg, "draws", 1, 255)
    need_positive(cfg, "temperature")
    if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", cfg.device):
        raise refuse("device", cfg.device, "use auto, cpu, cuda or cuda:N")
    if cfg.vllm_args:
        try:
            extra = json.loads(cfg.vllm_args)
        except json.JSONDecodeError as e:
            raise refuse("vllm_args", cfg.vllm_args, f"not JSON ({e}); give a JSON object of vllm.LLM arguments") from e
        if not isinstance(extra, dict):
            raise refuse("vllm_args", cfg.vllm_args, "give a JSON object of vllm.LLM arguments")


def teacher_source(teacher: str) -> "TeacherSource":
    """The teacher resolved once (teacher_cache.teacher.resolve_teacher); a Hub id that
    cannot be fetched is a ConfigError naming --teacher."""
    from mmkd.teacher_cache.teacher import resolve_teacher

    try:
        return resolve_teacher(teacher)
    except Exception as e:  # noqa: BLE001 - huggingface_hub's network, auth and not-found errors alike
        raise refuse("teacher", teacher, f"cannot fetch it from the Hugging Face Hub ({type(e).__name__}: {e}); "
                                         "check the id, your network or HF_TOKEN, or give a local folder") from e


def run_teacher_pass(cfg: TeacherPassConfig, log=print) -> Manifest:
    """Run (or resume) the teacher pass; returns the final manifest."""
    import ray

    check_config(cfg)
    source, command = teacher_source(cfg.teacher), command_line("teacher-pass", cfg)
    cfg = replace(cfg, teacher=source.folder)  # every load below, and the workers', reads this one snapshot
    read_errors = None if cfg.fail_fast else []  # --fail-fast: the first malformed record stops the pass
    samples = read_inputs(cfg, read_errors)
    writer = open_writer(cfg.output, build_manifest(cfg, len(samples), source, command), cfg.rows_per_shard,
                         replace=cfg.new_cache, shuffle_seed=cfg.seed)
    quarantine = Quarantine(cfg.output, writer, read_errors or [], cfg.fail_fast, cfg.max_retries, log)
    done = {sid for s in writer.manifest.shards for sid in s.sample_ids}
    pending = [s for s in samples if s.id not in done]
    log(f"[teacher-pass] {len(samples)} samples, {len(done)} already in the cache, {len(pending)} to run")
    tokenizer = teacher_tokenizer(cfg.teacher, cfg.trust_remote_code) if pending else None
    lengths = estimated_tokens(pending, tokenizer, writer.manifest.processor.get("num_visual_tokens") or 0)
    work = {s.id: n for s, n in zip(pending, lengths)}  # estimated tokens: batch order and the ETA's unit
    progress = Progress(len(samples), len(done), sum(lengths), log)
    if pending:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if not ray.is_initialized():
            if cfg.address:
                ray.init(address=cfg.address)
            else:
                ray.init(num_cpus=max(2, cfg.num_workers + 1), object_store_memory=1 << 30,
                         include_dashboard=False, log_to_driver=False)
        import torch

        per_teacher = cfg.tensor_parallel_size if cfg.backend == "vllm" else 1
        gpus = cfg.num_gpus_per_worker if cfg.num_gpus_per_worker >= 0 else (per_teacher if torch.cuda.is_available() else 0)
        worker = VllmTeacherWorker if cfg.backend == "vllm" else TeacherWorker
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # same input -> same shards
        # Ray Data's bars on a terminal; in a log file the pass's own lines (pipelines/progress.py) say it all
        ctx.enable_progress_bars = sys.stderr.isatty()
        if not ctx.enable_progress_bars:
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # its "bars disabled" hint
        ctx.max_errored_blocks = 0 if cfg.fail_fast else -1  # a batch Ray gave up on: reported by quarantine.finish
        batches = plan_batches(pending, cfg.batch_size, lengths=lengths, shuffle_seed=cfg.seed)  # longest first,
        # then the others in a seeded random order: shards get a mix of lengths
        ds = ray.data.from_arrow(batch_blocks([[sample_item(s)["sample"] for s in b] for b in batches], cfg.batch_size,
                                              cfg.num_workers))
        # transformers workers preprocess the next batch on a second thread while the teacher runs (TeacherWorker's
        # lock); not by default on CPU teachers, whose forward needs the same cores (docs/benchmarks.md)
        prefetch = cfg.prefetch_batches if cfg.prefetch_batches >= 0 else int(gpus > 0)
        overlap = ({"max_concurrent_calls_per_actor": 1 + prefetch, "enable_true_multi_threading": True}
                   if cfg.backend != "vllm" and prefetch > 0 else {})
        # no batch waits queued on an actor beyond those it runs (Ray Data queues up to 4): a worker that dies
        # takes down only the batches it was running, not innocent ones queued behind them
        overlap["max_tasks_in_flight_per_actor"] = overlap.get("max_concurrent_calls_per_actor", 1)
        ds = ds.map_batches(worker, fn_constructor_kwargs={"cfg": cfg, "source": source}, batch_size=cfg.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=cfg.num_workers, **overlap), num_gpus=gpus,
                            batch_format="numpy", **worker_options(cfg))
        shards_before = len(writer.manifest.shards)
        background = BackgroundWriter(writer)  # shard encoding + commits overlap the next batches
        try:
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                table = quarantine.take(table)  # bad samples -> errors.jsonl (or stop: --fail-fast, worker error)
                if table.num_rows:
                    background.add(table.select(RAW_SCHEMA.names).cast(RAW_SCHEMA))
                progress.update(table.num_rows, count_targets(table),
                                sum(work[sid] for sid in table.column("sample_id").to_pylist()),
                                sum(s.bytes for s in writer.manifest.shards[shards_before:]))
        except BaseException:
            background.join(raise_error=False)  # commit what arrived; the pipeline's error is the one to see
            quarantine.stop()  # after --fail-fast or a worker error: the stopping batch's good rows, errors file
            raise
        background.join()
    quarantine.finish(pending)  # samples of batches whose worker died more than max_retries times
    writer.flush()
    committed = {sid for s in writer.manifest.shards for sid in s.sample_ids}
    manifest = writer.close(complete=all(s.id in committed for s in samples) and not quarantine.records)
    size = sum(s.bytes for s in manifest.shards)
    targets = sum(s.targets for s in manifest.shards)
    log(progress.summary(manifest.num_rows, len(manifest.shards), size, targets, cfg.output))
    if quarantine.records:
        log(quarantine.summary())
    return manifest
