"""The `mmkd` command line. Every subcommand maps YAML + flags onto a typed config."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _config(args, cls):
    from mmkd.common.config import load_config

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "cache_command", "config", "func")}
    return load_config(cls, args.config, flags)


def cmd_demo(args) -> int:
    from mmkd.pipelines.config import DemoConfig
    from mmkd.pipelines.demo import run_demo

    run_demo(_config(args, DemoConfig))
    return 0


def cmd_teacher_pass(args) -> int:
    from mmkd.pipelines.config import TeacherPassConfig
    from mmkd.pipelines.teacher_pass import run_teacher_pass

    cfg = _config(args, TeacherPassConfig)
    _require(cfg, "teacher", "data", "output")  # image_root: the reader asks when the data has image paths
    run_teacher_pass(cfg)
    return 0


def cmd_train(args) -> int:
    from mmkd.student.config import TrainConfig
    from mmkd.student.train import train

    cfg = _config(args, TrainConfig)
    _require(cfg, "data", "processor", "output_dir")
    train(cfg)
    return 0


def cmd_recipe(args) -> int:
    from mmkd.pipelines.recipe import run_recipe

    run_recipe(args.recipe, stage=args.stage, fresh=args.fresh, root=args.root, workdir=args.workdir)
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from mmkd.student.config import EvalConfig
    from mmkd.student.evaluate import check_config, evaluate
    from mmkd.student.plot import EVAL_NAME

    cfg = _config(args, EvalConfig)
    _require(cfg, "model", "data")
    check_config(cfg)
    metrics = evaluate(cfg.model, cfg.inputs, cfg.cache, cfg.batch_size, cfg.max_length, teacher=cfg.teacher)
    text = json.dumps({"model": cfg.model, "data": cfg.inputs.data, "cache": cfg.cache, **metrics}, indent=1)
    print(text)
    out = cfg.out
    if out is None and (Path(cfg.model) / "train_summary.json").exists():  # a run folder of `mmkd train`
        out = str(Path(cfg.model) / EVAL_NAME)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
        print(f"metrics written to {out}", file=sys.stderr)
    return 0


def cmd_plot(args) -> int:
    from mmkd.student.plot import PlotError, plot_runs

    try:
        out = plot_runs(args.run_dirs, args.out)
    except PlotError as e:
        print(f"mmkd plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def cmd_check(args) -> int:
    from mmkd.common.check import format_checks, run_checks

    try:
        checks = run_checks(args.teacher, args.student, args.cache, args.max_length, args.trust_remote_code)
    except (ImportError, OSError, ValueError) as e:  # a folder transformers cannot open says why
        print(f"mmkd check: cannot open a side: {e}", file=sys.stderr)
        return 2
    print(format_checks(checks))
    bad = [c for c in checks if not c.ok and c.fatal]
    print("compatible" if not bad else f"{len(bad)} mismatch(es): the student cannot distil from this teacher as set up")
    return 1 if bad else 0


def cmd_cache_inspect(args) -> int:
    from mmkd.storage.inspect import inspect_cache

    summary = inspect_cache(args.path)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        for key, value in summary.items():
            print(f"{key:>28}: {value}")
    return 0


def cmd_cache_verify(args) -> int:
    from mmkd.storage.reader import TeacherCache

    problems = TeacherCache(args.path, check=False).verify()
    for p in problems:
        print(p, file=sys.stderr)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_cache_merge(args) -> int:
    from mmkd.storage.ops import merge_caches

    m = merge_caches(args.inputs, args.output)
    print(f"merged {len(args.inputs)} caches: {m.num_rows} samples in {len(m.shards)} shards -> {args.output}")
    return 0


def cmd_cache_subset(args) -> int:
    from mmkd.storage.ops import subset_cache

    with open(args.ids) as f:
        ids = [line.strip() for line in f if line.strip()]
    m = subset_cache(args.input, args.output, ids, args.ids)
    print(f"subset: {m.num_rows} samples in {len(m.shards)} shards -> {args.output}")
    return 0


def cmd_cache_export(args) -> int:
    from mmkd.storage.export import export_cache

    info = export_cache(args.input, args.output, args.format)
    print(f"exported {info.rows} samples as {len(info.files)} {info.file_format} files -> {args.output}")
    return 0


def cmd_cache_push(args) -> int:
    from mmkd.storage.hub import push_cache

    url = push_cache(args.path, args.repo_id, private=args.private, revision=args.revision)
    print(f"published: {url}  (read it with mmkd train --cache {url})")
    return 0


def _require(cfg, *names) -> None:
    from mmkd.common.config import ConfigError, to_dict

    values = to_dict(cfg)
    missing = [n for n in names if not values[n]]
    if missing:
        raise ConfigError("missing required setting(s): " + ", ".join("--" + n.replace("_", "-") for n in missing)
                          + " (flags or the --config YAML)")


class _Version(argparse.Action):
    """--version, reading the installed version only when asked (storage.manifest imports pyarrow)."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from mmkd.storage.manifest import mmkd_version

        print(f"mmkd {mmkd_version()}")  # stdout, as argparse's own version action
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The whole command line. Imports only the (torch-free) config modules: `--help` of any
    subcommand answers without loading torch, transformers, Ray or pyarrow."""
    from mmkd.common.config import add_flags
    from mmkd.pipelines.config import DemoConfig, TeacherPassConfig
    from mmkd.student.config import EvalConfig, TrainConfig

    p = argparse.ArgumentParser(prog="mmkd", description="Offline distillation of multimodal LLMs.")
    p.add_argument("--version", action=_Version, help="print mmkd's version and exit")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name, cls, func, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--config", help="YAML file of settings (flags override it)")
        add_flags(sp, cls)
        sp.set_defaults(func=func)

    with_config("demo", DemoConfig, cmd_demo, "Run the whole loop on the synthetic data set and print the results table.")
    with_config("teacher-pass", TeacherPassConfig, cmd_teacher_pass,
                "Run the teacher once over a data set and write (or resume) a cache.")
    with_config("train", TrainConfig, cmd_train, "Train one stage: CE only, CE + distillation terms from a cache, "
                "or preference distillation.")

    rc = sub.add_parser("recipe", help="Run a stage recipe (configs/recipes/*.yaml): every stage in order, "
                                       "each from the previous stage's model; finished stages are skipped.")
    rc.add_argument("recipe", help="recipe YAML, e.g. configs/recipes/llava_kd.yaml")
    rc.add_argument("--stage", help="run only this stage (the previous stage's model must exist)")
    rc.add_argument("--root", default="runs/demo", help="replaces {root} in the recipe (default: runs/demo)")
    rc.add_argument("--workdir", help="where stage folders go (default: the recipe's workdir)")
    rc.add_argument("--fresh", action="store_true", help="retrain stages that are already done")
    rc.set_defaults(func=cmd_recipe)

    with_config("eval", EvalConfig, cmd_eval, "Exact match (and KL to the teacher, from a cache or the teacher "
                "itself) of a saved model on a split.")

    pl = sub.add_parser("plot", help="Loss curves of training runs (train_log.jsonl) and their evaluation table "
                                     "(eval.json, or a demo's results.json) as one PNG; several runs overlay.")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output folder of `mmkd train` (or `mmkd demo`)")
    pl.add_argument("--out", help="PNG file (default: RUN_DIR/plot.png; needed with several folders)")
    pl.set_defaults(func=cmd_plot)

    ck = sub.add_parser("check", help="Check that a student can learn from a teacher (and its cache): vocabulary, "
                                      "special tokens, chat template, image tokens, visual token count, heads, "
                                      "max length. Reads configs and processors only; exit 1 on a mismatch.")
    ck.add_argument("teacher", help="teacher model folder")
    ck.add_argument("student", help="student model folder, or a processor folder for a student built from one")
    ck.add_argument("--cache", help="also check the student against this teacher cache")
    ck.add_argument("--max-length", type=int, help="longest sample you plan to use, in tokens (with --cache, the "
                                                   "cache's longest sequence is checked too)")
    ck.add_argument("--trust-remote-code", action="store_true", help="allow checkpoints' own Python code")
    ck.set_defaults(func=cmd_check)

    cache = sub.add_parser("cache", help="Inspect, verify, merge, subset, export or publish teacher caches.")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    ins = csub.add_parser("inspect", help="Manifest summary, sizes, bytes per token, teacher statistics.")
    ins.add_argument("path", help="cache folder or URL")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.set_defaults(func=cmd_cache_inspect)
    ver = csub.add_parser("verify", help="Check checksums, schema, row counts, decoding, duplicate samples; "
                                         "exit status 1 naming the offending files.")
    ver.add_argument("path", help="cache folder or URL")
    ver.set_defaults(func=cmd_cache_verify)
    mer = csub.add_parser("merge", help="Join caches made with identical settings into a new cache.")
    mer.add_argument("inputs", nargs="+", metavar="input", help="caches to join (no sample may appear in two)")
    mer.add_argument("output", help="new cache folder (or fsspec URL); last, like every other command's output")
    mer.set_defaults(func=cmd_cache_merge)
    sbs = csub.add_parser("subset", help="Write a new cache holding only the listed samples.")
    sbs.add_argument("input", help="cache folder or URL")
    sbs.add_argument("output", help="new cache folder (or fsspec URL)")
    sbs.add_argument("--ids", required=True, help="text file with one sample id per line")
    sbs.set_defaults(func=cmd_cache_subset)
    exp = csub.add_parser("export", help="Write the targets as plain columns (ids by probability, float32 "
                                         "log-probs) that any Parquet/JSON reader reads without mmkd.")
    exp.add_argument("input", help="cache folder or URL")
    exp.add_argument("output", help="new folder (or fsspec URL) for the plain files")
    exp.add_argument("--format", default="parquet", help="parquet (default) or jsonl")
    exp.set_defaults(func=cmd_cache_export)
    push = csub.add_parser("push", help="Publish a complete, verified cache as a Hugging Face Hub dataset (one "
                                        "commit); read it back as hf://datasets/REPO_ID.")
    push.add_argument("path", help="local cache folder")
    push.add_argument("repo_id", help="Hub dataset repository, e.g. my-org/llava-13b-topk64 (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    push.set_defaults(func=cmd_cache_push)
    return p


def quiet_when_logged() -> None:
    """Output that is not a terminal (a log file, CI, a pipe) gets lines, not carriage-return
    progress bars: Hugging Face's bars (transformers' "Loading weights" and "Writing model
    shards", datasets') are switched off; a variable already set wins."""
    if sys.stdout.isatty() and sys.stderr.isatty():
        return
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(var, "1")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    quiet_when_logged()  # before transformers, datasets or Ray are imported: they read these once
    from mmkd.common.config import ConfigError
    from mmkd.common.samples import SampleError
    from mmkd.pipelines.quarantine import WorkerError
    from mmkd.storage.schema import CacheError

    try:
        return args.func(args)
    except (ConfigError, CacheError, SampleError, WorkerError) as e:
        print(f"mmkd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
