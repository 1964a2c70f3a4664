"""Text-only teachers and students: a plain causal LM (its tokenizer and chat template, no
image processor) through the teacher pass, training (response KD, sampled KD, preference
distillation), evaluation and `mmkd check`; the visual terms are refused naming the flag."""

import json

import numpy as np
import pytest
import torch

from mmkd.common.models import TextProcessor, load_processor
from mmkd.common.preprocess import IGNORE_INDEX, encode_sample
from mmkd.common.samples import Sample, SampleError, read_llava
from mmkd.pipelines.cli import main
from mmkd.storage.codec import LEVELS
from mmkd.storage.reader import TeacherCache

STUDENT = ["--arch.text-hidden", "32", "--arch.text-layers", "1", "--arch.text-heads", "2",
           "--arch.text-intermediate", "64"]
QUICK = ["--batch-size", "8", "--num-workers", "0", "--save-every", "0", "--report-to", "none"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, object_store_memory=200 << 20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_tokenizer_folder_is_a_text_processor_that_encodes_like_its_template(text_dir):
    processor = load_processor(str(text_dir / "teacher"))
    assert isinstance(processor, TextProcessor) and processor.image_token is None
    tok = processor.tokenizer
    sample = Sample("s", None, [{"role": "user", "content": "what color is the circle?"},
                                {"role": "assistant", "content": "red"},
                                {"role": "user", "content": "and the square?"},
                                {"role": "assistant", "content": "blue"}])
    enc = encode_sample(processor, sample, None, 256)
    # the reference: the tokenizer's own chat-template rendering, plain-string content
    rendered = tok.apply_chat_template(sample.messages, tokenize=False)
    assert enc.input_ids.tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
    supervised = tok.decode(enc.labels[enc.labels != IGNORE_INDEX])
    assert supervised.split() == ["red", "</s>", "blue", "</s>"] and enc.vision == {}
    with pytest.raises(SampleError, match="sample s has an image but the model is text-only"):
        encode_sample(processor, Sample("s", "x.png", [{"role": "user", "content": "<image>\nhi"},
                                                       {"role": "assistant", "content": "red"}]), None, 256)


def _dense_metrics(student_dir, teacher_dir, samples) -> dict:
    """The eval metrics recomputed from whole logits, one sample at a time (the reference)."""
    from transformers import AutoModelForCausalLM

    student, teacher = (AutoModelForCausalLM.from_pretrained(str(d)).eval() for d in (student_dir, teacher_dir))
    processor = load_processor(str(student_dir))
    ce, kl, agree, conf, hit = [], [], [], [], []
    for s in samples:
        enc = encode_sample(processor, s, None, 256)
        ids = torch.from_numpy(enc.input_ids)[None]
        pos = torch.from_numpy(np.nonzero(enc.labels != IGNORE_INDEX)[0])
        with torch.no_grad():
            q, p = (torch.log_softmax(m(ids).logits[0, pos - 1].double(), -1) for m in (student, teacher))
        ref = torch.from_numpy(enc.labels)[pos]
        ce += (-q.gather(-1, ref[:, None])[:, 0]).tolist()
        kl += (p.exp() * (p - q)).sum(-1).tolist()
        agree += (q.argmax(-1) == p.argmax(-1)).tolist()
        conf += q.max(-1).values.exp().tolist()
        hit += (q.argmax(-1) == ref).tolist()
    conf, hit = np.array(conf), np.array(hit, dtype=float)
    edges = np.linspace(0, 1, 16)
    ece = sum(abs(hit[m].mean() - conf[m].mean()) * m.sum() for lo, hi in zip(edges[:-1], edges[1:])
              if (m := (conf > lo) & (conf <= hi)).any()) / len(conf)
    return {"ce": np.mean(ce), "full_kl_to_teacher": np.mean(kl), "top1_agreement": np.mean(agree), "ece": ece}


@pytest.mark.slow
def test_text_only_teacher_pass_train_eval_and_check(ray_local, text_dir, tmp_path, capsys):
    """Response KD (top-k), sampled KD and preference distillation from a text-only teacher's
    caches; the cache holds the teacher's own log-softmax; visual records and terms are
    refused at the door."""
    from transformers import AutoModelForCausalLM

    teacher = str(text_dir / "teacher")
    base = ["teacher-pass", "--teacher", teacher, "--batch-size", "8", "--rows-per-shard", "16"]
    assert main([*base, "--data", str(text_dir / "train.json"), "--output", str(tmp_path / "topk"), "--k", "5"]) == 0
    cache = TeacherCache(str(tmp_path / "topk"))
    assert cache.manifest.complete and cache.manifest.processor["image_token_id"] is None
    assert cache.manifest.processor["image_processor_sha256"] is None

    # the cached top-5 is the teacher's log-softmax at the rows predicting the answer tokens
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    processor = load_processor(teacher)
    rows = cache.rows()
    for s in read_llava(text_dir / "train.json")[:3]:
        enc = encode_sample(processor, s, None, 256)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.from_numpy(enc.input_ids)[None]).logits[0], -1)
        pos = np.nonzero(enc.labels != IGNORE_INDEX)[0]
        ref_vals, ref_ids = logp[pos - 1].topk(5, -1)
        row = rows[s.id]
        assert (row.response.positions == pos).all()
        assert (np.sort(row.response.ids, 1) == np.sort(ref_ids.numpy(), 1)).all()
        err = np.abs(np.sort(row.response.logprobs, 1) - np.sort(ref_vals.numpy(), 1))
        assert err.max() <= np.diff(LEVELS).max() / 2 + 1e-5  # the codec's rounding

    assert main([*base, "--data", str(text_dir / "train.json"), "--output", str(tmp_path / "sampled"),
                 "--mode", "sampled", "--draws", "8"]) == 0
    assert main([*base, "--data", str(text_dir / "preference.jsonl"), "--output", str(tmp_path / "pref"),
                 "--records", "preference"]) == 0
    capsys.readouterr()
    assert main([*base, "--data", str(text_dir / "train.json"), "--output", str(tmp_path / "vis"),
                 "--records", "response,visual"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--records" in err and "text-only teacher" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "vis").exists()

    train = ["train", "--processor", teacher, "--data", str(text_dir / "train.json"), *QUICK, *STUDENT]
    out = tmp_path / "student"
    assert main([*train, "--cache", str(tmp_path / "topk"), "--output-dir", str(out), "--max-steps", "3"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["final"]["kd"])
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert main([*train, "--cache", str(tmp_path / "sampled"), "--output-dir", str(tmp_path / "s2"),
                 "--max-steps", "2"]) == 0
    assert np.isfinite(json.loads((tmp_path / "s2" / "train_summary.json").read_text())["final"]["kd"])
    assert main(["train", "--processor", teacher, "--data", str(text_dir / "preference.jsonl"), *QUICK,
                 "--cache", str(tmp_path / "pref"), "--objective", "preference", "--init-from", str(out),
                 "--output-dir", str(tmp_path / "dpo"), "--max-steps", "2"]) == 0
    assert np.isfinite(json.loads((tmp_path / "dpo" / "train_summary.json").read_text())["final"]["dpo"])
    capsys.readouterr()
    assert main([*train, "--cache", str(tmp_path / "topk"), "--output-dir", str(tmp_path / "v"),
                 "--visual-weight", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmkd: error: --visual-weight 1.0") and "text-only" in err

    assert main(["eval", "--model", str(out), "--data", str(text_dir / "test.json"), "--teacher", teacher,
                 "--out", str(tmp_path / "eval.json")]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["samples"] == 16 and metrics["full_kl_to_teacher"] > 0
    ref = _dense_metrics(out, teacher, read_llava(text_dir / "test.json"))
    for key, tol in (("ce", 1e-4), ("full_kl_to_teacher", 1e-4), ("top1_agreement", 0), ("ece", 1e-5)):
        assert abs(metrics[key] - ref[key]) <= tol, (key, metrics[key], ref[key])
    assert main(["check", teacher, str(out), "--cache", str(tmp_path / "topk")]) == 0
