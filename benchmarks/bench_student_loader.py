"""Does the student's data loader keep up with the training step?

The demo's student (pipelines.config.DemoConfig: student_arch, batch size 32, its training
subset) on the demo's data (ROOT = the workdir of `mmkd demo`: data/train.json, processor/,
cache/train; only read), with the loss terms of --stage (kd: CE + response KD, student (b);
rdist: + MDist visual + RDist, student (d); ce: no cache, student (a)):

  (a) loader alone: the training DataLoader (StudentData: cache rows read and decoded, image
      decode, chat template, tokenisation, image processing, alignment check; collate) iterated
      without training, for each --workers count; samples/s from the first batch on, and the
      first batch's delay (worker start-up) apart.
  (b) step alone: student.train.train() with keep_encoded=True, num_workers=0 and two epochs:
      the second epoch's samples come from memory; samples/s of its steps' work (step_s minus
      the data wait that remains, the collate).
  (c) the real loop: train() for --steps steps with each --workers count; samples/s and the
      data-wait fraction of train_log.jsonl (student/run_log.py), the first step (worker
      start-up) excluded and shown apart.

loader/step = (a) / (b): below 1 the loader cannot feed the step however it overlaps; above
1 it can, if its workers get cores the step does not use ((c) shows whether they do).

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/bench_student_loader.py --root runs/demo [--steps 30]
    (validation: --steps 3 --workers 0,1)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmkd.common.config import InputsConfig  # noqa: E402
from mmkd.pipelines.config import DemoConfig  # noqa: E402
from mmkd.student.config import TrainConfig  # noqa: E402
from mmkd.student.train import train  # noqa: E402

STAGES = {"ce": {"cache": None}, "kd": {}, "rdist": {"visual_weight": 1.0, "relation_weight": 1.0}}


def config(root: Path, stage: str, steps: int, out: Path, **kw) -> TrainConfig:
    demo = DemoConfig()
    base = dict(inputs=InputsConfig(str(root / "data" / "train.json"), str(root / "data")),
                processor=str(root / "processor"), cache=str(root / "cache" / "train"), arch=demo.student_arch,
                batch_size=demo.batch_size, subset=steps * demo.batch_size, lr=demo.student_lr, epochs=1,
                output_dir=str(out), seed=demo.seed)
    return TrainConfig(**{**base, **STAGES[stage], **kw})


def loader_alone(cfg: TrainConfig, num_workers: int) -> dict:
    """(a): the DataLoader train() builds for cfg, iterated to the end without a step."""
    from transformers import AutoProcessor

    from mmkd.student.train import loader, setup_data

    processor = AutoProcessor.from_pretrained(cfg.processor)
    data = setup_data(dataclasses.replace(cfg, num_workers=num_workers), processor, 0, 1)
    loader = loader(dataclasses.replace(cfg, num_workers=num_workers), data, 0, 1, 0, 0)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    n = sum(1 for _ in it)
    dt = time.perf_counter() - t1
    return {"samples_per_s": n * cfg.batch_size / dt if n else float("nan"), "first_s": t1 - t0}


def train_log(cfg: TrainConfig) -> list[dict]:
    train(cfg, log=lambda *_: None)
    return [json.loads(line) for line in (Path(cfg.output_dir) / "train_log.jsonl").read_text().splitlines()]


def rates(records: list[dict], batch_size: int) -> dict:
    """samples/s and data-wait fraction over records; work_samples_per_s: per second of
    work (step time minus data wait)."""
    step_s = sum(r["step_s"] for r in records)
    wait_s = sum(r["data_wait"] * r["step_s"] for r in records)
    n = len(records) * batch_size
    return {"samples_per_s": n / step_s, "data_wait": wait_s / step_s, "work_samples_per_s": n / (step_s - wait_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/demo", help="workdir of a finished `mmkd demo` (read only)")
    ap.add_argument("--stage", choices=sorted(STAGES), default="kd")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps (batches) per measurement")
    ap.add_argument("--workers", default="0,1,2", help="loader worker counts to measure")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(args.root)
    if not (root / "data" / "train.json").exists():
        raise SystemExit(f"{root}: not the workdir of a finished `mmkd demo` (no data/train.json); run `make demo` "
                         "or pass --root")
    workers = [int(w) for w in args.workers.split(",")]
    bs = DemoConfig().batch_size
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-student-loader-") as tmp:
        tmp = Path(tmp)
        for w in workers:
            a = loader_alone(config(root, args.stage, args.steps, tmp / "a"), w)
            rows.append(("(a) loader alone", w, a["samples_per_s"], None, a["first_s"]))
        log = train_log(config(root, args.stage, args.steps, tmp / "b", epochs=2, num_workers=0, keep_encoded=True))
        b = rates([r for r in log if r["epoch"] == 1], bs)
        step_rate = b["work_samples_per_s"]
        rows.append(("(b) step alone (encodings in memory)", 0, step_rate, b["data_wait"], None))
        for w in workers:
            log = train_log(config(root, args.stage, args.steps, tmp / f"c{w}", num_workers=w))
            c = rates(log[1:], bs)
            rows.append(("(c) training loop", w, c["samples_per_s"], c["data_wait"],
                         log[0]["data_wait"] * log[0]["step_s"]))

    print(f"\nstudent loader vs step: {root}, stage {args.stage}, batch size {bs}, {args.steps} batches per "
          f"measurement, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {os.cpu_count()} CPUs\n")
    print("| measurement | num_workers | samples/s | data wait | first batch wait (s) | / step alone |")
    print("|---|---|---|---|---|---|")
    for name, w, sps, wait, first in rows:
        print(f"| {name} | {w} | {sps:.1f} | {'-' if wait is None else f'{wait:.0%}'} | "
              f"{'-' if first is None else f'{first:.2f}'} | {sps / step_rate:.2f} |")
    print("\n(b) counts the step's work only: step time minus its data wait (collate). (c) excludes the first "
          "step, whose wait includes starting the loader workers (shown as first batch wait).")


if __name__ == "__main__":
    main()
