"""Loading a teacher checkpoint and describing it for the cache manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """'auto' -> the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_teacher(path: str, dtype: str = "float32", device: str = "auto"):
    """(model in eval mode on device, processor) from a Hugging Face model folder."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype])
    model.to(resolve_device(device)).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def _sha256_text(s: str | None) -> str | None:
    return None if s is None else hashlib.sha256(s.encode()).hexdigest()


def weights_digest(path: str | Path) -> str:
    """sha256 over the checkpoint's weight files (names and bytes, in name order)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors or .bin weight files")
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def processor_description(processor, num_visual_tokens: int) -> dict:
    """Digests of everything that decides the token sequence a sample becomes."""
    tok = processor.tokenizer
    vocab = json.dumps(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]))
    specials = json.dumps({k: str(v) for k, v in sorted(tok.special_tokens_map.items())})
    template = getattr(processor, "chat_template", None) or tok.chat_template
    return {
        "tokenizer_sha256": _sha256_text(vocab + specials),
        "chat_template_sha256": _sha256_text(template),
        "image_processor_sha256": _sha256_text(processor.image_processor.to_json_string()),
        "image_token_id": tok.convert_tokens_to_ids(processor.image_token),
        "num_visual_tokens": num_visual_tokens,
    }


def teacher_description(path: str, dtype: str) -> dict:
    return {"path": str(path), "weights_sha256": weights_digest(path), "dtype": dtype}
