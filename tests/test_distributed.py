"""Data-parallel training (student/parallel.py, student/optim.py): the loss curve does not
depend on how the global batch is split over ranks and accumulation micro-batches; ZeRO-3,
bf16, MoE with ZeRO 2 (and its refusal with ZeRO 3), the optimizer and LR schedule."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmkd.student.parallel
import mmkd.student.train
from mmkd.common.config import InputsConfig, load_config, to_dict
from mmkd.pipelines.cli import build_parser
from mmkd.student.config import MoEConfig, TrainConfig
from mmkd.student.optim import build_optimizer, build_scheduler
from mmkd.student.train import check_config, train

from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]
TERMS = ("loss", "ce", "kd", "visual_kd", "relation")
STEPS = 10  # 40 samples, global batch 8, 2 epochs
ABS_TOL = {"relation": 1e-6}
# lr 3e-3 x (warmup over max(1, int(0.2 x 10)) = 2 steps, then linear to 0 at step 10)
LRS = [3e-3 * f for f in (0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)]


@pytest.fixture(scope="module")
def base(demo_dir, processor_dir, small_cache):
    """A stage with every token-mean term (CE, response KD, visual KD, per-sample RDist)."""
    return TrainConfig(inputs=InputsConfig(str(demo_dir / "train.json"), str(demo_dir)), processor=str(processor_dir),
                       cache=str(small_cache), arch=TINY, num_workers=0, epochs=2, lr=3e-3, lr_schedule="linear",
                       warmup_ratio=0.2, ce_weight=1.0, kd_weight=1.0, visual_weight=1.0, relation_weight=1.0,
                       log_every=1000, data_streams=2)  # 2 streams: 1 rank and 2 ranks read the same global batches


def _run(cfg: TrainConfig) -> tuple[list[dict], dict]:
    train(cfg, log=lambda *_: None)
    return _read(cfg.output_dir)


def _read(out) -> tuple[list[dict], dict]:
    out = Path(out)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return log, json.loads((out / "train_summary.json").read_text())


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """1 rank, batch 8 (= the global batch): the curve the other splits must reproduce."""
    return _run(dataclasses.replace(base, batch_size=8, output_dir=str(tmp_path_factory.mktemp("ref"))))


def assert_same_curve(got: list[dict], want: list[dict]) -> None:
    """Equal within float32 rounding: 1e-5 relative, or 2e-7 absolute for the small KL terms
    (differences of log-probs of size ~4, so their rounding error is absolute; measured
    up to 6e-8), 1e-6 for RDist's 1 - cos of fp32 Gram products (measured 4.8e-7 at step 10,
    with the micro-batches' rows taken from two streams in another grouping; a per-micro-batch
    mean instead of the global one would be off by ~1e-2)."""
    assert len(got) == len(want) == STEPS
    for g, w in zip(got, want):
        for k in TERMS:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=ABS_TOL.get(k, 2e-7)), (g["step"], k, g[k], w[k])
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-12)


def test_reference_run_logs_the_schedule_and_learns(reference):
    log, summary = reference
    assert [r["lr"] for r in log] == pytest.approx(LRS, rel=1e-12)
    assert summary["micro_batches_per_rank"] == [STEPS]
    assert log[-1]["loss"] < log[0]["loss"]
    # the logged loss is the weighted sum of the logged global terms
    assert log[3]["loss"] == pytest.approx(sum(log[3][k] for k in TERMS[1:]), rel=1e-9)


def test_grad_accumulation_equals_the_full_batch(base, reference, tmp_path):
    """1 rank, batch 4 x grad_accum 2: the supervised-token counts of the two halves differ,
    so per-micro-batch means would give another curve."""
    log, summary = _run(dataclasses.replace(base, batch_size=4, grad_accum=2, output_dir=str(tmp_path)))
    assert_same_curve(log, reference[0])
    assert summary["micro_batches_per_rank"] == [2 * STEPS]


def partition_all(cfg: TrainConfig) -> dict:
    """The DeepSpeed config, with ZeRO-3 partitioning every parameter: below its default
    persistence threshold (1e5 elements) it keeps parameters whole, all of the tiny model's."""
    ds = mmkd.student.parallel.deepspeed_config(cfg)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return ds


def test_zero3_equals_stage_0(base, reference, tmp_path, monkeypatch):
    """ZeRO-3 with every parameter partitioned, the output head included (the student
    wrapper reads its weight outside the head's forward): stage 0's loss curve, and the
    saved model (gathered from the partitions) is stage 0's."""
    monkeypatch.setattr(mmkd.student.train, "deepspeed_config", partition_all)
    log, _ = _run(dataclasses.replace(base, batch_size=8, zero_stage=3, output_dir=str(tmp_path)))
    assert_same_curve(log, reference[0])
    want = load_file(Path(reference[1]["config"]["output_dir"]) / "model.safetensors")
    got = load_file(tmp_path / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        # The attention key biases get a gradient that is 0 up to rounding (softmax ignores them), which
        # Adam scales up to ~lr per step: they differ by rounding noise (measured 3e-5, and 1.3e-4 with the
        # fused head, whose sums run in another order); every other parameter agrees within 5e-7.
        tol = 3e-4 if name.endswith("k_proj.bias") else 1e-4
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=tol), name


