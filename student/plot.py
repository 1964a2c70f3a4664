"""`mmkd plot RUN_DIR [RUN_DIR ...] [--out PNG]`: a training run's curves and evaluation
table as one PNG.

Curves: one panel per scalar of train_log.jsonl (student/run_log.py): the loss, each loss
term, lr, then the timings; x = optimizer step. Several run folders share the panels, one
line (colour) per run, to compare runs. A panel whose values are all positive and span more
than a factor of 20 gets a log scale.

Table: the evaluation results found in the folders, one row per model (columns of
student.evaluate.metrics_table): a run folder's eval.json (what `mmkd eval` writes into a
run folder by default) as a row named after the run, and a demo folder's results.json (all
its rows). A folder with a table and no train_log.jsonl (the demo's workdir) gives the
table alone.

Rendering uses matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from mmkd.student.evaluate import metrics_table
from mmkd.student.run_log import LOG_NAME, is_loss_key, read_train_log

EVAL_NAME = "eval.json"  # `mmkd eval --out` default inside a run folder
DEMO_RESULTS = "results.json"  # `mmkd demo`: {"config": ..., "results": {name: metrics}}
COLUMNS = 3  # curve panels per row


class PlotError(ValueError):
    """A run folder holds nothing to plot, or a file in it is not what mmkd writes."""


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Short distinct names: the folder name, or the path below the folders' common parent
    when names repeat (runs/a/dft, runs/b/dft -> a/dft, b/dft)."""
    names = [d.resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    parent = os.path.commonpath([str(d.resolve()) for d in run_dirs])
    return [os.path.relpath(d.resolve(), parent) for d in run_dirs]


def read_eval_results(run_dir: Path, label: str) -> dict[str, dict]:
    """{row name: metrics} of run_dir's eval.json (one row, named label) and results.json."""
    rows = {}
    for name in (EVAL_NAME, DEMO_RESULTS):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlotError(f"{path}: not JSON ({e})") from e
        found = {label: data} if name == EVAL_NAME else data.get("results") if isinstance(data, dict) else None
        if not isinstance(found, dict) or not all(isinstance(r, dict) and "accuracy" in r for r in found.values()):
            raise PlotError(f"{path}: not an evaluation result (expected the metrics of `mmkd eval`"
                            + (" under 'results'" if name == DEMO_RESULTS else "") + ")")
        rows.update(found)
    return rows


def curve_keys(logs: list[list[dict]]) -> list[str]:
    """The plotted scalars, in first-seen order: the loss and its terms first, then the rest."""
    keys = list(dict.fromkeys(k for log in logs for r in log for k, v in r.items()
                              if k not in ("step", "epoch") and isinstance(v, (int, float))))
    return [k for k in keys if is_loss_key(k)] + [k for k in keys if not is_loss_key(k)]


def plot_runs(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Render the curves of every run folder with a train_log.jsonl and the table of every
    evaluation result among them into one PNG; returns its path. out: default
    RUN_DIR/plot.png for one folder (required for several)."""
    from matplotlib.figure import Figure

    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise PlotError("give at least one run folder")
    if out is None:
        if len(dirs) > 1:
            raise PlotError("several run folders: name the output with --out FILE.png")
        out = dirs[0] / "plot.png"
    labels = run_labels(dirs)
    logs, table = {}, {}
    for d, label in zip(dirs, labels):
        if not d.is_dir():
            raise PlotError(f"{d}: no such folder")
        results = read_eval_results(d, label)
        table.update(results)
        if (d / LOG_NAME).is_file() or not results:
            try:
                logs[label] = read_train_log(d)
            except (FileNotFoundError, ValueError) as e:
                raise PlotError(f"{e} (or a folder with {EVAL_NAME} / {DEMO_RESULTS}: `mmkd eval --out`, "
                                "`mmkd demo`)") from e

    keys = curve_keys(list(logs.values()))
    curve_rows = math.ceil(len(keys) / COLUMNS)
    table_h = 0.6 + 0.3 * len(table) if table else 0.0
    fig = Figure(figsize=(5 * COLUMNS, 3.2 * curve_rows + table_h), layout="constrained")
    grid = fig.add_gridspec(curve_rows + bool(table), COLUMNS,
                            height_ratios=[3.2] * curve_rows + ([table_h] if table else []))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(grid[i // COLUMNS, i % COLUMNS])
        values = []
        for color, (label, log) in enumerate(logs.items()):  # a run keeps its colour in every panel
            points = [(r["step"], r[key]) for r in log if key in r]
            if points:
                ax.plot(*zip(*points), label=label, color=f"C{color % 10}", linewidth=1)
                values += [v for _, v in points]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(logs) > 1 and i == 0:
            ax.legend(fontsize=8)
    if table:
        ax = fig.add_subplot(grid[curve_rows, :])
        ax.axis("off")
        head, rows = metrics_table(table)
        t = ax.table(cellText=rows, colLabels=head, loc="center", cellLoc="center")
        t.auto_set_font_size(False)
        t.set_fontsize(8)
        t.auto_set_column_width(list(range(len(head))))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
