"""Checkpoints and exact resume of student training (student/checkpoint.py).

The end-to-end test kills `mmkd train` (SIGKILL) once a mid-epoch checkpoint exists, runs
the same command again, and compares the whole loss curve and the final weights with an
uninterrupted run of the same command: on the CPU they are equal, bit for bit.
"""

import dataclasses
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmkd.common.config import ConfigError, InputsConfig, flag, to_dict
from mmkd.student import checkpoint
from mmkd.student.config import TrainConfig
from mmkd.student.run_log import GROUPS
from mmkd.student.train import train

from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]
# a fresh single-rank process each time: not the rendezvous settings this test process may hold
ENV = {**{k: v for k, v in os.environ.items()
          if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")},
       "PYTHONPATH": str(REPO)}
STEPS_PER_EPOCH = 10  # 40 demo training samples, 4 per optimizer step


def _flags(cfg: TrainConfig) -> list[str]:
    """The `mmkd train` command line of cfg (every field, nested ones dotted)."""
    flat = checkpoint.math_config(to_dict(cfg))
    flat.update({k: getattr(cfg, k) for k in checkpoint.NOT_MATH})
    args = []
    for key, value in flat.items():
        if value is not None:
            args += shlex.split(flag(key, value))
    return [sys.executable, "-m", "mmkd.pipelines.cli", "train", *args]


def _run(cfg: TrainConfig, stdout: Path) -> subprocess.Popen:
    return subprocess.Popen(_flags(cfg), cwd=REPO, env=ENV, stdout=open(stdout, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _log(out: Path) -> list[dict]:
    """train_log.jsonl without the timing columns (student.run_log: the perf/ group)."""
    rows = [json.loads(line) for line in (out / checkpoint.LOG).read_text().splitlines()]
    return [{k: v for k, v in r.items() if GROUPS.get(k) != "perf"} for r in rows]


def _latest_step(out: Path) -> int:
    done = checkpoint.complete_checkpoints(out)
    return json.loads((done[-1] / checkpoint.STATE).read_text())["position"]["step"] if done else 0


@pytest.mark.slow
@pytest.mark.parametrize("student", ["dense", "moe"])
def test_killed_run_resumes_to_the_uninterrupted_result(student, small_cache, demo_dir, processor_dir,
                                                        teacher_dir, tmp_path):
    """2 epochs of 10 optimizer steps, CE + response KD, one loader process, a checkpoint
    every 3 steps (never at an epoch boundary). The dense student accumulates 2 micro-batches
    per step. The MoE student (upcycled from the tiny teacher, 4 experts, top-2) draws from
    the torch RNG every step (second expert sampled, random token selection over capacity),
    so its curve continues only if the RNG states are restored."""
    kw = dict(inputs=InputsConfig(str(demo_dir / "train.json"), str(demo_dir)), processor=str(processor_dir),
              cache=str(small_cache), arch=TINY, epochs=2, batch_size=2, grad_accum=2, lr=3e-3, num_workers=1,
              log_every=1000, save_every=3, keep_checkpoints=2)
    if student == "moe":
        kw.update(init_from=str(teacher_dir), upcycle=True, trainable="moe", batch_size=4, grad_accum=1,
                  moe=dataclasses.replace(TrainConfig().moe, every=1))
    ref = TrainConfig(output_dir=str(tmp_path / "uninterrupted"), **kw)
    cfg = TrainConfig(output_dir=str(tmp_path / "killed"), **kw)
    out = Path(cfg.output_dir)

    # The uninterrupted run and the one to kill start together (their start-ups overlap).
    # Kill once a checkpoint exists and the log has gone past it (those lines are redone).
    uninterrupted = _run(ref, tmp_path / "ref.txt")
    proc = _run(cfg, tmp_path / "killed.txt")
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        step = _latest_step(out)
        if step and (out / checkpoint.LOG).exists() and len((out / checkpoint.LOG).read_text().splitlines()) > step:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=30) == -signal.SIGKILL, (tmp_path / "killed.txt").read_text()[-3000:]
    assert not (out / checkpoint.SUMMARY).exists()
    resumed_at = _latest_step(out)
    assert 0 < resumed_at < 2 * STEPS_PER_EPOCH and resumed_at % STEPS_PER_EPOCH  # mid-epoch
    # (+1: the kill may fall between a new checkpoint's marker and the deletion of the oldest)
    assert len(checkpoint.complete_checkpoints(out)) <= cfg.keep_checkpoints + 1
    assert uninterrupted.wait(timeout=120) == 0, (tmp_path / "ref.txt").read_text()[-3000:]
    assert len(_log(Path(ref.output_dir))) == 2 * STEPS_PER_EPOCH

    # The same command again: it continues from that checkpoint to the end.
    assert _run(cfg, tmp_path / "resumed.txt").wait(timeout=120) == 0, (tmp_path / "resumed.txt").read_text()[-3000:]
    text = (tmp_path / "resumed.txt").read_text()
    epoch, steps_in_epoch = divmod(resumed_at, STEPS_PER_EPOCH)
    batch = steps_in_epoch * cfg.grad_accum  # micro-batches
    assert f"[train] resuming from step {resumed_at} (epoch {epoch}, batch {batch})" in text

    assert _log(out) == _log(Path(ref.output_dir))  # every step: loss, each term, lr
    # TensorBoard: the steps logged after the checkpoint and redone appear once, with the redone values
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in _log(out)], rel=1e-6)
    got, want = load_file(out / "model.safetensors"), load_file(Path(ref.output_dir) / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not (out / checkpoint.CHECKPOINTS).exists()  # a finished run keeps no checkpoints

    # A finished run is not trained again (no engine is built: the summary comes back as is).
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    summary = train(cfg, log=lambda *_: None)
    assert summary == json.loads((out / checkpoint.SUMMARY).read_text())
    assert summary["steps"] == 2 * STEPS_PER_EPOCH and (out / "model.safetensors").stat().st_mtime_ns == mtime
    # the summary counts the micro-batches of the whole run, before the kill included
    assert summary["micro_batches_per_rank"] == json.loads((Path(ref.output_dir) / checkpoint.SUMMARY).read_text()
                                                           )["micro_batches_per_rank"]


def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    cfg = TrainConfig(inputs=InputsConfig(data="d.json"), processor="p", output_dir=str(tmp_path), save_every=3,
                      lr=1e-3)
    folder = tmp_path / checkpoint.CHECKPOINTS / "step00000003"
    folder.mkdir(parents=True)
    checkpoint.mark_complete(folder, cfg, checkpoint.Position(3, 0, 3, 1.0), world=1)
    half = tmp_path / checkpoint.CHECKPOINTS / "step00000006"  # a save cut short: no marker
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"partial")

    # Fields that do not change the math may differ; the incomplete folder is never loaded.
    same = dataclasses.replace(cfg, log_every=7, num_workers=0, save_every=5, keep_checkpoints=1, report_to="wandb",
                               run_name="again")
    assert checkpoint.find_resume(same, world=1, rank=1) == (None, folder)
    assert half.exists()  # only rank 0 cleans up
    assert checkpoint.find_resume(same, world=1, rank=0) == (None, folder)
    assert not half.exists()

    other = dataclasses.replace(cfg, lr=5e-4, arch=dataclasses.replace(cfg.arch, text_hidden=64))
    with pytest.raises(ConfigError) as e:
        checkpoint.find_resume(other, world=1, rank=0)
    msg = str(e.value)
    assert "arch.text_hidden: 128 there, 64 now" in msg and "lr: 0.001 there, 0.0005 now" in msg
    assert "log_every" not in msg and "new output_dir" in msg and "--no-resume" in msg
    with pytest.raises(ConfigError, match="made by 1 ranks, this run has 2"):
        checkpoint.find_resume(cfg, world=2, rank=0)

    # A finished run of another config is refused too; of the same config, returned as is.
    (tmp_path / checkpoint.SUMMARY).write_text(json.dumps({"steps": 9, "config": to_dict(cfg)}))
    with pytest.raises(ConfigError, match="finished run .* lr: 0.001 there, 0.0005 now"):
        checkpoint.find_resume(other, world=1, rank=0)
    assert checkpoint.find_resume(same, world=1, rank=0)[0]["steps"] == 9

    # resume=false starts over: the checkpoints and the summary are gone.
    assert checkpoint.find_resume(dataclasses.replace(other, resume=False), world=1, rank=0) == (None, None)
    assert not (tmp_path / checkpoint.CHECKPOINTS).exists() and not (tmp_path / checkpoint.SUMMARY).exists()


