"""The student's data path: plan items -> batches with typed teacher targets, built in the
loader's worker processes.

Items are the rows the stage trains on: with a cache, the cache's rows whose sample is in
the input (in shard order; a shard's items are its rows, so storage.plan can order them by
shards and row groups), without one the input's samples (in pieces of INPUT_PIECE rows).
StudentData.batch(items) reads just those cache rows (TeacherCache.read_items: their row
groups only), decodes them flat (storage.schema.RowBatch), reads the samples from the
memory-mapped input (common.inputs.SampleTable), re-encodes each with the student's
processor, checks it against its row (invariant 1) and collates a student.targets.Batch.
Nothing is decoded ahead of the plan: a process holds the batches in flight and the last
row groups read, whatever the size of the cache or of the input.

The student never sees the teacher: only the cache rows (storage/) and the samples.
"""

from __future__ import annotations

import numpy as np
import torch

from mmkd.common.check import vocab_digest
from mmkd.common.inputs import load_image
from mmkd.common.preprocess import (
    IGNORE_INDEX,
    VISION_KEYS,
    Encoded,
    collate,
    encode_sample,
    image_token_count,
    image_token_id,
)
from mmkd.storage.fs import join
from mmkd.storage.plan import EpochPlan
from mmkd.storage.reader import TeacherCache
from mmkd.storage.schema import CacheError, CacheRow, TokenBatch, collapse_image_runs, token_digest
from mmkd.storage.writer import ERRORS_NAME
from mmkd.student.targets import Batch, Sampled, TopK


class AlignmentError(CacheError):
    """The sequence the student built differs from the one the teacher saw."""


def check_alignment(enc: Encoded, row: CacheRow, processor, kinds: tuple[str, ...] = ("response",)) -> None:
    """Refuse a cache row whose teacher sequence is not the student's (text tokens; the
    visual token count may differ unless visual/relation targets are used) or whose
    supervised token count differs."""
    img = image_token_id(processor)
    if token_digest(enc.input_ids, img) != row.token_digest:
        a = collapse_image_runs(enc.input_ids, img)
        b = collapse_image_runs(row.input_ids, img)
        i = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
        tok = processor.tokenizer
        raise AlignmentError(
            f"sample {enc.sample_id}: the student's token sequence differs from the teacher's in "
            f"the cache at text token {i} (student {tok.convert_ids_to_tokens(a[i:i + 5].tolist())} "
            f"vs cache {tok.convert_ids_to_tokens(b[i:i + 5].tolist())}; lengths {len(a)} vs {len(b)}). "
            "The targets would be misaligned. Use the teacher's tokenizer and chat template for "
            "the student (and the data the cache was made from), or rebuild the cache."
        )
    n_student = int((enc.labels != IGNORE_INDEX).sum())
    n_cached = len(row.response) if row.response is not None else 0
    if n_student != n_cached:
        raise AlignmentError(
            f"sample {enc.sample_id}: {n_student} supervised tokens for the student but "
            f"{n_cached} response targets in the cache; the label masks differ"
        )
    if "visual" in kinds or "relation" in kinds:
        n_vis = int((enc.input_ids == img).sum())
        n_teacher = len(row.visual) if row.visual is not None else row.relation.shape[0]
        if n_vis != n_teacher:
            raise AlignmentError(_visual_count_message(f"sample {enc.sample_id}", n_vis, n_teacher))


def _visual_count_message(where: str, student: int, teacher: int) -> str:
    return (f"{where}: the student has {student} visual tokens per image, the teacher's cache {teacher}; "
            "the visual terms (MDist visual KL, RDist) compare position by position and need the same "
            "count. Set visual_weight=0 and relation_weight=0 (the response targets still work), or give "
            "the student the teacher's image resolution and patch grid")


INPUT_PIECE = 1024  # input rows per piece of the plan when there is no cache (the plan's "shards")


def _targets(tb: TokenBatch | None, mode: str) -> TopK | Sampled | None:
    """A kind's decoded targets as the typed value the loss terms read."""
    if tb is None:
        return None
    ids = torch.from_numpy(tb.ids).long()  # gather indices
    if mode == "sampled":
        return Sampled(ids, torch.from_numpy(tb.counts))
    return TopK(ids, torch.from_numpy(tb.logprobs), torch.from_numpy(tb.leftover))


def _tensors(encoded: list[Encoded], pad_id: int) -> dict:
    arrays = collate(encoded, pad_id)
    vision = {k: torch.from_numpy(arrays.pop(k)) for k in VISION_KEYS if k in arrays}
    return {**{k: torch.from_numpy(v) for k, v in arrays.items()}, "vision": vision}


