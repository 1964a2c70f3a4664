"""Configs (YAML + flags onto typed dataclasses) and the command line."""

import json
import subprocess
import sys

import pytest

from mmkd.common.config import ConfigError, load_config
from mmkd.pipelines.cli import build_parser, main
from mmkd.pipelines.config import DemoConfig
from mmkd.student.config import TrainConfig


def test_yaml_then_flags_override_defaults(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 0.01\nbatch_size: 4\narch: {text_hidden: 48}\ncache: null\n")
    args = build_parser().parse_args(["train", "--config", str(y), "--batch-size", "2", "--arch.text-layers", "3"])
    cfg = load_config(TrainConfig, args.config, {k: v for k, v in vars(args).items()
                                                 if k not in ("command", "config", "func")})
    assert cfg.lr == 0.01 and cfg.batch_size == 2
    assert cfg.arch.text_hidden == 48 and cfg.arch.text_layers == 3 and cfg.arch.vision_hidden == 64
    assert cfg.cache is None


def test_unknown_keys_and_bad_types_are_named(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("learning_rate: 0.01\n")
    with pytest.raises(ConfigError, match="learning_rate.*valid"):
        load_config(TrainConfig, y)
    with pytest.raises(ConfigError, match="arch.text_hidden: expected int"):
        load_config(TrainConfig, None, {"arch.text_hidden": "big"})
    assert load_config(DemoConfig, None, {"fresh": True}).fresh is True


def test_shipped_configs_load():
    from pathlib import Path

    for path in Path("configs").glob("*.yaml"):
        load_config(DemoConfig, path)


def test_every_subcommand_has_help():
    for cmd in (["demo"], ["teacher-pass"], ["train"], ["eval"], ["cache", "inspect"], ["cache", "verify"]):
        r = subprocess.run([sys.executable, "-m", "mmkd.pipelines.cli", *cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: mmkd" in r.stdout, (cmd, r.stderr)


def test_missing_settings_and_bad_caches_fail_clearly(tmp_path, capsys):
    assert main(["teacher-pass", "--data", "x.json"]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert main(["cache", "inspect", str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_cache_verify_exit_status_names_the_bad_shard(tmp_path, capsys):
    from helpers import write

    write(tmp_path, ["a", "b", "c"], rows_per_shard=2)
    assert main(["cache", "verify", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    shard = tmp_path / manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[20] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["cache", "verify", str(tmp_path)]) == 1
    assert manifest["shards"][0]["file"] in capsys.readouterr().err


def test_cache_inspect_merge_subset_commands(tmp_path, capsys):
    from helpers import write

    write(tmp_path / "a", ["a1", "a2", "a3"], rows_per_shard=2)
    write(tmp_path / "b", ["b1", "b2"], rows_per_shard=2, seed=1)
    assert main(["cache", "merge", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "m")]) == 0
    (tmp_path / "ids.txt").write_text("a2\nb1\n")
    assert main(["cache", "subset", str(tmp_path / "m"), str(tmp_path / "s"), "--ids", str(tmp_path / "ids.txt")]) == 0
    capsys.readouterr()
    assert main(["cache", "inspect", "--json", str(tmp_path / "s")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["samples"] == 2 and info["mode"] == "topk" and info["k"] == 8
    assert 0 < info["response_topk_mass_mean"] <= 1
    assert info["bytes_per_target_token"] > 0
