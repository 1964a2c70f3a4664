"""Caches teams can share: plain exports read without mmkd (pyarrow, datasets, DuckDB,
polars in a Python that cannot import mmkd), the cache folder itself as a `datasets` data
set, the dataset card and portable manifest identities, push to the Hub and hf:// reads
(against local stand-ins: no network here), Hub-id teachers resolved once."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mmkd.pipelines.cli import main
from mmkd.storage.card import CARD_NAME
from mmkd.storage.export import export_cache
from mmkd.storage.hub import push_cache
from mmkd.storage.manifest import Manifest
from mmkd.storage.reader import TeacherCache
from mmkd.storage.schema import CacheError
from mmkd.storage.writer import LOCK_NAME

from helpers import write

IDS = [f"s{i}" for i in range(10)]


def _plain_python(tmp_path: Path) -> str:
    """A Python with this environment's libraries but no mmkd: a bare venv whose .pth adds
    the site-packages folder (a .pth inside it, mmkd's editable finder, is not run)."""
    import site
    import sysconfig

    env = tmp_path / "plain-venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(env)], check=True)
    purelib = Path(sysconfig.get_paths(vars={"base": str(env), "platbase": str(env)})["purelib"])
    (purelib / "libs.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return str(env / "bin" / "python")


READER = textwrap.dedent('''
    import importlib.util, json, sys
    assert importlib.util.find_spec("mmkd") is None, "mmkd is importable"
    out, cache = sys.argv[1], sys.argv[2]
    import datasets, duckdb, polars, pyarrow.parquet as pq
    table = pq.read_table(out + "/train-00000.parquet")
    ds = datasets.load_dataset("parquet", data_dir=out, split="train")
    pl = polars.read_parquet(out + "/*.parquet")
    db = duckdb.sql(f"select sample_id, response_logprobs[1][1] as top from '{out}/*.parquet' "
                    "order by sample_id").fetchall()
    shards = datasets.load_dataset("parquet", data_dir=cache, split="train")  # the cache folder itself
    lines = [json.loads(l) for l in open(out + "/../jsonl/train-00000.jsonl")]
    print(json.dumps({"pyarrow": table.to_pylist(), "datasets": ds.to_list(), "polars_rows": pl.height,
                      "duckdb": db, "jsonl": lines, "cache_rows": shards.num_rows,
                      "cache_ids": sorted(shards["sample_id"])}))
''')


def test_an_export_reads_without_mmkd_and_the_cache_folder_is_a_dataset(tmp_path):
    cache = tmp_path / "cache"
    write(cache, IDS, rows_per_shard=100, kinds=("response", "visual", "relation"))
    info = export_cache(str(cache), str(tmp_path / "plain"), log=lambda *_: None)
    export_cache(str(cache), str(tmp_path / "jsonl"), "jsonl", log=lambda *_: None)
    assert info.rows == 10 and info.files == ["train-00000.parquet"] and info.mode == "topk"
    with pytest.raises(CacheError, match="not empty"):
        export_cache(str(cache), str(tmp_path / "plain"), log=lambda *_: None)

    run = subprocess.run([_plain_python(tmp_path), "-c", READER, str(tmp_path / "plain"), str(cache)],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": "",
                                                                             "HF_DATASETS_CACHE": str(tmp_path / "hf")})
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])

    ref = TeacherCache(str(cache)).rows()  # mmkd's own decoding of the same shards
    assert got["cache_rows"] == 10 and got["cache_ids"] == sorted(IDS)
    assert got["polars_rows"] == 10 and got["pyarrow"] == got["datasets"]
    for reader in ("pyarrow", "jsonl"):
        assert sorted(r["sample_id"] for r in got[reader]) == sorted(IDS)
        for r in got[reader]:
            row = ref[r["sample_id"]]
            assert r["input_ids"] == row.input_ids.tolist()
            for kind in ("response", "visual"):
                t = getattr(row, kind)
                order = np.argsort(-t.logprobs, axis=1, kind="stable")
                assert r[f"{kind}_positions"] == t.positions.tolist()
                assert r[f"{kind}_ids"] == np.take_along_axis(t.ids, order, 1).tolist()
                np.testing.assert_allclose(np.array(r[f"{kind}_logprobs"]).reshape(t.logprobs.shape),
                                           np.take_along_axis(t.logprobs, order, 1), rtol=1e-6)
                np.testing.assert_allclose(r[f"{kind}_leftover"], t.leftover, rtol=1e-6)
                assert all(np.all(np.diff(lp) <= 0) for lp in r[f"{kind}_logprobs"])  # by probability
            np.testing.assert_allclose(np.array(r["relation"]), row.relation, rtol=1e-6)
    for sid, top in got["duckdb"]:
        t = ref[sid].response
        assert (top is None) == (len(t) == 0)
        if top is not None:
            assert abs(top - float(t.logprobs[0].max())) < 1e-6


