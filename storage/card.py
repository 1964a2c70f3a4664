"""The cache's dataset card: ``README.md`` beside the manifest, for a person who finds it.

Written from the manifest whenever a writer closes the cache (teacher pass, merge,
subset), so it always describes the committed shards. Its YAML header is a Hugging Face
dataset card header: ``configs`` lists the shard files as the "train" split, so the Hub's
viewer and ``datasets.load_dataset(CACHE)`` read exactly the committed shards (their
stored, encoded columns). The body says what made the cache and how to read it. The card
is informational: readers trust the manifest only.
"""

from __future__ import annotations

import json

from mmkd.storage.fs import join, open_fs, write_atomic
from mmkd.storage.manifest import Manifest

CARD_NAME = "README.md"


def _short(digest: str | None) -> str:
    return f"`{digest[:16]}…`" if digest else "-"


def card_text(m: Manifest) -> str:
    """The dataset card of the cache m describes (YAML header + Markdown)."""
    t, p, x = m.teacher, m.processor, m.extraction
    size = sum(s.bytes for s in m.shards)
    targets = sum(s.targets for s in m.shards)
    files = "\n".join(f"    - {json.dumps(s.file)}" for s in m.shards) or "    []"
    width = f"k = {x['k']}" if m.mode == "topk" else f"{x['draws']} draws per position (seed {x.get('seed')})"
    teacher = t.get("name") or t.get("path")
    revision = t.get("revision")
    inputs = m.inputs
    rows = [
        ("teacher", f"`{teacher}`" + (f" at revision `{revision}`" if revision else "")),
        ("teacher weights sha256", f"`{t.get('weights_sha256')}`"),
        ("teacher dtype / head rows", f"{t.get('dtype')} / {t.get('head_size', '-')}"),
        ("tokenizer / chat template sha256", f"{_short(p.get('tokenizer_sha256'))} / "
                                             f"{_short(p.get('chat_template_sha256'))}"),
        ("shared vocabulary", f"{m.vocab_size} ids"),
        ("record kinds", ", ".join(m.record_kinds)),
        ("targets", f"{m.mode}, {width}, temperature {x.get('temperature')}"),
        ("positions", x.get("positions", "-")),
        ("codec", ", ".join(f"{k} {v}" for k, v in m.codec.items())),
        ("samples / target tokens", f"{m.num_rows} / {targets}"),
        ("size", f"{size / 2**20:.1f} MiB in {len(m.shards)} shards, "
                 f"{size / max(1, targets):.1f} bytes per target token"),
        ("input data", ", ".join(f"{k} `{v}`" for k, v in inputs.items()) or "-"),
        ("complete", "yes" if m.complete else "no: a pass was interrupted (re-run it to finish)"),
        ("made by", f"mmkd {m.mmkd_version or 'unknown'}" + (f": `{m.command}`" if m.command else "")),
        ("cache id / created", f"`{m.cache_id}` / {m.created}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
tags:
- mmkd
- knowledge-distillation
- teacher-logits
configs:
- config_name: default
  data_files:
  - split: train
    path:
{files}
---

# Teacher cache of `{teacher}`

Offline distillation targets written by the teacher pass of mmkd (offline distillation of
multimodal LLMs): the teacher's next-token distributions at the samples' answer tokens
(and, with those record kinds, at image tokens, relation matrices, preference reference
log-probs), one row per sample. `manifest.json` is the single source of truth (checksums of every shard); this card
is written from it.

| | |
|---|---|
{table}

## How to read it

- With mmkd: `mmkd train --cache <this folder or URL> ...` streams it; `mmkd cache inspect`
  summarises it, `mmkd cache verify` checks every shard's sha256.
- Plain columns (ids by probability, float32 log-probs), readable with no mmkd installed:
  `mmkd cache export <this folder> <out> [--format parquet|jsonl]`, then
  `datasets.load_dataset("parquet", data_dir="<out>")`, DuckDB or polars.
- The shards themselves load with `datasets.load_dataset("<this folder>")` (or
  `load_dataset("parquet", data_dir=...)`), but their target columns are encoded (byte-plane
  ids in a per-shard vocabulary order, uint8 log-prob codes): the format is specified in
  mmkd's docs/cache-format.md.
"""


def write_card(cache_dir: str, m: Manifest) -> None:
    fs, root = open_fs(cache_dir)
    write_atomic(join(root, CARD_NAME), card_text(m), fs)
