"""Checkpoints of a training run and its exact resume.

A run in `output_dir` saves every `save_every` optimizer steps into

    output_dir/checkpoints/step{N:08d}/
        DeepSpeed's files (engine.save_checkpoint, tag step{N:08d}): model, optimizer and LR
            scheduler state, ZeRO partitions and MoE experts per rank
        rng_rank{r}.json     rank r's RNG states: python random, numpy, torch CPU (and CUDA)
        trainer_state.json   the position (optimizer step, epoch, micro-batches of the epoch
                             consumed, training seconds), the world size and
                             the config fields that change the math

trainer_state.json is written last, atomically, once every rank has finished its files: it
marks the checkpoint complete. A folder without it (a save cut short by a kill) is never
loaded. DeepSpeed's own `latest` file is not used: rank 0 writes it when its own files are
done, before the other ranks' are (the barrier comes after), and in place (a kill can leave
it empty).

Resume (`resume`, default true) continues from the latest complete checkpoint: weights,
optimizer, scheduler and RNG states are restored, and the epoch's deterministic batch list
(storage.plan: this rank's micro-batches) is sliced after the micro-batches already consumed, so nothing
is re-read and the loss curve continues as if the run had never stopped.

Loading runs no code: our files are JSON. DeepSpeed's files are torch pickles, which its
TorchCheckpointEngine opens with torch.load(weights_only=False); restore() forces weights-only
loading around it (TORCH_FORCE_WEIGHTS_ONLY_LOAD), allowing only the few plain DeepSpeed
classes its ZeRO optimizer state holds (SAFE_DEEPSPEED_CLASSES).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mmkd.common.config import ConfigError, to_dict
from mmkd.storage.fs import write_atomic

CHECKPOINTS = "checkpoints"  # folder under output_dir
STATE = "trainer_state.json"  # the completion marker of one checkpoint
SUMMARY = "train_summary.json"  # written by train() when the run has finished
LOG = "train_log.jsonl"  # one JSON line per optimizer step
# TrainConfig fields that do not change what is computed; every other field must match to resume.
# (Gradient checkpointing recomputes the same activations; where the scalars are reported changes nothing.)
NOT_MATH = ("output_dir", "log_every", "save_every", "keep_checkpoints", "resume", "num_workers", "keep_encoded",
            "report_to", "tracker_project", "run_name", "gradient_checkpointing")


@dataclass
class Position:
    """Where a run stands after an optimizer step.

    step: optimizer steps done; epoch: the epoch the step is in; batch: micro-batches of that
    epoch's micro-batches (this rank's, from the epoch plan) consumed; wall_s: seconds spent
    training so far.
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    wall_s: float = 0.0


