"""The method family on the student side: every stage kind trains from the cache
(MDist, RDist, preference, MoE), freezing per stage, refusals, and both shipped recipes
end to end in a process that never opens the teacher's weights."""

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkd.common.config import InputsConfig
from mmkd.common.inputs import SampleList
from mmkd.common.samples import read_llava
from mmkd.pipelines.config import TeacherPassConfig
from mmkd.pipelines.recipe import load_recipe
from mmkd.pipelines.teacher_pass import run_teacher_pass
from mmkd.storage.reader import TeacherCache
from mmkd.storage.schema import CacheError
from mmkd.student.config import TrainConfig
from mmkd.student.data import StudentData
from mmkd.student.model import load_model
from mmkd.student.train import train

from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(teacher_dir, demo_dir, processor_dir, tmp_path_factory):
    """A folder laid out like `mmkd demo`'s (data, processor, caches, CE student), so the
    shipped recipes run on it with --root."""
    import ray

    r = tmp_path_factory.mktemp("root")
    (r / "data").symlink_to(demo_dir, target_is_directory=True)
    (r / "processor").symlink_to(processor_dir, target_is_directory=True)
    common = dict(teacher=str(teacher_dir), batch_size=8, rows_per_shard=16, k=6)
    run_teacher_pass(TeacherPassConfig(inputs=InputsConfig(str(demo_dir / "train.json"), str(demo_dir)),
                                       output=str(r / "cache" / "train"), records="response,visual,relation",
                                       **common), log=lambda *_: None)
    run_teacher_pass(TeacherPassConfig(inputs=InputsConfig(str(demo_dir / "preference.jsonl"), str(demo_dir)),
                                       output=str(r / "cache" / "preference"), records="preference", **common),
                     log=lambda *_: None)
    ray.shutdown()
    # two decoder layers: LLaVA-MoD's upcycling turns every other layer's FFN into experts
    train(_cfg(r, "student_ce", cache=None, epochs=2, arch=dataclasses.replace(TINY, text_layers=2)),
          log=lambda *_: None)
    return r


def _cfg(root, out, data="train.json", **kw):
    base = dict(inputs=InputsConfig(str(root / "data" / data), str(root / "data")), processor=str(root / "processor"),
                output_dir=str(root / out), cache=str(root / "cache" / "train"), arch=TINY, batch_size=8,
                num_workers=0, lr=3e-3, log_every=1000)
    base.update(kw)
    return TrainConfig(**base)


