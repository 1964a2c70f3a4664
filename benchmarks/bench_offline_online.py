"""Offline equals online? Students distilled from the cache vs the online baseline (the
teacher resident, full-vocabulary KD every step), on the demo task, over several seeds.

Rows (one training stage each, the demo's student (b) settings: pipelines/demo.py
DemoConfig's student architecture, training subset, epochs, lr and batch size; CE + forward
KL on the response tokens, weights 1 and 1; only the KD term's source differs):
    SFT (CE only)              no teacher
    offline top-k, --k 64 8 4  caches from the Ray teacher pass (bucket mode); a k above the
                               vocabulary is capped to it (the demo has 49 ids)
    offline sampled            the Sparse-Logit-Sampling cache, --draws ids per position
    online (full vocabulary)   --online-teacher: the teacher resident, dense KL

Metrics on the test split, per seed, then mean +- std (sample std over seeds): exact match,
the full-vocabulary forward KL to the teacher (the teacher is loaded for it: the honest
metric, not the cache's bucket lower bound) and the hallucination rate (absent-object
existence questions answered "yes").

Cost: per-step time of SFT, offline KD (the largest k, and sampled) and online KD, in this
one process, interleaved: every round runs --cost-steps steps of each (the order rotating
per round) over the same collated batches, with the trainer's own pieces (StudentOutputs,
distill_terms, OnlineTeacher.targets) and AdamW; not timed: DeepSpeed's wrapper (the same
for all) and data loading (the cache is decoded once when the data set opens; the loader
may run in worker processes). Medians over the rounds after the first, ratios to SFT.

Caches and students go to --workdir; finished ones are reused (a folder made with other
sizes is refused). The demo folder (--demo: teacher, processor, data) is only read. On a
box with other load, OMP_NUM_THREADS=2 makes tiny models many times slower: run it quiet.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_offline_online.py --demo runs/demo \
        --workdir runs/bench_offline_online
Tiny check of the script (about 2 minutes):
    ... --workdir /tmp/bench_tiny --train-samples 64 --test-samples 32 --subset 48 --epochs 1 --seeds 0 \
        --cost-rounds 2 --cost-steps 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mmkd.common.config import InputsConfig

ROW_SFT, ROW_ONLINE = "SFT (CE only)", "online (full vocabulary)"


def topk_row(k: int, vocab: int) -> str:
    return f"offline top-{k}" + (f" (= all {vocab} ids)" if k >= vocab else "")


def sampled_row(draws: int) -> str:
    return f"offline sampled ({draws} draws)"


def write_split(src: Path, dst: Path, n: int) -> Path:
    """The first n samples of a LLaVA JSON split (all with n = 0), written to dst."""
    rows = json.loads(src.read_text())
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(rows[:n] if n else rows))
    return dst


def make_caches(a, demo: Path, train_json: Path, vocab: int, log) -> dict[str, str]:
    """Row name -> cache folder: one Ray teacher pass per k and one in sampled mode
    (response records); an existing complete cache is resumed, i.e. reused."""
    from mmkd.pipelines.config import TeacherPassConfig
    from mmkd.pipelines.teacher_pass import run_teacher_pass

    common = dict(teacher=str(demo / "teacher"), inputs=InputsConfig(str(train_json), str(demo / "data")),
                  records="response", batch_size=64, rows_per_shard=1024)
    caches = {}
    for k in a.k:
        out = Path(a.workdir) / "cache" / f"topk{min(k, vocab)}"
        run_teacher_pass(TeacherPassConfig(output=str(out), k=min(k, vocab), **common), log)
        caches[topk_row(k, vocab)] = str(out)
    out = Path(a.workdir) / "cache" / f"sampled{a.draws}"
    run_teacher_pass(TeacherPassConfig(output=str(out), mode="sampled", draws=a.draws, seed=0, **common), log)
    caches[sampled_row(a.draws)] = str(out)
    import ray

    ray.shutdown()  # give the cores back to the students
    return caches


def train_configs(a, demo: Path, train_json: Path, caches: dict[str, str], seed: int) -> dict:
    """Row name -> TrainConfig of one seed (the demo's student settings)."""
    from mmkd.pipelines.config import DemoConfig
    from mmkd.student.config import TrainConfig

    d = DemoConfig()
    common = dict(inputs=InputsConfig(str(train_json), str(demo / "data")), processor=str(demo / "processor"),
                  arch=d.student_arch, subset=a.subset if a.subset is not None else d.student_subset,
                  epochs=a.epochs if a.epochs is not None else d.student_epochs, lr=d.student_lr,
                  batch_size=d.batch_size, seed=seed, log_every=10 ** 9, num_workers=0, keep_encoded=True)
    runs = {ROW_SFT: {}, **{name: {"cache": c} for name, c in caches.items()},
            ROW_ONLINE: {"online_teacher": str(demo / "teacher")}}
    students = Path(a.workdir) / "students"
    return {name: TrainConfig(output_dir=str(students / _slug(name) / f"seed{seed}"), **common, **kw)
            for name, kw in runs.items()}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.split(" (")[0]).strip("_")


