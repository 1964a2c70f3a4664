"""Peak memory of the student's loss, forward + backward, at T rows x V vocabulary.

Each variant runs in its own process: the student's logits [T, V] fp32 (requires grad) and
the cached teacher targets are allocated first, then the loss and its backward run, and
the process's peak resident memory above that starting point is reported (VmHWM - VmRSS,
Linux). The memory of the logits themselves and of their gradient is the same for every
variant; what differs is what each loss keeps for the backward.

Variants: CE alone (torch cross_entropy: keeps one [T, V] log-softmax); CE + sparse
forward KL (bucket / renormalize), reverse KL, JSD on the cached top-k, and the sampled-KD
estimator, all chunked over rows (student.losses); and a naive dense KD for contrast
(a second full [T, V] log-softmax kept for the backward, the un-chunked formula).

    .venv/bin/python benchmarks/bench_loss_memory.py [--rows 4096 --vocab 151936 --k 64]
"""

import argparse
import json
import subprocess
import sys
import time

VARIANTS = ["ce", "ce+fkl_bucket", "ce+fkl_renorm", "ce+rkl_bucket", "ce+jsd_bucket", "ce+sampled", "ce+naive_dense_kd"]


def _kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise KeyError(field)


def run_one(variant: str, rows: int, vocab: int, k: int, chunk: int, warm: bool = True) -> dict:
    import torch

    from mmkd.student.losses import cross_entropy, sampled_kd, sparse_divergence

    if warm:  # lazy imports and allocator pools of the code path, before measuring
        run_one(variant, 8, 1000, min(k, 100), chunk, warm=False)
    torch.manual_seed(0)
    logits = torch.randn(rows, vocab).requires_grad_(True)
    y = torch.randint(0, vocab, (rows,))
    ids = torch.randint(0, vocab, (rows, k))
    t_logp = torch.log_softmax(torch.randn(rows, k), -1) - 0.1
    left = torch.full((rows,), 1 - float(torch.exp(torch.tensor(-0.1))))
    counts = torch.ones(rows, k, dtype=torch.int32)
    base = _kb("VmRSS:")
    t0 = time.perf_counter()
    loss = cross_entropy(logits, y)
    if variant != "ce":
        kind = variant.split("+")[1]
        if kind == "sampled":
            loss = loss + sampled_kd(logits, ids, counts, chunk_rows=chunk)
        elif kind == "naive_dense_kd":
            s = torch.log_softmax(logits, -1)  # a second [T, V] fp32, kept for the backward
            loss = loss + (t_logp.exp() * (t_logp - s.gather(-1, ids))).sum(-1).mean()
        else:
            div, mode = kind.split("_")
            div = {"fkl": "forward_kl", "rkl": "reverse_kl", "jsd": "jsd"}[div]
            loss = loss + sparse_divergence(logits, ids, t_logp, left, div,
                                            {"bucket": "bucket", "renorm": "renormalize"}[mode], chunk_rows=chunk)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _kb("VmHWM:")
    return {"variant": variant, "extra_peak_gb": (peak - base) / 2**20, "seconds": seconds,
            "logits_gb": rows * vocab * 4 / 2**30}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.rows, a.vocab, a.k, a.chunk_rows)))
        return
    results = []
    for v in a.variants.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", v, "--rows", str(a.rows), "--vocab", str(a.vocab),
                              "--k", str(a.k), "--chunk-rows", str(a.chunk_rows)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ce = results[0]["extra_peak_gb"] if results[0]["variant"] == "ce" else None
    print(f"T={a.rows} V={a.vocab} k={a.k} chunk={a.chunk_rows}; logits [T, V] fp32 = {results[0]['logits_gb']:.2f} GiB "
          "(allocated before measuring, same for all)")
    print("| loss (forward + backward) | extra peak memory (GiB) | vs CE | time (s) |")
    print("|---|---|---|---|")
    for r in results:
        ratio = f"{r['extra_peak_gb'] / ce:.2f}x" if ce else "-"
        print(f"| {r['variant']} | {r['extra_peak_gb']:.2f} | {ratio} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
