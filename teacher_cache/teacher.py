"""Loading a teacher checkpoint and describing it for the cache manifest."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mmkd.common.check import vocab_digest
from mmkd.common.heads import DTYPES
from mmkd.common.models import load_processor, model_class
from mmkd.common.preprocess import image_token_id


def resolve_device(device: str) -> torch.device:
    """'auto' -> the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_teacher(path: str, dtype: str = "float32", device: str = "auto", device_map: str | None = None,
                 trust_remote_code: bool = False):
    """(model in eval mode, processor) from a Hugging Face model folder or hub id, through
    transformers' Auto classes: image-text-to-text models (LLaVA-1.5, LLaVA-OneVision,
    Qwen2-VL / Qwen2.5-VL, ...) or text-only causal LMs (common.models).

    device_map: None puts the whole model on `device`; "auto" (or any accelerate device map)
    spreads a teacher larger than one GPU over the visible GPUs (inputs then go to the
    device of the input embeddings, see input_device). trust_remote_code stays off unless
    the user turns it on: a checkpoint's own Python code runs only then.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if device_map:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise ValueError(f"device_map={device_map!r} needs the accelerate package: pip install accelerate")
        kwargs["device_map"] = device_map
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = model_class(config).from_pretrained(path, **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ValueError(f"{path}: this checkpoint needs its own Python code; mmkd does not run it "
                             "unless you pass --trust-remote-code (read the code first)") from e
        raise
    if not device_map:
        model.to(resolve_device(device))
    model.eval()
    return model, load_processor(path, trust_remote_code)


def input_device(model) -> torch.device:
    """Where a batch goes: the device of the input embeddings (the first shard under a
    device_map)."""
    return model.get_input_embeddings().weight.device


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
    """Digests of everything that decides the token sequence a sample becomes (a text-only
    processor: no image processor digest, image_token_id None)."""
    tok = processor.tokenizer
    vocab = json.dumps(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]))
    specials = json.dumps({k: str(v) for k, v in sorted(tok.special_tokens_map.items())})
    template = getattr(processor, "chat_template", None) or tok.chat_template
    images = processor.image_processor
    return {
        "tokenizer_sha256": _sha256_text(vocab + specials),
        "vocab_sha256": vocab_digest(tok),
        "chat_template_sha256": _sha256_text(template),
        "image_processor_sha256": None if images is None else _sha256_text(images.to_json_string()),
        "image_token_id": image_token_id(processor),
        "num_visual_tokens": num_visual_tokens,
    }


@dataclass(frozen=True)
class TeacherSource:
    """The teacher, resolved once by the driver: its name (a Hub id, or the folder's name),
    a local folder with its files, and for a Hub id the commit that folder holds."""

    name: str
    folder: str
    revision: str | None = None

    def local_folder(self) -> str:
        """The teacher's folder on this machine: `folder`, or, where it does not exist (a
        Ray worker on another node), the same Hub commit fetched into this node's cache."""
        if self.revision is None or os.path.isdir(self.folder):
            return self.folder
        from huggingface_hub import snapshot_download

        return snapshot_download(self.name, revision=self.revision)


def resolve_teacher(ref: str) -> TeacherSource:
    """A local folder (absolute path), or a Hub id "org/name" ("org/name@revision" pins a
    branch, tag or commit) resolved to its snapshot in the Hugging Face cache (downloaded
    unless there or offline): huggingface_hub names the snapshot folder by its commit."""
    if os.path.isdir(ref):
        folder = os.path.abspath(ref)
        return TeacherSource(os.path.basename(folder.rstrip("/")), folder)
    from huggingface_hub import snapshot_download

    repo, _, revision = str(ref).partition("@")
    folder = snapshot_download(repo, revision=revision or None)
    return TeacherSource(repo, folder, os.path.basename(folder.rstrip("/")))


def teacher_description(source: TeacherSource, dtype: str, head_size: int) -> dict:
    """The manifest's teacher: name, where it was loaded from (the Hub id, or the folder's
    absolute path), the Hub commit, the digest of its weight files; head_size: rows of its
    output head (may exceed the shared vocabulary)."""
    return {"name": source.name, "path": source.name if source.revision else source.folder,
            "revision": source.revision, "weights_sha256": weights_digest(source.folder), "dtype": dtype,
            "head_size": head_size}