def train_and_evaluate(cfg, demo: Path, test_json: Path, log) -> dict:
    """Train (unless already done) and evaluate one student; its metrics JSON is kept next to it."""
    from mmkd.student.evaluate import evaluate
    from mmkd.student.train import train

    out = Path(cfg.output_dir)
    metrics_file = out / "bench_metrics.json"
    if metrics_file.exists():
        return json.loads(metrics_file.read_text())
    if not (out / "train_summary.json").exists():
        train(cfg, log=lambda *_: None)
    summary = json.loads((out / "train_summary.json").read_text())
    m = evaluate(str(out), InputsConfig(str(test_json), str(demo / "data")), teacher=str(demo / "teacher"))
    metrics = {"accuracy": m["accuracy"], "full_kl_to_teacher": m["full_kl_to_teacher"],
               "hallucination_rate": m.get("hallucination_rate"), "steps": summary["steps"],
               "train_wall_s": summary["wall_s"]}
    metrics_file.write_text(json.dumps(metrics, indent=1))
    return metrics


def step_costs(a, demo: Path, train_json: Path, caches: dict[str, str], vocab: int, log) -> dict:
    """Median seconds per training step of SFT, offline KD (top-k at the largest k, sampled)
    and online KD: one process, interleaved rounds over the same batches."""
    from transformers import AutoProcessor

    from mmkd.common.inputs import SampleList, read_inputs
    from mmkd.pipelines.config import DemoConfig
    from mmkd.student.config import TrainConfig
    from mmkd.student.model import build_llava

    d = DemoConfig()
    processor = AutoProcessor.from_pretrained(demo / "processor")
    samples = SampleList(read_inputs(str(train_json), image_root=str(demo / "data"))[: a.cost_steps * d.batch_size])
    topk = topk_row(max(a.k), vocab)
    sampled = sampled_row(a.draws)
    return timed_steps(lambda: build_llava(d.student_arch, processor, seed=0), processor, samples, str(demo / "data"),
                       {ROW_SFT: None, topk: caches[topk], sampled: caches[sampled]}, str(demo / "teacher"),
                       TrainConfig(lr=d.student_lr), d.batch_size, a.cost_rounds, vocab, log)


