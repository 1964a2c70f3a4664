"""Evaluation on a held-out split: exact-match accuracy and mean KL to the teacher.

Exact match is computed in one teacher-forced forward: a sample counts as correct when the
argmax at every supervised position is the reference token. That is exactly "greedy
decoding reproduces the reference answer (and its end-of-turn token)", since greedy
decoding follows the reference as long as each argmax matches it (ties aside); it costs
one forward instead of a generate loop. A test checks it against `generate`.

KL to the teacher reads the teacher's targets from a cache of the same split (the teacher
is not loaded): the per-token bucket forward KL (student.losses.topk_rows), a lower bound
of the full-vocabulary KL that is exact up to the top-k coarsening. With `teacher`, the
teacher is loaded (student/online.py) and full_kl_to_teacher is the exact forward KL over
the whole shared vocabulary: the honest metric for comparing students trained from caches
of different k or modes (benchmarks/bench_offline_online.py), with top1_agreement (how often
the student's argmax is the teacher's).

Every run also reports the student's cross-entropy on the reference tokens (ce) and the
expected calibration error of its next-token confidence (ece: ECE_BINS equal-width bins of
the argmax's probability, "correct" when the argmax is the reference token; the weighted
mean over bins of |accuracy - confidence|).
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import torch

from mmkd.common.config import InputsConfig, need_at_least, need_model, need_path
from mmkd.common.inputs import SampleTable
from mmkd.common.models import length_limit, load_processor
from mmkd.common.preprocess import image_token_id
from mmkd.storage.reader import TeacherCache
from mmkd.student.config import EvalConfig
from mmkd.student.data import StudentData, check_student_vocab
from mmkd.student.fused import head_top1
from mmkd.student.model import load_model
from mmkd.student.outputs import StudentOutputs
from mmkd.student.targets import TopK
from mmkd.student.terms import divergence_term

ECE_BINS = 15


def calibration_error(counts: torch.Tensor, confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """Expected calibration error from per-bin sums (float64 [ECE_BINS] each): rows, sum of
    confidences, sum of correct predictions; sum_b n_b / N x |acc_b - conf_b|."""
    n = counts.clamp(min=1)
    return float(((correct / n - confidence / n).abs() * counts).sum() / counts.sum().clamp(min=1))


def _bin_of(confidence: torch.Tensor) -> torch.Tensor:
    """Bin index of each confidence in [0, 1]: bins (i/B, (i+1)/B], 0 in the first."""
    return (confidence * ECE_BINS).ceil().long().clamp(1, ECE_BINS) - 1


def _answer(sample) -> str:
    return next(m["content"] for m in reversed(sample.messages) if m["role"] == "assistant").strip().lower()


def check_config(cfg: EvalConfig) -> None:
    """Refuse what evaluation cannot honour before any model loads (ConfigError)."""
    need_model(cfg, "model", "model")
    need_path(cfg, "inputs.data", "data file or folder")
    need_path(cfg, "inputs.image_root", "image root folder", required=False)
    if cfg.cache:
        need_path(cfg, "cache", "teacher cache folder")
    if cfg.teacher:
        need_model(cfg, "teacher", "teacher model", hub=False)
    need_at_least(cfg, 1, "batch_size")
    need_at_least(cfg, 0, "max_length")


@torch.no_grad()
def evaluate(model_path: str, inputs: InputsConfig, cache: str | None = None, batch_size: int = 64,
             max_length: int = 0, device: str = "cpu", teacher: str | None = None) -> dict:
    """Metrics of the model saved at model_path on the samples of `inputs`:
    accuracy (exact match), accuracy per task (the samples' "task" field, if any),
    ce (nats per supervised token: the cross-entropy of the reference tokens), ece (the
    expected calibration error of the argmax confidence, ECE_BINS bins),
    kl_to_teacher (nats per supervised token, the bucket KL; only with a cache),
    full_kl_to_teacher (nats per supervised token over the full vocabulary) and
    top1_agreement (fraction of supervised positions where the student's argmax is the
    teacher's; both only with a teacher folder: the teacher is loaded and run on the same
    batches), samples, tokens, and,
    when the data has existence questions (task "exists"), hallucination_rate: the
    fraction of those about an ABSENT object that the model answers "yes" (POPE's
    false-positive rate; the answer is the argmax at the first answer token).
    `inputs.data` is any input of common.inputs.read_inputs; max_length 0 = the model's limit
    (common.models.length_limit)."""
    model = load_model(model_path, device=device).eval()
    processor = load_processor(model_path)
    max_length = max_length or length_limit(model.config, processor) or 2048
    teacher_cache = TeacherCache(cache) if cache else None
    dataset = StudentData(SampleTable(inputs), processor, inputs.image_root, max_length, teacher_cache)
    if teacher_cache is not None:
        check_student_vocab(teacher_cache, model)
    online = None
    if teacher:
        from mmkd.student.online import OnlineTeacher

        online = OnlineTeacher(teacher, processor, model, device=device)
    vocab = teacher_cache.manifest.vocab_size if teacher_cache else online.vocab_size if online else None
    rows = StudentOutputs(model, image_token_id(processor), vocab)
    yes_id = processor.tokenizer("yes", add_special_tokens=False)["input_ids"][0]
    absent, said_yes = 0, 0  # existence questions whose answer is "no" (POPE-style)
    correct, per_task, per_task_n = 0, Counter(), Counter()
    kl_sum, kl_tokens, full_kl_sum, tokens, ce_sum, agree = 0.0, 0, 0.0, 0, 0.0, 0
    bins = torch.zeros(3, ECE_BINS, dtype=torch.float64)  # rows, confidence sum, correct sum per bin
    items = np.arange(len(dataset))
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=lambda b: b)
    kl_cfg = SimpleNamespace(divergence="forward_kl", kd_leftover="bucket")  # the metrics' divergence
    for batch in loader:
        batch = batch.to(device)
        terms = []
        if isinstance(batch.response, TopK):  # top-k caches; a sampled cache holds no log-probs to compare with
            terms.append(divergence_term("kl", batch.response, kl_cfg))
        if online is not None:
            dense = online.targets(batch)["response"]
            terms.append(divergence_term("full_kl", dense, kl_cfg))
        out = rows(batch.input_ids, batch.attention_mask, batch.labels, batch.vision or None,
                   terms={"response": terms} if terms else None, argmax=True, token_logprobs=True)
        pred, targets, sample_of_row = out["argmax"], out["targets"], out["rows_sample"]
        ce_sum += -out["token_logprobs"].double().sum().item()
        confidence, hit = out["argmax_logprob"].exp().double().cpu(), (pred == targets).double().cpu()
        at = _bin_of(confidence)
        for i, v in enumerate((torch.ones_like(confidence), confidence, hit)):
            bins[i].index_add_(0, at, v)
        if online is not None:
            agree += int((head_top1(dense.hidden, dense.head)[0] == pred).sum())
        n = len(batch.samples)
        first = torch.ones_like(sample_of_row, dtype=torch.bool)
        first[1:] = sample_of_row[1:] != sample_of_row[:-1]  # each sample's first answer token
        first_pred = torch.full((n,), -1, dtype=torch.long, device=device)
        first_pred[sample_of_row[first]] = pred[first]
        wrong = torch.zeros(n, dtype=torch.long, device=device)
        wrong.index_add_(0, sample_of_row, (pred != targets).long())
        for j, sample in enumerate(batch.samples):
            ok = int(wrong[j] == 0)
            correct += ok
            task = sample.meta.get("task", "all")
            per_task[task] += ok
            per_task_n[task] += 1
            if task == "exists" and _answer(sample) == "no":
                absent += 1
                said_yes += int(first_pred[j] == yes_id)
        if "kl" in out["values"]:
            kl_sum += out["values"]["kl"].item() * len(targets)
            kl_tokens += len(targets)
        if "full_kl" in out["values"]:
            full_kl_sum += out["values"]["full_kl"].item() * len(targets)
        tokens += len(targets)
    out = {
        "accuracy": correct / len(dataset),
        "per_task": {t: per_task[t] / per_task_n[t] for t in sorted(per_task_n)},
        "ce": ce_sum / max(tokens, 1),
        "ece": calibration_error(*bins),
        "samples": len(dataset),
        "tokens": tokens,
    }
    if absent:
        out["hallucination_rate"] = said_yes / absent
        out["absent_object_questions"] = absent
    if kl_tokens:  # top-k caches; a sampled cache holds no log-probs to compare with
        out["kl_to_teacher"] = kl_sum / kl_tokens
    if online is not None:
        out["full_kl_to_teacher"] = full_kl_sum / tokens
        out["top1_agreement"] = agree / max(tokens, 1)
    return out


def metrics_table(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a results table: one row per model of {name: evaluate() metrics},
    formatted (the demo's results.md and `mmkd plot`'s PNG). A params column when every
    row has "params"; "-" where a model lacks a metric (no cache: no KL; no existence
    questions: no hallucination rate)."""
    tasks = sorted({t for r in results.values() for t in r.get("per_task", {})})
    params = all("params" in r for r in results.values())
    head = (["model"] + (["params"] if params else []) + ["exact match", "KL to teacher (nats/token)",
                                                           "hallucination (absent, said yes)"] + tasks)
    rows = []
    for name, r in results.items():
        kl = r.get("kl_to_teacher")
        cells = [name] + ([f"{r['params'] / 1e6:.2f}M"] if params else []) + [
            f"{r['accuracy']:.3f}",
            "-" if kl is None else f"{max(kl, 0.0):.4f}",  # a teacher's own row is float16 rounding, +-1e-5
            f"{r['hallucination_rate']:.3f}" if "hallucination_rate" in r else "-"]
        cells += [f"{r['per_task'][t]:.2f}" if t in r.get("per_task", {}) else "-" for t in tasks]
        rows.append(cells)
    return head, rows