def _log(path):
    return [json.loads(line) for line in (Path(path) / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("term", ["visual", "relation"])
def test_visual_and_relation_terms_each_train_the_student(root, term):
    """MDist's visual term alone, then RDist alone (no CE, no response KD): it falls."""
    name = {"visual": "visual_kd", "relation": "relation"}[term]
    train(_cfg(root, term, init_from=str(root / "student_ce"), ce_weight=0, kd_weight=0, epochs=8, lr=1e-2,
               relation_pooling="sample", **{f"{term}_weight": 1.0}), log=lambda *_: None)
    log = _log(root / term)
    assert name in log[0] and "kd" not in log[0]
    # epoch means, over the same 40 samples whatever the batches (RDist per sample: no batch pooling)
    mean = lambda rows: sum(r[name] for r in rows) / len(rows)  # noqa: E731
    # measured: visual falls to 0.04 of its first epoch, relation to 0.79 (4 visual tokens per image)
    assert mean(log[-5:]) < {"visual": 0.5, "relation": 0.85}[term] * mean(log[:5])


def test_projector_stage_changes_only_the_projector(root):
    train(_cfg(root, "dpt", init_from=str(root / "student_ce"), trainable="projector", visual_weight=1,
               relation_weight=1, epochs=2), log=lambda *_: None)
    before, after = load_model(str(root / "student_ce")), load_model(str(root / "dpt"))
    a = dict(after.named_parameters())
    changed = {n for n, p in before.named_parameters() if not torch.equal(p, a[n])}
    assert changed and all("multi_modal_projector" in n for n in changed)


def test_preference_stage_lowers_the_dpo_loss(root):
    train(_cfg(root, "pref", init_from=str(root / "student_ce"), objective="preference",
               data="preference.jsonl", cache=str(root / "cache" / "preference"),
               trainable="llm+projector", ce_weight=0, batch_size=4, epochs=8, lr=5e-3), log=lambda *_: None)
    log = _log(root / "pref")
    assert log[-1]["dpo"] < log[0]["dpo"] and log[-1]["margin"] > log[0]["margin"]


def test_visual_terms_refuse_another_visual_token_count(root, processor):
    other = copy.deepcopy(processor)
    other.patch_size = processor.patch_size // 2  # 4x the visual tokens per image
    from mmkd.common.preprocess import _image_token_count
    _image_token_count.cache_clear()
    samples = SampleList(read_llava(root / "data" / "train.json"))
    cache = TeacherCache(str(root / "cache" / "train"))
    with pytest.raises(CacheError, match="visual tokens.*visual_weight=0"):
        StudentData(samples, other, str(root / "data"), 512, cache, kinds=("response", "visual"))
    StudentData(samples, other, str(root / "data"), 512, cache, kinds=("response",))  # response targets still work
    _image_token_count.cache_clear()


def test_missing_record_kinds_and_bad_options_are_refused(root, tmp_path):
    with pytest.raises(CacheError, match="--records"):
        train(_cfg(root, "x", cache=str(root / "cache" / "preference"), epochs=1), log=lambda *_: None)
    for bad in (dict(divergence="kl"), dict(trainable="vision"), dict(relation_pooling="mean"),
                dict(objective="preference", cache=None), dict(upcycle=True)):
        with pytest.raises(ValueError):
            train(_cfg(root, "x", **bad), log=lambda *_: None)


AUDIT = r"""
import json, os, sys
teacher = os.path.realpath(sys.argv[1]); touched = []
def hook(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        p = os.fsdecode(args[0])
        if os.path.realpath(p).startswith(teacher):
            touched.append((event, p))
sys.addaudithook(hook)
from mmkd.pipelines.cli import main
rc = 0
for recipe in sys.argv[4:]:
    rc = rc or main(["recipe", recipe, "--root", sys.argv[2]])
json.dump({"rc": rc, "touched": touched}, open(sys.argv[3], "w"))
"""


@pytest.mark.slow
def test_both_recipes_run_from_the_cache_without_opening_the_teacher(root, teacher_dir, tmp_path):
    """LLaVA-KD (DPT -> SFT -> DFT) and LLaVA-MoD (adaptor -> mimic dense -> mimic sparse MoE
    -> preference), the shipped YAML files, in a fresh process with an audit hook on every
    file open: no path under the teacher's folder is opened (its caches are used instead)."""
    report = tmp_path / "audit.json"
    # a fresh single-rank process: not the rendezvous settings this test process set up
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    recipes = [str(REPO / "configs" / "recipes" / f) for f in ("llava_kd.yaml", "llava_mod.yaml")]
    proc = subprocess.run([sys.executable, "-c", AUDIT, str(teacher_dir), str(root), str(report), *recipes],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    audit = json.loads(report.read_text())
    assert audit["rc"] == 0
    assert audit["touched"] == []
    assert TeacherCache(str(root / "cache" / "train")).manifest.teacher["path"] == str(teacher_dir)  # it was there
    for name, stages in (("llava_kd", ["dpt", "sft", "dft"]),
                         ("llava_mod", ["adaptor_init", "mimic_dense", "mimic_sparse", "preference"])):
        _, loaded = load_recipe(REPO / "configs" / "recipes" / f"{name}.yaml", root=str(root))
        assert [s.name for s in loaded] == stages
        for s in loaded:
            assert (Path(s.config.output_dir) / "train_summary.json").exists()
    mod = root / "recipes" / "llava_mod"
    # each stage started from the previous one's model: the sparse stage's upcycled layers
    # hold experts, and the preference stage (started from it) is an MoE student too
    for stage in ("mimic_sparse", "preference"):
        cfg = json.loads((mod / stage / "config.json").read_text())
        assert cfg["mmkd_moe"]["num_experts"] == 4
    summary = json.loads((mod / "mimic_sparse" / "train_summary.json").read_text())
    assert "moe_aux" in summary["final"] and summary["final"]["moe_aux"] > 0
    from mmkd.student.evaluate import evaluate

    m = evaluate(str(mod / "preference"), InputsConfig(str(root / "data" / "test.json"), str(root / "data")))
    assert 0 <= m["accuracy"] <= 1
    # a second run resumes: every stage is done, nothing retrains
    proc = subprocess.run([sys.executable, "-m", "mmkd.pipelines.cli", "recipe", recipes[0], "--root", str(root)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.count("skipping") == 3, proc.stdout + proc.stderr