def test_rng_states_round_trip_through_json():
    """After restoring, every generator repeats the draws it made after the save."""
    def draws():
        return (random.random(), np.random.rand(), torch.rand(3).tolist(), np.random.randn())

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # numpy caches the second Gaussian of a pair: part of its state
    saved = json.loads(json.dumps(checkpoint._rng_state()))
    first = draws()
    draws()
    checkpoint._set_rng_state(saved)
    assert draws() == first


def test_deepspeed_files_load_weights_only(tmp_path):
    """Around DeepSpeed's torch.load(weights_only=False), restore() loads weights only: the
    DeepSpeed classes of a ZeRO optimizer state load, any other object is refused."""
    import datetime
    import pickle

    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    torch.save({"loss_scaler": LossScaler(1.0), "w": torch.ones(2)}, tmp_path / "zero.pt")
    torch.save({"when": datetime.date(2026, 1, 1)}, tmp_path / "other.pt")
    with checkpoint._weights_only_loading():
        assert torch.load(tmp_path / "zero.pt", weights_only=False)["loss_scaler"].cur_scale == 1.0
        with pytest.raises(pickle.UnpicklingError, match="datetime"):
            torch.load(tmp_path / "other.pt", weights_only=False)
    assert torch.load(tmp_path / "other.pt", weights_only=False)["when"].year == 2026  # only inside
