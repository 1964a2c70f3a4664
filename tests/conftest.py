"""Shared fixtures: a tiny demo data set, the demo processor and a tiny random LLaVA
teacher saved as an ordinary Hugging Face folder. Nothing is downloaded."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "2")
if "HF_DATASETS_CACHE" not in os.environ:  # Parquet inputs are converted into this cache; keep it out of $HOME
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="mmkd-tests-hf-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(2)

from mmkd.pipelines.demo_data import write_demo_dataset
from mmkd.pipelines.demo_processor import build_demo_processor
from mmkd.student.config import LlavaArch
from mmkd.student.model import build_llava

TINY = LlavaArch(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1,
                 text_heads=2, text_intermediate=64)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    write_demo_dataset(d, num_train=40, num_val=8, num_test=16, num_preference=8, seed=3)
    return d


@pytest.fixture(scope="session")
def processor_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("processor")
    build_demo_processor(d)
    return d


@pytest.fixture(scope="session")
def processor(processor_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(processor_dir)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, processor):
    """A tiny random LLaVA saved with its processor, loadable like a downloaded checkpoint."""
    d = tmp_path_factory.mktemp("teacher")
    model = build_llava(TINY, processor, seed=1)
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def small_cache(teacher_dir, demo_dir, tmp_path_factory):
    """A cache of the train split (response, visual and relation records, top-4) written
    without Ray (extraction + writer directly)."""
    from mmkd.common.inputs import load_image
    from mmkd.common.preprocess import collate, encode_sample, image_token_count, image_token_id
    from mmkd.common.samples import read_llava
    from mmkd.storage.manifest import Manifest
    from mmkd.storage.writer import CacheWriter
    from mmkd.teacher_cache.extract import ExtractionSpec, extract_rows, to_device
    from mmkd.teacher_cache.teacher import load_teacher

    out = tmp_path_factory.mktemp("cache")
    model, processor = load_teacher(str(teacher_dir), "float32", "cpu")
    samples = read_llava(demo_dir / "train.json")
    records = ("response", "visual", "relation")
    img = image_token_id(processor)
    m = Manifest(teacher={"path": str(teacher_dir), "weights_sha256": "x", "dtype": "float32"},
                 processor={"image_token_id": img, "num_visual_tokens": image_token_count(processor)},
                 vocab_size=len(processor.tokenizer),
                 extraction={"mode": "topk", "k": 4, "temperature": 1.0, "record_kinds": list(records)})
    w = CacheWriter(str(out), m, rows_per_shard=16)
    for i in range(0, len(samples), 8):
        chunk = samples[i:i + 8]
        enc = [encode_sample(processor, s, load_image(demo_dir, s), 256) for s in chunk]
        batch = to_device(collate(enc, processor.tokenizer.pad_token_id), "cpu", torch.float32)
        w.add(extract_rows(model, batch, [s.id for s in chunk], img, ExtractionSpec(k=4, records=records)))
    w.close(complete=True)
    return out


def strip_images(records: list[dict]) -> list[dict]:
    """The records without their images: no "image" key, no <image> placeholder."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k != "image"}
        if "conversations" in r:
            r["conversations"] = [{**t, "value": t["value"].replace("<image>\n", "").replace("<image>", "")}
                                  for t in r["conversations"]]
        out.append(r)
    return out


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory, demo_dir):
    """A text-only world: root/teacher, a tiny random Llama causal LM saved with a plain-text
    tokenizer (the demo's ids, no image processor); root/train.json, test.json and
    preference.jsonl, the demo's samples without their images."""
    import json

    from mmkd.common.models import TextProcessor
    from mmkd.pipelines.demo_processor import build_text_tokenizer
    from mmkd.student.model import build_student

    root = tmp_path_factory.mktemp("text")
    tok = build_text_tokenizer(root / "teacher")
    model = build_student(TINY, TextProcessor(tok), seed=1)
    with torch.no_grad():  # larger weights than the default init: peaked distributions, like a trained model's
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25)
    model.save_pretrained(root / "teacher")
    for name in ("train.json", "test.json"):
        (root / name).write_text(json.dumps(strip_images(json.loads((demo_dir / name).read_text()))))
    pairs = [json.loads(line) for line in (demo_dir / "preference.jsonl").read_text().splitlines()]
    (root / "preference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in strip_images(pairs)))
    return root