def math_config(config: dict, prefix: str = "") -> dict:
    """The fields of a TrainConfig (its YAML form, common.config.to_dict) that change the
    math, flattened to dotted names ("arch.text_hidden")."""
    flat = {}
    for key, value in config.items():
        if not prefix and key in NOT_MATH:
            continue
        if isinstance(value, dict):
            flat.update(math_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_same_run(saved: dict, cfg, what: str) -> None:
    """Refuse to continue `what` (a checkpoint or a finished run, saved with the TrainConfig
    dict `saved`) under a config whose math differs, naming each differing field."""
    old, new = math_config(saved), math_config(to_dict(cfg))
    diff = [f"{k}: {old.get(k, '(absent)')!r} there, {new.get(k, '(absent)')!r} now"
            for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    if diff:
        raise ConfigError(f"{what} was made with another config ({'; '.join(diff)}); it cannot be continued "
                          f"with this one. Use a new output_dir, or resume: false (--no-resume) to train from step 0 "
                          f"in {cfg.output_dir}, replacing its run")


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """The complete checkpoint folders of `out_dir`, oldest first."""
    root = out_dir / CHECKPOINTS
    found = [d for d in root.glob("step*") if (d / STATE).exists()] if root.is_dir() else []
    return sorted(found, key=lambda d: d.name)


def _remove(folder: Path) -> None:
    # The marker goes first: a kill halfway leaves an incomplete folder, never a broken complete one.
    (folder / STATE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def find_resume(cfg, world: int, rank: int, log=print) -> tuple[dict | None, Path | None]:
    """What output_dir holds for this run, before any work is done:
    (summary, None) for a finished run (train_summary.json), which is not trained again;
    (None, folder) for the latest complete checkpoint to continue from; (None, None) to start
    at step 0. A finished run or checkpoint made with another config (check_same_run) or
    another world size is refused. resume=false starts over: rank 0 deletes the folder's
    checkpoints and summary. Rank 0 also deletes incomplete checkpoint folders.
    """
    out_dir = Path(cfg.output_dir)
    if not cfg.resume:
        if rank == 0:
            shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
            (out_dir / SUMMARY).unlink(missing_ok=True)
        return None, None
    if (out_dir / SUMMARY).exists():
        summary = json.loads((out_dir / SUMMARY).read_text())
        check_same_run(summary["config"], cfg, f"the finished run in {out_dir}")
        log(f"[train] {out_dir} holds a finished run ({summary['steps']} steps): not training again "
            "(--no-resume retrains)")
        return summary, None
    complete = complete_checkpoints(out_dir)
    if rank == 0:
        for d in (out_dir / CHECKPOINTS).glob("step*"):
            if d not in complete:
                _remove(d)
    if not complete:
        return None, None
    latest = complete[-1]
    state = json.loads((latest / STATE).read_text())
    check_same_run(state["config"], cfg, f"the checkpoint {latest}")
    if state["world_size"] != world:
        raise ConfigError(f"the checkpoint {latest} was made by {state['world_size']} ranks, this run has {world}: "
                          "the ranks' batches would differ. Resume with the same number of ranks, or use a new "
                          "output_dir (or --no-resume)")
    return None, latest


def _rng_state() -> dict:
    """This process's RNG states as JSON-able lists."""
    version, mt, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [name, key.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# (module, class) of the non-tensor objects in DeepSpeed 0.19's checkpoint files (ZeRO 1/2
# optimizer state, fp32 and bf16): data holders without code of their own. A DeepSpeed that
# pickles another class fails to resume with torch's UnpicklingError naming it.
SAFE_DEEPSPEED_CLASSES = (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                          ("deepspeed.utils.tensor_fragment", "fragment_address"),
                          ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"))


@contextmanager
def _weights_only_loading():
    """Every torch.load inside loads weights only (tensors, containers and the
    SAFE_DEEPSPEED_CLASSES), also where the caller (DeepSpeed) asks for weights_only=False."""
    import importlib

    allowed = [getattr(importlib.import_module(m), name) for m, name in SAFE_DEEPSPEED_CLASSES]
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def restore(engine, folder: Path | None, out_dir: Path, rank: int, log=print) -> Position:
    """Load the checkpoint `folder` (from find_resume; None = a fresh start) into the
    DeepSpeed engine and this process's RNGs, and cut out_dir's train_log.jsonl back to its
    step (the later steps are redone; a fresh start empties it). Returns the position to
    continue from."""
    pos, kept = Position(), []
    if folder is not None:
        with _weights_only_loading():
            load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if load_path is None:
            raise ConfigError(f"{folder}: DeepSpeed found no checkpoint files in this complete checkpoint; delete "
                              "the folder to resume from the one before, or --no-resume")
        pos = Position(**json.loads((folder / STATE).read_text())["position"])
        _set_rng_state(json.loads((folder / f"rng_rank{rank}.json").read_text()))
        log(f"[train] resuming from step {pos.step} (epoch {pos.epoch}, batch {pos.batch}) of {folder}")
    log_path = Path(out_dir) / LOG
    if rank == 0 and folder is not None and log_path.exists():
        for line in log_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] > pos.step:
                    break
            except (json.JSONDecodeError, KeyError):  # a line cut short by the kill
                break
            kept.append(line + "\n")
    if rank == 0:
        write_atomic(log_path, "".join(kept))
    return pos


def save(engine, cfg, pos: Position, rank: int, world: int) -> Path:
    """Checkpoint the run at `pos` (call on every rank, right after an optimizer step); then
    keep only the newest cfg.keep_checkpoints. Returns the checkpoint folder."""
    root = Path(cfg.output_dir) / CHECKPOINTS
    tag = f"step{pos.step:08d}"
    folder = root / tag
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)  # ends with a barrier
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"rng_rank{rank}.json", json.dumps(_rng_state()))
    for f in folder.rglob("*"):  # on disk before the marker says so (power loss, not only a kill)
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    torch.distributed.barrier()  # every rank's files are written
    if rank == 0:
        mark_complete(folder, cfg, pos, world)
        for old in complete_checkpoints(Path(cfg.output_dir))[:-cfg.keep_checkpoints]:
            _remove(old)
    return folder


def mark_complete(folder: Path, cfg, pos: Position, world: int) -> None:
    """Write the checkpoint folder's trainer_state.json (atomically): from now on it is
    loaded. Called once every rank's files in it are on disk."""
    state = {"position": asdict(pos), "world_size": world, "config": to_dict(cfg)}
    write_atomic(folder / STATE, json.dumps(state, indent=1))


def remove_checkpoints(out_dir: Path) -> None:
    """A finished run (train_summary.json written) needs its checkpoints no more."""
    shutil.rmtree(Path(out_dir) / CHECKPOINTS, ignore_errors=True)
