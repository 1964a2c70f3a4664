"""The student's data path at scale: decode rate, memory per rank, bytes read per rank.

Synthetic caches (pipelines/synthetic_cache.py: real token sequences, Zipf-like top-k ids,
heavy-tailed log-probs; about the bytes per token of SmolLM2-135M's real top-64) of two
profiles: "long" (k = 64, 201 targets per row, like SmolLM2 chat answers) and "short"
(k = 16, 8 targets per row, like the demo's). Three measurements:

  1. decode rate, one thread, target tokens/s: TeacherCache.iter_rows (every row in shard
     order), TeacherCache.stream (one rank's rows one by one, shuffled), and the training
     path: the epoch plan's micro-batches of 32 through TeacherCache.read_items (shuffled,
     rank-sliced; what a loader worker does before encoding the samples).
  2. `mmkd train` (3 steps, batch 8, no loader workers, the default shuffle window) on long
     caches of 1x, 4x and 16x the rows: peak RSS of the process (VmHWM).
  3. bytes read per rank with 2 ranks (streams 2): the Parquet row-group bytes each rank's
     reader fetches over one epoch of micro-batches, against the cache's size.
  4. the cost of the integrity checks: the training path's decode rate on the long cache
     and on a copy written as before checksums (no page CRCs, no footer digests), the two
     alternated, best of 5 each.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_stream.py [--base 1000] [--workdir DIR]
    (validation: --base 60 --sizes 1,2)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mmkd.pipelines.synthetic_cache import without_checksums, write_synthetic  # noqa: E402
from mmkd.storage.reader import TeacherCache  # noqa: E402

PEAK = """
import sys
from mmkd.pipelines.cli import main
rc = main(sys.argv[1:])
print("PEAK_KB", next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
sys.exit(rc)
"""


def train_path(cache: TeacherCache) -> int:
    """One epoch of the plan's micro-batches of 32 through read_items; target tokens read."""
    plan = cache.epoch_plan(1, 0, 1024)
    return sum(int(cache.read_items(plan, b).response.lengths.sum()) for b in plan.micro_batches(0, 1, 32))


def rate(cache_dir: str, fn) -> float:
    """Target tokens/s of fn on a fresh reader."""
    cache = TeacherCache(cache_dir)
    t = time.perf_counter()
    n = fn(cache)
    return n / (time.perf_counter() - t)


def decode_rates(cache_dir: str, repeats: int = 3) -> dict:
    """Best-of-repeats target tokens/s of the three read paths, one fresh reader each."""
    paths = {"iter_rows": lambda c: sum(len(r.response) for r in c.iter_rows()),
             "stream": lambda c: sum(len(r.response) for r in c.stream(seed=0)), "training path": train_path}
    return {name: max(rate(cache_dir, fn) for _ in range(repeats)) for name, fn in paths.items()}


def checksum_cost(cache_dir: str, work: Path, repeats: int = 5) -> dict:
    """The training path's best rate with the checks and on an unchecked copy, alternated."""
    import warnings

    old = work / "long-unchecked"
    if not old.exists():
        without_checksums(cache_dir, old)
    best = {"checked": 0.0, "unchecked": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old-cache note
        for _ in range(repeats):
            for name, path in (("checked", cache_dir), ("unchecked", str(old))):
                best[name] = max(best[name], rate(path, train_path))
    return best


def peak_rss_mb(root: Path, out: Path) -> float:
    args = ["train", "--data", str(root / "data.jsonl"), "--image-column", "", "--processor", str(root / "processor"),
            "--cache", str(root / "cache"), "--output-dir", str(out), "--max-steps", "3", "--batch-size", "8",
            "--num-workers", "0", "--save-every", "0", "--report-to", "none", "--max-length", "512",
            "--arch.vision-hidden", "32", "--arch.vision-layers", "1", "--arch.vision-heads", "2",
            "--arch.text-hidden", "32", "--arch.text-layers", "1", "--arch.text-heads", "2",
            "--arch.text-intermediate", "64", "--arch.max-positions", "512"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    return int(proc.stdout.split("PEAK_KB")[-1].split()[0]) / 1024


def bytes_per_rank(root: Path, world: int = 2) -> list[int]:
    """Row-group bytes (compressed, as stored) each rank's reader fetches over one epoch."""
    from transformers import AutoProcessor

    from mmkd.common.config import InputsConfig
    from mmkd.common.inputs import SampleTable
    from mmkd.storage.plan import EpochPlan
    from mmkd.student.data import StudentData

    processor = AutoProcessor.from_pretrained(root / "processor")
    samples = SampleTable(InputsConfig(str(root / "data.jsonl"), image_column=""))
    out = []
    for rank in range(world):
        cache = TeacherCache(str(root / "cache"))
        fetched = []
        real = cache._row_group

        def counting(s, g, real=real, cache=cache, fetched=fetched):
            if (s, g) not in cache._groups:
                md = cache._footer(s).metadata.row_group(g)
                fetched.append(sum(md.column(i).total_compressed_size for i in range(md.num_columns)))
            return real(s, g)

        cache._row_group = counting
        data = StudentData(samples, processor, "", 512, cache)
        plan = EpochPlan(data.shard_rows, streams=world, seed=0, window=1024)
        for items in plan.micro_batches(rank, world, 8):
            cache.read_items(data._layout, items)
        out.append(sum(fetched))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=int, default=1000, help="rows of the 1x long cache (and 4x that for short)")
    ap.add_argument("--sizes", default="1,4,16", help="cache sizes for the memory table, in multiples of --base")
    ap.add_argument("--workdir", help="keep the caches here (default: a temporary folder)")
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench-stream-"))
    distinct = min(a.base, 250)
    caches = {}
    for name, kw in (("short", dict(distinct=min(4 * a.base, 1000), copies=max(1, 4 * a.base // 1000),
                                    answer_words=7, k=16, vocab_words=40)),
                     *((f"long x{n}", dict(distinct=distinct, copies=n * a.base // distinct, answer_words=200, k=64))
                       for n in sizes)):
        root = work / name.replace(" ", "-")
        if not (root / "cache" / "manifest.json").exists():
            t = time.time()
            write_synthetic(root, **kw)
            print(f"[bench] wrote {name} in {time.time() - t:.0f}s", flush=True)
        caches[name] = root

    results = {"machine": f"{os.cpu_count()} CPUs", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    print("\n1. decode rate, one thread (target tokens/s; best of 3)\n")
    print("| cache | rows | targets | bytes/target | iter_rows | stream | training path |")
    print("|---|---|---|---|---|---|---|")
    for name in ("long x1", "short"):
        c = TeacherCache(str(caches[name] / "cache"))
        rows, targets = c.manifest.num_rows, sum(s.targets for s in c.manifest.shards)
        size = sum(s.bytes for s in c.manifest.shards)
        r = decode_rates(str(caches[name] / "cache"))
        results[f"decode {name}"] = r
        print(f"| {name} (k={c.k}) | {rows:,} | {targets:,} | {size / targets:.1f} | "
              + " | ".join(f"{r[k] / 1e6:.2f} M" for k in ("iter_rows", "stream", "training path")) + " |")

    print("\n2. `mmkd train`, 3 steps, batch 8, num_workers 0: peak RSS (VmHWM)\n")
    print("| cache | rows | targets | cache bytes | peak RSS | vs 1x |")
    print("|---|---|---|---|---|---|")
    first = None
    for n in sizes:
        root = caches[f"long x{n}"]
        c = TeacherCache(str(root / "cache"))
        rss = peak_rss_mb(root, work / f"run-x{n}-{time.time_ns()}")
        first = rss if first is None else first
        results[f"rss x{n}"] = rss
        print(f"| long x{n} | {c.manifest.num_rows:,} | {sum(s.targets for s in c.manifest.shards):,} | "
              f"{sum(s.bytes for s in c.manifest.shards) / 2**20:.0f} MiB | {rss:.0f} MiB | {rss - first:+.0f} MiB |")

    print("\n3. bytes read per rank, 2 ranks, one epoch\n")
    print("| cache | cache bytes | rank 0 | rank 1 | rank share |")
    print("|---|---|---|---|---|")
    for n in sizes:
        root = caches[f"long x{n}"]
        total = sum(s.bytes for s in TeacherCache(str(root / "cache")).manifest.shards)
        per = bytes_per_rank(root)
        results[f"bytes x{n}"] = {"total": total, "ranks": per}
        print(f"| long x{n} | {total / 2**20:.1f} MiB | {per[0] / 2**20:.1f} MiB | {per[1] / 2**20:.1f} MiB | "
              f"{np.mean(per) / total:.2f} |")

    print("\n4. integrity checks: training-path decode rate (target tokens/s; best of 5, alternated)\n")
    r = checksum_cost(str(caches["long x1"] / "cache"), work)
    results["checksum cost"] = r
    print("| cache | page CRCs + footer sha256 | unchecked copy | checked / unchecked |")
    print("|---|---|---|---|")
    print(f"| long x1 | {r['checked'] / 1e6:.2f} M | {r['unchecked'] / 1e6:.2f} M | {r['checked'] / r['unchecked']:.3f} |")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults in {work / 'results.json'}")


if __name__ == "__main__":
    main()
