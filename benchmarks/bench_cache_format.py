"""Cache format on REAL teacher distributions: bytes per token, fidelity, decode speed.

Input: the dump of benchmarks/real_teacher.py (SmolLM2-135M-Instruct on real English text;
run it first, ~2 minutes). Every number comes from writing real caches with
storage.CacheWriter and reading them back with storage.TeacherCache:

- bytes per target token, all-in (shards + manifest, including input ids, positions,
  digests and per-shard vocabulary orders), for top-k at several k and the sampled mode,
  against a naive layout (int32 ids + float16 log-probs, Parquet zstd-3) in the same run;
- fidelity: the largest log-prob error among entries with p >= 5%, and
  dKL = KL(teacher || decoded) - KL(teacher || exact top-k), relative to the latter, where
  a top-k distribution puts its leftover mass evenly on the other ids (exact without the
  full row: the dump keeps sum_rest p log p);
- decode throughput of the reader (one thread), in cached target tokens per second;
- relation matrices: cosine between stored and exact R, bytes per matrix;
- for comparison, per-row zstd with a trained dictionary over the same id streams.

    OMP_NUM_THREADS=1 python benchmarks/bench_cache_format.py [--dump benchmarks/.data/smollm2.npz]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from mmkd.storage import codec
from mmkd.storage.manifest import Manifest
from mmkd.storage.reader import TeacherCache
from mmkd.storage.schema import CacheRow, TokenTargets
from mmkd.storage.tables import raw_table
from mmkd.storage.writer import CacheWriter


def load_profile(d, profile: str, k: int, mode: str, draws: int = 32) -> list[CacheRow]:
    """One CacheRow per dumped sequence, its targets = the dumped positions."""
    seq, lens = d[f"{profile}/seq"], d[f"{profile}/seq_lens"]
    ids_all, lp_all = d[f"{profile}/ids"], d[f"{profile}/logprobs"]
    input_ids = np.split(d[f"{profile}/input_ids"], np.cumsum(lens)[:-1])
    rows = []
    for s in range(len(lens)):
        sel = np.nonzero(seq == s)[0]
        n = len(sel)
        pos = np.arange(lens[s] - n, lens[s])
        if mode == "topk":
            t = TokenTargets(pos, ids_all[sel, :k], lp_all[sel, :k], d[f"{profile}/leftover{k}"][sel])
        else:
            drawn = np.sort(d[f"{profile}/draws"][sel, :draws], 1)
            ids, counts = np.zeros((n, draws), np.int64), np.zeros((n, draws), np.int32)
            for j in range(n):
                u, c = np.unique(drawn[j], return_counts=True)
                ids[j, :len(u)], counts[j, :len(u)] = u, c
            t = TokenTargets(pos, ids, counts=counts)
        rows.append(CacheRow(f"{profile}-{s:04d}", "digest", input_ids[s], response=t))
    return rows


def write_cache(path: str, rows: list[CacheRow], vocab: int, mode: str, width: int, rows_per_shard: int) -> float:
    extraction = {"mode": mode, ("k" if mode == "topk" else "draws"): width, "temperature": 1.0,
                  "record_kinds": ["response"]}
    m = Manifest(teacher={"path": "SmolLM2-135M-Instruct"}, processor={}, vocab_size=vocab, extraction=extraction)
    t0 = time.perf_counter()
    w = CacheWriter(path, m, rows_per_shard=rows_per_shard)
    for i in range(0, len(rows), 16):
        w.add(raw_table(rows[i:i + 16]))
    w.close(complete=True)
    return time.perf_counter() - t0


def all_in_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if not f.startswith("."))


def naive_bytes(rows: list[CacheRow]) -> int:
    """int32 ids + float16 log-probs + float32 leftover in list columns, Parquet zstd-3."""
    def lists(arrs, typ):
        off = np.r_[0, np.cumsum([a.size for a in arrs])].astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(off), pa.array(np.concatenate([a.ravel() for a in arrs]), typ))
    t = pa.table({"sample_id": [r.sample_id for r in rows],
                  "input_ids": lists([r.input_ids.astype(np.int32) for r in rows], pa.int32()),
                  "positions": lists([r.response.positions.astype(np.int32) for r in rows], pa.int32()),
                  "ids": lists([r.response.ids.astype(np.int32) for r in rows], pa.int32()),
                  "logprobs": lists([r.response.logprobs.astype(np.float16) for r in rows], pa.float16()),
                  "leftover": lists([r.response.leftover.astype(np.float32) for r in rows], pa.float32())})
    buf = io.BytesIO()
    pq.write_table(t, buf, compression="zstd", compression_level=3)
    return buf.tell()


def fidelity(d, profile: str, k: int, decoded: dict[str, CacheRow], vocab: int) -> tuple[float, float, float]:
    """(max |dlogp| over entries with p >= 5%, exact top-k KL, relative dKL)."""
    seq = d[f"{profile}/seq"]
    lp = d[f"{profile}/logprobs"][:, :k].astype(np.float64)
    ids = d[f"{profile}/ids"][:, :k].astype(np.int64)
    left = d[f"{profile}/leftover{k}"].astype(np.float64)
    prest = d[f"{profile}/plogp_rest{k}"].astype(np.float64)
    dec_lp = np.zeros_like(lp)
    dec_left = np.zeros_like(left)
    for s in np.unique(seq):
        sel = np.nonzero(seq == s)[0]
        t = decoded[f"{profile}-{s:04d}"].response
        o, ro = np.argsort(t.ids, 1), np.argsort(ids[sel], 1)
        assert (np.take_along_axis(t.ids, o, 1) == np.take_along_axis(ids[sel], ro, 1)).all()
        inv = np.argsort(ro, 1)  # back to the dump's rank order
        dec_lp[sel] = np.take_along_axis(np.take_along_axis(t.logprobs, o, 1), inv, 1)
        dec_left[sel] = t.leftover

    def kl(vals, r):  # KL(teacher || top-k with r spread evenly over the other V-k ids)
        z = np.exp(vals).sum(1) + r
        return ((np.exp(lp) * (lp - vals)).sum(1) + np.log(z) + prest - left * (np.log(r / (vocab - k)))).mean()

    exact = kl(lp, left)
    return float(np.abs(dec_lp - lp)[lp >= np.log(0.05)].max()), float(exact), float((kl(dec_lp, dec_left) - exact) / exact)


def decode_rate(path: str, repeats: int = 3) -> float:
    """Cached target tokens per second through TeacherCache.iter_rows (best of repeats)."""
    cache = TeacherCache(path)
    tokens = sum(s.targets for s in cache.manifest.shards)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(len(r.response) for r in cache.iter_rows())
        best = max(best, n / (time.perf_counter() - t0))
        assert n == tokens
    return best


def dictionary_bytes(rows: list[CacheRow], vocab: int, k: int) -> float:
    """Per-row zstd with a trained dictionary over each row's id planes (+ value codes):
    bytes per token on the second half of the rows, dictionary trained on the first."""
    blobs = []
    for r in rows:
        t = r.response
        order = codec.vocab_order(t.ids, vocab)
        planes, perm = codec.encode_id_sets(t.ids.ravel(), np.full(len(t), k), order, vocab)
        blobs.append(planes.tobytes() + codec.encode_logprobs(t.logprobs.ravel()[perm]).tobytes())
    half = len(blobs) // 2
    dictionary = zstandard.train_dictionary(32 * 1024, blobs[:half])
    cctx = zstandard.ZstdCompressor(level=6, dict_data=dictionary)
    total = sum(len(cctx.compress(b)) for b in blobs[half:])
    return total / sum(len(r.response) for r in rows[half:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump", default="benchmarks/.data/smollm2.npz")
    ap.add_argument("--rows-per-shard", type=int, default=512)
    args = ap.parse_args()
    if not os.path.exists(args.dump):
        raise SystemExit(f"{args.dump} not found: run `python benchmarks/real_teacher.py` first")
    d = np.load(args.dump)
    vocab = int(d["vocab_size"])
    print(f"teacher SmolLM2-135M-Instruct (vocab {vocab}); zstd level {6}; one thread")
    print("| profile | mode | k / draws | targets | bytes/token (mmkd) | naive int32+fp16 | max dlogp (p>=5%) "
          "| exact top-k KL | dKL / KL | write tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for profile in ("text", "chat"):
        for mode, width in (("topk", 32), ("topk", 50), ("topk", 64), ("topk", 128), ("sampled", 32)):
            rows = load_profile(d, profile, width, mode, width)
            targets = sum(len(r.response) for r in rows)
            with tempfile.TemporaryDirectory() as tmp:
                wt = write_cache(tmp, rows, vocab, mode, width, args.rows_per_shard)
                size = all_in_bytes(tmp)
                rate = decode_rate(tmp)
                if mode == "topk":
                    err, exact, rel = fidelity(d, profile, width, TeacherCache(tmp).rows(), vocab)
                    naive = f"{naive_bytes(rows) / targets:.1f}"
                    fid = f"{err:.4f} | {exact:.3f} | {rel * 100:+.2f}%"
                else:
                    naive, fid = "-", "- (unbiased estimator) | - | -"
            print(f"| {profile} | {mode} | {width} | {targets} | {size / targets:.1f} | {naive} | {fid} | "
                  f"{targets / wt:,.0f} | {rate:,.0f} |")

    # Decode speed on a larger cache (the chat rows repeated 16x, 194k targets), k=64.
    rows = load_profile(d, "chat", 64, "topk")
    big = [CacheRow(f"{r.sample_id}-{i}", r.token_digest, r.input_ids, response=r.response)
           for i in range(16) for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        write_cache(tmp, big, vocab, "topk", 64, args.rows_per_shard)
        cache = TeacherCache(tmp)
        tokens = sum(s.targets for s in cache.manifest.shards)
        rate = decode_rate(tmp)
        t0 = time.perf_counter()
        n = sum(len(r.response) for r in cache.stream(rank=0, world_size=1, seed=0, shuffle_buffer=1024))
        srate = n / (time.perf_counter() - t0)
    print(f"\nDecode, k=64, {tokens:,} targets in {len(cache.manifest.shards)} shards: iter_rows {rate:,.0f} tok/s, "
          f"stream (seeded shuffle) {srate:,.0f} tok/s (one thread)")

    print(f"\nPer-row zstd-6 with a trained 32 KiB dictionary (chat, k=64, ids + value codes only): "
          f"{dictionary_bytes(rows, vocab, 64):.1f} bytes/token")

    if "relations" in d.files:
        print("\n| relation codec | n | bytes per matrix | cosine(stored, exact) min |")
        print("|---|---|---|---|")
        rel = d["relations"]
        n = rel.shape[1]
        for name, rank in (("triangle-f16", 0), ("lowrank-f16", 64), ("lowrank-f16", 16)):
            cos, size = [], 0
            for r in rel:
                blob = codec.encode_relation(r, name, rank)
                back = codec.decode_relation(blob, n, name).astype(np.float64)
                cos.append((back * r).sum() / np.linalg.norm(back) / np.linalg.norm(r))
                size = len(zstandard.ZstdCompressor(level=6).compress(blob))
            label = name if name == "triangle-f16" else f"{name} (rank {rank})"
            print(f"| {label} | {n} | {size:,} (zstd) | {min(cos):.6f} |")


if __name__ == "__main__":
    main()
