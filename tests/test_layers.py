"""The layers of docs/architecture.md, kept by reading every module's imports (ast).

    mmkd.pipelines                      (top) orchestration: Ray pass, CLI, demo, recipes
    mmkd.teacher_cache   mmkd.student   the two halves, which never import each other
    mmkd.common                         the floor both halves share
    mmkd.storage                        (ground) the cache format: no model code

Imports run down only, every module's imports count (also those inside functions: a lazy
import is still an arrow), no module imports itself round a circle, and every project
import goes through the one installed namespace (`mmkd.storage`, never `storage`).

`python tests/test_layers.py ROOT` checks another checkout (e.g. an older commit's tree).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# folder -> (package, layer); a package may import packages of lower layers only
LAYERS = {"storage": ("mmkd.storage", 0), "common": ("mmkd.common", 1), "teacher_cache": ("mmkd.teacher_cache", 2),
          "student": ("mmkd.student", 2), "pipelines": ("mmkd.pipelines", 3), "mmkd": ("mmkd", 4)}


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name (mmkd.storage.reader) -> file, for every module of the layered folders."""
    out = {}
    for folder, (package, _) in LAYERS.items():
        for path in sorted((root / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import statement in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def _namespaced(module: str) -> str | None:
    """The module's name under the mmkd namespace, or None if it is no project module."""
    top = module.split(".")[0]
    if top == "mmkd":
        return module
    if top in LAYERS and top != "mmkd":
        return "mmkd." + module
    return None


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def problems(root: Path) -> list[str]:
    """Every forbidden import and circle of the tree at `root`, one line each (file:line)."""
    modules = project_modules(root)
    layer = {package: n for package, n in LAYERS.values()}
    found, edges = [], {m: set() for m in modules}
    for mod, path in modules.items():
        where = path.relative_to(root)
        for line, target, names in imports(path):
            full = _namespaced(target)
            if full is None:
                continue
            if full != target:
                found.append(f"{where}:{line}: imports {target!r}: project modules are imported through the one "
                             f"namespace, as {full!r}")
            # `from mmkd.student import checkpoint` imports the module mmkd.student.checkpoint
            targets = [f"{full}.{n}" for n in names if f"{full}.{n}" in modules] or [full]
            for t in targets:
                src_pkg, dst_pkg = _package(mod), _package(t)
                if src_pkg != dst_pkg and not layer.get(dst_pkg, 99) < layer.get(src_pkg, -1):
                    found.append(f"{where}:{line}: {src_pkg} imports {t}: {dst_pkg} is not below {src_pkg} "
                                 "(docs/architecture.md, the layers)")
                if t in modules and t != mod:
                    edges[mod].add(t)
    for cycle in _circles(edges):
        found.append("circle: " + " -> ".join(str(modules[m].relative_to(root)) for m in cycle + cycle[:1]))
    return found


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a list."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_layers_and_namespace_hold():
    found = problems(REPO)
    assert not found, "\n".join(found)


def test_checker_sees_each_kind_of_fault(tmp_path):
    """A tree with a circle, an upward arrow, a sideways arrow between the halves and an
    import outside the namespace: each is named with its file and line."""
    files = {
        "storage/a.py": "from mmkd.common import b\n",  # up
        "common/b.py": "def f():\n    import mmkd.common.c\n",  # lazy, part of a circle
        "common/c.py": "from mmkd.common.b import f\n",
        "student/d.py": "from mmkd.teacher_cache import e\n",  # sideways
        "teacher_cache/e.py": "import storage.a\n",  # outside the namespace (allowed direction)
        "pipelines/f.py": "from mmkd.student.d import x\nfrom mmkd.storage import a\n",  # fine
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    found = problems(tmp_path)
    assert any(p.startswith("storage/a.py:1: mmkd.storage imports mmkd.common.b") for p in found), found
    assert "circle: common/b.py -> common/c.py -> common/b.py" in found, found
    assert any(p.startswith("student/d.py:1: mmkd.student imports mmkd.teacher_cache.e") for p in found), found
    assert any(p.startswith("teacher_cache/e.py:1: imports 'storage.a'") for p in found), found
    assert not any(p.startswith("pipelines/") for p in found), found
    assert len(found) == 4, found


if __name__ == "__main__":
    report = problems(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO)
    print("\n".join(report) or "layers hold")
    print(f"{len(report)} problem(s)")
    sys.exit(1 if report else 0)
