"""Trainer options users expect: their own DeepSpeed JSON merged with mmkd's settings
(conflicts named), gradient checkpointing and the attention implementation."""

import json

import pytest

from mmkd.common.config import ConfigError
from mmkd.pipelines.cli import main
from mmkd.student.config import TrainConfig
from mmkd.student.parallel import deepspeed_config

STUDENT = ["--arch.text-hidden", "32", "--arch.text-layers", "1", "--arch.text-heads", "2",
           "--arch.text-intermediate", "64"]


def _ds(tmp_path, d) -> str:
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(d))
    return str(p)


def test_a_deepspeed_json_is_merged_and_conflicts_are_named(tmp_path):
    user = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": 5e7},
            "gradient_accumulation_steps": "auto", "wall_clock_breakdown": True}
    cfg = TrainConfig(batch_size=4, grad_accum=2, zero_stage=2, deepspeed=_ds(tmp_path, user))
    got = deepspeed_config(cfg)
    assert got["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": 5e7}
    assert got["gradient_accumulation_steps"] == 2 and got["train_micro_batch_size_per_gpu"] == 4
    assert got["wall_clock_breakdown"] is True and got["bf16"] == {"enabled": False}
    assert deepspeed_config(TrainConfig(batch_size=4)) == {k: v for k, v in deepspeed_config(
        TrainConfig(batch_size=4, deepspeed=_ds(tmp_path, {}))).items()}
    with pytest.raises(ConfigError, match=r"sets zero_optimization.stage = 3 but --zero-stage gives 0"):
        deepspeed_config(TrainConfig(deepspeed=_ds(tmp_path, {"zero_optimization": {"stage": 3}})))
    with pytest.raises(ConfigError, match=r"sets 'optimizer'.*--optimizer"):
        deepspeed_config(TrainConfig(deepspeed=_ds(tmp_path, {"optimizer": {"type": "Adam"}})))
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="cannot read it as JSON"):
        deepspeed_config(TrainConfig(deepspeed=str(tmp_path / "bad.json")))


def test_train_runs_with_a_deepspeed_json_checkpointing_and_eager_attention(text_dir, tmp_path, capsys):
    teacher = str(text_dir / "teacher")
    base = ["train", "--processor", teacher, "--data", str(text_dir / "train.json"), *STUDENT, "--batch-size", "8",
            "--num-workers", "0", "--save-every", "0", "--report-to", "none", "--max-steps", "2"]
    ds = _ds(tmp_path, {"zero_optimization": {"stage": 0}, "wall_clock_breakdown": False})
    out = tmp_path / "s"
    assert main([*base, "--output-dir", str(out), "--deepspeed", ds, "--gradient-checkpointing",
                 "--attn-implementation", "eager"]) == 0
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2
    capsys.readouterr()
    bad = _ds(tmp_path, {"train_micro_batch_size_per_gpu": 3})
    assert main([*base, "--output-dir", str(tmp_path / "x"), "--deepspeed", bad]) == 2
    err = capsys.readouterr().err
    assert "train_micro_batch_size_per_gpu = 3 but --batch-size gives 8" in err and not (tmp_path / "x").exists()
    assert main([*base, "--output-dir", str(tmp_path / "x"), "--attn-implementation", "fast"]) == 2
    assert "--attn-implementation 'fast'" in capsys.readouterr().err


def test_help_shows_each_knobs_comment_and_built_defaults(capsys):
    from mmkd.pipelines.config import DemoConfig

    for argv in (["train", "--help"], ["demo", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert ("--lr-schedule STR cosine | linear | constant, after a linear warmup (student.optim) "
            "(default: cosine)") in out
    assert "--cache STR teacher cache folder; None trains with CE only (default: none)" in out
    # a nested field of a factory default shows the built value, not the class's
    want = DemoConfig().student_arch.text_hidden
    import re

    assert want != type(DemoConfig().student_arch)().text_hidden
    assert re.search(rf"--student-arch\.text-hidden INT [^-]*default: {want}\b", out)
    assert "mmkd 0.1.0" in out
