"""What a training run records, on rank 0: one JSON line per optimizer step
(output_dir/train_log.jsonl), the same values to the trackers of `report_to` (TensorBoard in
output_dir/tensorboard/, Weights & Biases, MLflow: accelerate's tracker classes), and a
progress bar on a terminal (on anything else, such as a log file, a line every log_every
steps, with the time elapsed and the estimated time left).

A step's record, by JSON key (tracker tag in brackets):

    step             optimizer step, from 1 (the scalars' x axis)
    epoch            epoch, from 0                                          [progress/epoch]
    loss             the weighted sum of the terms: the function whose
                     gradient the step applied                              [train/loss]
    ce, kd, visual_kd, relation, moe_aux, dpo | kto_pair, margin
                     each loss term of the stage, unweighted (those the
                     stage uses; student.train.distill_terms / preference_terms),
                     its mean over the step's global batch (all ranks and
                     micro-batches; student.parallel)                       [train/<term>]
    lr               the learning rate the step used                        [opt/lr]
    step_s           wall seconds of the step, all its micro-batches        [perf/step_s]
    data_wait        fraction of step_s spent blocked on the data loader    [perf/data_wait]
    samples_per_s    this step's samples (preference: pairs) per second     [perf/samples_per_s]
    tokens_per_s     this step's supervised tokens per second               [perf/tokens_per_s]

Throughputs are rank 0's (every rank trains as many samples per step; multiply by the world
size for the whole run's). data_wait near 0 means the loader workers keep up with the step;
a large value means the step waits for data (more `num_workers`, or `keep_encoded` for small
data sets). The first step of an epoch includes starting the loader's worker processes.

W&B and MLflow are configured the way their own tools are (WANDB_API_KEY, WANDB_MODE,
MLFLOW_TRACKING_URI, ...); the run's settings are stored there as its configuration.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mmkd.common.units import format_duration

LOG_NAME = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"
# report_to's trackers: the package each needs (accelerate.tracking drives them)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# TensorBoard group of each non-loss key; every other key (loss and the terms) is train/<key>.
GROUPS = {"epoch": "progress", "lr": "opt", "step_s": "perf", "data_wait": "perf", "samples_per_s": "perf",
          "tokens_per_s": "perf"}


def tag(key: str) -> str:
    """The TensorBoard tag of a record key: 'kd' -> 'train/kd', 'lr' -> 'opt/lr'."""
    return f"{GROUPS.get(key, 'train')}/{key}"


def is_loss_key(key: str) -> bool:
    """loss and the loss terms (train/... tags), as opposed to step, epoch, lr and timings."""
    return key != "step" and key not in GROUPS


class StepClock:
    """Wall time per optimizer step, and the part of it spent waiting for the data loader.

    Iterate the loader through `batches(loader)`; call `lap(samples, tokens)` once per
    optimizer step. Waiting is the time `iter(loader)` (which starts the worker processes)
    and each `next()` block; all the rest (forward, backward, optimizer, logging) is work.
    On a GPU the step's logged values (student.parallel.StepMeans.logged) synchronise at
    its end, so the work is measured as run, not as queued.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self._start = clock()
        self._wait = 0.0

    def batches(self, loader: Iterable) -> Iterator:
        t = self.clock()
        it = iter(loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self._wait += self.clock() - t
            yield batch
            t = self.clock()

    def lap(self, samples: int, tokens: int) -> dict[str, float]:
        """The step that just ended: step_s, data_wait (fraction of step_s), samples_per_s
        and tokens_per_s for the samples and supervised tokens it trained on."""
        now = self.clock()
        step_s = max(now - self._start, 1e-9)
        out = {"step_s": step_s, "data_wait": min(1.0, self._wait / step_s), "samples_per_s": samples / step_s,
               "tokens_per_s": tokens / step_s}
        self._start, self._wait = now, 0.0
        return out


def parse_report_to(value: str) -> list[str]:
    """report_to's comma list as tracker names ("none" or "" = none); ValueError naming an
    unknown tracker or a missing package, with the pip command."""
    names = [n.strip() for n in value.split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)} or none")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ValueError(f"{name} is not installed: pip install {TRACKERS[name]}, or leave {name} out")
    return names


