"""The student's data: samples re-encoded with the student's processor, joined with the
teacher's cached targets, checked for alignment, batched per data-parallel rank.

The student never sees the teacher: only the cache rows (storage/) and the samples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from mmkd.common.check import vocab_digest
from mmkd.common.inputs import load_image
from mmkd.common.preprocess import IGNORE_INDEX, Encoded, collate, encode_sample, image_token_count, image_token_id
from mmkd.common.samples import PreferencePair, Sample
from mmkd.storage.fs import join
from mmkd.storage.reader import CacheRow, TeacherCache
from mmkd.storage.schema import CacheError, collapse_image_runs, token_digest
from mmkd.storage.writer import ERRORS_NAME


class AlignmentError(CacheError):
    """The sequence the student built differs from the one the teacher saw."""


@dataclass
class Item:
    encoded: Encoded
    target: CacheRow | None


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


class DistillDataset(torch.utils.data.Dataset):
    """Map-style: item i = sample i encoded by the student's processor (+ its cache row).

    With a cache, every sample must have a row (an error lists the missing ids), and each
    row is alignment-checked when its item is built. kinds: the record kinds the training
    terms use (response, visual, relation); the cache must hold them.
    """

    def __init__(self, samples: list[Sample], processor, image_root: str, max_length: int,
                 cache: TeacherCache | None = None, keep_encoded: bool = False,
                 kinds: tuple[str, ...] = ("response",)):
        self.samples, self.processor = samples, processor
        self.image_root, self.max_length = image_root, max_length
        # keep_encoded: remember each encoded sample after its first use (small data sets
        # trained for many epochs in one process; pixel values make this costly for large ones)
        self._encoded: dict[int, Encoded] | None = {} if keep_encoded else None
        self.rows: dict[str, CacheRow] | None = None
        self.max_target_id: int | None = None
        self.kinds = kinds
        if cache is not None:
            check_cache_compatible(cache, processor, kinds)
            self.rows = cache.rows()
            self.max_target_id = max((int(t.ids.max()) for r in self.rows.values()
                                      for t in (r.response, r.visual) if t is not None and t.ids.size), default=None)
            missing = [s.id for s in samples if s.id not in self.rows]
            if missing:
                errors = join(cache.root, ERRORS_NAME)
                raise CacheError(
                    f"{cache.path}: {len(missing)} of {len(samples)} samples have no cached targets "
                    f"(first: {missing[:5]}); run the teacher pass on this data (it resumes) "
                    "or train on the cached samples only"
                    + (f"; the samples the teacher pass set aside are listed with the reason in {errors}"
                       if cache.fs.exists(errors) else "")
                )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Item:
        s = self.samples[i]
        enc = self._encoded.get(i) if self._encoded is not None else None
        if enc is None:
            enc = encode_sample(self.processor, s, load_image(self.image_root, s), self.max_length)
            if self._encoded is not None:
                self._encoded[i] = enc
        row = None
        if self.rows is not None:
            row = self.rows[s.id]
            check_alignment(enc, row, self.processor, self.kinds)
        return Item(enc, row)


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
    if max_target_id is not None and max_target_id >= vocab:
        raise CacheError(
            f"{cache.path}: holds target id {max_target_id}, outside its own vocabulary of {vocab} ids "
            "(a padded head row?); rebuild the cache with this version of mmkd"
        )


TARGET_PREFIX = {"response": "target", "visual": "visual"}


def collate_items(items: list[Item], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch tensors: input_ids, attention_mask, labels [B, T], pixel_values, and, with a
    cache, the teacher's targets:
    - response targets of the N supervised tokens in row-major (sample, position) order
      (the order of labels != -100): target_ids [N, w] and either target_logprobs [N, k]
      + target_leftover [N] (top-k cache) or target_counts [N, draws] (sampled);
    - visual targets (if cached) of the M image tokens in row-major order (the order of
      input_ids == image token): visual_ids, visual_logprobs, visual_leftover / visual_counts;
    - relation [B, n, n] (if cached): each sample's normalised teacher relation matrix."""
    batch = {k: torch.from_numpy(v) for k, v in collate([it.encoded for it in items], pad_id).items()}
    if not items or items[0].target is None:
        return batch
    for kind, prefix in TARGET_PREFIX.items():
        targets = [getattr(it.target, kind) for it in items]
        if targets[0] is None:
            continue
        for name in ("ids", "logprobs", "leftover", "counts"):
            if getattr(targets[0], name) is not None:
                batch[f"{prefix}_{name}"] = torch.from_numpy(np.concatenate([getattr(t, name) for t in targets]))
        batch[f"{prefix}_ids"] = batch[f"{prefix}_ids"].long()  # gather indices
    if items[0].target.relation is not None:
        batch["relation"] = torch.from_numpy(np.stack([it.target.relation for it in items]))
    return batch


