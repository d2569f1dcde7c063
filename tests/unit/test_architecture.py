"""The package layout and dependency direction of docs/design.md, checked for real."""
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
    mods = _modules_after_import("import search_spaces, search_spaces.schema")
    for banned in ("service", "trainables", "ray", "mlflow"):
        assert banned not in mods, f"search_spaces pulled in {banned!r}"


def test_trial_config_keys_agree_between_packages():
    from search_spaces.schema import TRIAL_CONFIG_KEYS as space_keys
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
    """design.md: someone who knows the paper finds each equation in one obvious place."""
    where = _docstring_equations()
    implemented = {8, 9, 10, 12, 13, 15, 16, 17, 18}
    assert implemented <= set(where), f"equations without a docstring: {sorted(implemented - set(where))}"
    repeated = {n: places for n, places in where.items() if len(places) > 1}
    assert not repeated, f"equations cited in more than one docstring: {repeated}"
