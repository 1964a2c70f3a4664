"""The demo's results over several runs: mean and range per model, the table the README shows.

    mmkd demo --seed 1 --workdir runs/demo_s1      # one run per seed (make demo is seed 0)
    python benchmarks/demo_spread.py runs/demo runs/demo_s1 runs/demo_s2

Reads each workdir's results.json (written by `mmkd demo`) and prints, per model, the mean
and [min, max] of exact match, KL to the teacher and the hallucination rate, and the demo's
wall time per step (steps/*.json) for each run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METRICS = (("accuracy", "exact match", "{:.3f}"), ("kl_to_teacher", "KL to teacher (nats/token)", "{:.3f}"),
           ("hallucination_rate", "hallucination (absent, said yes)", "{:.2f}"))


def spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdirs", nargs="+", help="demo workdirs, each with results.json")
    args = ap.parse_args()
    runs = [json.loads((Path(w) / "results.json").read_text()) for w in args.workdirs]
    seeds = [r["config"]["seed"] for r in runs]
    print(f"{len(runs)} runs, seeds {seeds}: mean [min, max]\n")
    print("| model | params | " + " | ".join(h for _, h, _ in METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    for model in runs[0]["results"]:
        rows = [r["results"][model] for r in runs if model in r["results"]]
        cells = [spread([row[k] for row in rows if k in row], fmt) for k, _, fmt in METRICS]
        print(f"| {model} | {rows[0]['params'] / 1e6:.2f}M | " + " | ".join(cells) + " |")
    print("\nwall seconds per step:\n")
    names = sorted({p.stem for w in args.workdirs for p in (Path(w) / "steps").glob("*.json")})
    print("| workdir | " + " | ".join(names) + " | total |")
    print("|---|" + "---|" * (len(names) + 1))
    for w in args.workdirs:
        walls = {p.stem: json.loads(p.read_text()).get("wall_s", 0.0) for p in (Path(w) / "steps").glob("*.json")}
        print(f"| {w} | " + " | ".join(f"{walls.get(n, 0):.0f}" for n in names) + f" | {sum(walls.values()):.0f} |")


if __name__ == "__main__":
    main()
