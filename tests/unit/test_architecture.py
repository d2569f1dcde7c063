"""The package layout and dependency direction of docs/architecture.md, checked for real."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _modules_after_import(stmt: str) -> set[str]:
    code = f"import sys; {stmt}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_trainables_core_imports_without_ray_optuna_mlflow():
    mods = _modules_after_import("import trainables, trainables.layers, trainables.losses, trainables.train")
    for banned in ("ray", "optuna", "mlflow", "service", "search_spaces"):
        assert banned not in mods, f"importing the trainables core pulled in {banned!r}"


def test_search_spaces_imports_nothing_of_ours():
    mods = _modules_after_import("import search_spaces, search_spaces.models")
    for banned in ("service", "trainables", "ray", "mlflow"):
        assert banned not in mods, f"search_spaces pulled in {banned!r}"


def test_trial_config_keys_agree_between_packages():
    from search_spaces import TRIAL_CONFIG_KEYS as space_keys
    from trainables.config import TRIAL_CONFIG_KEYS as train_keys

    assert set(space_keys) == set(train_keys)


def test_console_script_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'bonn-sweep = "service.launch.cli:main"' in text
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "bonn-sweep").exists(), "the bonn-sweep console script is not installed in the venv"


@pytest.mark.parametrize("pkg", ["service", "trainables", "search_spaces"])
def test_top_level_packages_exist(pkg):
    assert (ROOT / pkg / "__init__.py").exists()


def _docstring_equations() -> dict[int, list[str]]:
    """Every ``Eq. N`` / ``Eqs. N, M-K`` cited in a docstring of our packages -> where."""
    import ast
    import re

    cite = re.compile(r"Eqs?\.\s*((?:\d+\s*(?:-|–|,|and)\s*)*\d+)")
    where: dict[int, list[str]] = {}
    for pkg in ("trainables", "service", "search_spaces"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text())
            nodes = [tree] + [n for n in ast.walk(tree)
                              if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
            for node in nodes:
                doc = ast.get_docstring(node) or ""
                name = f"{path.relative_to(ROOT)}:{getattr(node, 'name', '<module>')}"
                for m in cite.finditer(doc):
                    nums: set[int] = set()
                    for part in re.split(r"\s*(?:,|and)\s*", m.group(1)):
                        bounds = [int(b) for b in re.split(r"\s*[-–]\s*", part)]  # "16-18" or "13"
                        nums.update(range(bounds[0], bounds[-1] + 1))
                    for n in nums:
                        if name not in where.setdefault(n, []):
                            where[n].append(name)
    return where


def test_each_paper_equation_lives_in_exactly_one_docstring():
    """docs/architecture.md: someone who knows the paper finds each equation in one obvious place."""
    where = _docstring_equations()
    implemented = {8, 9, 10, 12, 13, 15, 16, 17, 18}
    assert implemented <= set(where), f"equations without a docstring: {sorted(implemented - set(where))}"
    repeated = {n: places for n, places in where.items() if len(places) > 1}
    assert not repeated, f"equations cited in more than one docstring: {repeated}"


# -- the import graph of our three packages, read from the source (every import, lazy ones included) ----

PACKAGES = ("service", "trainables", "search_spaces")


def _our_modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (``from a.b import c`` names a.b.c when that is a module)."""
    import ast

    mods = _our_modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for a in node.names:
                    targets.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def _imports_anything_of(graph: dict[str, set[str]], module: str, prefixes: tuple[str, ...]) -> set[str]:
    return {t for t in graph[module] if any(t == p or t.startswith(p + ".") for p in prefixes)}


def test_no_import_cycle():
    """No circle of imports anywhere in our packages (Tarjan's strongly connected components)."""
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


MAX_LINES = 500
LONG_FILE_MARK = "longer than 500 lines because"


def test_no_source_file_over_500_lines_without_a_stated_reason():
    import ast

    too_long = []
    for name, path in _our_modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_LINES and LONG_FILE_MARK not in (ast.get_docstring(ast.parse(text)) or ""):
            too_long.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not too_long, f"over {MAX_LINES} lines with no '{LONG_FILE_MARK} ...' in the module docstring: {too_long}"


# -- the rooms of the house and what each may import (docs/architecture.md) --------------------------

ROOMS_MAY_NOT_IMPORT = {
    # what every program shares: nothing of the programs themselves
    "service.core": ("service.api", "service.sweep", "service.launch"),
    # the API talks to Ray over HTTP (Jobs API) and never runs a sweep or a launcher
    "service.api": ("service.sweep", "service.launch"),
    # the driver on the cluster needs neither the API nor the operator's launcher
    "service.sweep": ("service.api", "service.launch"),
    # the launcher starts the API and Ray as processes, never imports them as code
    "service.launch": ("service.api", "service.sweep", "trainables"),
    "trainables": ("service", "search_spaces"),
    "search_spaces": ("service", "trainables"),
}


@pytest.mark.parametrize("room", sorted(ROOMS_MAY_NOT_IMPORT))
def test_rooms_import_only_what_they_may(room):
    graph = _import_graph()
    banned = ROOMS_MAY_NOT_IMPORT[room]
    bad = {m: sorted(_imports_anything_of(graph, m, banned))
           for m in graph if m == room or m.startswith(room + ".")}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"{room} may not import {banned}: {bad}"


def _imports_external(path: Path, top: str) -> bool:
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == top for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == top:
            return True
    return False


# service/launch/ray_loopback.py is `ray start` itself (a separate process the launcher spawns, patched to
# bind loopback only), so it imports ray; no other launcher module does.
RAY_IN_SERVICE_OUTSIDE_SWEEP = {"service.launch.ray_loopback"}


def test_only_the_sweep_imports_ray_in_service():
    mods = _our_modules()
    importers = {m for m, p in mods.items() if m.startswith("service") and _imports_external(p, "ray")}
    outside = {m for m in importers if not m.startswith("service.sweep")} - RAY_IN_SERVICE_OUTSIDE_SWEEP
    assert not outside, f"ray imported outside service/sweep: {sorted(outside)}"
    assert any(m.startswith("service.sweep") for m in importers)


def test_api_and_launcher_import_without_ray():
    mods = _modules_after_import("import service.api.app, service.launch.cli, service.core.payload")
    assert "ray" not in mods and "trainables" not in mods


def test_only_tune_imports_ray_in_trainables():
    mods = _our_modules()
    importers = {m for m, p in mods.items() if m.startswith("trainables") and _imports_external(p, "ray")}
    assert importers == {"trainables.tune"}


# The reference math (the paper's equations, layer by layer) never depends on the fast path; the Trainer
# chooses the fast path, and trainables.fast imports the reference side.
TRAINABLES_ALLOWED_TO_IMPORT_FAST = {"trainables.train", "trainables.fast"}


def test_reference_math_does_not_import_the_fast_path():
    graph = _import_graph()
    users = {m for m in graph if m.startswith("trainables") and not m.startswith("trainables.fast.")
             and _imports_anything_of(graph, m, ("trainables.fast",))}
    assert users <= TRAINABLES_ALLOWED_TO_IMPORT_FAST, f"only {TRAINABLES_ALLOWED_TO_IMPORT_FAST} may: {users}"
