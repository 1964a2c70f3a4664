"""The cache manifest: ``manifest.json`` beside the shards, the single source of truth.

A shard exists for readers only once it is listed here. The manifest is rewritten
atomically (temporary file, fsync, rename), so it is always either the old or the new one.
JSON only: loading a cache never executes code.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from storage.schema import SCHEMA_VERSION, CacheError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "mmkd-teacher-cache"


@dataclass
class ShardInfo:
    file: str  # name relative to the cache folder
    rows: int
    bytes: int
    sha256: str
    sample_ids: list[str]


@dataclass
class Manifest:
    """What was run to make the cache, and which shards are committed.

    teacher: {"path", "weights_sha256", "dtype"}; processor: {"tokenizer_sha256",
    "chat_template_sha256", "image_processor_sha256", "image_token_id",
    "num_visual_tokens"}; extraction: {"k", "temperature", "record_kinds", "positions"}.
    """

    teacher: dict
    processor: dict
    vocab_size: int
    extraction: dict
    inputs: dict = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False
    schema_version: str = SCHEMA_VERSION
    format: str = FORMAT_NAME
    cache_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def k(self) -> int:
        return int(self.extraction["k"])

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def settings(self) -> dict:
        """Everything that defines the cache's contents (not its progress): two passes
        with equal settings make interchangeable rows."""
        return {
            "teacher": self.teacher,
            "processor": self.processor,
            "vocab_size": self.vocab_size,
            "extraction": self.extraction,
            "schema_version": self.schema_version,
        }

    def save(self, cache_dir: str | Path) -> None:
        path = Path(cache_dir) / MANIFEST_NAME
        tmp = path.with_name(f".{MANIFEST_NAME}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, cache_dir: str | Path) -> "Manifest":
        path = Path(cache_dir) / MANIFEST_NAME
        if not path.exists():
            raise CacheError(f"{path}: no manifest; is {cache_dir} a teacher cache (mmkd teacher-pass output)?")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{path}: not valid JSON ({e}); the manifest was damaged or edited") from e
        if d.get("format") != FORMAT_NAME:
            raise CacheError(f"{path}: format is {d.get('format')!r}, expected {FORMAT_NAME!r}")
        major = str(d.get("schema_version", "")).split(".")[0]
        if major != SCHEMA_VERSION.split(".")[0]:
            raise CacheError(
                f"{path}: schema version {d.get('schema_version')} but this mmkd reads "
                f"{SCHEMA_VERSION.split('.')[0]}.x; upgrade mmkd to read this cache"
            )
        try:
            d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
            return cls(**d)
        except TypeError as e:
            raise CacheError(f"{path}: unexpected manifest fields ({e})") from e


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
