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

from mmkd.storage.fs import join, open_fs, write_atomic
from mmkd.storage.schema import MODES, RECORD_KINDS, SCHEMA_VERSION, CacheError
from mmkd.storage.tables import CodecSettings, TargetSettings

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "mmkd-teacher-cache"


def mmkd_version() -> str:
    """The installed mmkd's version (what the manifest records as mmkd_version)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmkd")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def unreachable(where: str, e: BaseException) -> CacheError:
    """The error for a cache location that cannot be read at all (network, credentials, URL)."""
    return CacheError(f"{where}: cannot read it ({type(e).__name__}: {e}); check the path or URL, the network and "
                      "the credentials (HF_TOKEN for hf://, the cloud SDK's for s3:// and gs://)")


@dataclass
class ShardInfo:
    file: str  # name relative to the cache folder
    rows: int
    bytes: int
    sha256: str
    sample_ids: list[str]
    targets: int = 0  # response + visual target positions in the shard
    # Checked on every read (storage.reader): the sha256 of the shard's Parquet footer (schema,
    # offsets, the vocabulary order), and whether its data pages carry CRC checksums. Shards
    # written before 2026-12 have neither; only `mmkd cache verify` (whole-file sha256) checks them.
    footer_sha256: str | None = None
    page_checksums: bool = False


@dataclass
class Manifest:
    """What was run to make the cache, and which shards are committed.

    teacher: {"name" (a Hub id, or the folder's name), "path" (where it was loaded from:
    the Hub id, or the folder's absolute path), "revision" (the Hub commit, None for a local
    folder), "weights_sha256", "dtype", "head_size"}; processor: {"tokenizer_sha256",
    "chat_template_sha256", "image_processor_sha256", "image_token_id",
    "num_visual_tokens"}; extraction: {"mode", "k", "draws", "temperature",
    "record_kinds", "positions", "max_length"}; codec: CodecSettings as a dict; inputs: the
    data's identity ({"data": its name, "path", "sha256" of a data file, "num_samples",
    "split"}; merge and subset: the caches they came from). mmkd_version and command: what
    wrote the cache (None in caches made before 2026-12).
    """

    teacher: dict
    processor: dict
    vocab_size: int
    extraction: dict
    codec: dict = field(default_factory=lambda: asdict(CodecSettings()))
    inputs: dict = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False
    schema_version: str = SCHEMA_VERSION
    format: str = FORMAT_NAME
    cache_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    mmkd_version: str | None = None
    command: str | None = None

    @property
    def k(self) -> int:
        return int(self.extraction["k"])

    @property
    def mode(self) -> str:
        return self.extraction.get("mode", "topk")

    @property
    def record_kinds(self) -> list[str]:
        return list(self.extraction["record_kinds"])

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def target_settings(self) -> TargetSettings:
        """What the codec needs to decode this cache's shards."""
        width = self.k if self.mode == "topk" else int(self.extraction["draws"])
        return TargetSettings(self.vocab_size, self.mode, width, CodecSettings(**self.codec))

    def settings(self) -> dict:
        """Everything that defines the cache's contents (not its progress): two passes
        with equal settings make interchangeable rows."""
        return {
            # where the teacher was loaded from (its name, path, Hub revision) does not change
            # its outputs; its weights do
            "teacher": {k: v for k, v in self.teacher.items() if k not in ("path", "name", "revision")},
            "processor": self.processor,
            "vocab_size": self.vocab_size,
            "extraction": self.extraction,
            "codec": self.codec,
            "schema_version": self.schema_version,
        }

    def settings_differ(self, other: "Manifest") -> list[str]:
        """The names of the settings() in which the two caches differ (empty: their rows are
        interchangeable, so one can resume or be merged with the other)."""
        mine, theirs = self.settings(), other.settings()
        return [k for k in mine if mine[k] != theirs.get(k)]

    def save(self, cache_dir: str) -> None:
        fs, root = open_fs(cache_dir)
        write_atomic(join(root, MANIFEST_NAME), json.dumps(asdict(self), indent=1), fs)

    @classmethod
    def load(cls, cache_dir: str) -> "Manifest":
        try:
            fs, root = open_fs(cache_dir)
            path = join(root, MANIFEST_NAME)
            raw = fs.cat_file(path) if fs.exists(path) else None
        except Exception as e:  # noqa: BLE001 - any fsspec backend's network, auth or protocol error
            raise unreachable(cache_dir, e) from e
        if raw is None:
            hint = ""
            if str(cache_dir).startswith("hf://") and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true",
                                                                                                     "yes", "on"):
                hint = " (HF_HUB_OFFLINE is set: hf:// URLs need the network; unset it)"
            raise CacheError(f"{path}: no manifest; is {cache_dir} a teacher cache (mmkd teacher-pass output)?{hint}")
        try:
            d = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheError(f"{path}: not valid JSON ({e}); the manifest was damaged or edited") from e
        if not isinstance(d, dict):
            raise CacheError(f"{path}: not a manifest object; the manifest was damaged or edited")
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
            m = cls(**d)
            m.check()
            return m
        except (TypeError, KeyError, ValueError) as e:
            raise CacheError(f"{path}: unexpected or missing manifest fields ({e}); the manifest was "
                             "damaged or edited by hand") from e

    def check(self) -> None:
        """Raise ValueError when the fields contradict each other (a hand-edited manifest)."""
        if self.mode not in MODES:
            raise ValueError(f"extraction.mode {self.mode!r} is not one of {MODES}")
        bad = [k for k in self.record_kinds if k not in RECORD_KINDS]
        if bad:
            raise ValueError(f"unknown record kinds {bad}")
        self.target_settings()
        names = [s.file for s in self.shards]
        if len(set(names)) != len(names):
            raise ValueError("a shard is listed twice")
        for s in self.shards:
            if len(s.sample_ids) != s.rows or "/" in s.file:
                raise ValueError(f"shard {s.file}: {len(s.sample_ids)} sample ids for {s.rows} rows")
