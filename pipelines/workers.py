"""The teacher pass's Ray actors: a batch of samples in, cache rows out.

Both backends share one contract and one body (TeacherActor): constructed with the
TeacherPassConfig (and the driver's TeacherSource: a worker on a node without the driver's
snapshot of a Hub teacher fetches the same commit); called with a map_batches batch ({"sample": [JSON of a Sample or
PreferencePair]}, see sample_item); each sample is encoded on its own by the one
encode_sample (pipelines.quarantine.encode_each, so both backends score identical ids and
set aside the same bad samples); the teacher scores the samples that encoded; the answer is
RAW_SCHEMA rows plus error rows for the bad samples (pipelines/quarantine.py). They differ
only in the scoring: TeacherWorker runs a transformers model (teacher_cache.extract),
VllmTeacherWorker a vllm.LLM (teacher_cache.vllm_backend).
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from dataclasses import asdict, replace

import pyarrow as pa

from mmkd.common.check import shared_vocab_size
from mmkd.common.inputs import load_image
from mmkd.common.preprocess import collate, encode_sample, image_token_id
from mmkd.common.samples import PreferencePair, Sample
from mmkd.pipelines.quarantine import encode_each, guarded, with_errors
from mmkd.teacher_cache.extract import parse_records


def sample_item(x: Sample | PreferencePair) -> dict:
    """The row of the teacher pass's Ray data set that carries one sample (or pair)."""
    return {"sample": json.dumps(asdict(x)) if isinstance(x, PreferencePair) else x.to_json()}


class TeacherActor:
    """The shared body of the teacher actors (module docstring). A backend sets processor,
    image_token_id and vocab_size in its constructor and implements score_samples and
    score_pairs."""

    def __init__(self, cfg, source=None):
        if source is not None:
            cfg = replace(cfg, teacher=source.local_folder())
        self.cfg = cfg
        self.records = parse_records(cfg.records)

    def __call__(self, batch: dict) -> pa.Table:
        """The batch's RAW rows, and its bad samples as error rows: each sample is encoded
        on its own, the teacher runs on those that encode."""
        return guarded(self._rows, batch)

    def _encode(self, sample: Sample):
        """(image or None, Encoded) of one sample; SampleError when it cannot be used."""
        image = load_image(self.cfg.inputs.image_root, sample)
        return image, encode_sample(self.processor, sample, image, self.cfg.max_length)

    def _rows(self, batch: dict) -> pa.Table:
        if self.records == ["preference"]:  # chosen sequences, then rejected, scored together
            pairs, encoded, bad = encode_each([PreferencePair(**json.loads(s)) for s in batch["sample"]],
                                              lambda p: (self._encode(p.sample("chosen")),
                                                         self._encode(p.sample("rejected"))))
            return with_errors(self.score_pairs(pairs, encoded) if pairs else None, bad)
        samples, encoded, bad = encode_each([Sample.from_json(s) for s in batch["sample"]], self._encode)
        return with_errors(self.score_samples(samples, encoded) if samples else None, bad)

    def score_samples(self, samples: list[Sample], encoded: list) -> pa.Table:
        """RAW rows of the configured record kinds; encoded: (image, Encoded) per sample."""
        raise NotImplementedError

    def score_pairs(self, pairs: list[PreferencePair], encoded: list) -> pa.Table:
        """RAW preference rows; encoded: ((image, chosen Encoded), (image, rejected Encoded))
        per pair."""
        raise NotImplementedError


