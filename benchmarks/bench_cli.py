"""How long `mmkd ... --help` takes, in a fresh process each time (what a user waits for).

    python benchmarks/bench_cli.py [--runs 5]

Prints, per command line, the median and the slowest of `--runs` wall times of
`python -m mmkd.pipelines.cli ARGS` and the heavy libraries that process imported (none is
the point: the parser is built from the torch-free config modules, student/config.py and
pipelines/config.py). The floor, a bare `python -c pass`, is printed first.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = [["--help"], ["train", "--help"], ["teacher-pass", "--help"], ["demo", "--help"], ["eval", "--help"],
            ["cache", "merge", "--help"], ["--version"]]
HEAVY = ("torch", "transformers", "ray", "pyarrow", "deepspeed", "datasets")
PROBE = ("import runpy, sys\nsys.argv = ['mmkd', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('mmkd.pipelines.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "print('HEAVY=' + ','.join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)\n")


def timed(argv: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    heavy = next((line[6:] for line in proc.stderr.splitlines() if line.startswith("HEAVY=")), "")
    return wall, heavy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print("| command | median s | max s | heavy modules imported |\n|---|---|---|---|")
    rows = [("python -c pass", [sys.executable, "-c", "pass"])]
    rows += [("mmkd " + " ".join(c), [sys.executable, "-c", PROBE.format(heavy=HEAVY), *c]) for c in COMMANDS]
    for name, argv in rows:
        runs = [timed(argv) for _ in range(args.runs)]
        walls = [w for w, _ in runs]
        print(f"| `{name}` | {statistics.median(walls):.2f} | {max(walls):.2f} | {runs[-1][1] or 'none'} |")


if __name__ == "__main__":
    main()