class StudentData(torch.utils.data.Dataset):
    """The items of one stage (module docstring), batched by batch(items) / __getitems__ (the
    DataLoader hands a list of items to a worker, which returns the collated Batch).

    samples: the input (common.inputs.SampleTable, or SampleList for samples in memory);
    preference pairs when samples.pairs. cache: the teacher cache (None: CE only, or the
    online baseline). kinds: the record kinds the stage's terms read (student.terms).
    subset: input rows to use (None: all). keep_encoded: remember each sample, its encoding
    and its row check (small data trained for many epochs in one process; needs
    num_workers=0).

    shard_rows: per cache shard (or input piece), the rows used: the layout storage.plan
    orders. Refuses, before any step, a cache lacking the kinds, another vocabulary or
    image token or temperature (check_cache_compatible), and input samples the cache has no
    row for (naming them and the teacher pass's errors file).
    """

    def __init__(self, samples, processor, image_root: str, max_length: int, cache: TeacherCache | None = None,
                 kinds: tuple[str, ...] = ("response",), subset: np.ndarray | None = None, keep_encoded: bool = False):
        self.samples, self.processor, self.cache = samples, processor, cache
        self.image_root, self.max_length, self.kinds = image_root, max_length, kinds
        self.pad_id, self.image_token_id = processor.tokenizer.pad_token_id, image_token_id(processor)
        # keep_encoded: each sample, its encoding and its row check, once (small data, many epochs)
        self._encoded: dict[int, Encoded] | None = {} if keep_encoded else None
        self._samples: dict[int, object] | None = {} if keep_encoded else None
        self._checked: set[int] = set()
        n = len(samples)
        use = np.ones(n, dtype=bool) if subset is None else np.isin(np.arange(n), subset)
        if cache is None:
            pieces = range(0, n, INPUT_PIECE)
            self.shard_rows = [np.flatnonzero(use[a:a + INPUT_PIECE]) for a in pieces]
            self.input_rows = np.concatenate([a + r for a, r in zip(pieces, self.shard_rows)]) if n else \
                np.zeros(0, np.int64)
        else:
            if samples.pairs and "preference" not in cache.manifest.record_kinds:
                raise CacheError(f"{cache.path}: holds no preference records ({cache.manifest.record_kinds}); "
                                 "run the teacher pass with --records preference on the pairs file")
            if not samples.pairs:
                check_cache_compatible(cache, processor, kinds)
            cache.read_kinds = ("preference",) if samples.pairs else tuple(kinds)  # decode no other record kind
            rows = [samples.rows_of(s.sample_ids) for s in cache.manifest.shards]
            self.shard_rows = [np.flatnonzero((r >= 0) & use[np.maximum(r, 0)]) for r in rows]
            self.input_rows = np.concatenate([r[k] for r, k in zip(rows, self.shard_rows)]) if rows else \
                np.zeros(0, np.int64)
            covered = np.zeros(n, dtype=bool)
            covered[self.input_rows] = True
            missing = np.flatnonzero(use & ~covered)
            if len(missing):
                what = "pairs have no cached reference log-probs" if samples.pairs else "samples have no cached targets"
                errors = join(cache.root, ERRORS_NAME)
                raise CacheError(
                    f"{cache.path}: {len(missing)} of {int(use.sum())} {what} (first: "
                    f"{[samples.id_at(i) for i in missing[:5]]}); run the teacher pass on this data (it resumes) "
                    "or train on the cached samples only"
                    + (f"; the samples the teacher pass set aside are listed with the reason in {errors}"
                       if cache.fs.exists(errors) else ""))
        self._layout = EpochPlan(self.shard_rows, seed=None)  # item numbering (the plan's locate)

    def __len__(self) -> int:
        return len(self.input_rows)

    def __getitem__(self, i: int) -> Batch:
        return self.batch([i])

    def __getitems__(self, items) -> Batch:
        return self.batch(items)

    def _sample(self, row: int):
        if self._samples is None:
            return self.samples[row]
        if row not in self._samples:
            self._samples[row] = self.samples[row]
        return self._samples[row]

    def _encode(self, row: int, sample) -> Encoded:
        enc = self._encoded.get(row) if self._encoded is not None else None
        if enc is None:
            enc = encode_sample(self.processor, sample, load_image(self.image_root, sample), self.max_length)
            if self._encoded is not None:
                self._encoded[row] = enc
        return enc

    def batch(self, items) -> Batch:
        """The collated Batch of these items (in this order)."""
        items = np.asarray(items, dtype=np.int64)
        rows = self.cache.read_items(self._layout, items) if self.cache is not None else None
        samples = [self._sample(int(r)) for r in self.input_rows[items]]
        if self.samples.pairs:
            return self._pairs(items, samples, rows)
        encoded = [self._encode(int(r), s) for r, s in zip(self.input_rows[items], samples)]
        batch = Batch(**_tensors(encoded, self.pad_id), samples=samples)
        if rows is None:
            return batch
        for i, (item, enc) in enumerate(zip(items.tolist(), encoded)):
            if item not in self._checked:
                check_alignment(enc, rows.row(i), self.processor, self.kinds)
                if self._encoded is not None:  # kept encodings: a row checked once stays checked
                    self._checked.add(item)
        mode = self.cache.manifest.mode
        for kind in ("response", "visual"):
            tb = getattr(rows, kind) if kind in self.kinds else None
            if tb is not None and tb.ids.size:
                check_target_ids(self.cache, int(tb.ids.max()))
            setattr(batch, kind, _targets(tb, mode))
        if "relation" in self.kinds:
            batch.relation = [torch.from_numpy(m) for m in rows.relation]
        return batch

    def _pairs(self, items: np.ndarray, pairs: list, rows) -> Batch:
        """2P sequences (the P chosen, then the P rejected) and the teacher's reference."""
        chosen, rejected = [], []
        for j, p in enumerate(pairs):
            enc = [encode_sample(self.processor, s, load_image(self.image_root, s), self.max_length)
                   for s in (p.sample("chosen"), p.sample("rejected"))]
            row = rows.row(j)
            pref = row.preference
            for e, digest, n_ref, which in ((enc[0], row.token_digest, len(pref.chosen_token_logprobs), "chosen"),
                                            (enc[1], pref.rejected_token_digest, len(pref.rejected_token_logprobs),
                                             "rejected")):
                n = int((e.labels != IGNORE_INDEX).sum())
                if token_digest(e.input_ids, self.image_token_id) != digest or n != n_ref:
                    raise AlignmentError(f"pair {p.id}: the student's {which} sequence differs from the one the "
                                         "teacher scored (tokenizer, chat template or the pairs file changed); "
                                         "use the teacher's processor or rebuild the preference cache")
            chosen.append(enc[0])
            rejected.append(enc[1])
        return Batch(**_tensors(chosen + rejected, self.pad_id), samples=pairs,
                     ref_chosen=torch.tensor([r.chosen_logprob for r in rows.preference], dtype=torch.float64),
                     ref_rejected=torch.tensor([r.rejected_logprob for r in rows.preference], dtype=torch.float64))