def test_a_sampled_export_lists_drawn_ids_with_counts(tmp_path):
    write(tmp_path / "c", IDS[:4], mode="sampled", width=16)
    export_cache(str(tmp_path / "c"), str(tmp_path / "out"), "jsonl", log=lambda *_: None)
    ref = TeacherCache(str(tmp_path / "c")).rows()
    for line in (tmp_path / "out" / "train-00000.jsonl").read_text().splitlines():
        r = json.loads(line)
        t = ref[r["sample_id"]].response
        for ids, counts, i in zip(r["response_ids"], r["response_counts"], range(len(t))):
            want = {int(a): int(c) for a, c in zip(t.ids[i], t.counts[i]) if c > 0}
            assert dict(zip(ids, counts)) == want and counts == sorted(counts, reverse=True)
            assert sum(counts) == 16


# ------------------------------------------------------------------ push / hf:// (local stand-ins)

class StandInHub:
    """huggingface_hub.HfApi's create_repo / create_branch / upload_folder against a local
    folder (root/datasets/REPO): the file selection by huggingface_hub's own
    filter_repo_objects, as upload_folder does."""

    def __init__(self, root: Path):
        self.root, self.commits = root, []

    def create_repo(self, repo_id, repo_type, private=False, exist_ok=False):
        (self.root / f"{repo_type}s" / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def create_branch(self, repo_id, branch, repo_type, exist_ok=False):
        raise AssertionError("not used here")

    def upload_folder(self, folder_path, repo_id, repo_type, revision=None, allow_patterns=None,
                      delete_patterns=None, commit_message=""):
        import fnmatch
        import shutil

        from huggingface_hub.utils import filter_repo_objects

        repo = self.root / f"{repo_type}s" / repo_id
        names = [p.name for p in Path(folder_path).iterdir() if p.is_file()]
        chosen = list(filter_repo_objects(names, allow_patterns=allow_patterns))
        for old in repo.iterdir():  # delete_patterns: remote files matching them that are not uploaded
            if old.name not in chosen and any(fnmatch.fnmatch(old.name, p) for p in delete_patterns or []):
                old.unlink()
        for name in chosen:
            shutil.copyfile(Path(folder_path) / name, repo / name)
        self.commits.append((repo_id, sorted(chosen), commit_message))


@pytest.fixture
def hf_standin(tmp_path, monkeypatch):
    """hf:// served from a local folder: fsspec's "hf" protocol replaced by a DirFileSystem
    (the reader's fsspec code path, not huggingface_hub's HfFileSystem)."""
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    root = tmp_path / "hub"
    root.mkdir()

    class HubDir(DirFileSystem):
        protocol = "hf"

        def __init__(self, **kw):
            super().__init__(path=str(root), fs=LocalFileSystem())

        @classmethod
        def _strip_protocol(cls, path):
            return str(path).removeprefix("hf://")

    from fsspec.registry import _registry

    monkeypatch.setitem(_registry, "hf", HubDir)  # restored after the test
    yield root


def test_push_publishes_a_verified_cache_and_hf_urls_read_it(tmp_path, hf_standin, capsys):
    cache = tmp_path / "cache"
    write(cache, IDS, rows_per_shard=4, kinds=("response", "visual"))
    (cache / LOCK_NAME).write_text("")  # debris a publish must leave out
    (cache / "train-99999-deadbeef.parquet").write_bytes(b"never committed")
    hub = StandInHub(hf_standin)
    url = push_cache(str(cache), "team/llava-topk8", api=hub, log=lambda *_: None)
    assert url == "hf://datasets/team/llava-topk8"
    m = Manifest.load(str(cache))
    assert hub.commits[0][1] == sorted(["manifest.json", CARD_NAME, *(s.file for s in m.shards)])

    remote = TeacherCache(url)  # through fsspec, as mmkd train / eval / cache inspect open it
    local = TeacherCache(str(cache)).rows()
    for row in remote.iter_rows():
        np.testing.assert_array_equal(row.response.ids, local[row.sample_id].response.ids)
        np.testing.assert_array_equal(row.visual.logprobs, local[row.sample_id].visual.logprobs)
    plan = remote.epoch_plan(seed=0)
    assert sorted(remote.read_items(plan, plan.stream(0)).sample_ids) == sorted(IDS)
    assert main(["cache", "inspect", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 10
    assert main(["cache", "inspect", "hf://datasets/team/missing"]) == 2
    assert "no manifest" in capsys.readouterr().err

    # a damaged or unfinished cache is not published
    shard = cache / m.shards[0].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="problem.*repair the cache before publishing"):
        push_cache(str(cache), "team/x", api=hub, log=lambda *_: None)
    write(tmp_path / "part", IDS[:3])
    part = Manifest.load(str(tmp_path / "part"))
    part.complete = False
    part.save(str(tmp_path / "part"))
    with pytest.raises(CacheError, match="not complete"):
        push_cache(str(tmp_path / "part"), "team/x", api=hub, log=lambda *_: None)
    assert len(hub.commits) == 1


def test_an_unreachable_url_is_one_clear_error(monkeypatch, capsys):
    from fsspec.implementations.memory import MemoryFileSystem
    from fsspec.registry import _registry

    class Down(MemoryFileSystem):  # what a backend does without the network
        protocol = "down"

        def exists(self, path, **kw):
            raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setitem(_registry, "down", Down)
    assert main(["cache", "inspect", "down://bucket/cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "down://bucket/cache: cannot read it (ConnectionError" in err
    assert "HF_TOKEN" in err
    assert main(["cache", "inspect", "hf://datasets/nobody/nothing"]) == 2  # the real HfFileSystem, offline
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE is set" in err


# ------------------------------------------------------------------ card, identities, Hub-id teachers

def _hub_cache(root: Path, repo: str, folder: Path, commit: str) -> None:
    """A Hugging Face cache (HF_HUB_CACHE layout) holding `folder` as repo's snapshot at commit."""
    import shutil

    base = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_a_hub_id_teacher_resolves_once_and_the_cache_describes_itself(text_dir, tmp_path):
    """The whole pass in a subprocess with HF_HUB_OFFLINE and HF_HUB_CACHE pointing at a
    local stand-in of the Hub's cache: the id resolves to the snapshot there."""
    from mmkd.teacher_cache.teacher import weights_digest

    commit = "0123456789abcdef0123456789abcdef01234567"
    _hub_cache(tmp_path / "hub", "tiny-org/tiny-lm", text_dir / "teacher", commit)
    out = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hfd")}
    run = subprocess.run([sys.executable, "-m", "mmkd.pipelines.cli", "teacher-pass", "--teacher", "tiny-org/tiny-lm",
                          "--data", str(text_dir / "train.json"), "--output", str(out), "--k", "4",
                          "--batch-size", "8"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    m = Manifest.load(str(out))
    assert m.teacher["name"] == m.teacher["path"] == "tiny-org/tiny-lm" and m.teacher["revision"] == commit
    assert m.teacher["weights_sha256"] == weights_digest(text_dir / "teacher")
    import hashlib

    data = text_dir / "train.json"
    assert m.inputs == {"data": "train.json", "path": str(data.resolve()), "num_samples": len(json.loads(
        data.read_text())), "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}
    assert m.command.startswith("mmkd teacher-pass --teacher tiny-org/tiny-lm ") and "--k 4" in m.command
    assert m.mmkd_version and m.mmkd_version != "unknown"
    assert not (out / LOCK_NAME).exists()
    card = (out / CARD_NAME).read_text()
    assert f"`tiny-org/tiny-lm` at revision `{commit}`" in card and m.teacher["weights_sha256"] in card
    assert all(s.file in card for s in m.shards)

    import datasets

    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hfd"))  # the card's configs
    assert sorted(ds["sample_id"]) == sorted(i for s in m.shards for i in s.sample_ids)