def open_trackers(names: list[str], out_dir: Path, resume_step: int, project: str, run_name: str,
                  config: dict | None) -> list:
    """Started accelerate trackers for `names`. TensorBoard writes out_dir/tensorboard
    (replaced, unless resume_step > 0: then the scalars of steps >= resume_step + 1, which are
    redone, are dropped); W&B and MLflow get the run as `run_name` in `project` (W&B project,
    MLflow experiment) with `config` (flat {key: scalar}) as its configuration."""
    from accelerate import PartialState
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if names:
        PartialState()  # accelerate's trackers log through it; in a DeepSpeed run it reads the existing process group
    trackers = []
    for name in names:
        if name == "tensorboard":
            folder = out_dir / TENSORBOARD_DIR
            if not resume_step:
                shutil.rmtree(folder, ignore_errors=True)  # old event files would mix two runs' curves
            tracker = TensorBoardTracker("", folder, flush_secs=30, purge_step=resume_step + 1 if resume_step else None)
        elif name == "wandb":
            tracker = WandBTracker(project, name=run_name, dir=str(out_dir))
        else:
            tracker = MLflowTracker(experiment_name=project, run_name=run_name)
        # only rank 0 opens a RunLog: every call runs here, not through accelerate's main-process test
        tracker.main_process_only = False
        tracker.start()
        if config and name != "tensorboard":  # TensorBoard's hparams would add a run folder of their own
            tracker.store_init_configuration(config)
        trackers.append(tracker)
    return trackers


class RunLog:
    """Rank 0's record of a run: `step(record)` once per optimizer step, `close()` at the end.

    out_dir: the run's output_dir; train_log.jsonl (and TensorBoard's folder) are replaced (a
    run in the same folder starts a new record), unless resume_step > 0: a run resumed from
    the checkpoint of that step appends to the log (student.checkpoint.restore has cut it
    back to that step). total_steps: the run's optimizer steps (the bar's length).
    report_to: tracker names (parse_report_to), opened by open_trackers with project,
    run_name (default: out_dir's name) and config. bar: show a tqdm progress bar on stdout;
    None = when stdout is a terminal. Without the bar, `log` gets a line every log_every
    steps and at the last step.
    """

    def __init__(self, out_dir: Path, total_steps: int, log_every: int, report_to: list[str] = ("tensorboard",),
                 log: Callable[[str], None] = print, bar: bool | None = None, resume_step: int = 0,
                 project: str = "mmkd", run_name: str = "", config: dict | None = None):
        self.total_steps, self.log_every, self.log = total_steps, log_every, log
        self.start, self.first_step = time.perf_counter(), resume_step
        # line-buffered: readable while training, and on disk before the next checkpoint
        self.file = open(Path(out_dir) / LOG_NAME, "a" if resume_step else "w", buffering=1)
        self.trackers = open_trackers(list(report_to), Path(out_dir), resume_step, project,
                                      run_name or Path(out_dir).resolve().name, config)
        self.bar = None
        if sys.stdout.isatty() if bar is None else bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=resume_step, desc="train", unit="step", file=sys.stdout,
                            dynamic_ncols=True)

    def step(self, record: dict) -> None:
        """record: the step's scalars (module docstring); 'step' is required."""
        step = record["step"]
        self.file.write(json.dumps(record) + "\n")
        scalars = {tag(key): value for key, value in record.items() if key != "step"}
        for tracker in self.trackers:
            tracker.log(scalars, step=step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                 wait=f"{record['data_wait']:.0%}", refresh=False)
            self.bar.update(1)
        elif step % self.log_every == 0 or step == self.total_steps:
            self.log(self.line(record))

    def line(self, record: dict) -> str:
        """The log line of a step: its loss and terms, lr, rates, time elapsed and the time
        left at this run's mean step time so far."""
        terms = " ".join(f"{k} {v:.4f}" for k, v in record.items() if is_loss_key(k) and k != "loss")
        elapsed = time.perf_counter() - self.start
        done = max(record["step"] - self.first_step, 1)
        eta = elapsed / done * (self.total_steps - record["step"])
        return (f"[train] step {record['step']}/{self.total_steps} loss {record['loss']:.4f} ({terms}) "
                f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} sup-tok/s {record['samples_per_s']:.1f} "
                f"samples/s data wait {record['data_wait']:.0%} elapsed {format_duration(elapsed)} "
                f"eta {format_duration(eta)}")

    def close(self) -> None:
        self.file.close()
        for tracker in self.trackers:
            tracker.finish()
        if self.bar is not None:
            self.bar.close()


def read_train_log(run_dir: str | Path) -> list[dict]:
    """The records of run_dir/train_log.jsonl, in step order; a clear error when the file
    is missing, empty or not JSON lines."""
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {LOG_NAME}; give the output_dir of an `mmkd train` run (each "
                                "recipe stage has its own: <workdir>/<stage>)")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON line ({e}); the file is not a training log") from e
    if not records:
        raise ValueError(f"{path}: no steps logged yet")
    return records