def timed_steps(make_model, processor, samples, image_root: str | None, caches: dict[str, str | None],
                teacher: str, cfg, batch_size: int, rounds: int, vocab: int, log) -> dict:
    """{row: median ms, ratio to the SFT row (the one whose cache is None), steps timed}: a
    training step (forward, fused loss, backward, AdamW) of a fresh make_model() per row on
    the same batches of `samples`, the KD rows with their cache's targets and one more row,
    ROW_ONLINE, with `teacher` resident (OnlineTeacher.fill); rows interleaved round by
    round (the order rotating), the first round not counted (allocator and cache warm-up).
    cfg: the TrainConfig whose weights the trained rows use."""
    from mmkd.common.preprocess import image_token_id
    from mmkd.storage.reader import TeacherCache
    from mmkd.student import terms
    from mmkd.student.data import StudentData
    from mmkd.student.online import OnlineTeacher
    from mmkd.student.outputs import StudentOutputs

    def batches(cache: str | None) -> list:
        ds = StudentData(samples, processor, image_root, cfg.max_length, TeacherCache(cache) if cache else None)
        return [ds.batch(range(s, min(s + batch_size, len(ds)))) for s in range(0, len(ds), batch_size)]

    sft = next(name for name, c in caches.items() if c is None)
    modes = {name: batches(c) for name, c in caches.items()}
    states = {}
    for name in [*modes, ROW_ONLINE]:
        model = make_model().train()
        online = OnlineTeacher(teacher, processor, model) if name == ROW_ONLINE else None
        data = modes[sft] if name == ROW_ONLINE else modes[name]
        # one rank, no accumulation: the trainer's loss is the weighted sum of the stage's terms
        stage = [t for t in terms.stage_terms(cfg, teacher=name != sft, moe=False) if terms.weight_of(t, cfg)]
        states[name] = (StudentOutputs(model, image_token_id(processor), vocab), torch.optim.AdamW(
            model.parameters(), lr=cfg.lr), online, stage, data)

    def step(wrapped, opt, online, stage, batch) -> float:
        t = time.perf_counter()
        if online is not None:
            online.fill(batch)
        coefs = {term.name: terms.weight_of(term, cfg) for term in stage}  # one rank: weight x 1
        out = wrapped(batch.input_ids, batch.attention_mask, batch.labels, batch.vision or None,
                      terms=terms.token_terms(stage, batch, cfg, coefs))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    times = {name: [] for name in states}
    names = list(states)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            per_step = [step(*states[name][:4], b) for b in states[name][4]]
            if r > 0:
                times[name] += per_step
        log(f"[cost] round {r + 1}/{rounds} done")
    base = statistics.median(times[sft])
    return {name: {"median_ms": 1000 * statistics.median(t), "ratio_to_sft": statistics.median(t) / base,
                   "steps_timed": len(t)} for name, t in times.items()}


def check_workdir(work: Path, settings: dict) -> None:
    """Finished caches and students are reused: refuse a work folder made with other settings."""
    path = work / "settings.json"
    if path.exists() and json.loads(path.read_text()) != settings:
        raise SystemExit(f"{work} holds runs made with {path.read_text()}; these settings are {settings}: "
                         "use another --workdir or delete it")
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


METRICS = (("accuracy", "exact match", "{:.3f}"), ("full_kl_to_teacher", "full KL to teacher (nats/token)", "{:.4f}"),
           ("hallucination_rate", "hallucination", "{:.3f}"))  # (key, column header, format)


def results_table(rows: dict[str, dict[int, dict]], metrics=METRICS) -> str:
    """One line per row: mean ± std over its seeds of each metric ("-" where no seed has it)."""
    lines = ["| row | " + " | ".join(h for _, h, _ in metrics) + " | seeds |", "|---" * (len(metrics) + 2) + "|"]
    for name, per_seed in rows.items():
        cells = []
        for key, _, fmt in metrics:
            vals = [m[key] for m in per_seed.values() if m.get(key) is not None]
            if vals:
                mu, sd = mean_std(vals)
                cells.append(f"{fmt.format(mu)} ± {fmt.format(sd)}")
            else:
                cells.append("-")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(per_seed)} |")
    return "\n".join(lines)


def cost_table(costs: dict) -> str:
    lines = ["| step | median ms | ratio to SFT | steps timed |", "|---|---|---|---|"]
    lines += [f"| {name} | {c['median_ms']:.1f} | {c['ratio_to_sft']:.2f}x | {c['steps_timed']} |"
              for name, c in costs.items()]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg canvas, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def metric_bars(ax, rows: dict, key: str, title: str, labels: bool) -> None:
    """Horizontal bars of one metric per row, mean ± std over seeds (row names when labels)."""
    names = list(rows)
    stats = [mean_std([m[key] for m in rows[n].values()]) for n in names]
    ax.barh(range(len(names)), [s[0] for s in stats], xerr=[s[1] for s in stats], color="tab:blue", capsize=3)
    ax.set_yticks(range(len(names)), names if labels else [])
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)


def cost_bars(ax, costs: dict) -> None:
    ax.barh(range(len(costs)), [c["ratio_to_sft"] for c in costs.values()], color="tab:orange")
    ax.set_yticks(range(len(costs)), list(costs))
    ax.invert_yaxis()
    ax.set_title("step time / SFT step time (median)", fontsize=10)


