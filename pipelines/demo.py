"""`mmkd demo`: the whole loop on the embedded synthetic data set, on a CPU.

    1. data      synthetic shapes VQA (LLaVA format) + preference pairs
    2. teacher   a LLaVA built from config, trained with mmkd's trainer (CE), saved as an
                 ordinary Hugging Face folder
    3. cache     the Ray teacher pass over the train split (response, visual and relation
                 records), the test split (response targets, for KL to the teacher) and the
                 preference pairs (the teacher's answer log-probs)
    4. students  one stage each, same smaller architecture and training subset, no teacher
                 loaded: (a) CE only, (b) + response KD, (c) + MDist's visual term,
                 (d) + RDist (= LLaVA-KD's loss)
    5. recipes   configs/recipes/llava_kd.yaml (DPT -> SFT -> DFT) and llava_mod.yaml
                 (adaptor init -> mimic dense -> mimic sparse MoE -> preference), both
                 starting from student (a)
    6. eval      exact match, KL to the teacher, hallucination rate on existence questions
                 about absent objects (POPE-style) on the test split -> results table

Each step writes a marker when done; re-running the demo in the same workdir skips
finished steps (``--fresh`` starts over).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from mmkd.common.config import InputsConfig
from mmkd.pipelines.config import DemoConfig


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
    from mmkd.pipelines.config import TeacherPassConfig
    from mmkd.pipelines.demo_data import write_demo_dataset
    from mmkd.pipelines.demo_processor import build_demo_processor
    from mmkd.pipelines.recipe import run_recipe
    from mmkd.pipelines.teacher_pass import run_teacher_pass
    from mmkd.student.config import TrainConfig
    from mmkd.student.evaluate import evaluate
    from mmkd.student.train import train

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

    _step("1/6 data set", marks / "data.json", False, make_data, log)

    # Small data, many epochs: encode each sample once and keep it (no loader processes).
    train_inputs = InputsConfig(str(data / "train.json"), str(data))
    common = dict(inputs=train_inputs, processor=str(proc), batch_size=cfg.batch_size, seed=cfg.seed,
                  log_every=250, num_workers=0, keep_encoded=True)
    teacher_cfg = TrainConfig(output_dir=str(w / "teacher"), arch=cfg.teacher_arch, epochs=cfg.teacher_epochs,
                              lr=cfg.teacher_lr, **common)

    def train_teacher():
        s = train(teacher_cfg, log)
        val = evaluate(str(w / "teacher"), InputsConfig(str(data / "val.json"), str(data)))
        log(f"   teacher val exact match: {val['accuracy']:.3f}")
        return {"steps": s["steps"], "val_accuracy": val["accuracy"]}

    _step("2/6 teacher (supervised training)", marks / "teacher.json", False, train_teacher, log)

    def cache(split, data_file, records):
        return TeacherPassConfig(teacher=str(w / "teacher"), inputs=InputsConfig(str(data / data_file), str(data)),
                                 output=str(w / "cache" / split), records=records, k=cfg.k, batch_size=64,
                                 rows_per_shard=1024, new_cache=True)

    def run_caches():
        out = {}
        for split, data_file, records in (("train", "train.json", "response,visual,relation"),
                                          ("test", "test.json", "response"),
                                          ("preference", "preference.jsonl", "preference")):
            m = run_teacher_pass(cache(split, data_file, records), log)
            out[split] = {"rows": m.num_rows, "bytes": sum(s.bytes for s in m.shards), "records": records}
        return out

    _step("3/6 teacher pass (Ray) -> caches", marks / "caches.json", False, run_caches, log)
    _shutdown_ray()

    student = dict(arch=cfg.student_arch, subset=cfg.student_subset,
                   epochs=cfg.student_epochs, lr=cfg.student_lr, cache=str(w / "cache" / "train"), **common)
    runs = {
        "(a) CE only": TrainConfig(output_dir=str(w / "student_ce"), **{**student, "cache": None}),
        "(b) + KD (response top-k)": TrainConfig(output_dir=str(w / "student_kd"), **student),
        "(c) + MDist visual term": TrainConfig(output_dir=str(w / "student_mdist"), visual_weight=1.0, **student),
        "(d) + RDist (LLaVA-KD loss)": TrainConfig(output_dir=str(w / "student_rdist"), visual_weight=1.0,
                                                   relation_weight=1.0, **student),
    }
    for i, (name, tc) in enumerate(runs.items()):
        _step(f"4/6 student {name}", marks / f"student{i}.json", False,
              lambda tc=tc: {"steps": train(tc, log)["steps"]}, log)

    recipes = Path(__file__).resolve().parents[1] / "configs" / "recipes"
    for recipe in ("llava_kd", "llava_mod"):
        _step(f"5/6 recipe {recipe}", marks / f"recipe_{recipe}.json", False,
              lambda r=recipe: {s: v["steps"] for s, v in run_recipe(recipes / f"{r}.yaml", root=str(w), log=log).items()},
              log)
    models = {"teacher": w / "teacher", **{f"student {n}": Path(tc.output_dir) for n, tc in runs.items()},
              "LLaVA-KD recipe: DPT -> SFT -> DFT": w / "recipes" / "llava_kd" / "dft",
              "LLaVA-MoD: adaptor -> mimic dense": w / "recipes" / "llava_mod" / "mimic_dense",
              "LLaVA-MoD: -> mimic sparse (MoE, 4 experts top-2)": w / "recipes" / "llava_mod" / "mimic_sparse",
              "LLaVA-MoD: -> preference (DPO)": w / "recipes" / "llava_mod" / "preference"}

    def run_eval():
        rows = {}
        for name, path in models.items():
            rows[name] = evaluate(str(path), InputsConfig(str(data / "test.json"), str(data)),
                                  cache=str(w / "cache" / "test"))
            rows[name]["params"] = _params(path)
            log(f"   {name}: exact match {rows[name]['accuracy']:.3f}, KL {rows[name]['kl_to_teacher']:.4f}, "
                f"hallucination {rows[name].get('hallucination_rate', float('nan')):.3f}")
        return rows

    results = _step("6/6 evaluation on the test split", marks / "eval.json", True, run_eval, log)
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
    from mmkd.student.evaluate import metrics_table

    head, rows = metrics_table(results)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    n = next(iter(results.values()))["samples"]
    absent = next(iter(results.values())).get("absent_object_questions", 0)
    lines.append(f"\nTest split: {n} samples ({absent} existence questions about absent objects). Students "
                 f"(a)-(d): one stage, {cfg.student_subset} training samples, {cfg.student_epochs} epochs; KD "
                 f"targets: teacher top-{cfg.k} + leftover mass. Recipes start from (a); stages and epochs in "
                 "configs/recipes/. MoE params count all experts.")
    return "\n".join(lines)
