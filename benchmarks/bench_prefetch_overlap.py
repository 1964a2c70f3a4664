"""Does a teacher actor preprocess the next batch while its device runs the current one?

On a CPU-only machine the teacher's forward uses the same cores as preprocessing, so the
overlap cannot show in bench_teacher_pass.py. Here the device is simulated: the teacher is
a TINY random LLaVA with the realistic processor of bench_teacher_pass.py (SmolLM2's
tokenizer and chat template, CLIP preprocessing at 224 px, the same samples: PNG decode,
chat template, tokenisation, image processing are all real), and every extraction first
sleeps for --device-ms per batch (a sleep holds no core and releases the GIL, as a GPU
kernel does). The output head is cut to the first 256 ids (a 49k-way log-softmax + top-k
on the CPU would cost more than everything else; the cache's contents do not matter here).
The full `run_teacher_pass` (1 actor, Ray, writing) then runs with `prefetch_batches` 0 and
1, twice each, timed from the first batch's arrival at the driver to the last's. Without
prefetch a batch costs preprocessing + device (+ the tiny CPU forward); with it, about the
larger of the two.

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/bench_prefetch_overlap.py [--device-ms 0 = measured preprocessing]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_teacher_pass import prepare  # noqa: E402

VOCAB_CUT = 256  # ids the head keeps (module level: the actor's copy of the class reads it by value)


def tiny_teacher(src: Path, dst: Path) -> None:
    """A 1-layer random LLaVA with the processor saved in src (the realistic one)."""
    from transformers import AutoProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(src)
    tok = processor.tokenizer
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048)
    vision = CLIPVisionConfig(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(processor.image_token),
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(dst)
    processor.save_pretrained(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device-ms", type=float, default=0.0, help="simulated device time per batch; 0 = the "
                    "measured preprocessing time per batch")
    ap.add_argument("--workdir", default="benchmarks/.data/teacher-pass")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray

    import mmkd.pipelines.teacher_pass as tp
    from mmkd.common.config import InputsConfig
    from mmkd.common.inputs import load_image
    from mmkd.common.preprocess import collate, encode_sample

    workdir = Path(args.workdir)
    teacher, data = prepare(workdir, args.samples, 160, 0)
    tiny = workdir / "tiny-teacher"
    if not (tiny / "config.json").exists():
        tiny_teacher(teacher, tiny)
    cfg = tp.TeacherPassConfig(teacher=str(tiny), inputs=InputsConfig(str(data / "data.json"), str(data)),
                               output=str(workdir / "cache-overlap"), k=64, batch_size=args.batch_size,
                               rows_per_shard=64, device="cpu")
    samples = tp.read_inputs(cfg)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny)
    from mmkd.teacher_cache.extract import ExtractionSpec, extract_rows, to_device
    from mmkd.teacher_cache.teacher import load_teacher

    model, _ = load_teacher(str(tiny), "float32", "cpu")
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    pre = cpu = 0.0
    for i in range(0, len(samples), args.batch_size):
        t0 = time.perf_counter()
        group = samples[i:i + args.batch_size]
        b = collate([encode_sample(processor, s, load_image(cfg.inputs.image_root, s), cfg.max_length) for s in group],
                    processor.tokenizer.pad_token_id)
        t1 = time.perf_counter()
        extract_rows(model, to_device(b, "cpu", torch.float32), [s.id for s in group], image_id,
                     ExtractionSpec(k=64, vocab_size=VOCAB_CUT))
        pre, cpu = pre + t1 - t0, cpu + time.perf_counter() - t1
    n_batches = -(-len(samples) // args.batch_size)
    pre, cpu = pre / n_batches, cpu / n_batches
    device = args.device_ms / 1000 if args.device_ms else pre

    class SimulatedDevice(tp.TeacherWorker):  # shipped by value: each extraction first "runs on the device"
        device_s = device

        def __init__(self, cfg):
            super().__init__(cfg)
            import mmkd.teacher_cache.extract as ex

            real = ex.extract_rows

            def on_device(model, batch, ids, image_id, spec, *a, **kw):
                time.sleep(self.device_s)
                return real(model, batch, ids, image_id, dataclasses.replace(spec, vocab_size=VOCAB_CUT), *a, **kw)

            ex.extract_rows = on_device

    tp.TeacherWorker = SimulatedDevice
    ray.init(num_cpus=2, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    results = {}
    for prefetch in (0, 1, 0, 1):
        cfg.prefetch_batches = prefetch
        shutil.rmtree(cfg.output, ignore_errors=True)
        marks = []
        tp.run_teacher_pass(cfg, log=lambda line: marks.append(time.perf_counter())
                            if re.search(r"\d+/\d+ samples", line) else None)
        # from the first batch's arrival to the last's: start-up and shutdown left out
        results.setdefault(prefetch, []).append((marks[-1] - marks[0]) / (n_batches - 1))
    ray.shutdown()
    print(f"\n{len(samples)} samples, batch {args.batch_size} ({n_batches} batches), 1 actor, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; per batch, measured serially here: preprocessing "
          f"{1000 * pre:.0f} ms, tiny teacher on the CPU {1000 * cpu:.0f} ms; simulated device {1000 * device:.0f} ms\n")
    print("| prefetch_batches | ms per batch in the pass (two runs) | serial sum: no overlap | larger part: full overlap |")
    print("|---|---|---|---|")
    for p, v in results.items():
        print(f"| {p} | {', '.join(f'{1000 * x:.0f}' for x in v)} | {1000 * (pre + cpu + device):.0f} | "
              f"{1000 * max(pre, cpu + device):.0f} |")


if __name__ == "__main__":
    main()
