"""Package hygiene: no import cycle inside icl_heads (function-local imports count too), and importing
any module has no side effect on matplotlib."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import icl_heads

SRC = Path(icl_heads.__file__).parent
PKG = "icl_heads"

# No cycle is allowed (the E2-E4 runners that caused the last one moved from analysis/ to experiments/).
KNOWN_CYCLES: list[frozenset[str]] = []


def module_names() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = (PKG,) + f.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_graph() -> dict[str, set[str]]:
    """Edges module -> every icl_heads module its code imports, anywhere in the file (module level or
    inside functions), including the packages a dotted import initialises (but not the importer's own)."""
    mods = module_names()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    root = base[: len(base) - node.level + 1]
                    target = ".".join(root + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets.add(target)
                targets |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods}
        for t in targets:
            if t == PKG or not t.startswith(PKG + "."):
                continue
            for name in ({t} | _ancestors(t)) - _ancestors(mod) - {mod}:
                if name in mods:
                    graph[mod].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle_and_local_imports() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert cycles({"a": {"b"}, "b": set()}) == []
    g = import_graph()
    assert "icl_heads.training.loop" in g["icl_heads.training"]  # a package's __init__ imports
    assert "icl_heads.model" in g["icl_heads.training.loop"]  # a module-level relative import
    assert "icl_heads.experiments.e6_mechanism" in g["icl_heads.cli.analysis"]  # a function-local import counts


def test_no_import_cycle_inside_the_package() -> None:
    found = cycles(import_graph())
    unexpected = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not unexpected, f"import cycles: {unexpected}"


def test_importing_every_module_leaves_matplotlib_alone() -> None:
    """No module switches matplotlib's backend or imports pyplot at import time (plots make Figures)."""
    names = sorted(module_names())
    code = (
        "import importlib, sys\n"
        "import matplotlib\n"
        "before = matplotlib.rcParams._get('backend')\n"
        f"for n in {names!r}:\n"
        "    importlib.import_module(n)\n"
        "assert matplotlib.rcParams._get('backend') == before, (before, matplotlib.rcParams._get('backend'))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


BELOW = {"analysis", "checkpoint", "claims", "config", "estimators", "evaluation", "experiments", "folders", "io",
         "metrics", "model", "plotting", "runs", "tasks", "training", "workers"}

# What each layer may import (docs/architecture.md says why). The orchestrators on top -- reproduce and report
# (the main job), api, zoo/ (which runs the main job on its models), cli/ (over all of them) -- may import every
# layer below them; no layer below imports them, and nothing but cli/ imports zoo/.
ALLOWED = {
    "config": set(), "io": set(), "workers": set(), "metrics": {"config"}, "tasks": {"config"},
    "folders": {"config"}, "runs": {"config"},
    "model": {"config"},
    "checkpoint": {"config", "io", "model"},
    "evaluation": {"config", "metrics", "model", "tasks"},
    "estimators": {"config", "metrics", "tasks"},
    "plotting": {"io"},
    "claims": {"config", "io", "runs"},
    "training": {"checkpoint", "config", "evaluation", "folders", "io", "model", "tasks", "workers"},
    # analysis is pure functions on loaded models and arrays: no file I/O (io, checkpoint, runs) and no experiments
    "analysis": {"claims", "config", "estimators", "evaluation", "metrics", "model", "tasks", "training"},
    "experiments": {"analysis", "checkpoint", "claims", "config", "estimators", "evaluation", "io",
                    "metrics", "model", "plotting", "runs", "tasks", "training", "workers"},
    # the orchestrators: the main job, its report, the zoo (which runs the main job on its models), the CLI
    "report": BELOW, "reproduce": BELOW | {"report"}, "api": BELOW,
    "zoo": BELOW | {"reproduce", "report"},
    "cli": BELOW | {"reproduce", "report", "zoo"},
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_each_layer_imports_only_the_layers_below_it() -> None:
    bad = sorted(f"{a} -> {b}" for a, bs in import_graph().items() for b in bs
                 if _part(a) in ALLOWED and _part(b) != _part(a) and _part(b) not in ALLOWED[_part(a)])
    assert not bad, "imports across the layering of docs/architecture.md: " + ", ".join(bad)


# Function-local imports hide the structure (issue 16: 62 of them hid three cycles). Allowed only for heavy or
# optional dependencies imported where they are used, and in the command-line front end (cli/), which defers
# the work modules (icl_heads' own) so that --help and a bad argument answer in a fraction of a second. The
# package itself (``icl_heads.load`` on first use) and ``__main__`` keep start-up light too (issue 26: a Ctrl-C
# during start-up is one line, not a traceback of torch's import).
LAZY_OK_MODULES = {"icl_heads", "icl_heads.__main__"}
LAZY_OK_IMPORTS = {"torch", "tqdm", "tqdm.auto", "scipy.linalg", "ctypes", "ctypes.util", "tomllib",
                   "transformer_lens"}  # the optional `lens` extra: ActivationCache, only when asked for
FRONT_END = "icl_heads.cli"


def _deferred_work_module(mod: str, name: str) -> bool:
    """A front-end module's function-local import of one of the package's own modules (``..experiments...``)."""
    return mod.startswith(FRONT_END) and name.startswith("..")


def test_function_local_imports_only_in_the_front_ends_or_of_heavy_dependencies() -> None:
    bad = []
    for mod, path in module_names().items():
        if mod in LAZY_OK_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom):
                    names = [("." * sub.level) + (sub.module or "")]
                elif isinstance(sub, ast.Import):
                    names = [a.name for a in sub.names]
                else:
                    continue
                bad += [f"{mod}:{sub.lineno} {n}" for n in names
                        if n not in LAZY_OK_IMPORTS and not _deferred_work_module(mod, n)]
    assert not bad, bad


def test_no_module_level_import_waits_for_the_code_above_it() -> None:
    """No ``noqa: E402``: every module's imports stand at its top (the last one, in cli.py, registered the zoo
    sub-group after the commands; cli/app.py now adds every group in one place)."""
    bad = [str(path.relative_to(SRC)) for path in module_names().values() if "noqa: E402" in path.read_text()]
    assert not bad, bad
