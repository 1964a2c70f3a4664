"""Does the streaming shuffle train as well as a full shuffle? (the demo, student (b))

The epoch plan (storage/plan.py) shuffles whole shards, then row-group blocks inside a
stream, then rows within a window of `shuffle_window` rows. A window as large as the epoch
is a full shuffle. This trains the demo's student (b) (CE + response KD from the demo's
cache, the demo's settings) with windows of 64, 1024 (the default) and the whole epoch,
for several seeds, and compares the loss curves and the test metrics: mean +- std over
seeds, and each window's paired difference (same seed) against the full shuffle.

ROOT is the workdir of a finished `mmkd demo` (data/, processor/, cache/; only read).

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/bench_shuffle.py --root runs/demo [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mmkd.common.config import InputsConfig
from mmkd.pipelines.config import DemoConfig
from mmkd.student.config import TrainConfig
from mmkd.student.evaluate import evaluate
from mmkd.student.train import train

FULL = 1 << 30


def run(root: Path, out: Path, seed: int, window: int) -> dict:
    d = DemoConfig()
    cfg = TrainConfig(inputs=InputsConfig(str(root / "data" / "train.json"), str(root / "data")),
                      processor=str(root / "processor"), output_dir=str(out), cache=str(root / "cache" / "train"),
                      arch=d.student_arch, subset=d.student_subset, epochs=d.student_epochs, lr=d.student_lr,
                      batch_size=d.batch_size, seed=seed, log_every=10 ** 9, num_workers=0, keep_encoded=True,
                      save_every=0, report_to="none", shuffle_window=window)
    t = time.time()
    train(cfg, log=lambda *_: None)
    loss = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    m = evaluate(str(out), InputsConfig(str(root / "data" / "test.json"), str(root / "data")),
                 cache=str(root / "cache" / "test"))
    return {"loss": loss, "accuracy": m["accuracy"], "kl": m["kl_to_teacher"], "s": time.time() - t}


def mean_std(xs) -> str:
    return f"{statistics.mean(xs):.3f} +- {statistics.stdev(xs) if len(xs) > 1 else 0:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/demo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--windows", type=int, nargs="+", default=[64, 1024, FULL])
    a = ap.parse_args()
    root = Path(a.root)
    if not (root / "cache" / "train" / "manifest.json").exists():
        raise SystemExit(f"{root}: not the workdir of a finished `mmkd demo`; run `make demo` or pass --root")
    res: dict[int, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-shuffle-") as tmp:
        for seed in a.seeds:
            for w in a.windows:
                res.setdefault(w, {})[seed] = r = run(root, Path(tmp) / f"w{w}-s{seed}", seed, w)
                print(f"[bench] window {w if w != FULL else 'full'} seed {seed}: exact match {r['accuracy']:.3f}, "
                      f"KL {r['kl']:.4f}, final loss {np.mean(r['loss'][-46:]):.4f} ({r['s']:.0f}s)", flush=True)
    name = lambda w: "full shuffle" if w == FULL else f"window {w}"  # noqa: E731
    steps = len(res[a.windows[0]][a.seeds[0]]["loss"])
    tail = max(1, steps // 20)  # the last 5% of the steps
    print(f"\nstudent (b), {len(a.seeds)} seeds, {steps} steps; loss = mean of the last {tail} steps\n")
    print("| order | exact match | KL to teacher | final loss | paired vs full: exact match | KL | loss |")
    print("|---|---|---|---|---|---|---|")
    for w in a.windows:
        row = [mean_std([res[w][s]["accuracy"] for s in a.seeds]), mean_std([res[w][s]["kl"] for s in a.seeds]),
               mean_std([np.mean(res[w][s]["loss"][-tail:]) for s in a.seeds])]
        if w == FULL:
            row += ["-", "-", "-"]
        else:
            row += [mean_std([res[w][s][k] - res[FULL][s][k] for s in a.seeds]) for k in ("accuracy", "kl")]
            row.append(mean_std([np.mean(res[w][s]["loss"][-tail:]) - np.mean(res[FULL][s]["loss"][-tail:])
                                 for s in a.seeds]))
        print(f"| {name(w)} | " + " | ".join(row) + " |")
    curves = {w: np.array([res[w][s]["loss"] for s in a.seeds]) for w in a.windows}
    seed_spread = curves[FULL].std(0).mean()
    print(f"\nloss curves: mean over steps of the across-seed std (full shuffle) {seed_spread:.4f}; mean over steps "
          "of |window - full| of the seed-mean curves: "
          + ", ".join(f"{name(w)} {np.abs(curves[w].mean(0) - curves[FULL].mean(0)).mean():.4f}"
                      for w in a.windows if w != FULL))


if __name__ == "__main__":
    main()
