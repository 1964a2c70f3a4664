"""No bad argument gets past the door: every refusal is one line naming the flag, exit
status 2, before Ray or DeepSpeed start and before anything is written."""

import dataclasses
import math
import os
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmkd.common.config import ConfigError, from_dict, nest_dict
from mmkd.pipelines.cli import main
from mmkd.pipelines.config import TeacherPassConfig
from mmkd.pipelines.teacher_pass import check_config as check_pass
from mmkd.student.config import TrainConfig
from mmkd.student.train import check_config as check_train
from mmkd.student.train import check_paths

PASS_CASES = [["--rows-per-shard", "0"], ["--k", "0"], ["--k", "-3"], ["--temperature", "0"],
              ["--dtype", "float13"], ["--batch-size", "0"], ["--batch-size", "-1"], ["--records", "responze"],
              ["--mode", "topp"], ["--num-workers", "0"], ["--k", "64"], ["--teacher", "/nope/teacher"],
              ["--mode", "sampled", "--draws", "0"], ["--max-length", "1"], ["--device", "gpu"],
              ["--vllm-args", "[1]"], ["--temperature", "nan"]]
TRAIN_CASES = [["--batch-size", "0"], ["--grad-accum", "0"], ["--save-every", "-1"], ["--divergence", "kl_forward"],
               ["--epochs", "0"], ["--epochs", "-1"], ["--processor", "/nope/processor"], ["--lr", "0"],
               ["--warmup-ratio", "2"], ["--arch.text-layers", "0"], ["--moe.top-k", "3"], ["--shuffle-window", "0"],
               ["--data", "/nope/data.json"], ["--visual-weight", "-1"]]


def _run(capsys, argv, tmp_path):
    before = sorted(os.listdir(tmp_path))
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert sorted(os.listdir(tmp_path)) == before, "a refused command wrote something"
    return rc, err


@pytest.mark.parametrize("extra", PASS_CASES, ids=" ".join)
def test_teacher_pass_refuses_in_one_line(extra, teacher_dir, demo_dir, tmp_path, capsys):
    argv = ["teacher-pass", "--teacher", str(teacher_dir), "--data", str(demo_dir / "train.json"),
            "--image-root", str(demo_dir), "--output", str(tmp_path / "cache"), *extra]
    rc, err = _run(capsys, argv, tmp_path)
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("mmkd: error: "), err
    assert extra[-2] in err, err  # the flag is named


@pytest.mark.parametrize("extra", TRAIN_CASES, ids=" ".join)
def test_train_refuses_in_one_line(extra, processor_dir, demo_dir, tmp_path, capsys):
    argv = ["train", "--data", str(demo_dir / "train.json"), "--image-root", str(demo_dir), "--processor",
            str(processor_dir), "--output-dir", str(tmp_path / "out"), *extra]
    rc, err = _run(capsys, argv, tmp_path)
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("mmkd: error: "), err
    assert extra[-2].replace("-", "_").removeprefix("__") in err.replace("-", "_"), err  # the flag or its key


def test_eval_refuses_a_missing_model(demo_dir, tmp_path, capsys):
    rc, err = _run(capsys, ["eval", "--model", str(tmp_path / "none"), "--data", str(demo_dir / "test.json")],
                   tmp_path)
    assert rc == 2 and "--model" in err and "not found" in err and len(err.splitlines()) == 1


def _values(tp) -> st.SearchStrategy:
    """Values of a config field's type, biased to the edges."""
    base = typing.get_args(tp)[0] if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType"))\
        else tp
    if base is bool:
        return st.booleans()
    if base is int:
        return st.one_of(st.integers(-3, 3), st.integers(-10**9, 10**9))
    if base is float:
        return st.one_of(st.sampled_from([0.0, -1.0, 1.0, 0.5, math.nan, math.inf, 1e-12, 1e12]),
                         st.floats(-10, 10))
    return st.one_of(st.sampled_from(["", "auto", "cpu", "bucket", "jsd", "topk", "response", "x"]), st.text(max_size=6))


def _scalar_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _scalar_fields(hints[f.name], prefix if f.metadata.get("mmkd.inline") else prefix + f.name + ".")
        else:
            yield prefix + f.name, hints[f.name]


PATHS = ("teacher", "data", "image_root", "output", "processor", "output_dir", "cache", "online_teacher", "init_from")


@pytest.mark.parametrize("cls", [TeacherPassConfig, TrainConfig], ids=lambda c: c.__name__)
def test_random_values_are_accepted_or_refused_by_name(cls, teacher_dir, processor_dir, demo_dir, tmp_path):
    """Hypothesis throws random values at every field (paths kept valid): building and
    checking the config either passes or raises a one-line ConfigError naming a flag;
    nothing else escapes."""
    fields = [(n, t) for n, t in _scalar_fields(cls) if n.split(".")[-1] not in PATHS]
    valid = {"teacher": str(teacher_dir), "data": str(demo_dir / "train.json"), "image_root": str(demo_dir),
             "output": str(tmp_path / "c"), "processor": str(processor_dir), "output_dir": str(tmp_path / "o")}
    valid = {k: v for k, v in valid.items() if k in dict(_scalar_fields(cls))}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.fixed_dictionaries({}, optional={n: _values(t) for n, t in fields}))
    def check(values):
        try:
            cfg = from_dict(cls, nest_dict({**valid, **values}))
            if cls is TeacherPassConfig:
                check_pass(cfg)
            else:
                check_train(cfg)
                check_paths(cfg)
        except ConfigError as e:
            assert len(str(e).splitlines()) == 1 and ("--" in str(e) or "." in str(e)), str(e)

    check()
