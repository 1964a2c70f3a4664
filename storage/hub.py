"""`mmkd cache push`: publish a cache as a Hugging Face Hub dataset repository.

A cache is published only when it is complete and every shard passes `verify()` (sha256,
schema, decoding), so nobody pulls a damaged or half-written cache. The upload is one Hub
commit (huggingface_hub's `upload_folder`) of exactly the committed files: manifest.json,
the dataset card (README.md), the listed shards and errors.jsonl when present; never the
lock file or a crash's leftovers. A commit appears whole or not at all, so a reader never
sees a manifest listing shards that are not there.

Reading back needs nothing of this module: `TeacherCache("hf://datasets/ORG/NAME")` (and
`mmkd train --cache hf://...`) reads through huggingface_hub's fsspec file system, like any
other fsspec URL (s3://, gs://); `datasets.load_dataset("ORG/NAME")` reads the shards' stored
columns through the card's `configs`.
"""

from __future__ import annotations

from mmkd.storage.card import CARD_NAME
from mmkd.storage.fs import is_local, join, open_fs
from mmkd.storage.manifest import MANIFEST_NAME
from mmkd.storage.reader import TeacherCache
from mmkd.storage.schema import CacheError
from mmkd.storage.writer import ERRORS_NAME


def publishable_files(cache: TeacherCache) -> list[str]:
    """The files a published copy holds: the manifest, the card, the shards, the errors file."""
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in cache.fs.ls(cache.root, detail=False)}
    extra = [n for n in (CARD_NAME, ERRORS_NAME) if n in names]
    return [MANIFEST_NAME, *extra, *(s.file for s in cache.manifest.shards)]


def push_cache(path: str, repo_id: str, private: bool = False, revision: str | None = None,
               api=None, log=print) -> str:
    """Upload the complete, verified local cache at `path` to the Hub dataset `repo_id`
    (created when missing; `revision`: a branch, default main) in one commit; returns the
    cache's hf:// URL. api: a huggingface_hub.HfApi (default: one with the saved token)."""
    fs, root = open_fs(path)
    if not is_local(fs):
        raise CacheError(f"{path}: push uploads a local cache folder; copy it here first")
    cache = TeacherCache(path)
    if not cache.manifest.complete:
        raise CacheError(f"{path}: the cache is not complete (an interrupted pass); re-run the teacher pass to "
                         "finish it before publishing")
    log(f"[push] verifying {len(cache.manifest.shards)} shards before upload")
    problems = cache.verify()
    if problems:
        raise CacheError(f"{path}: {len(problems)} problem(s), first: {problems[0]}; run `mmkd cache verify` and "
                         "repair the cache before publishing")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    files = publishable_files(cache)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
    m = cache.manifest
    api.upload_folder(folder_path=root, repo_id=repo_id, repo_type="dataset", revision=revision,
                      allow_patterns=files, delete_patterns=["train-*.parquet", "shard-*.parquet"],
                      commit_message=f"mmkd cache {m.cache_id}: {m.num_rows} samples, {len(m.shards)} shards")
    url = f"hf://datasets/{repo_id}" + (f"@{revision}" if revision else "")
    log(f"[push] {len(files)} files of {join(root, '')} -> {url}")
    return url