@dataclass
class PairItem:
    chosen: Encoded
    rejected: Encoded
    reference: CacheRow


class PreferenceDataset(torch.utils.data.Dataset):
    """Map-style: item i = pair i's chosen and rejected sequences encoded by the student's
    processor, with the teacher's log-probs of both answers from a preference cache (the
    reference model of DPO / KTO). Both sequences are checked against the digests the
    teacher pass stored."""

    def __init__(self, pairs: list[PreferencePair], processor, image_root: str, max_length: int,
                 cache: TeacherCache):
        if "preference" not in cache.manifest.record_kinds:
            raise CacheError(f"{cache.path}: holds no preference records ({cache.manifest.record_kinds}); "
                             "run the teacher pass with --records preference on the pairs file")
        self.pairs, self.processor, self.image_root, self.max_length = pairs, processor, image_root, max_length
        self.rows = cache.rows()
        missing = [p.id for p in pairs if p.id not in self.rows]
        if missing:
            raise CacheError(f"{cache.path}: {len(missing)} of {len(pairs)} pairs have no cached reference "
                             f"log-probs (first: {missing[:5]}); run the teacher pass on these pairs")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> PairItem:
        p = self.pairs[i]
        enc = [encode_sample(self.processor, s, load_image(self.image_root, s), self.max_length)
               for s in (p.sample("chosen"), p.sample("rejected"))]
        row = self.rows[p.id]
        img = image_token_id(self.processor)
        for e, digest, n_ref, which in ((enc[0], row.token_digest, len(row.preference.chosen_token_logprobs), "chosen"),
                                        (enc[1], row.preference.rejected_token_digest,
                                         len(row.preference.rejected_token_logprobs), "rejected")):
            n = int((e.labels != IGNORE_INDEX).sum())
            if token_digest(e.input_ids, img) != digest or n != n_ref:
                raise AlignmentError(f"pair {p.id}: the student's {which} sequence differs from the one the "
                                     "teacher scored (tokenizer, chat template or the pairs file changed); "
                                     "use the teacher's processor or rebuild the preference cache")
        return PairItem(enc[0], enc[1], row)


def collate_pairs(items: list[PairItem], pad_id: int) -> dict[str, torch.Tensor]:
    """2P sequences (the P chosen, then the P rejected) as in collate(), plus
    ref_chosen / ref_rejected [P]: the teacher's summed answer log-probs."""
    batch = {k: torch.from_numpy(v) for k, v in
             collate([it.chosen for it in items] + [it.rejected for it in items], pad_id).items()}
    batch["ref_chosen"] = torch.tensor([it.reference.preference.chosen_logprob for it in items], dtype=torch.float64)
    batch["ref_rejected"] = torch.tensor([it.reference.preference.rejected_logprob for it in items],
                                         dtype=torch.float64)
    return batch


def rank_batches(num_items: int, batch_size: int, rank: int, world_size: int, seed: int,
                 epoch: int) -> list[list[int]]:
    """This rank's batches of item indices for one epoch.

    A seeded shuffle (same on every rank), cut to a multiple of world_size * batch_size so
    every rank yields the same number of full batches (docs/architecture.md, invariant 7);
    the cut-off tail differs per epoch because the shuffle does.
    """
    order = list(range(num_items))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    per_step = batch_size * world_size
    steps = num_items // per_step
    if steps == 0:
        raise ValueError(f"{num_items} items are fewer than one global batch ({per_step}); lower batch_size")
    mine = order[: steps * per_step][rank::world_size]
    return [mine[i * batch_size:(i + 1) * batch_size] for i in range(steps)]
