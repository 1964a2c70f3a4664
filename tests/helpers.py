"""Synthetic cache rows for storage tests: realistic (softmax of heavy-tailed logits);
Parquet copies of the demo data set for the input tests."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mmkd.storage.manifest import Manifest
from mmkd.storage.schema import CacheRow, Preference, TokenTargets
from mmkd.storage.tables import raw_table
from mmkd.storage.writer import CacheWriter


def manifest(vocab=300, mode="topk", width=8, kinds=("response",)):
    w = {"k": width} if mode == "topk" else {"draws": width}
    return Manifest(teacher={"path": "t", "weights_sha256": "0" * 64, "dtype": "float32"},
                    processor={"image_token_id": 4}, vocab_size=vocab,
                    extraction={"mode": mode, **w, "temperature": 1.0, "record_kinds": list(kinds)})


def token_targets(n, vocab, mode, width, rng, first_pos=1):
    logits = torch.from_numpy(rng.standard_t(4, size=(n, vocab)) * 1.5)
    logp = torch.log_softmax(logits, -1)
    pos = np.arange(first_pos, first_pos + n)
    if mode == "topk":
        v, i = logp.topk(width, -1)
        left = torch.exp(torch.logsumexp(logp.scatter(-1, i, float("-inf")), -1))
        return TokenTargets(pos, i.numpy(), v.float().numpy(), left.float().numpy())
    drawn = np.stack([rng.choice(vocab, width, p=logp[j].exp().numpy()) for j in range(n)]) if n else \
        np.zeros((0, width), np.int64)
    ids = np.zeros((n, width), np.int64)
    counts = np.zeros((n, width), np.int32)
    for j in range(n):
        u, c = np.unique(drawn[j], return_counts=True)
        ids[j, :len(u)], counts[j, :len(u)] = u, c
    return TokenTargets(pos, ids, counts=counts)


def rows(ids, vocab=300, mode="topk", width=8, kinds=("response",), seed=0, nv=4):
    rng = np.random.default_rng(seed)
    out = []
    for sid in ids:
        n = int(rng.integers(0, 6))
        r = CacheRow(sid, "d" + sid, rng.integers(0, vocab, 12))
        if "response" in kinds:
            r.response = token_targets(n, vocab, mode, width, rng, first_pos=5)
        if "visual" in kinds:
            r.visual = token_targets(nv, vocab, mode, width, rng, first_pos=1)
        if "relation" in kinds:
            z = rng.normal(size=(nv, 16)) + 3.0
            r.relation = (z @ z.T).astype(np.float32)
        if "preference" in kinds:
            c, j = -rng.random(3).astype(np.float32) * 4, -rng.random(2).astype(np.float32) * 4
            r.preference = Preference(float(c.sum()), float(j.sum()), c, j, "r" + sid)
        out.append(r)
    return out


def write(path, ids, rows_per_shard=4, **kw):
    """A complete cache of synthetic rows at `path`; returns the rows written."""
    kinds = kw.get("kinds", ("response",))
    rs = rows(ids, **kw)
    w = CacheWriter(str(path), manifest(kw.get("vocab", 300), kw.get("mode", "topk"), kw.get("width", 8), kinds),
                    rows_per_shard=rows_per_shard, row_group_rows=2)
    w.add(raw_table(rs[: len(rs) // 2]))
    w.add(raw_table(rs[len(rs) // 2:]))
    w.close(complete=True)
    return rs


def assert_topk_close(t: TokenTargets, ref_ids: np.ndarray, ref_logprobs: np.ndarray) -> None:
    """Decoded top-k targets equal a reference top-k as sets, values within the codec's
    bound (1/128 nat above log p = -3, half the local level step below)."""
    from mmkd.storage.codec import LEVELS

    o, ro = np.argsort(t.ids, 1), np.argsort(ref_ids, 1)
    assert (np.take_along_axis(t.ids, o, 1) == np.take_along_axis(ref_ids, ro, 1)).all()
    got, want = np.take_along_axis(t.logprobs, o, 1), np.take_along_axis(ref_logprobs, ro, 1)
    err = np.abs(got - want)
    assert np.all(err[want > -3] <= 1 / 128 + 1e-5)
    deep = want < -LEVELS[-1]  # below -40 nats (p < 4e-18): stored as the last level
    assert np.all(err[~deep] <= np.diff(LEVELS).max() / 2 + 1e-5)
    assert np.all(got[deep] == np.float32(-LEVELS[-1]))


def llava_parquet(json_path, out, image_root, image="bytes", n=None):
    """The LLaVA JSON records of json_path (the first n) as a Parquet file written with
    pyarrow alone: the image column as the file's bytes ("bytes") or its relative path
    ("path"). Returns the records written."""
    records = json.loads(Path(json_path).read_text())[:n]
    rows = [dict(r, image=(Path(image_root) / r["image"]).read_bytes()) if image == "bytes" else dict(r)
            for r in records]
    pq.write_table(pa.Table.from_pylist(rows), out)
    return records