def plot(rows: dict, costs: dict, path: Path) -> bool:
    """A PNG: exact match and full KL per row (mean +- std over seeds), step cost ratios."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=False)
    metric_bars(axes[0], rows, "accuracy", "test exact match", True)
    metric_bars(axes[1], rows, "full_kl_to_teacher", "KL to the teacher, full vocabulary (nats/token)", False)
    cost_bars(axes[2], costs)
    axes[2].axvline(1.15, color="k", linestyle="--", linewidth=1, label="offline target 1.15x")
    axes[2].legend(loc="lower right", fontsize=8)
    fig.suptitle("mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default="runs/demo", help="a finished demo folder (teacher, processor, data); read only")
    ap.add_argument("--workdir", default="runs/bench_offline_online")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--k", type=int, nargs="+", default=[64, 8, 4], help="top-k caches (capped to the vocabulary)")
    ap.add_argument("--draws", type=int, default=12,
                    help="sampled mode: ids drawn per position (Sparse Logit Sampling: ~12 tokens per position "
                         "matched full KD)")
    ap.add_argument("--train-samples", type=int, default=0, help="use the first N train samples (0 = all)")
    ap.add_argument("--test-samples", type=int, default=0, help="evaluate on the first N test samples (0 = all)")
    ap.add_argument("--subset", type=int, help="student training subset (default: the demo's)")
    ap.add_argument("--epochs", type=int, help="student epochs (default: the demo's)")
    ap.add_argument("--cost-rounds", type=int, default=6, help="interleaved timing rounds (the first is warm-up)")
    ap.add_argument("--cost-steps", type=int, default=12, help="steps (batches) per mode per round")
    a = ap.parse_args()
    from transformers import AutoProcessor

    from mmkd.student.evaluate import evaluate

    t0 = time.time()
    log = print
    demo, work = Path(a.demo), Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    check_workdir(work, {k: getattr(a, k) for k in ("demo", "train_samples", "test_samples", "subset", "epochs",
                                                     "draws")})
    vocab = len(AutoProcessor.from_pretrained(demo / "processor").tokenizer)
    train_json = write_split(demo / "data" / "train.json", work / "data" / "train.json", a.train_samples)
    test_json = write_split(demo / "data" / "test.json", work / "data" / "test.json", a.test_samples)
    log(f"[bench] vocabulary {vocab} ids; k {a.k} -> {[min(k, vocab) for k in a.k]}; seeds {a.seeds}")

    caches = make_caches(a, demo, train_json, vocab, log)
    rows: dict[str, dict[int, dict]] = {}
    for seed in a.seeds:
        for name, cfg in train_configs(a, demo, train_json, caches, seed).items():
            t = time.time()
            rows.setdefault(name, {})[seed] = m = train_and_evaluate(cfg, demo, test_json, log)
            log(f"[bench] seed {seed} {name}: exact match {m['accuracy']:.3f}, full KL {m['full_kl_to_teacher']:.4f}"
                f" ({time.time() - t:.0f}s)")
    teacher = evaluate(str(demo / "teacher"), InputsConfig(str(test_json), str(demo / "data")))
    costs = step_costs(a, demo, train_json, caches, vocab, log)

    table, cost = results_table(rows), cost_table(costs)
    d = train_configs(a, demo, train_json, caches, a.seeds[0])[ROW_SFT]
    note = (f"Test split: {len(json.loads(test_json.read_text()))} samples; teacher exact match "
            f"{teacher['accuracy']:.3f}. Students: {d.subset} training samples (a seeded draw per seed), "
            f"{d.epochs} epochs, lr {d.lr}, batch {d.batch_size}; CE + forward KL on the response tokens. "
            f"Vocabulary {vocab} ids. Sampled mode: {a.draws} draws per position. mean ± std over seeds {a.seeds}.")
    text = f"{table}\n\n{note}\n\n{cost}\n"
    (work / "results.md").write_text(text)
    (work / "results.json").write_text(json.dumps({
        "args": vars(a), "vocab_size": vocab, "teacher_accuracy": teacher["accuracy"],
        "rows": {n: {str(s): m for s, m in per_seed.items()} for n, per_seed in rows.items()},
        "cost": costs}, indent=1))
    plotted = plot(rows, costs, work / "offline_online.png")
    log("\n" + text)
    log(f"[bench] wrote {work / 'results.md'}, {work / 'results.json'}"
        + (f", {work / 'offline_online.png'}" if plotted else " (no plot: matplotlib is not installed)")
        + f"; {time.time() - t0:.0f}s in all")


if __name__ == "__main__":
    main()