# Each rank: `mmkd train --config` once per config file, in one process (start-up is most
# of the time), with ZeRO-3 partitioning every parameter.
RANK_SCRIPT = """
import sys
import mmkd.student.train
from mmkd.pipelines.cli import main
from tests.test_distributed import partition_all
mmkd.student.train.deepspeed_config = partition_all
for config in sys.argv[1:]:
    assert main(["train", "--config", config]) == 0
"""


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_the_same_global_batch(base, reference, tmp_path):
    """torchrun, 2 CPU ranks (gloo) x batch 4, ZeRO 0, 2 and 3: the loss curve of 1 rank x
    batch 8, and both ranks run the same number of micro-batches."""
    configs = []
    for stage in (0, 2, 3):
        cfg = dataclasses.replace(base, batch_size=4, zero_stage=stage, output_dir=str(tmp_path / f"zero{stage}"))
        configs.append(tmp_path / f"zero{stage}.yaml")
        configs[-1].write_text(json.dumps(to_dict(cfg)))  # JSON is YAML
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    # a fresh launch: not the single-rank rendezvous settings this test process set up
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *map(str, configs)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(f"micro-batches per rank: [{STEPS}, {STEPS}]") == 3
    for stage in (0, 2, 3):
        log, summary = _read(tmp_path / f"zero{stage}")
        assert summary["micro_batches_per_rank"] == [STEPS, STEPS]
        assert_same_curve(log, reference[0])


def test_bf16_trains(base, reference, tmp_path):
    """DeepSpeed's bf16 mode (bf16 weights and activations, fp32 master weights) learns,
    along the fp32 curve to bf16 precision."""
    log, _ = _run(dataclasses.replace(base, batch_size=8, dtype="bfloat16", output_dir=str(tmp_path)))
    loss, fp32 = [r["loss"] for r in log], [r["loss"] for r in reference[0]]
    assert all(math.isfinite(v) for v in loss)
    assert loss == pytest.approx(fp32, rel=0.03)  # measured: within 1.1%
    assert sum(loss[-3:]) < 0.95 * sum(loss[:3])  # measured: 0.90


def test_moe_student_trains_with_zero_2_and_is_refused_with_zero_3(base, teacher_dir, tmp_path):
    moe = dataclasses.replace(base, init_from=str(teacher_dir), upcycle=True, moe=MoEConfig(every=1), trainable="moe", batch_size=4,
                              grad_accum=2, max_steps=3, zero_stage=2, output_dir=str(tmp_path / "z2"))
    log, _ = _run(moe)
    assert len(log) == 3 and all(math.isfinite(r["loss"]) and r["moe_aux"] > 0 for r in log)
    with pytest.raises(ValueError, match="zero_stage 3 cannot train an MoE student.*zero_stage 1 or 2"):
        train(dataclasses.replace(moe, zero_stage=3, output_dir=str(tmp_path / "z3")), log=lambda *_: None)


@pytest.mark.parametrize("schedule,factors", [
    # 10 steps, warmup_ratio 0.25 -> 2 warmup steps; then p = (s - 2) / 8
    ("cosine", [0.5, 1.0, 1.0, 0.961940, 0.853553, 0.691342, 0.5, 0.308658, 0.146447, 0.038060]),
    ("linear", [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]),
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_lr_schedules(schedule, factors):
    cfg = TrainConfig(lr=0.1, lr_schedule=schedule, warmup_ratio=0.25)
    opt = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * f for f in factors], abs=1e-7)


def test_optimizer_settings_from_flags_and_bad_values_named():
    args = build_parser().parse_args(["train", "--optimizer", "adam", "--adam-beta2", "0.95", "--adam-epsilon",
                                      "1e-6", "--lr-schedule", "constant", "--weight-decay", "0.1"])
    cfg = load_config(TrainConfig, None, {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")})
    opt = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], cfg)
    assert type(opt) is torch.optim.Adam
    g = opt.param_groups[0]
    assert g["betas"] == (0.9, 0.95) and g["eps"] == 1e-6 and g["weight_decay"] == 0.1
    assert type(build_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainConfig())) is torch.optim.AdamW
    for bad, named in ((dict(optimizer="sgd"), "--optimizer 'sgd'"), (dict(lr_schedule="step"), "--lr-schedule 'step'"),
                       (dict(zero_stage=4), "--zero-stage 4"), (dict(dtype="float16"), "--dtype 'float16'"),
                       (dict(grad_accum=0), "--grad-accum 0")):
        with pytest.raises(ValueError, match=named):
            check_config(TrainConfig(**bad))
