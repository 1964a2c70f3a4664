"""Nothing corrupt is read as data: a bit-flip scan over one shard, through every read path.

Each flip either leaves what a path returns exactly as from the intact cache (a flip in bytes
no reader interprets: statistics, padding, ...) or makes the path raise a CacheError that
names the shard and the fix. Never different values, never a raw library exception.
"""

import shutil

import numpy as np
import pytest

from mmkd.storage.inspect import inspect_cache
from mmkd.storage.manifest import Manifest
from mmkd.storage.ops import merge_caches, subset_cache
from mmkd.storage.reader import TeacherCache
from mmkd.storage.schema import CacheError
from mmkd.storage.tables import raw_table
from mmkd.storage.writer import CacheWriter

from helpers import manifest, rows

KINDS = ("response", "visual", "relation")
FLIPS = 200


def _snapshot(batch_rows) -> dict:
    out = {}
    for r in batch_rows:
        fields = [r.input_ids, r.relation]
        for kind in ("response", "visual"):
            t = getattr(r, kind)
            fields += [t.positions, t.ids, t.logprobs, t.leftover]
        out[r.sample_id] = (r.token_digest, [np.asarray(f).tobytes() for f in fields])
    return out


def _paths(path: str, tmp) -> dict:
    """What each read path gives for the cache at `path` (a snapshot to compare)."""
    def training(c):
        plan = c.epoch_plan(1, 0, 8)
        return _snapshot([r for b in plan.micro_batches(0, 1, 4) for r in c.read_items(plan, b).rows()])

    def copies(fn):
        out = tmp / "copy"
        shutil.rmtree(out, ignore_errors=True)
        fn(out)
        return _snapshot(TeacherCache(str(out)).iter_rows())

    return {
        "iter_rows": lambda: _snapshot(TeacherCache(path).iter_rows()),
        "stream": lambda: _snapshot(TeacherCache(path).stream(seed=1, shuffle_buffer=8)),
        "training": lambda: training(TeacherCache(path)),
        "inspect": lambda: {k: v for k, v in inspect_cache(path).items() if k not in ("path", "cache_id")},
        "subset": lambda: copies(lambda out: subset_cache(path, str(out), [f"s{i:02d}" for i in range(0, 30, 2)])),
        "merge": lambda: copies(lambda out: merge_caches([path], str(out))),
    }


@pytest.mark.slow
def test_bit_flips_in_a_shard_are_caught_on_every_read_path(tmp_path):
    cache = tmp_path / "cache"
    w = CacheWriter(str(cache), manifest(kinds=KINDS), rows_per_shard=15)
    w.add(raw_table(rows([f"s{i:02d}" for i in range(30)], kinds=KINDS)))
    w.close(complete=True)
    shard = cache / Manifest.load(str(cache)).shards[0].file
    intact = shard.read_bytes()
    paths = _paths(str(cache), tmp_path)
    want = {name: fn() for name, fn in paths.items()}
    step = max(1, len(intact) // FLIPS)
    counts = {"same": 0, "caught": 0}
    for at in range(0, len(intact), step):
        flipped = bytearray(intact)
        flipped[at] ^= 1 << (at % 8)
        shard.write_bytes(bytes(flipped))
        for name, fn in paths.items():
            try:
                got = fn()
            except CacheError as e:
                assert shard.name in str(e) and "mmkd cache verify" in str(e), (at, name, str(e))
                counts["caught"] += 1
                continue
            except Exception as e:  # noqa: BLE001 - what the test exists to rule out
                pytest.fail(f"byte {at}, path {name}: raw {type(e).__name__}: {e}")
            assert got == want[name], f"byte {at}, path {name}: silently different values"
            counts["same"] += 1
    shard.write_bytes(intact)
    assert counts["caught"] > 0.8 * (counts["caught"] + counts["same"]), counts


def test_a_cache_written_before_checksums_reads_with_one_warning(tmp_path):
    """Old shards (no page CRCs, no footer digest) give the same rows; one warning per reader
    says only `mmkd cache verify` checks them; verify still passes."""
    import warnings

    from mmkd.pipelines.synthetic_cache import without_checksums

    cache = tmp_path / "cache"
    w = CacheWriter(str(cache), manifest(kinds=KINDS), rows_per_shard=4)
    w.add(raw_table(rows([f"s{i:02d}" for i in range(10)], kinds=KINDS)))
    w.close(complete=True)
    without_checksums(cache, tmp_path / "old")
    old = Manifest.load(str(tmp_path / "old"))
    assert len(old.shards) == 3 and not any(s.page_checksums or s.footer_sha256 for s in old.shards)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader = TeacherCache(str(tmp_path / "old"))
        got = reader.rows()
        assert reader.verify() == []
    notes = [str(x.message) for x in caught if "written before shards carried checksums" in str(x.message)]
    assert len(notes) == 1 and "mmkd cache verify" in notes[0]
    assert _snapshot(got.values()) == _snapshot(TeacherCache(str(cache)).rows().values())
