"""`mmkd demo`: the whole loop on the embedded synthetic data set, on a CPU.

    1. data      synthetic shapes VQA (LLaVA format) + preference pairs
    2. teacher   a LLaVA built from config, trained with mmkd's trainer (CE), saved as an
                 ordinary Hugging Face folder
    3. cache     the Ray teacher pass over the train split (targets for distillation) and
                 the test split (targets for measuring KL to the teacher)
    4. students  (a) CE only and (b) CE + mimic KL from the cache: same smaller
                 architecture, same training subset, no teacher loaded
    5. eval      exact match and KL to the teacher on the test split -> results table

Each step writes a marker when done; re-running the demo in the same workdir skips
finished steps (``--fresh`` starts over).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from student.model import LlavaArch


@dataclass
class DemoConfig:
    workdir: str = "runs/demo"
    seed: int = 0
    num_train: int = 4000
    num_val: int = 200
    num_test: int = 400
    num_preference: int = 400
    k: int = 16  # top-k kept per supervised token (the demo vocabulary has ~50 entries)
    teacher_arch: LlavaArch = field(default_factory=LlavaArch)
    teacher_epochs: int = 30
    teacher_lr: float = 5e-4
    student_arch: LlavaArch = field(default_factory=lambda: LlavaArch(
        vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=64, text_layers=2, text_heads=2,
        text_intermediate=128))
    student_subset: int = 1500  # both students train on the same first N (shuffled) samples
    student_epochs: int = 20
    student_lr: float = 2e-3
    batch_size: int = 32
    fresh: bool = False


def _step(name: str, marker: Path, fresh: bool, fn, log):
    if marker.exists() and not fresh:
        log(f"== {name}: already done ({marker}), skipping")
        return json.loads(marker.read_text())
    log(f"== {name}")
    t = time.time()
    out = fn() or {}
    out["wall_s"] = round(time.time() - t, 1)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(out, indent=1))
    log(f"== {name}: done in {out['wall_s']}s")
    return out


def run_demo(cfg: DemoConfig, log=print) -> dict:
    from pipelines.demo_data import write_demo_dataset
    from pipelines.demo_processor import build_demo_processor
    from pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass
    from student.evaluate import evaluate
    from student.train import TrainConfig, train

    w = Path(cfg.workdir)
    if cfg.fresh and w.exists():
        shutil.rmtree(w)
    t0 = time.time()
    data, proc = w / "data", w / "processor"
    marks = w / "steps"

    def make_data():
        write_demo_dataset(data, cfg.num_train, cfg.num_val, cfg.num_test, cfg.num_preference, cfg.seed)
        build_demo_processor(proc)
        return {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}

    _step("1/5 data set", marks / "data.json", False, make_data, log)

    # Small data, many epochs: encode each sample once and keep it (no loader processes).
    common = dict(image_root=str(data), processor=str(proc), batch_size=cfg.batch_size, seed=cfg.seed,
                  log_every=250, num_workers=0, keep_encoded=True)
    teacher_cfg = TrainConfig(data=str(data / "train.json"), output_dir=str(w / "teacher"), arch=cfg.teacher_arch,
                              epochs=cfg.teacher_epochs, lr=cfg.teacher_lr, **common)

    def train_teacher():
        s = train(teacher_cfg, log)
        val = evaluate(str(w / "teacher"), str(data / "val.json"), str(data))
        log(f"   teacher val exact match: {val['accuracy']:.3f}")
        return {"steps": s["steps"], "val_accuracy": val["accuracy"]}

    _step("2/5 teacher (supervised training)", marks / "teacher.json", False, train_teacher, log)

    def cache(split):
        def run():
            m = run_teacher_pass(TeacherPassConfig(
                teacher=str(w / "teacher"), data=str(data / f"{split}.json"), image_root=str(data),
                output=str(w / "cache" / split), k=cfg.k, batch_size=64, rows_per_shard=1024), log)
            return {"rows": m.num_rows, "bytes": sum(s.bytes for s in m.shards)}
        return run

    _step("3/5 teacher pass (Ray) -> cache", marks / "cache.json", False,
          lambda: {"train": cache("train")(), "test": cache("test")()}, log)
    _shutdown_ray()

    student = dict(data=str(data / "train.json"), arch=cfg.student_arch, subset=cfg.student_subset,
                   epochs=cfg.student_epochs, lr=cfg.student_lr, **common)
    runs = {
        "student (a) CE only": TrainConfig(output_dir=str(w / "student_ce"), **student),
        "student (b) CE + KD from cache": TrainConfig(output_dir=str(w / "student_kd"),
                                                      cache=str(w / "cache" / "train"), **student),
    }
    for i, (name, tc) in enumerate(runs.items()):
        _step(f"4/5 {name}", marks / f"student{i}.json", False, lambda tc=tc: {"steps": train(tc, log)["steps"]}, log)

    def run_eval():
        rows = {}
        for name, path in [("teacher", w / "teacher")] + [(n, Path(tc.output_dir)) for n, tc in runs.items()]:
            rows[name] = evaluate(str(path), str(data / "test.json"), str(data), cache=str(w / "cache" / "test"))
            rows[name]["params"] = _params(path)
            log(f"   {name}: exact match {rows[name]['accuracy']:.3f}, KL {rows[name]['kl_to_teacher']:.4f}")
        return rows

    results = _step("5/5 evaluation on the test split", marks / "eval.json", True, run_eval, log)
    results.pop("wall_s", None)
    table = results_table(results, cfg)
    (w / "results.md").write_text(table + "\n")
    (w / "results.json").write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=1))
    log("\n" + table)
    log(f"\ndemo finished in {time.time() - t0:.0f}s; results in {w / 'results.md'}")
    return results


def _params(path: Path) -> int:
    summary = path / "train_summary.json"
    return json.loads(summary.read_text())["params"] if summary.exists() else 0


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()  # give the cores back to the students


def results_table(results: dict, cfg: DemoConfig) -> str:
    tasks = sorted(next(iter(results.values()))["per_task"])
    head = ["model", "params", "exact match", "KL to teacher (nats/token)"] + tasks
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        kl = max(r["kl_to_teacher"], 0.0)  # the teacher's own row is float16 rounding, +-1e-5
        cells = [name, f"{r['params'] / 1e6:.2f}M", f"{r['accuracy']:.3f}", f"{kl:.4f}"]
        cells += [f"{r['per_task'][t]:.2f}" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    n = next(iter(results.values()))["samples"]
    lines.append(f"\nTest split: {n} samples. Students: {cfg.student_subset} training samples, "
                 f"{cfg.student_epochs} epochs; KD targets: teacher top-{cfg.k} + leftover mass.")
    return "\n".join(lines)