def check_cache_compatible(cache: TeacherCache, processor, kinds: tuple[str, ...] = ("response",)) -> None:
    """Settings the student cannot honour: record kinds the training terms need but the
    cache lacks, a different image token or visual token count (when visual terms are
    used), or targets at a temperature other than 1 (the losses compare them with the
    student's own softmax)."""
    m = cache.manifest
    missing = [k for k in kinds if k not in m.record_kinds]
    if missing:
        raise CacheError(f"{cache.path}: holds no {', '.join(missing)} records (it has {m.record_kinds}); "
                         f"the training terms need them: re-run the teacher pass with --records "
                         f"{','.join(dict.fromkeys(m.record_kinds + missing))} into a new folder, or set "
                         "their weights to 0")
    digest = m.processor.get("vocab_sha256")  # caches made before 2026-11 lack it
    if digest is not None and digest != vocab_digest(processor.tokenizer):
        raise CacheError(
            f"{cache.path}: the student's vocabulary (token -> id map) is not the one of the teacher that made "
            "this cache, so cached target ids would name other tokens; use the teacher's tokenizer "
            "(`mmkd check TEACHER STUDENT --cache PATH` lists the differences)"
        )
    img = image_token_id(processor)
    if m.processor.get("image_token_id") != img:
        raise CacheError(
            f"{cache.path}: the cache's image token id is {m.processor.get('image_token_id')}, the "
            f"student's is {img}; the student must use the teacher's tokenizer"
        )
    if ("visual" in kinds or "relation" in kinds) and m.processor.get("num_visual_tokens") != image_token_count(processor):
        raise CacheError(_visual_count_message(str(cache.path), image_token_count(processor),
                                               m.processor.get("num_visual_tokens")))
    if float(m.extraction.get("temperature", 1.0)) != 1.0:
        raise CacheError(
            f"{cache.path}: targets were extracted at temperature {m.extraction['temperature']}; this "
            "trainer distils at temperature 1. Re-run the teacher pass with --temperature 1"
        )


def check_student_vocab(cache: TeacherCache, model, max_target_id: int | None = None) -> None:
    """The student must score every id of the cache's shared vocabulary (manifest
    vocab_size: the tokenizer's ids, without either head's padding), and every cached target
    id (max_target_id, when the caller has looked) must lie inside that vocabulary."""
    vocab = cache.manifest.vocab_size
    width = model.get_output_embeddings().weight.shape[0]
    if width < vocab:
        raise CacheError(
            f"{cache.path}: the teacher's vocabulary has {vocab} ids but the student's output head only "
            f"{width} rows; the student must share the teacher's tokenizer (its head may be padded larger, "
            "never smaller)"
        )
    if max_target_id is not None:
        check_target_ids(cache, max_target_id)


def check_target_ids(cache: TeacherCache, max_target_id: int) -> None:
    """Every cached target id must lie inside the cache's own shared vocabulary."""
    if max_target_id >= cache.manifest.vocab_size:
        raise CacheError(
            f"{cache.path}: holds target id {max_target_id}, outside its own vocabulary of "
            f"{cache.manifest.vocab_size} ids (a padded head row?); rebuild the cache with this version of mmkd"
        )