class TeacherWorker(TeacherActor):
    """The transformers backend: holds the teacher model (teacher_cache.teacher.load_teacher)."""

    def __init__(self, cfg, source=None):
        import torch

        from mmkd.common.heads import head_gram, output_head
        from mmkd.teacher_cache.extract import ExtractionSpec
        from mmkd.teacher_cache.teacher import input_device, load_teacher

        super().__init__(cfg, source)
        cfg = self.cfg
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.model, self.processor = load_teacher(cfg.teacher, cfg.dtype, cfg.device, cfg.device_map or None,
                                                  cfg.trust_remote_code)
        self.device = input_device(self.model)
        self.vocab_size = shared_vocab_size(self.processor, self.model.get_output_embeddings().weight.shape[0])
        self.image_token_id = image_token_id(self.processor)
        self.spec = ExtractionSpec(tuple(self.records), cfg.mode, cfg.k, cfg.draws, cfg.temperature, self.vocab_size)
        self._forward = threading.Lock()  # calls run on prefetch_batches + 1 threads; one at a time runs the teacher
        self.gram = None
        if "relation" in self.records:  # W^T W once per teacher: every R is then H G H^T
            self.gram = head_gram(output_head(self.model, self.vocab_size).weight)

    def _tensors(self, encoded: list) -> dict:
        from mmkd.teacher_cache.extract import to_device

        return to_device(collate(encoded, self.processor.tokenizer.pad_token_id), self.device, self.model.dtype)

    def score_pairs(self, pairs: list[PreferencePair], encoded: list) -> pa.Table:
        from mmkd.teacher_cache.extract import extract_preference_rows

        tensors = self._tensors([c for (_, c), _ in encoded] + [r for _, (_, r) in encoded])
        with self._forward:
            return extract_preference_rows(self.model, tensors, [p.id for p in pairs], self.image_token_id,
                                           self.vocab_size)

    def score_samples(self, samples: list[Sample], encoded: list) -> pa.Table:
        import torch

        from mmkd.teacher_cache.extract import extract_rows

        tensors = self._tensors([e for _, e in encoded])
        ids = [s.id for s in samples]
        gen = None
        if self.cfg.mode == "sampled":  # draws depend on the seed and the batch's samples, not on timing
            gen = torch.Generator(self.device).manual_seed(zlib.crc32(f"{self.cfg.seed}|{'|'.join(ids)}".encode()))
        with self._forward:
            return extract_rows(self.model, tensors, ids, self.image_token_id, self.spec, gen, self.gram)


class VllmTeacherWorker(TeacherActor):
    """The vLLM backend (``--backend vllm``): holds a vllm.LLM of the teacher.

    llm: an engine to reuse (e.g. one LLM for several record kinds in one process); by
    default one is built from cfg (teacher_cache.vllm_backend.engine_args; cfg.vllm_args, a
    JSON object, overrides any vllm.LLM argument).
    """

    def __init__(self, cfg, llm=None, source=None):
        from transformers import AutoConfig

        from mmkd.common.models import load_processor
        from mmkd.teacher_cache.vllm_backend import check_settings, load_vllm_teacher

        super().__init__(cfg, source)
        cfg = self.cfg
        check_settings(cfg.mode, self.records, cfg.temperature)
        self.processor = load_processor(cfg.teacher, cfg.trust_remote_code)
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

    def _score(self, encoded: list, ids: list[str], k: int, last_row: bool):
        """vLLM's log-prob tables of the (image, Encoded) sequences, and their labels."""
        from mmkd.teacher_cache.vllm_backend import score_sequences

        tables = score_sequences(self.llm, [e.input_ids for _, e in encoded], [im for im, _ in encoded], ids, k,
                                 self.image_token_id, self.vocab_size, last_row, self.head_padding)
        return tables, [e.labels for _, e in encoded]

    def score_pairs(self, pairs: list[PreferencePair], encoded: list) -> pa.Table:
        from mmkd.teacher_cache.vllm_backend import preference_rows_from_tables

        ids = [p.id for p in pairs]
        tables, labels = self._score([c for c, _ in encoded] + [r for _, r in encoded], ids + ids, 0, last_row=False)
        return preference_rows_from_tables(tables, labels, ids, self.image_token_id)

    def score_samples(self, samples: list[Sample], encoded: list) -> pa.Table:
        from mmkd.teacher_cache.vllm_backend import rows_from_tables

        ids = [s.id for s in samples]
        tables, labels = self._score(encoded, ids, self.cfg.k, last_row="visual" in self.records)
        return rows_from_tables(tables, labels, ids, self.image_token_id, tuple(self.records))
