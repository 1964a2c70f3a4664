"""The cache's row schema (version 1) and the sequence digest that checks alignment.

One row per sample. Positions are indices into ``input_ids`` (the teacher's sequence with
image placeholders expanded). For the i-th supervised token, at position
``supervised_positions[i] = t``, the teacher's target is its next-token distribution from
the logits at ``t - 1`` (shifted, like the CE label); its top-k entries are
``topk_ids[i*k:(i+1)*k]`` / ``topk_logprobs[i*k:(i+1)*k]`` in descending order, and
``leftover[i]`` is the probability mass outside them. Log-probs are natural-log
probabilities (nats) of the teacher's softmax at the manifest's temperature.

Flat lists keep decoding to a single numpy view per column; ``k`` lives in the manifest.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "1.0"  # major.minor: a reader refuses a newer major version

ROW_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("token_digest", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("supervised_positions", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_logprobs", pa.list_(pa.float16()), nullable=False),
        pa.field("leftover", pa.list_(pa.float32()), nullable=False),
    ]
)


class CacheError(RuntimeError):
    """A cache that cannot be read or used as asked; the message names the file and fix."""


def token_digest(input_ids: np.ndarray, image_token_id: int | None) -> str:
    """sha256 of the sequence with each run of image tokens collapsed to one.

    Collapsing makes the digest independent of the visual token count, so a student with
    another vision tower can still check that its text tokens are the teacher's (targets
    are aligned by order within their segment, DESIGN invariant 6).
    """
    ids = collapse_image_runs(input_ids, image_token_id)
    return hashlib.sha256(ids.astype("<i4").tobytes()).hexdigest()


def collapse_image_runs(input_ids: np.ndarray, image_token_id: int | None) -> np.ndarray:
    """The sequence with each run of consecutive image tokens replaced by one."""
    ids = np.asarray(input_ids, dtype=np.int64)
    if image_token_id is None or not len(ids):
        return ids
    is_img = ids == image_token_id
    return ids[~(is_img & np.concatenate([[False], is_img[:-1]]))]


def make_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts of numpy arrays / str, keys = ROW_SCHEMA names) -> an Arrow table with
    exactly ROW_SCHEMA's types."""
    cols = {}
    for f in ROW_SCHEMA:
        vals = [r[f.name] for r in rows]
        if pa.types.is_list(f.type):
            dt = f.type.value_type.to_pandas_dtype()
            flat = np.concatenate([np.asarray(v, dtype=dt).ravel() for v in vals]) if vals else np.zeros(0, dt)
            offsets = np.zeros(len(vals) + 1, dtype=np.int32)
            np.cumsum([np.asarray(v).size for v in vals], out=offsets[1:])
            cols[f.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=f.type.value_type))
        else:
            cols[f.name] = pa.array(vals, type=f.type)
    return pa.table(cols, schema=ROW_SCHEMA)
