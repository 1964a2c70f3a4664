"""The teacher pass's actor for ``--backend vllm``: same contract as
pipelines.teacher_pass.TeacherWorker (constructed with the TeacherPassConfig; called with a
batch of samples, returns RAW_SCHEMA rows plus error rows for bad samples), with the
teacher run by vLLM (teacher_cache.vllm_backend). Sequences are built by the one
encode_sample, each sample on its own through pipelines.quarantine.encode_each, so both
backends score identical ids and set aside the same bad samples."""

from __future__ import annotations

import json

import pyarrow as pa

from pipelines.preprocess import encode_sample, image_token_id
from pipelines.quarantine import encode_each, guarded, with_errors
from pipelines.samples import PreferencePair, Sample, load_image


class VllmTeacherWorker:
    """A Ray actor: holds a vllm.LLM of the teacher, turns a batch of samples into cache rows.

    llm: an engine to reuse (e.g. one LLM for several record kinds in one process); by
    default one is built from cfg (teacher_cache.vllm_backend.engine_args; cfg.vllm_args, a
    JSON object, overrides any vllm.LLM argument).
    """

    def __init__(self, cfg, llm=None):
        from transformers import AutoConfig, AutoProcessor

        from pipelines.teacher_pass import parse_records
        from teacher_cache.teacher import shared_vocab_size
        from teacher_cache.vllm_backend import check_settings, load_vllm_teacher

        self.cfg = cfg
        self.records = parse_records(cfg.records)
        check_settings(cfg.mode, self.records, cfg.temperature)
        self.processor = AutoProcessor.from_pretrained(cfg.teacher)
        self.image_token_id = image_token_id(self.processor)
        head_size = AutoConfig.from_pretrained(cfg.teacher).get_text_config().vocab_size
        self.vocab_size = shared_vocab_size(self.processor, head_size)  # as the transformers backend
        self.head_padding = head_size - self.vocab_size
        if llm is None and cfg.device != "auto":
            from vllm.platforms import current_platform

            if not cfg.device.startswith(current_platform.device_type):
                raise ValueError(f"device {cfg.device!r}: this vLLM build runs on {current_platform.device_type!r}; "
                                 "vLLM picks its platform itself, so leave --device auto with --backend vllm")
        extra = json.loads(cfg.vllm_args) if cfg.vllm_args else {}
        if not isinstance(extra, dict):
            raise ValueError(f"vllm_args {cfg.vllm_args!r}: expected a JSON object of vllm.LLM arguments")
        self.llm = llm if llm is not None else load_vllm_teacher(
            cfg.teacher, cfg.dtype, cfg.k + self.head_padding, cfg.max_length, cfg.tensor_parallel_size, extra)

    def _encode(self, sample: Sample):
        image = load_image(self.cfg.image_root, sample)
        return image, encode_sample(self.processor, sample, image, self.cfg.max_length)

    def _score(self, encoded: list, ids: list[str], k: int, last_row: bool):
        """encoded: (image, Encoded) per sequence."""
        from teacher_cache.vllm_backend import score_sequences

        tables = score_sequences(self.llm, [e.input_ids for _, e in encoded], [im for im, _ in encoded], ids, k,
                                 self.image_token_id, self.vocab_size, last_row, self.head_padding)
        return tables, [e.labels for _, e in encoded]

    def __call__(self, batch: dict) -> pa.Table:
        """As TeacherWorker.__call__: RAW rows plus error rows for the bad samples."""
        return guarded(self._rows, batch)

    def _rows(self, batch: dict) -> pa.Table:
        from teacher_cache.vllm_backend import preference_rows_from_tables, rows_from_tables

        if self.records == ["preference"]:  # chosen sequences, then rejected, in one vLLM batch
            pairs, encoded, bad = encode_each([PreferencePair(**json.loads(s)) for s in batch["sample"]],
                                              lambda p: (self._encode(p.sample("chosen")),
                                                         self._encode(p.sample("rejected"))))
            if not pairs:
                return with_errors(None, bad)
            ids = [p.id for p in pairs]
            tables, labels = self._score([c for c, _ in encoded] + [r for _, r in encoded], ids + ids, 0,
                                         last_row=False)
            return with_errors(preference_rows_from_tables(tables, labels, ids, self.image_token_id), bad)
        samples, encoded, bad = encode_each([Sample.from_json(s) for s in batch["sample"]], self._encode)
        if not samples:
            return with_errors(None, bad)
        ids = [s.id for s in samples]
        tables, labels = self._score(encoded, ids, self.cfg.k, last_row="visual" in self.records)
        return with_errors(rows_from_tables(tables, labels, ids, self.image_token_id, tuple(self.records)), bad)
