"""Stage recipes: a YAML file that chains training stages, each a student.config.TrainConfig.

    name: llava-kd
    workdir: "{root}/llava_kd"          # stage s writes its model to workdir/s
    init_from: runs/demo/student_ce     # the first stage starts from this model (optional)
    defaults: {data: ..., cache: ..., lr: ...}   # TrainConfig fields shared by every stage
    stages:
      - {name: dpt, trainable: projector, visual_weight: 1.0, relation_weight: 1.0}
      - {name: sft, trainable: llm+projector, kd_weight: 0.0, cache: null}
      ...

"{root}" in any string value is replaced by the root given on the command line (default
runs/demo, where `mmkd demo` leaves its data, processor and caches), so one recipe file
serves the demo, the micro demo and the tests. Stage i's config = defaults < the stage's own keys, with output_dir = workdir/<name> and
init_from = the previous stage's output (stage 0: the recipe's init_from, if any). A stage
whose folder already holds train_summary.json is done and skipped, so re-running the
recipe resumes after the last finished stage, and a stage cut short continues from its
latest checkpoint (fresh=True retrains them all from scratch). Running one
stage alone (`--stage NAME`) needs the previous stage's model on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from mmkd.common.config import ConfigError, from_dict, merge_dicts


@dataclass
class RecipeStage:
    name: str
    config: "object"  # student.config.TrainConfig

    @property
    def done(self) -> bool:
        return (Path(self.config.output_dir) / "train_summary.json").exists()


DEFAULT_ROOT = "runs/demo"


def _substitute(value, root: str):
    if isinstance(value, str):
        return value.replace("{root}", root)
    if isinstance(value, dict):
        return {k: _substitute(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, root) for v in value]
    return value


def load_recipe(path: str | Path, root: str = DEFAULT_ROOT, workdir: str | None = None
                ) -> tuple[str, list[RecipeStage]]:
    """(recipe name, its stages with resolved configs); every key is checked."""
    from mmkd.student.config import TrainConfig

    path = Path(path)
    data = _substitute(yaml.safe_load(path.read_text()) or {}, root)
    allowed = {"name", "workdir", "init_from", "defaults", "stages"}
    unknown = set(data) - allowed
    if unknown or not data.get("stages"):
        raise ConfigError(f"{path}: a recipe has keys {sorted(allowed)} with a non-empty 'stages' list"
                          + (f"; unknown: {sorted(unknown)}" if unknown else ""))
    root = Path(workdir or data.get("workdir") or f"runs/recipes/{path.stem}")
    stages, prev = [], data.get("init_from")
    seen: set[str] = set()
    for i, raw in enumerate(data["stages"]):
        raw = dict(raw)
        name = raw.pop("name", None)
        if not name or name in seen:
            raise ConfigError(f"{path}: stage {i} needs a unique 'name'")
        seen.add(name)
        for key in ("output_dir", "init_from"):
            if key in raw:
                raise ConfigError(f"{path}: stage {name}: '{key}' is set by the recipe (workdir/<stage>, "
                                  "previous stage's output)")
        merged = merge_dicts(data.get("defaults") or {}, raw)
        merged.update(output_dir=str(root / name), init_from=prev)
        stages.append(RecipeStage(name, from_dict(TrainConfig, merged, where=f"{path}: stage {name}: ")))
        prev = str(root / name)
    return data.get("name", path.stem), stages


def run_recipe(path: str | Path, stage: str | None = None, fresh: bool = False, root: str = DEFAULT_ROOT,
               workdir: str | None = None, log=print) -> dict:
    """Run every stage in order (or only `stage`); returns {stage name: train summary}."""
    from mmkd.student.train import train

    name, stages = load_recipe(path, root, workdir)
    if stage is not None:
        names = [s.name for s in stages]
        if stage not in names:
            raise ConfigError(f"{path}: no stage {stage!r}; stages: {names}")
        chosen = [s for s in stages if s.name == stage]
    else:
        chosen = stages
    summaries = {}
    for s in chosen:
        init = s.config.init_from
        if init and not Path(init).exists():
            raise FileNotFoundError(f"stage {s.name} of {name} starts from {init}, which does not exist: run the "
                                    "previous stage first (or the whole recipe)")
        if s.done and not fresh:
            log(f"[recipe {name}] stage {s.name}: done ({s.config.output_dir}), skipping")
            continue
        log(f"[recipe {name}] stage {s.name} -> {s.config.output_dir}")
        summaries[s.name] = train(replace(s.config, resume=False) if fresh else s.config, log)
    return summaries
