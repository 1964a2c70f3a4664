"""The student's output head + loss at a real vocabulary: torch's unfused CE against the
fused head + loss (student/fused.py), CE alone and CE + each KD term, forward + backward.

Inputs (allocated before any measurement): the hidden states at the T target rows [T, d]
and the output head [V, d] (both requiring grad), the cached top-k targets (or sampled ids,
or a teacher's hidden states for the dense term). Variants:

  torch CE          logits = h W^T, F.cross_entropy, backward (what the trainer did before)
  fused CE          student.fused.token_losses with the CE term
  fused CE + KD     ... + forward KL (bucket / renormalize), reverse KL, JSD (bucket), sampled
                    KD (32 draws), dense forward KL from a teacher's hidden states [T, d]
  liger CE          Liger's fused linear cross-entropy, when liger_kernel imports (GPU)

--step: the whole training step of a small causal LM with a SmolLM2-sized head (V = 49,152,
d = 576; --layers decoder layers), batch 8 x 256 tokens with 128 supervised each: the
student's forward, the fused loss (SFT: CE; KD: CE + forward KL bucket on top-64 targets),
backward and AdamW, through student.outputs.StudentOutputs as the trainer runs it.

--memory: each variant in its own process; the peak memory above the inputs (CPU: VmHWM -
VmRSS; CUDA: max_memory_allocated - memory_allocated). --time: all variants in one process,
interleaved rounds, median seconds (ratios are what to compare).

    CPU:  OMP_NUM_THREADS=2 python benchmarks/bench_fused_loss.py --memory --rows 4096 --vocab 151936
          OMP_NUM_THREADS=2 python benchmarks/bench_fused_loss.py --time --rows 2048 --vocab 49152
    GPU:  python benchmarks/bench_fused_loss.py --device cuda --dtype bfloat16 --rows 8192 --vocab 151936 \
              --memory --time
    Step: OMP_NUM_THREADS=2 python benchmarks/bench_fused_loss.py --step --vocab 49152 --hidden 576
    (validation: --rows 64 --vocab 3000 --hidden 32 --memory --time --step --layers 1 --repeats 2)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = ["torch CE", "fused CE", "fused CE + fkl bucket", "fused CE + fkl renorm", "fused CE + rkl bucket",
            "fused CE + jsd bucket", "fused CE + sampled", "fused CE + dense fkl", "liger CE"]


def _kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise KeyError(field)


def inputs(a):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    dt = getattr(torch, a.dtype)
    h = (torch.randn(a.rows, a.hidden, generator=g) * 0.5).to(a.device, dt).requires_grad_(True)
    w = (torch.randn(a.vocab, a.hidden, generator=g) * 0.05).to(a.device, dt).requires_grad_(True)
    y = torch.randint(0, a.vocab, (a.rows,), generator=g).to(a.device)
    ids = torch.stack([torch.randperm(a.vocab, generator=g)[: a.k] for _ in range(min(a.rows, 64))])
    ids = ids.repeat(-(-a.rows // len(ids)), 1)[: a.rows].to(a.device)
    t_logp = torch.log_softmax(torch.randn(a.rows, a.k, generator=g), -1).to(a.device) - 0.1
    left = torch.full((a.rows,), 0.095, device=a.device)
    counts = torch.ones(a.rows, a.k, dtype=torch.int32, device=a.device)
    t_h = (torch.randn(a.rows, a.hidden, generator=g) * 0.5).to(a.device, dt)
    return h, w, y, ids, t_logp, left, counts, t_h


def step(variant: str, a, x) -> None:
    import torch

    from mmkd.common.heads import Head
    from mmkd.student import fused
    from mmkd.student.losses import ce_rows, dense_rows, sampled_rows, topk_rows

    h, w, y, ids, t_logp, left, counts, t_h = x
    if variant == "torch CE":
        loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), y)
    elif variant == "liger CE":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()(w, h, y)
    else:
        terms = [fused.TokenTerm("ce", 1.0, lambda s, r: ce_rows(s), y[:, None])]
        kd = variant.split(" + ")[1] if " + " in variant else None
        if kd == "sampled":
            terms.append(fused.TokenTerm("kd", 1.0, lambda s, r, c: sampled_rows(s, c), ids, args=(counts,)))
        elif kd == "dense fkl":
            terms.append(fused.TokenTerm("kd", 1.0, lambda s, t: dense_rows(s, t), teacher=(t_h, Head(w.detach(),
                                                                                                      None))))
        elif kd:
            div, mode = kd.split()
            div = {"fkl": "forward_kl", "rkl": "reverse_kl", "jsd": "jsd"}[div]
            mode = {"bucket": "bucket", "renorm": "renormalize"}[mode]
            terms.append(fused.TokenTerm("kd", 1.0, lambda s, r, t, lf: topk_rows(s, r, t, lf, div, mode), ids,
                                         rest=mode == "bucket", args=(t_logp, left)))
        loss, _ = fused.token_losses(h, Head(w, None), terms, a.chunk_rows)
    loss.backward()
    h.grad = w.grad = None


def memory(variant: str, a) -> float:
    """GiB of peak memory above the inputs, forward + backward of one step (after a warm-up
    step at a tiny size, which loads the code path and the allocator's pools)."""
    import torch

    small = argparse.Namespace(**{**vars(a), "rows": 8, "vocab": 1000, "k": min(a.k, 100)})
    step(variant, small, inputs(small))
    x = inputs(a)
    if a.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(variant, a, x)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**30
    base = _kb("VmRSS:")
    step(variant, a, x)
    return (_kb("VmHWM:") - base) / 2**20


def times(variants: list[str], a) -> dict[str, float]:
    import torch

    x = inputs(a)
    got = {v: [] for v in variants}
    for r in range(a.repeats + 1):
        for v in variants[r % len(variants):] + variants[: r % len(variants)]:
            if a.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(v, a, x)
            if a.device == "cuda":
                torch.cuda.synchronize()
            if r:  # the first round warms up
                got[v].append(time.perf_counter() - t)
    return {v: statistics.median(t) for v, t in got.items()}


def step_times(a) -> dict[str, float]:
    """Median seconds of the SFT and the KD training step (module docstring)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmkd.student import terms
    from mmkd.student.outputs import StudentOutputs
    from mmkd.student.targets import Batch, TopK

    torch.manual_seed(0)
    heads = max(1, a.hidden // 64)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3,
                                         num_hidden_layers=a.layers, num_attention_heads=heads,
                                         num_key_value_heads=max(1, heads // 3), max_position_embeddings=512))
    wrapped = StudentOutputs(model, image_token_id=-1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, a.vocab, (8, 256))
    labels = ids.clone()
    labels[:, :128] = -100
    n = int((labels != -100).sum())
    t_logp = torch.log_softmax(torch.randn(n, a.k), -1) - 0.1
    targets = TopK(torch.stack([torch.randperm(a.vocab)[: a.k] for _ in range(n)]), t_logp, torch.full((n,), 0.095))
    batch = Batch(ids, torch.ones_like(ids), labels, response=targets)
    cfg = argparse.Namespace(divergence="forward_kl", kd_leftover="bucket")
    stages = {"SFT step": [t for t in terms.TERMS if t.name == "ce" and t.objective == "distill"],
              "KD step (CE + fKL bucket)": [t for t in terms.TERMS
                                            if t.name in ("ce", "kd") and t.objective == "distill"]}
    got = {k: [] for k in stages}
    for r in range(a.repeats + 1):
        for name, stage in (list(stages.items())[::1 if r % 2 else -1]):
            t0 = time.perf_counter()
            out = wrapped(batch.input_ids, batch.attention_mask, batch.labels,
                          terms=terms.token_terms(stage, batch, cfg, {t.name: 1.0 for t in stage}))
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r:
                got[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in got.items()}


def available(variants: list[str]) -> list[str]:
    try:
        import liger_kernel  # noqa: F401
        return variants
    except ImportError:
        return [v for v in variants if not v.startswith("liger")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=576, help="576: SmolLM2-135M; 896: Qwen2-0.5B")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--chunk-rows", type=int, default=None, help="default: student.fused.rows_per_chunk")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--step", action="store_true")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the --step student")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    import torch

    if a.one:
        print(json.dumps({"gib": memory(a.one, a)}))
        return
    variants = available(a.variants.split(","))
    from mmkd.student.fused import rows_per_chunk

    print(f"T={a.rows} d={a.hidden} V={a.vocab} k={a.k} {a.device} {a.dtype}, chunks of "
          f"{rows_per_chunk(a.vocab, a.chunk_rows)} rows; torch {torch.__version__}, {torch.get_num_threads()} "
          "threads; "
          f"logits [T, V] fp32 = {a.rows * a.vocab * 4 / 2**30:.2f} GiB, head grad [V, d] fp32 = "
          f"{a.vocab * a.hidden * 4 / 2**30:.2f} GiB")
    mem, sec = {}, {}
    if a.memory:
        for v in variants:
            args = [sys.executable, __file__, "--one", v] + [f"--{k.replace('_', '-')}={val}"
                                                            for k, val in vars(a).items()
                                                            if k not in ("one", "memory", "time", "variants",
                                                                         "step")
                                                            and val is not None]
            out = subprocess.run(args, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            mem[v] = json.loads(out.stdout.strip().splitlines()[-1])["gib"]
    if a.time:
        sec = times(variants, a)
    if a.step:
        st = step_times(a)
        sft = st["SFT step"]
        print(f"whole training step, {a.layers} layers, d={a.hidden}, V={a.vocab}, batch 8 x 256 (1,024 supervised "
              "rows): " + "; ".join(f"{k} {v:.3f} s ({v / sft:.2f}x SFT)" for k, v in st.items()))
        if not (a.memory or a.time):
            return
    ref_m, ref_t = mem.get("torch CE"), sec.get("torch CE")
    fused_t = sec.get("fused CE")
    print("| loss, forward + backward | extra peak memory (GiB) | vs torch CE | median s | vs torch CE | "
          "vs fused CE |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        m, t = mem.get(v), sec.get(v)
        print(f"| {v} | {'-' if m is None else f'{m:.2f}'} | "
              f"{'-' if m is None or not ref_m else f'{m / ref_m:.2f}x'} | "
              f"{'-' if t is None else f'{t:.3f}'} | {'-' if t is None or not ref_t else f'{t / ref_t:.2f}x'} | "
              f"{'-' if t is None or not fused_t else f'{t / fused_t:.2f}x'} |")


if __name__ == "__main__":
    main()
