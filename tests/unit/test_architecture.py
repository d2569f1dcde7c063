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
    assert 'bonn-sweep = "service.cli:main"' in text
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "bonn-sweep").exists(), "the bonn-sweep console script is not installed in the venv"


@pytest.mark.parametrize("pkg", ["service", "trainables", "search_spaces"])
def test_top_level_packages_exist(pkg):
    assert (ROOT / pkg / "__init__.py").exists()
