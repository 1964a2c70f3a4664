"""The command line as a new user meets it: help for every flag, the same knobs in YAML and
on the command line, one boolean style, a --help that loads no ML library, training logs
to TensorBoard / W&B / MLflow, and logs without progress bars when not on a terminal."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmkd.common.config import flag, flat_dict, load_config, nest_dict
from mmkd.pipelines.cli import _config, build_parser, main
from mmkd.pipelines.config import DemoConfig, TeacherPassConfig
from mmkd.student.config import EvalConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"demo": DemoConfig, "teacher-pass": TeacherPassConfig, "train": TrainConfig, "eval": EvalConfig}
STUDENT = ["--arch.text-hidden", "32", "--arch.text-layers", "1", "--arch.text-heads", "2",
           "--arch.text-intermediate", "64"]


def _subparsers(parser, path=("mmkd",)):
    """(command path, parser) of every (sub)command."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*path, name))


def test_every_flag_of_every_command_says_what_it_does():
    missing = []
    for path, parser in _subparsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            text = (action.help or "").split("(default:")[0].strip()
            if len(text) < 8:
                missing.append(f"{' '.join(path)} {action.option_strings or action.dest}: {action.help!r}")
    assert not missing, "flags without a description:\n" + "\n".join(missing)


def _changed(value):
    """A value of value's type that differs from it."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value - 1 if value > 1 else value + 1  # within MoEConfig's own checks (top_k 1 or 2)
    if isinstance(value, float):
        return value * 0.5 + 0.25
    return "changed"


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_yaml_and_flags_are_the_same_knobs(command, tmp_path):
    """Every YAML key is a flag (booleans as --x / --no-x) and both give the same config."""
    cls = CONFIGS[command]
    parser = dict(_subparsers(build_parser()))[("mmkd", command)]
    dests = {a.dest for a in parser._actions} - {"help", "config", "func"}
    keys = flat_dict(cls())
    assert set(keys) == dests
    changed = {k: _changed(v if v is not None else "") for k, v in keys.items()}
    args = parser.parse_args([tok for k, v in changed.items() for tok in _tokens(k, v)])
    from_flags = _config(args, cls)  # what the command does with its flags
    (tmp_path / "c.yaml").write_text(json.dumps(nest_dict(changed)))  # JSON is YAML
    from_yaml = load_config(cls, tmp_path / "c.yaml")
    assert from_flags == from_yaml and flat_dict(from_yaml) == changed


def _tokens(key, value):
    import shlex

    return shlex.split(flag(key, value))


def test_booleans_take_one_style_and_positionals_put_the_output_last():
    parser = build_parser()
    assert parser.parse_args(["demo", "--fresh"]).fresh is True
    assert parser.parse_args(["train", "--no-resume"]).resume is False
    with pytest.raises(SystemExit):  # the old `--flag true` form is gone
        parser.parse_args(["train", "--resume", "false"])
    merge = parser.parse_args(["cache", "merge", "a", "b", "out"])
    assert (merge.inputs, merge.output) == (["a", "b"], "out")
    subset = parser.parse_args(["cache", "subset", "in", "out", "--ids", "i.txt"])
    assert (subset.input, subset.output) == ("in", "out")


def test_help_loads_no_ml_library():
    """--help of every command imports neither torch, transformers, Ray nor pyarrow: it
    answers in a fraction of a second (docs/benchmarks.md, "Command line")."""
    code = ("import sys\nfrom mmkd.pipelines.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['teacher-pass', '--help'], ['demo', '--help'],"
            " ['eval', '--help'], ['recipe', '--help'], ['cache', 'merge', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'ray', 'pyarrow', 'deepspeed', 'datasets')"
            " if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out[-500:]
    assert "--report-to STR" in out and "input [input ...] output" in out


def test_max_length_defaults_to_the_students_limit(text_dir, tmp_path):
    from mmkd.common.models import load_processor
    from mmkd.student.train import max_length_of

    processor = load_processor(str(text_dir / "teacher"))
    built = TrainConfig()
    assert max_length_of(built, processor) == built.arch.max_positions  # the model build_student makes
    config = json.loads((text_dir / "teacher" / "config.json").read_text())
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1536}))
    assert max_length_of(TrainConfig(init_from=str(tmp_path / "m")), processor) == 1536
    assert max_length_of(TrainConfig(init_from=str(tmp_path / "m"), max_length=100), processor) == 100


FAKE_WANDB = '''
import json, os
class _Run:
    def __init__(self, **kw):
        self.kw, self.rows = kw, []
    def log(self, values, step=None, **kw):
        self.rows.append({"step": step, **values})
    def finish(self):
        with open(os.environ["FAKE_TRACKER_OUT"] + "/wandb.json", "w") as f:
            json.dump({"init": self.kw, "rows": self.rows, "config": config.values}, f)
class _Config:
    values = {}
    def update(self, values, allow_val_change=False):
        self.values.update(values)
config = _Config()
def init(**kw):
    return _Run(**kw)
'''
FAKE_MLFLOW = '''
import json, os
from types import SimpleNamespace
utils = SimpleNamespace(validation=SimpleNamespace(MAX_PARAM_VAL_LENGTH=6000, MAX_PARAMS_TAGS_PER_BATCH=100))
_state = {"params": {}, "metrics": []}
def search_experiments(filter_string=None):
    return []
def create_experiment(name, artifact_location=None, tags=None):
    _state["experiment"] = name
    return "1"
def start_run(run_id=None, experiment_id=None, run_name=None, nested=False, tags=None, description=None):
    _state["run_name"] = run_name
    return SimpleNamespace(info=SimpleNamespace(run_id="r"))
def log_params(params):
    _state["params"].update(params)
def log_metrics(metrics, step=None, **kw):
    _state["metrics"].append({"step": step, **metrics})
def end_run():
    with open(os.environ["FAKE_TRACKER_OUT"] + "/mlflow.json", "w") as f:
        json.dump(_state, f)
'''


def test_report_to_sends_every_step_to_wandb_and_mlflow(text_dir, tmp_path, monkeypatch):
    """W&B and MLflow (stand-in packages recording what accelerate's trackers hand them)
    get each step's scalars under the TensorBoard tags, at its step, and the run's config."""
    from mmkd.student.run_log import tag

    fakes = tmp_path / "site"
    for name, text in (("wandb", FAKE_WANDB), ("mlflow", FAKE_MLFLOW)):
        (fakes / name).mkdir(parents=True)
        (fakes / name / "__init__.py").write_text(text)
    monkeypatch.syspath_prepend(str(fakes))
    monkeypatch.setenv("FAKE_TRACKER_OUT", str(tmp_path))
    for name in ("wandb", "mlflow"):
        sys.modules.pop(name, None)
    teacher = str(text_dir / "teacher")
    out = tmp_path / "run"
    assert main(["train", "--processor", teacher, "--data", str(text_dir / "train.json"), *STUDENT,
                 "--batch-size", "8", "--num-workers", "0", "--save-every", "0", "--max-steps", "3", "--lr", "1e-3",
                 "--report-to", "wandb,mlflow", "--tracker-project", "proj", "--output-dir", str(out)]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    want = [{"step": r["step"], **{tag(k): v for k, v in r.items() if k != "step"}} for r in log]
    wandb, mlflow = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("wandb", "mlflow"))
    assert wandb["rows"] == want and wandb["init"]["project"] == "proj" and wandb["init"]["name"] == "run"
    assert mlflow["metrics"] == want and mlflow["experiment"] == "proj" and mlflow["run_name"] == "run"
    assert wandb["config"]["lr"] == 1e-3 and wandb["config"]["arch.text_hidden"] == 32
    assert mlflow["params"]["report_to"] == "wandb,mlflow"
    assert not (out / "tensorboard").exists()
    for name in ("wandb", "mlflow"):
        sys.modules.pop(name, None)


def test_report_to_refuses_unknown_and_missing_trackers(capsys, monkeypatch):
    import importlib.util

    base = ["train", "--processor", "p", "--data", "d.json", "--output-dir", "o"]
    assert main([*base, "--report-to", "tensorbored"]) == 2
    assert "--report-to 'tensorbored': unknown tracker 'tensorbored'" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main([*base, "--report-to", "tensorboard,wandb"]) == 2
    assert "wandb is not installed: pip install wandb" in capsys.readouterr().err


@pytest.mark.slow
def test_logs_off_a_terminal_are_lines(text_dir, tmp_path):
    """`mmkd train` writing to a file (no terminal): no carriage-return progress bar (its own
    or transformers' "Loading weights" / "Writing model shards"), log lines with an ETA."""
    teacher = str(text_dir / "teacher")
    # a fresh single-rank process (not this one's rendezvous settings), with Hugging Face's bars left as they come
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HF_HUB_DISABLE_PROGRESS_BARS",
            "HF_DATASETS_DISABLE_PROGRESS_BARS")
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "log.txt", "w") as f:
        subprocess.run([sys.executable, "-m", "mmkd.pipelines.cli", "train", "--init-from", teacher, "--processor",
                        teacher, "--data", str(text_dir / "train.json"), "--batch-size", "8", "--num-workers", "0",
                        "--save-every", "0", "--max-steps", "4", "--log-every", "2", "--report-to", "none",
                        "--output-dir", str(tmp_path / "run")], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                       check=True, timeout=300)
    text = (tmp_path / "log.txt").read_text()
    assert "\r" not in text and "Loading weights" not in text and "Writing model shards" not in text, text[-2000:]
    lines = [line for line in text.splitlines() if line.startswith("[train] step")]
    assert [line.split()[2] for line in lines] == ["2/4", "4/4"] and all(" eta " in line for line in lines)
    assert lines[-1].endswith("eta 0s")
    assert dataclasses.asdict(TrainConfig())["max_length"] == 0  # the run took the model's limit:
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["config"]["max_length"] == json.loads((Path(teacher) / "config.json").read_text()
                                                         )["max_position_embeddings"]
