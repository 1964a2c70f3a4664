"""A synthetic data set and a cache of synthetic teacher targets for it, of any size.

For measuring the student's data path at scale (memory per rank, bytes read, decode rate:
benchmarks/bench_stream.py, tests/test_stream.py) without running a teacher. The samples
are text-only conversations of `answer_words` words drawn from a vocabulary of
`vocab_words` made-up words, with the demo's processor extended by those words (a LLaVA
processor: the student is an ordinary tiny LLaVA, run without images). Their cache rows
are written through storage.CacheWriter like a teacher pass's: every row holds the
sample's real token sequence (the student's alignment check passes) and, at each
supervised position, top-k ids drawn without replacement with Zipf-like weights and
log-probs of a heavy-tailed distribution, leftover included (each copy with other ids and
jittered values, so that copies do not compress into each other).

`distinct` samples are encoded (the costly part); a cache of `copies` times as many rows
repeats them under new ids, which is all that matters to the data path's costs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmkd.pipelines.demo_processor import build_demo_processor
from mmkd.storage.manifest import Manifest
from mmkd.storage.schema import CacheRow, TokenTargets, token_digest
from mmkd.storage.tables import raw_table
from mmkd.storage.writer import CacheWriter


def words(n: int) -> list[str]:
    return [f"w{i:05d}" for i in range(n)]


def write_synthetic(root: str | Path, distinct: int = 100, copies: int = 1, answer_words: int = 200,
                    vocab_words: int = 4096, k: int = 64, rows_per_shard: int = 512, seed: int = 0) -> dict:
    """Write root/processor (the demo processor + the words), root/data.jsonl (distinct x
    copies samples) and root/cache (their top-k rows). Returns {"samples", "targets"}."""
    root = Path(root)
    processor = build_demo_processor(root / "processor", tuple(words(vocab_words)))
    vocab = len(processor.tokenizer)
    if k > vocab:
        raise ValueError(f"k={k} is larger than the vocabulary ({vocab})")
    rng = np.random.default_rng(seed)
    vocabulary = words(vocab_words)
    records = [{"conversations": [{"from": "human", "value": "describe the image."},
                               {"from": "gpt", "value": " ".join(rng.choice(vocabulary, answer_words))}]}
            for _ in range(distinct)]
    from mmkd.common.preprocess import encode_sample, image_token_count, image_token_id
    from mmkd.common.samples import Sample

    img = image_token_id(processor)
    encoded = [encode_sample(processor, Sample.from_llava({"id": f"b{i}", **r}), None, 1 << 20)
               for i, r in enumerate(records)]
    (root / "data.jsonl").write_text("".join(json.dumps({"id": f"s{c:04d}-{i:05d}", **r}) + "\n"
                                             for c in range(copies) for i, r in enumerate(records)))
    m = Manifest(teacher={"path": "synthetic", "weights_sha256": "0" * 64, "dtype": "float32"},
                 processor={"image_token_id": img, "num_visual_tokens": image_token_count(processor)},
                 vocab_size=vocab, extraction={"mode": "topk", "k": k, "temperature": 1.0,
                                               "record_kinds": ["response"]})
    writer = CacheWriter(str(root / "cache"), m, rows_per_shard=rows_per_shard)
    log_zipf = -1.1 * np.log(np.arange(1, vocab + 1))
    base = []  # per distinct sample: Zipf-weighted top-k ids without replacement (Gumbel top-k), logits
    for e in encoded:
        n = int((e.labels != -100).sum())
        keys = log_zipf + rng.gumbel(size=(n, vocab))
        base.append((np.argpartition(-keys, k, axis=1)[:, :k], rng.standard_t(3, size=(n, k)) * 2.0))
    targets = 0
    for c in range(copies):
        perm = rng.permutation(vocab)  # each copy names other ids, so copies do not compress into each other
        rows = []
        for i, (e, (ids, logits)) in enumerate(zip(encoded, base)):
            pos = np.flatnonzero(e.labels != -100)
            z = np.sort(logits + rng.normal(scale=0.3, size=logits.shape), axis=1)[:, ::-1]
            lse = np.logaddexp.reduce(np.concatenate([z, np.full((len(pos), 1), np.log(vocab - k))], 1), axis=1)
            logprobs = (z - lse[:, None]).astype(np.float32)
            leftover = (1 - np.exp(logprobs.astype(np.float64)).sum(1)).clip(1e-9).astype(np.float32)
            rows.append(CacheRow(f"s{c:04d}-{i:05d}", token_digest(e.input_ids, img), e.input_ids,
                                 response=TokenTargets(pos, perm[ids], logprobs, leftover)))
            targets += len(pos)
        writer.add(raw_table(rows))
    writer.close(complete=True)
    return {"samples": distinct * copies, "targets": targets}


def without_checksums(src: str | Path, dst: str | Path) -> None:
    """Copy the cache at src to dst as it would have been written before shards carried
    checksums (2026-12): pages without CRCs, no footer digests in the manifest. Same rows."""
    import pyarrow.parquet as pq

    from mmkd.storage.fs import write_atomic
    from mmkd.storage.writer import encode_parquet, sha256_bytes

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    m = Manifest.load(str(src))
    for s in m.shards:
        f = pq.ParquetFile(src / s.file)
        data = encode_parquet(f.read(), m.codec["compression"], m.codec["compression_level"],
                              f.metadata.row_group(0).num_rows, page_checksums=False)
        write_atomic(str(dst / s.file), data)
        s.bytes, s.sha256, s.footer_sha256, s.page_checksums = len(data), sha256_bytes(data), None, False
    m.save(str(dst))
