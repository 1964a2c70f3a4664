"""RDist with pooling="batch": the reference pools RAW teacher relation matrices, the cache
stores each one divided by its Frobenius norm. How much does that change the loss and its
gradient? Measured on real teacher/student pairs: the demo's teacher and a demo student.

For batches of B test samples: R_t (raw, from the teacher's hidden states and head, as the
teacher pass computes it before normalising), R_s (the student's), then
    L_ref  = 1 - cos(flat [R_t,1 .. R_t,B], flat [R_s,...])         (reference)
    L_ours = 1 - cos(flat [R_t,i / ||R_t,i||], flat [R_s,...])     (from the cache)
and the cosine between their gradients in R_s. Also the spread of ||R_t|| over samples
(the weights the reference gives to samples).

    .venv/bin/python benchmarks/bench_rdist_pooling.py [--workdir runs/demo --student student_kd]
"""

import argparse

import numpy as np
import torch

from mmkd.common.heads import relation_matrix, visual_rows
from mmkd.common.inputs import load_image
from mmkd.common.preprocess import collate, encode_sample, image_token_id
from mmkd.common.samples import read_llava
from mmkd.student.losses import relation_loss
from mmkd.student.model import load_model
from mmkd.teacher_cache.extract import final_hidden_states, to_device


def relations(model, batch, img):
    h = final_hidden_states(model, batch)
    b, t = visual_rows(batch["input_ids"], batch["attention_mask"], img)
    head = model.get_output_embeddings()
    return [relation_matrix(h[r, t[b == r]], head.weight, head.bias) for r in range(batch["input_ids"].shape[0])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--student", default="student_kd")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--samples", type=int, default=256)
    a = ap.parse_args()
    from transformers import AutoProcessor

    teacher = load_model(f"{a.workdir}/teacher").eval()
    student = load_model(f"{a.workdir}/{a.student}").eval()
    proc = AutoProcessor.from_pretrained(f"{a.workdir}/teacher")
    img = image_token_id(proc)
    samples = read_llava(f"{a.workdir}/data/test.json")[: a.samples]
    norms, l_ref, l_ours, gcos = [], [], [], []
    for i in range(0, len(samples), a.batch):
        chunk = samples[i:i + a.batch]
        enc = [encode_sample(proc, s, load_image(f"{a.workdir}/data", s), 256) for s in chunk]
        batch = to_device(collate(enc, proc.tokenizer.pad_token_id), "cpu", torch.float32)
        with torch.no_grad():
            rt = relations(teacher, batch, img)
            rs = [r.detach().requires_grad_(True) for r in relations(student, batch, img)]
        norms += [float(r.norm()) for r in rt]
        ref = relation_loss(rs, rt, "batch")
        g_ref = torch.autograd.grad(ref, rs)
        ours = relation_loss(rs, [r / r.norm() for r in rt], "batch")
        g_ours = torch.autograd.grad(ours, rs)
        a_, b_ = torch.cat([g.flatten() for g in g_ref]), torch.cat([g.flatten() for g in g_ours])
        l_ref.append(ref.item())
        l_ours.append(ours.item())
        gcos.append(float(a_ @ b_ / (a_.norm() * b_.norm())))
    norms = np.array(norms)
    print(f"teacher {a.workdir}/teacher, student {a.student}, {len(samples)} test samples, batch {a.batch}")
    print(f"||R_t||_F over samples: mean {norms.mean():.4g}, std/mean {norms.std() / norms.mean():.3f}, "
          f"max/min {norms.max() / norms.min():.2f}")
    print("| pooled loss | mean over batches |")
    print("|---|---|")
    print(f"| reference (raw R_t) | {np.mean(l_ref):.5f} |")
    print(f"| cache (normalised R_t) | {np.mean(l_ours):.5f} |")
    print(f"| cosine between the two gradients (mean, min) | {np.mean(gcos):.4f}, {np.min(gcos):.4f} |")


if __name__ == "__main__":
    main()
