"""The whole loop on the micro configuration: data -> teacher -> Ray cache -> students -> eval."""

import json

import pytest

from mmkd.common.config import load_config
from mmkd.common.samples import read_llava
from mmkd.pipelines.config import DemoConfig
from mmkd.pipelines.demo import run_demo
from mmkd.storage.inspect import inspect_cache
from mmkd.storage.reader import TeacherCache


@pytest.mark.slow
def test_micro_demo_end_to_end(tmp_path):
    cfg = load_config(DemoConfig, "configs/demo_micro.yaml", {"workdir": str(tmp_path / "demo")})
    lines = []
    results = run_demo(cfg, log=lines.append)
    w = tmp_path / "demo"
    assert len(results) == 9 and "teacher" in results and "LLaVA-MoD: -> preference (DPO)" in results
    for split, n in (("train", cfg.num_train), ("test", cfg.num_test)):
        cache = TeacherCache(w / "cache" / split)
        ids = cache.sample_ids()
        assert len(ids) == len(set(ids)) == n
        assert set(ids) == {s.id for s in read_llava(w / "data" / f"{split}.json")}
        assert cache.verify() == [] and cache.manifest.k == cfg.k
    for name, r in results.items():
        assert 0 <= r["accuracy"] <= 1 and r["samples"] == cfg.num_test
        assert r["kl_to_teacher"] >= -1e-3
    assert abs(results["teacher"]["kl_to_teacher"]) < 1e-3  # only float16 rounding of the cache
    # the preference-trained student is scored on the test split's absent-object questions too
    test = read_llava(w / "data" / "test.json")
    absent = sum(s.meta["task"] == "exists" and s.messages[-1]["content"] == "no" for s in test)
    pref = results["LLaVA-MoD: -> preference (DPO)"]
    assert pref["absent_object_questions"] == absent > 0 and 0 <= pref["hallucination_rate"] <= 1
    table = (w / "results.md").read_text()
    assert "| student (d) + RDist (LLaVA-KD loss) |" in table and "hallucination" in table
    assert TeacherCache(w / "cache" / "train").manifest.record_kinds == ["response", "visual", "relation"]
    assert TeacherCache(w / "cache" / "preference").manifest.num_rows == cfg.num_preference
    assert json.loads((w / "results.json").read_text())["results"].keys() == results.keys()
    info = inspect_cache(str(w / "cache" / "train"))
    assert info["samples"] == cfg.num_train and info["bytes_per_target_token"] > 0

    # A second run resumes: every step is skipped but the evaluation.
    lines.clear()
    run_demo(cfg, log=lines.append)
    # data, teacher, caches, 4 students, 2 recipes (their 7 stages are not even reached)
    assert sum("skipping" in line for line in lines) == 9
