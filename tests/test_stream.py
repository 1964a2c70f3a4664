"""The student streams the cache: memory that does not grow with the cache, ranks that read
their own share, and every kind of target read from the stream."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkd.common.config import InputsConfig
from mmkd.common.inputs import SampleList, SampleTable, load_image
from mmkd.common.preprocess import collate, encode_sample, image_token_count, image_token_id
from mmkd.common.samples import read_llava
from mmkd.pipelines.synthetic_cache import write_synthetic
from mmkd.storage.manifest import Manifest
from mmkd.storage.plan import EpochPlan
from mmkd.storage.reader import TeacherCache
from mmkd.storage.writer import CacheWriter
from mmkd.student.config import TrainConfig
from mmkd.student.data import StudentData
from mmkd.student.targets import Sampled
from mmkd.student.train import train

from tests.conftest import TINY

REPO = Path(__file__).resolve().parent.parent
# a fresh single-rank process: not the rendezvous settings this test process may hold
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}, "PYTHONPATH": str(REPO)}
# Peak RSS of `mmkd train` in one process (no loader workers), reported by the child itself:
# VmHWM, the high-water mark of this process image (ru_maxrss would include the RSS of the
# forking parent, i.e. of this test process).
PEAK_RSS = """
import sys
from mmkd.pipelines.cli import main
rc = main(sys.argv[1:])
print("PEAK_KB", next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
sys.exit(rc)
"""


def _peak_rss_mb(root: Path, out: Path) -> float:
    args = ["train", "--data", str(root / "data.jsonl"), "--image-column", "", "--processor", str(root / "processor"),
            "--cache", str(root / "cache"), "--output-dir", str(out), "--max-steps", "3", "--batch-size", "2",
            "--num-workers", "0", "--save-every", "0", "--report-to", "none", "--max-length", "512",
            "--arch.vision-hidden", "32", "--arch.vision-layers", "1", "--arch.vision-heads", "2",
            "--arch.text-hidden", "32", "--arch.text-layers", "1", "--arch.text-heads", "2",
            "--arch.text-intermediate", "64", "--arch.max-positions", "512", "--shuffle-window", "64"]
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return int(proc.stdout.split("PEAK_KB")[-1].split()[0]) / 1024


@pytest.mark.slow
def test_training_memory_does_not_grow_with_the_cache(tmp_path):
    """The same 3 training steps from a cache of 200 samples (40k targets at k = 64) and from
    one 8x as large: peak RSS within 80 MB. Both caches hold more rows than the shuffle
    window (64 rows, a few row groups), whose rows are what the reader keeps. Measured: +3
    and +24 MB in two runs (the step's own peak varies by that much); the trainer that
    decoded the whole cache: +186 and +232 MB (~0.7 KB per target token)."""
    small, large = tmp_path / "x1", tmp_path / "x8"
    write_synthetic(small, distinct=100, copies=2, answer_words=200)
    info = write_synthetic(large, distinct=100, copies=16, answer_words=200)
    assert info["targets"] > 300_000
    one, eight = _peak_rss_mb(small, tmp_path / "run1"), _peak_rss_mb(large, tmp_path / "run8")
    assert eight - one < 80, (one, eight)


def test_two_ranks_read_disjoint_rows_from_their_own_shards(tmp_path):
    """Rank r's micro-batches come from its streams only: the two ranks' rows are disjoint,
    together they are the epoch less the rows the plan drops (N mod streams, and per stream
    its length mod the rows it gives each micro-batch), and each rank opens only the shards
    of its streams (the shard at the boundary of the two may be opened by both)."""
    info = write_synthetic(tmp_path, distinct=50, copies=2, answer_words=5, k=8, rows_per_shard=10)
    samples = SampleTable(InputsConfig(str(tmp_path / "data.jsonl"), image_column=""))
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tmp_path / "processor")
    shards = len(TeacherCache(str(tmp_path / "cache")).manifest.shards)
    assert shards == 10 and info["samples"] == 100
    read, opened = [], []
    for rank in range(2):
        cache = TeacherCache(str(tmp_path / "cache"))
        seen = set()
        real = cache._footer
        cache._footer = lambda s, real=real, seen=seen: seen.add(s) or real(s)
        data = StudentData(samples, processor, "", 256, cache)
        plan = EpochPlan(data.shard_rows, streams=2, seed=3, window=16, block_rows=4)
        ids = []
        for items in plan.micro_batches(rank, 2, batch_size=7, epoch=1):
            ids += [s.id for s in data.batch(items).samples]
        read.append(ids)
        opened.append(seen)
    assert not set(read[0]) & set(read[1])
    per_stream = 100 // 2 // 7 * 7  # 50 rows a stream, 7 to each micro-batch: 49 read, 1 dropped
    assert len(read[0]) == len(read[1]) == per_stream and len(set(read[0] + read[1])) == 2 * per_stream
    assert len(opened[0] & opened[1]) <= 1 and len(opened[0]) + len(opened[1]) <= shards + 1


@pytest.fixture(scope="module")
def sampled_cache(teacher_dir, demo_dir, tmp_path_factory):
    """A sampled-mode cache (12 draws per supervised position) of the train split."""
    from mmkd.teacher_cache.extract import ExtractionSpec, extract_rows, to_device
    from mmkd.teacher_cache.teacher import load_teacher

    out = tmp_path_factory.mktemp("sampled")
    model, processor = load_teacher(str(teacher_dir), "float32", "cpu")
    samples = read_llava(demo_dir / "train.json")
    m = Manifest(teacher={"path": str(teacher_dir), "weights_sha256": "x", "dtype": "float32"},
                 processor={"image_token_id": image_token_id(processor),
                            "num_visual_tokens": image_token_count(processor)},
                 vocab_size=len(processor.tokenizer),
                 extraction={"mode": "sampled", "draws": 12, "temperature": 1.0, "record_kinds": ["response"]})
    w = CacheWriter(str(out), m, rows_per_shard=16)
    gen = torch.Generator().manual_seed(0)
    for i in range(0, len(samples), 8):
        chunk = samples[i:i + 8]
        enc = [encode_sample(processor, s, load_image(demo_dir, s), 256) for s in chunk]
        batch = to_device(collate(enc, processor.tokenizer.pad_token_id), "cpu", torch.float32)
        w.add(extract_rows(model, batch, [s.id for s in chunk], image_token_id(processor),
                           ExtractionSpec(mode="sampled", draws=12), gen))
    w.close(complete=True)
    return out


def test_sampled_targets_train_from_the_stream(sampled_cache, demo_dir, processor, processor_dir, tmp_path):
    """A sampled cache's rows arrive as Sampled targets (counts summing to the draws) and KD
    alone, from them, moves the student towards the teacher."""
    data = StudentData(SampleList(read_llava(demo_dir / "train.json")), processor, str(demo_dir), 256,
                       TeacherCache(str(sampled_cache)))
    b = data.batch([3, 1])
    assert isinstance(b.response, Sampled) and len(b.response.ids) == int((b.labels != -100).sum())
    assert (b.response.counts.sum(-1) == 12).all()
    out = tmp_path / "student"
    train(TrainConfig(inputs=InputsConfig(str(demo_dir / "train.json"), str(demo_dir)), processor=str(processor_dir),
                      output_dir=str(out), cache=str(sampled_cache), arch=TINY, epochs=6, batch_size=8, lr=3e-3,
                      log_every=1000, ce_weight=0.0, num_workers=0), log=lambda *_: None)
    kd = [json.loads(line)["kd"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert np.mean(kd[-5:]) < np.mean(kd[:5]) - 0.05
