"""Student-side cost of distilling from the cache: output head + loss, forward + backward.

Compares CE alone with CE + sparse forward KL on cached top-k (both leftover modes), at
the supervised rows only (as the trainer computes them). Prints a table of median times
and their ratio to CE, measured in one run (compare ratios, not seconds across runs).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_kd_loss.py [--rows 2048 --vocab 32000 --k 64]
"""

import argparse
import statistics
import time

import torch

from mmkd.student.losses import cross_entropy, sparse_forward_kl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    torch.manual_seed(0)
    head = torch.nn.Linear(a.hidden, a.vocab, bias=False)
    h = torch.randn(a.rows, a.hidden)
    y = torch.randint(0, a.vocab, (a.rows,))
    t_logp, ids = torch.log_softmax(torch.randn(a.rows, a.vocab) * 3, -1).topk(a.k, -1)
    left = (1 - t_logp.exp().sum(-1)).clamp_min(0)

    def step(kind):
        logits = head(h.requires_grad_(True))
        loss = cross_entropy(logits, y)
        if kind != "CE":
            loss = loss + sparse_forward_kl(logits, ids, t_logp.half().float(), left, mode=kind)
        loss.backward()
        head.weight.grad = None

    kinds = ["CE", "bucket", "renormalize"]
    times = {k: [] for k in kinds}
    for _ in range(a.repeats):  # interleaved so drift hits every kind alike
        for k in kinds:
            t = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(f"rows={a.rows} hidden={a.hidden} vocab={a.vocab} k={a.k} threads={torch.get_num_threads()}")
    print("| loss | median ms (head + loss, fwd + bwd) | ratio to CE |")
    print("|---|---|---|")
    for k in kinds:
        name = "CE" if k == "CE" else f"CE + sparse KL ({k})"
        print(f"| {name} | {med[k] * 1e3:.1f} | {med[k] / med['CE']:.2f}x |")


if __name__ == "__main__":
    main()
